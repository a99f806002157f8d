"""The whole relay on real parts: the local host, Azurite, the Direct Line emulator, the provider simulator
(`relay_stack`); or its worker alone, in this process, against Azurite and the emulator's and the
simulator's cores mounted as `requests` transports (`inprocess_relay`), where each run takes milliseconds."""

from __future__ import annotations

import base64
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from devstack.channels import DEV_VALUES, ProviderSimulator, webhooks
from devstack.channels.transport import InProcessSimulator
from devstack.directline import DirectLineEmulator
from devstack.directline.server import DIRECTLINE_ENDPOINTS
from devstack.directline.transport import InProcessEmulator
from devstack.procs import ManagedProcess, free_port, wait_until
from relay.activities import directline_user_id
from relay.channels import get_adapter
from relay.channels.base import WebhookRequest
from relay.clock import SYSTEM_CLOCK, ManualClock
from relay.conversations import RelayContext, WorkResult, new_owner, work_conversation
from relay.directline import DirectLineClient, RetryPolicy
from relay.inbound import accept_message, parse_messages
from relay.poller import TickResult, poll_tick
from relay.settings import Settings, StorageSettings
from relay.store import RelayStore
from relay.store.conversations import ConversationKey, ConversationRecord
from relay.store.due_polls import InboundMark
from tests.conftest import DIRECTLINE_TEST_SECRET, subprocess_env

PROVIDERS = ("twilio", "whatsapp", "messagebird", "bird", "generic", "vonage", "line", "telegram")
NO_GREETING = {"RELAY_START_EVENT": ""}
"""The stacks here start without the greeting event (the echo bot's first reply is then its echo); a test of
the greeting passes env={"RELAY_START_EVENT": "startConversation"}."""
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


def directline_settings(emulator: DirectLineEmulator | InProcessEmulator, secret: str,
                        token_endpoint: bool) -> dict[str, str]:
    """The relay's Direct Line settings for `emulator`: its secret and base URL, or (`token_endpoint`) its agent
    token endpoint alone: no secret, and the base discovered from regionalchannelsettings."""
    if token_endpoint:
        return {"DIRECTLINE_TOKEN_ENDPOINT": emulator.token_endpoint, "DIRECTLINE_SECRET": "",
                "DIRECTLINE_ENDPOINT": ""}
    return {"DIRECTLINE_SECRET": secret, "DIRECTLINE_ENDPOINT": emulator.base_url}


@pytest.fixture
def relay_stack(storage_connection_string, table_prefix, start_emulator, start_host,
                tmp_path: Path) -> Iterator[Callable[..., RelayStack]]:
    simulators: list[ProviderSimulator] = []

    def start(*, schedule: str = EVERY_SECOND, burst: str = "2", emulator_options: dict | None = None,
              env: dict[str, str] | None = None, token_endpoint: bool = False) -> RelayStack:
        """`token_endpoint`: the relay in token endpoint mode, with no secret (and the Direct Line base discovered:
        no DIRECTLINE_ENDPOINT), in front of the emulator's Copilot-like bot unless `emulator_options` say."""
        if token_endpoint:
            emulator_options = {"copilot": True, "copilot_delay": (0.5, 1.0), **(emulator_options or {})}
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
            "RELAY_POLL_QUEUE": f"poll-{table_prefix}",  # the chases and batches of this test's own
            **directline_settings(emulator, emulator.secret, token_endpoint),
            "DIRECTLINE_TIMEOUT_SECONDS": "5",
            "RELAY_PUBLIC_BASE_URL": host_url,
            "RELAY_POLL_SCHEDULE": schedule,
            "RELAY_BURST_POLL_SECONDS": burst,
            **NO_GREETING,
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


# ------------------------------------------------------------------------------- the worker in-process

RELAY_URL = "http://relay.invalid"  # the public base URL webhooks are signed for; nothing listens there


