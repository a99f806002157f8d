"""The local stack the benchmarks run against, and the counters they read.

Table Storage transactions are counted at the storage client's transport (one `send` is one REST
request, which is what Azure bills as one transaction: a batch is one, a query page is one), never
estimated. Direct Line requests are read from the emulator's own counters.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from devstack.channels import DEV_VALUES, ProviderSimulator
from devstack.directline import DirectLineEmulator
from devstack.procs import Azurite, free_port
from relay.channels import get_adapter
from relay.channels.base import ChannelAdapter
from relay.clock import SYSTEM_CLOCK, Clock
from relay.conversations import RelayContext
from relay.directline import DirectLineClient
from relay.settings import Settings
from relay.store import RelayStore
from relay.store.tables import StorageTransport

SECRET = "bench-directline-secret"  # noqa: S105 - the local emulator's, nothing real
T = TypeVar("T")


class CountingTransport(StorageTransport):
    """The relay's storage transport, counting the requests it sends by kind (read, write, query, batch...)."""

    def __init__(self, *, pool_size: int = 128, **kwargs):
        super().__init__(pool_size=pool_size, **kwargs)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def send(self, request, **kwargs):
        kind = request_kind(request.method, request.url)
        with self._lock:
            self.counts[kind] += 1
        return super().send(request, **kwargs)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()


def request_kind(method: str, url: str) -> str:
    path = url.split("?", 1)[0]
    if path.endswith("$batch"):
        return "batch"
    if method == "GET":
        return "read" if path.endswith("')") else "query"
    return {"POST": "insert", "PUT": "write", "MERGE": "write", "PATCH": "write", "DELETE": "delete"}.get(method,
                                                                                                       method)


class SimulatedClock(Clock):
    """The system clock with its wall time moved by hand (the idle hour takes seconds, not an hour), and its
    monotonic time moved with it (what the relay spaces out by it, the sessions' refresh, follows the hour).

    Timers and waits stay real: the emulator and the simulator answer in real time."""

    def __init__(self, start: datetime | None = None):
        super().__init__()
        self._now = start or SYSTEM_CLOCK.now()
        self._skipped = 0.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return super().monotonic() + self._skipped

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._skipped += seconds


@dataclass
class Stack:
    azurite: Azurite
    emulator: DirectLineEmulator
    simulator: ProviderSimulator
    logs: Path

    def settings_environ(self, prefix: str, **values: str) -> dict[str, str]:
        return {
            **DEV_VALUES, **self.simulator.api_bases(),
            "AzureWebJobsStorage": self.azurite.connection_string,
            "RELAY_TABLE_PREFIX": prefix,
            "RELAY_POLL_QUEUE": f"poll-{prefix.lower()}",
            "DIRECTLINE_SECRET": SECRET,
            "DIRECTLINE_ENDPOINT": self.emulator.base_url,
            "DIRECTLINE_TIMEOUT_SECONDS": "10",
            "RELAY_PUBLIC_BASE_URL": self.simulator.relay_url,
            **values,
        }

    def context(self, prefix: str, *, clock: Clock = SYSTEM_CLOCK,
                **values: str) -> tuple[RelayContext, CountingTransport]:
        return relay_context(self.settings_environ(prefix, **values), clock=clock)

    def directline_requests(self) -> Counter[str]:
        return Counter(self.emulator.counters()["requests"])


def relay_context(environ: dict[str, str], *, clock: Clock = SYSTEM_CLOCK,
                  pool_size: int = 128) -> tuple[RelayContext, CountingTransport]:
    """The relay's context in this process, on counted storage and a pooled Direct Line client, all on `clock`."""
    settings = Settings.from_environ(environ)
    transport = CountingTransport(connection_timeout=5, read_timeout=30)
    store = RelayStore.from_settings(settings.storage, clock=clock, transport=transport)
    directline = DirectLineClient(settings.directline, clock=clock, pool_size=pool_size)
    adapters: dict[str, ChannelAdapter] = {}
    lock = threading.Lock()

    def adapter(name: str) -> ChannelAdapter:
        with lock:
            if name not in adapters:
                adapters[name] = get_adapter(name, settings, clock=clock)
            return adapters[name]

    return RelayContext(settings=settings, store=store, directline=directline, adapter=adapter,
                        clock=clock), transport


@contextlib.contextmanager
def local_stack(logs: Path, env: dict[str, str]) -> Iterator[Stack]:
    """Azurite, the Direct Line emulator (built-in echo, quiet) and the provider simulator, stopped afterwards."""
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        azurite = stack.enter_context(Azurite(log_path=logs / "azurite.log"))
        emulator = stack.enter_context(DirectLineEmulator(
            secret=SECRET, env=env, log_path=logs / "directline.log",
            extra_args=("--quiet", "--late-reply-seconds", "3", "--seed", "9")))
        # The relay host (started later, see benchmarks.hosted) answers on the URL the simulator signs for.
        simulator = stack.enter_context(ProviderSimulator(relay_url=f"http://127.0.0.1:{free_port()}", env=env,
                                                          log_path=logs / "simulator.log"))
        yield Stack(azurite, emulator, simulator, logs)


class PeakMemory:
    """The process's peak resident set size while the block runs (sampled every 5 ms from /proc)."""

    def __init__(self):
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    import resource

    return pages * resource.getpagesize()


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result
