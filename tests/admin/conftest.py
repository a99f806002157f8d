"""The operator's command line against the relay on real parts: Azurite, the Direct Line emulator's core in this
process (time in hand, as in tests/relay/conftest.py `inprocess_relay`) and the provider simulator as a real
process, so that `python -m relay.admin`, run as a child process, replays to the very provider the relay met."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devstack.channels import DEV_VALUES, ProviderSimulator
from devstack.directline.transport import InProcessEmulator
from devstack.procs import ROOT
from relay.channels import get_adapter
from relay.conversations import RelayContext
from relay.directline import DirectLineClient, RetryPolicy
from relay.settings import Settings
from relay.store import RelayStore
from tests.conftest import DIRECTLINE_TEST_SECRET, subprocess_env
from tests.relay.conftest import NO_GREETING, RELAY_URL, InProcessRelay, ManualTime
from tests.relay.conftest import event_receiver as event_receiver  # the operator's event endpoint, for these tests too


@dataclass
class Admin:
    """`python -m relay.admin` as a child process, with the relay's settings in its environment."""

    env: dict[str, str]

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relay.admin", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=subprocess_env(**(self.env if env is None else env)))

    def json(self, *args: str) -> Any:
        done = self.run("--json", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def provider_simulator(start_simulator) -> ProviderSimulator:
    return start_simulator(relay_url=RELAY_URL)


@pytest.fixture
def admin_relay(storage_connection_string, table_prefix,
                provider_simulator) -> Iterator[Callable[..., tuple[InProcessRelay, Admin]]]:
    """admin_relay(env={...}, **InProcessEmulator options) -> (the relay in-process, the CLI on the same settings)."""
    built: list[InProcessRelay] = []

    def start(*, env: dict[str, str] | None = None, **emulator_options) -> tuple[InProcessRelay, Admin]:
        emulator = InProcessEmulator(secret=DIRECTLINE_TEST_SECRET, **emulator_options)
        values = {**DEV_VALUES, **provider_simulator.api_bases(), "AzureWebJobsStorage": storage_connection_string,
                  "RELAY_TABLE_PREFIX": table_prefix, "DIRECTLINE_SECRET": DIRECTLINE_TEST_SECRET,
                  "DIRECTLINE_ENDPOINT": emulator.base_url, "RELAY_PUBLIC_BASE_URL": RELAY_URL, **NO_GREETING,
                  **(env or {})}
        settings = Settings.from_environ(values)
        time = ManualTime()
        time.followers.append(emulator.advance_clock)
        directline = DirectLineClient(settings.directline, retry=RetryPolicy(attempts=1), clock=time,
                                      transport=emulator.transport)
        adapters = functools.cache(lambda name: get_adapter(name, settings, clock=time))
        ctx = RelayContext(settings=settings, store=RelayStore.from_settings(settings.storage, clock=time),
                           directline=directline, adapter=adapters, clock=time)
        relay = InProcessRelay(ctx, emulator, provider_simulator, time)  # type: ignore[arg-type]  # a real one
        built.append(relay)
        return relay, Admin(values)

    yield start
    for relay in built:
        relay.ctx.directline.close()
        relay.emulator.close()