class ManualTime(ManualClock):
    """The relay's clock in the in-process tests: it stands still until a test moves it, and the relay's
    sleeps move it instead of waiting. Starts at the real time (whole seconds, so times read back from
    storage compare exactly), as the emulator's clock does; every move is passed on to `followers`
    (the emulator's clock), so tokens expire and activities age at Direct Line as the relay's time passes."""

    def __init__(self) -> None:
        super().__init__(SYSTEM_CLOCK.now().replace(microsecond=0))
        self.followers: list[Callable[[float], object]] = []

    def __call__(self) -> datetime:
        return self.now()

    def advance(self, seconds: float) -> datetime:  # type: ignore[override]  # returns the new time for tests
        super().advance(seconds)
        self._moved(seconds)
        return self.now()

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self._moved(seconds)

    def _moved(self, seconds: float) -> None:
        if seconds > 0:
            for follow in self.followers:
                follow(seconds)


@dataclass
class InProcessRelay:
    """RelayContext on Azurite, the emulator's core (built-in echo bot) and the simulator's core, with time in hand.

    The helpers do what a webhook and the timer do, one step at a time, so a test sees each decision."""

    ctx: RelayContext
    emulator: InProcessEmulator
    simulator: InProcessSimulator
    time: ManualTime
    arrivals: dict[ConversationKey, list[InboundMark]] = field(default_factory=dict)
    """The inbound rows of messages accepted but not yet worked, as the poller's claim would hand them over."""

    @property
    def store(self) -> RelayStore:
        return self.ctx.store

    def message(self, channel: str, user: str, text: str, *, reply_id: str = "") -> ConversationKey:
        """A user's signed webhook parsed and its message accepted (stored, due now), as a webhook does,
        but nothing worked yet; then a second passes (a worker starting in the very instant the message
        was stored would take it for one written while it worked). For twilio, whatsapp, bird and generic
        (the providers whose replies name the user). `reply_id` (whatsapp, vonage's whatsapp users, line,
        telegram): a tap on that button, list row or inline keyboard button of the newest message offering
        it (line: the postback of that quick reply button), instead of text."""
        reply = self.simulator.state.interactive_reply(user, reply_id, channel) if reply_id else None
        assert reply is not None or not reply_id, f"no {channel} message to {user} offered {reply_id}"
        hook = webhooks.build(channel, DEV_VALUES, RELAY_URL, sender=user, text=text, reply=reply)
        for token in hook.reply_tokens:
            self.simulator.state.issue_reply_token(token, user)
        if hook.callback_query_id:  # as the simulator's phone does: the tap is Telegram's to be answered
            self.simulator.state.telegram.tapped(hook.callback_query_id)
        request = WebhookRequest("POST", hook.url, hook.headers, hook.body)
        [message] = parse_messages(self.ctx.adapter(channel), channel, request)
        key = ConversationKey(channel, message.user_id)
        mark = accept_message(self.ctx, key, message)
        assert mark is not None
        self.arrivals.setdefault(key, []).append(mark)
        self.time.advance(1)
        return key

    def bot_says(self, conversation_id: str, text: str) -> str:
        """The bot sends a message of its own (through the emulator's Bot Connector endpoint); its activity id."""
        return self.bot_sends(conversation_id, {"type": "message", "text": text})

    def bot_sends(self, conversation_id: str, activity: dict) -> str:
        """The bot sends an activity of its own (a card, suggested actions...) through the Bot Connector endpoint."""
        response = self.emulator.http.post(f"{self.emulator.url}/v3/conversations/{conversation_id}/activities",
                                           json=activity, timeout=5)
        response.raise_for_status()
        return response.json()["id"]

    def activities_at_bot(self, conversation_id: str) -> list[dict]:
        """The user's message activities in a Direct Line conversation, as the bot received them."""
        return [a for a in self.emulator.conversation(conversation_id)["activities"]
                if a.get("type") == "message" and (a.get("from") or {}).get("role") != "bot"]

    def work(self, key: ConversationKey, **options) -> WorkResult:
        """One worker run under a lease taken now, as the timer runs a claimed conversation (`options`:
        work_conversation's, e.g. idle_check=False)."""
        owner = new_owner("test")
        record = self.store.conversations.acquire_lease(key, owner=owner, now=self.time(),
                                                        lease_seconds=self.ctx.settings.relay.lease_seconds,
                                                        create_with_user_id=directline_user_id(
                                                            key.channel, key.user, key_for=self.store.tables.key_for))
        assert record is not None, "another owner holds the lease"
        return work_conversation(self.ctx, record, owner=owner, inbound=self.arrivals.pop(key, []), **options)

    def tick(self) -> TickResult:
        """One run of the poller timer at the current time."""
        return poll_tick(self.ctx, workers=2)

    def record(self, key: ConversationKey) -> ConversationRecord:
        record = self.store.conversations.get_record(key)
        assert record is not None
        return record

    def replies(self, key: ConversationKey) -> list[str]:
        """The texts the provider received for the user, oldest first."""
        return [r["text"] for r in self.simulator.replies(key.channel, key.user)]

    def messages_at_bot(self, conversation_id: str) -> list[str]:
        """The user's texts in a Direct Line conversation, as the bot received them."""
        return [a.get("text", "") for a in self.emulator.conversation(conversation_id)["activities"]
                if a.get("type") == "message" and (a.get("from") or {}).get("role") != "bot"]

    def calls(self) -> dict[str, int]:
        """The relay's Direct Line requests by endpoint since the counters were last reset (not the bot's)."""
        return {endpoint: count for endpoint, count in self.emulator.counters()["requests"].items()
                if endpoint in DIRECTLINE_ENDPOINTS}


