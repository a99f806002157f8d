"""Time and chance: the one door through which the relay reads the time, waits and draws random numbers.

Nothing else in `relay/` calls `time.time`, `time.monotonic`, `time.sleep`, `datetime.now` or
`random`: a `Clock` is passed in (to the context, the store, the Direct Line client, the adapters
and the token server), so one operation reads one clock, and a test can replace it. The lease
logic, token renewal, poll scheduling and every backoff depend on time; with `ManualClock` a test
moves time by hand, a sleep returns at once (having moved the clock on), and the jitter is seeded,
so what the relay decides is the same on every run.

Randomness here is for spreading load (jitter, backoff); secrets and keys come from `secrets`.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock"]


class Clock:
    """The real clock: wall time, a monotonic timer, sleeping, and one source of jitter.

    Pass a seeded `random_source` to make the draws repeatable."""

    def __init__(self, *, random_source: random.Random | None = None):
        self._random = random_source or random.Random()

    def now(self) -> datetime:
        """The wall time, an aware UTC datetime: for what is stored and compared across instances."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Seconds on a timer that never goes back: for deadlines and durations inside one process."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` (nothing for zero or less)."""
        if seconds > 0:
            time.sleep(seconds)

    def uniform(self, low: float, high: float) -> float:
        """A random number between `low` and `high`, for jitter: never for anything secret."""
        return self._random.uniform(low, high)


SYSTEM_CLOCK = Clock()
"""The process's clock: what `get_context()`, `get_store()` and the other process-wide objects use."""


class ManualClock(Clock):
    """A clock for tests: time moves only by `advance` or `sleep` (which returns at once), draws are seeded.

    `sleeps` lists every sleep asked for, in order. Thread-safe: the poller's workers may share one."""

    def __init__(self, start: datetime = datetime(2030, 1, 1, tzinfo=UTC), *, seed: int = 0):
        if start.tzinfo is None:
            raise ValueError("a ManualClock starts at an aware datetime")
        super().__init__(random_source=random.Random(seed))
        self._start = start
        self._elapsed = 0.0
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def __repr__(self) -> str:
        return f"ManualClock(now={self.now().isoformat()!r})"

    def now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        with self._lock:
            return self._elapsed

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._elapsed += max(0.0, seconds)

    def uniform(self, low: float, high: float) -> float:
        with self._lock:
            return super().uniform(low, high)

    def advance(self, seconds: float) -> None:
        """Move the time on by `seconds` (wall and monotonic alike); ValueError for a step back."""
        if seconds < 0:
            raise ValueError("time does not go back")
        with self._lock:
            self._elapsed += seconds
