"""One clock, one source of chance: nothing in relay/ but relay/clock.py reads the time, waits or draws at random,
and the test clock makes what depends on them repeatable."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.clock import ManualClock

RELAY = Path(__file__).resolve().parent.parent / "relay"
THE_CLOCK = RELAY / "clock.py"

_TIME_CALLS = {"time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "sleep"}
_DATETIME_CALLS = {"datetime.datetime.now", "datetime.datetime.utcnow", "datetime.datetime.today",
                   "datetime.date.today"}


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a chain of attributes on a name; None for anything else (a call's result, a subscript)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _is_forbidden(name: str) -> bool:
    module, _, rest = name.partition(".")
    return ((module == "time" and rest in _TIME_CALLS) or (module == "random" and bool(rest))
            or name in _DATETIME_CALLS)


def forbidden_calls(source: str) -> list[str]:
    """"<line>: <call>" for each call of the time, the sleep, randomness or datetime.now in `source`,
    however the module was imported (`import time as t`, `from random import uniform`...)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b
                bound = alias.asname or alias.name.split(".")[0]
                aliases[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := _dotted(node.func)) is not None:
            head, _, tail = name.partition(".")
            qualified = ".".join(filter(None, [aliases.get(head, head), tail]))
            if _is_forbidden(qualified):
                found.append(f"{node.lineno}: {qualified}")
    return found


def test_nothing_in_relay_but_the_clock_reads_the_time_sleeps_or_draws_at_random():
    modules = sorted(path for path in RELAY.rglob("*.py") if path != THE_CLOCK)
    assert len(modules) > 20  # the scan sees the whole package
    found = [f"{path.relative_to(RELAY.parent)}:{call}" for path in modules
             for call in forbidden_calls(path.read_text(encoding="utf-8"))]
    assert found == [], "use the Clock passed in (ctx.clock, the store's, a client's) instead:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import time\ntime.monotonic()",
    "import time as t\nt.sleep(1)",
    "from time import perf_counter\nperf_counter()",
    "import random\nrandom.uniform(0, 1)",
    "from random import choice\nchoice([1, 2])",
    "from datetime import datetime\ndatetime.now()",
    "import datetime\ndatetime.datetime.utcnow()",
    "from datetime import date as day\nday.today()",
])
def test_the_scan_finds_the_time_and_chance_however_they_are_imported(source):
    assert len(forbidden_calls(source)) == 1


def test_the_scan_lets_the_clock_and_pure_datetime_arithmetic_pass():
    source = ("from datetime import UTC, datetime, timedelta\n"
              "now = ctx.clock.now() + timedelta(seconds=1)\n"
              "at = datetime.fromtimestamp(1, UTC)\n"
              "ctx.clock.sleep(ctx.clock.uniform(0, 1))\n")
    assert forbidden_calls(source) == []


def test_a_manual_clock_moves_only_when_told_or_when_it_sleeps():
    start = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    clock = ManualClock(start)
    assert (clock.now(), clock.monotonic()) == (start, 0.0)
    clock.sleep(2.5)  # returns at once
    clock.advance(10)
    assert clock.now() == start + timedelta(seconds=12.5) and clock.monotonic() == 12.5
    assert clock.sleeps == [2.5]
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_a_manual_clocks_chance_repeats_with_its_seed():
    first, again, other = ([clock.uniform(0, 1) for _ in range(5)]
                           for clock in (ManualClock(seed=1), ManualClock(seed=1), ManualClock(seed=2)))
    assert first == again and first != other and all(0 <= draw <= 1 for draw in first)