@pytest.fixture
def inprocess_relay(storage_connection_string, table_prefix) -> Iterator[Callable[..., InProcessRelay]]:
    """Build an InProcessRelay: inprocess_relay(env={RELAY_* settings}, **InProcessEmulator options).

    `token_endpoint=True`: the relay in token endpoint mode (no secret, the Direct Line base discovered), in
    front of the emulator's Copilot-like bot (answering 50-150 ms late) unless the options say otherwise.
    Direct Line calls are not retried (RetryPolicy(attempts=1)), so each decision meets each fault."""
    built: list[InProcessRelay] = []

    def start(*, env: dict[str, str] | None = None, token_endpoint: bool = False,
              **emulator_options) -> InProcessRelay:
        if token_endpoint:
            emulator_options = {"copilot": True, "copilot_delay": (0.05, 0.15), **emulator_options}
        emulator = InProcessEmulator(secret=DIRECTLINE_TEST_SECRET, **emulator_options)
        simulator = InProcessSimulator()
        settings = Settings.from_environ({
            **DEV_VALUES, **simulator.api_bases(),
            "AzureWebJobsStorage": storage_connection_string,
            "RELAY_TABLE_PREFIX": table_prefix,
            **directline_settings(emulator, DIRECTLINE_TEST_SECRET, token_endpoint),
            "RELAY_PUBLIC_BASE_URL": RELAY_URL,
            **NO_GREETING,
            **(env or {}),
        })
        time = ManualTime()
        time.followers.append(emulator.advance_clock)
        time.followers.append(simulator.advance_clock)
        directline = DirectLineClient(settings.directline, retry=RetryPolicy(attempts=1), clock=time,
                                      transport=emulator.transport)
        adapters = functools.cache(lambda name: get_adapter(name, settings, session=simulator.http, clock=time))
        ctx = RelayContext(settings=settings, store=RelayStore.from_settings(settings.storage, clock=time),
                           directline=directline, adapter=adapters,
                           clock=time)
        relay = InProcessRelay(ctx, emulator, simulator, time)
        built.append(relay)
        return relay

    yield start
    for relay in built:
        relay.ctx.directline.close()
        relay.emulator.close()
        relay.simulator.close()


# ------------------------------------------------------------------------------- the operator's event endpoint

EVENT_SECRET = "whsec_" + base64.b64encode(b"the operator's event webhook key!").decode()


@dataclass
class EventReceiver:
    """A real HTTP endpoint on loopback standing in for an agent desk: it records every POST (headers, body)
    and answers with the statuses in `answers`, one per request, then 200."""

    url: str
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"RELAY_EVENT_WEBHOOK_URL": self.url, "RELAY_EVENT_WEBHOOK_SECRET": EVENT_SECRET}


@pytest.fixture
def event_receiver() -> Iterator[EventReceiver]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.answers.pop(0) if receiver.answers else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = EventReceiver(url=f"http://127.0.0.1:{server.server_address[1]}/events")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


def queue_exists_with_messages(queue: QueueClient) -> bool:
    """Messages waiting on a storage queue, visible or not (the service's count includes those not yet visible);
    False for a queue never created (nothing was ever left on it)."""
    try:
        return (queue.get_queue_properties().approximate_message_count or 0) > 0
    except ResourceNotFoundError:
        return False
