"""The whole relay on real parts: the local host, Azurite, the Direct Line emulator, the provider simulator."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from devstack.channels import DEV_VALUES, ProviderSimulator
from devstack.directline import DirectLineEmulator
from devstack.procs import ManagedProcess, free_port, wait_until
from relay.settings import StorageSettings
from relay.store import RelayStore
from relay.store.conversations import ConversationKey, ConversationRecord
from tests.conftest import subprocess_env

PROVIDERS = ("twilio", "whatsapp", "messagebird", "bird", "generic")
EVERY_SECOND = "* * * * * *"
NEVER = "0 0 0 1 1 *"  # the timer stays out of the way: only the webhook's burst delivers


@dataclass
class RelayStack:
    emulator: DirectLineEmulator
    simulator: ProviderSimulator
    host: ManagedProcess
    store: RelayStore
    env: dict[str, str]
    restart_host: Callable[[], ManagedProcess]

    def send(self, provider: str, user: str, text: str, **options) -> dict:
        answer = self.simulator.send_inbound(provider, user, text, **options)
        assert answer["status"] == 200, answer
        return answer

    def replay(self, answer: dict) -> requests.Response:
        """Deliver a webhook again, byte for byte, as a provider's retry does."""
        hook = answer["webhook"]
        return requests.post(hook["url"], data=base64.b64decode(hook["body_b64"]), headers=hook["headers"],
                             timeout=30)

    def replies(self, provider: str, user: str) -> list[str]:
        return [r["text"] for r in self.simulator.replies(provider, user) if r["direction"] == "bot"]

    def wait_for_replies(self, provider: str, user: str, count: int, timeout: float = 30) -> list[str]:
        wait_until(lambda: len(self.replies(provider, user)) >= count, timeout=timeout,
                   what=f"{count} replies to {user} on {provider}")
        return self.replies(provider, user)

    def record(self, provider: str, user: str) -> ConversationRecord | None:
        return self.store.conversations.get_record(ConversationKey(provider, user))

    def user_messages_at_bot(self, conversation_id: str) -> list[str]:
        """The texts the bot received in a conversation (the emulator's own activity set)."""
        activities = self.emulator.conversation(conversation_id)["activities"]
        return [a.get("text", "") for a in activities
                if a.get("type") == "message" and (a.get("from") or {}).get("role") != "bot"]


@pytest.fixture
def relay_stack(storage_connection_string, table_prefix, start_emulator, start_host,
                tmp_path: Path) -> Iterator[Callable[..., RelayStack]]:
    simulators: list[ProviderSimulator] = []

    def start(*, schedule: str = EVERY_SECOND, burst: str = "2", emulator_options: dict | None = None,
              env: dict[str, str] | None = None) -> RelayStack:
        emulator = start_emulator(**{"extra_args": ("--late-reply-seconds", "1"), **(emulator_options or {})})
        port = free_port()
        host_url = f"http://127.0.0.1:{port}"
        simulator = ProviderSimulator(relay_url=host_url, env=subprocess_env(),
                                      log_path=tmp_path / f"simulator-{len(simulators)}.log")
        simulators.append(simulator.start())
        host_env = {
            **DEV_VALUES, **simulator.api_bases(),
            "AzureWebJobsStorage": storage_connection_string,
            "RELAY_TABLE_PREFIX": table_prefix,
            "DIRECTLINE_SECRET": emulator.secret,
            "DIRECTLINE_ENDPOINT": emulator.base_url,
            "DIRECTLINE_TIMEOUT_SECONDS": "5",
            "RELAY_PUBLIC_BASE_URL": host_url,
            "RELAY_POLL_SCHEDULE": schedule,
            "RELAY_BURST_POLL_SECONDS": burst,
            **(env or {}),
        }
        store = RelayStore.from_settings(StorageSettings(connection_string=storage_connection_string,
                                                         table_service_uri="", credential="", client_id="",
                                                         table_prefix=table_prefix))
        stack = RelayStack(emulator, simulator, start_host(env=host_env, port=port), store, host_env,
                           restart_host=lambda: start_host(env=host_env, port=port))
        return stack

    yield start
    for simulator in simulators:
        simulator.stop()
