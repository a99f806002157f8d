"""Where the time of one poll tick goes: the 1,000-conversation tick of benchmarks.polling, profiled.

    python -m benchmarks.profile_tick [--size 1000] [--runs 3] [--gap 6] [--profile none|cpu|wall] [--top 30]

Each run seeds `size` conversations on a fresh table prefix as `tick_benchmark` does (2 % with a
bot reply waiting, 50 ms added to every Direct Line request), waits `gap` seconds (in the benchmark
the naive poller runs between the seeding and the tick, long enough for Azurite to close idle
keep-alive connections after its 5 s), then times one `poll_tick`. Printed per run: the tick's
seconds, this process's CPU seconds, the CPU seconds of the emulator, Azurite and the provider
simulator during the tick (they share the machine's cores), and the TCP connections opened to each.
The median of the runs ends the output.

`--profile cpu`: a cProfile of every thread on its own CPU clock (time.thread_time), merged: our CPU,
without the waits. `--profile wall`: a sampler of every thread's stack every 2 ms: where the workers
wait (sockets, locks, the GIL shows as time in Python frames beyond the CPU profile's).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import logging
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from benchmarks.__main__ import child_env
from benchmarks.polling import TICK_SECONDS, _prefix, bot_says, seed
from benchmarks.stack import SimulatedClock, Stack, local_stack
from relay.poller import poll_tick


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def counted_connections() -> Iterator[Counter[int]]:
    """TCP connections opened inside the block, by port: urllib3's (requests, the storage SDK) and http.client's
    (the Direct Line client's kept connections)."""
    import http.client

    from urllib3.connection import HTTPConnection

    opened: Counter[int] = Counter()
    originals = {cls: cls.connect for cls in (HTTPConnection, http.client.HTTPConnection)}

    def counting(original):
        def connect(self):
            opened[self.port] += 1
            return original(self)
        return connect

    for cls, original in originals.items():
        cls.connect = counting(original)  # type: ignore[method-assign]
    try:
        yield opened
    finally:
        for cls, original in originals.items():
            cls.connect = original  # type: ignore[method-assign]


@contextmanager
def cpu_profile(top: int) -> Iterator[None]:
    """cProfile on every thread started inside the block (and this one), each on its own CPU clock."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start(*_):
        profile = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(profile)
        profile.enable()  # replaces this hook for the thread

    main = cProfile.Profile(time.thread_time)
    threading.setprofile(start)
    main.enable()
    try:
        yield
    finally:
        main.disable()
        threading.setprofile(None)
        stats = pstats.Stats(main)
        for profile in profiles:
            stats.add(profile)
        stats.dump_stats(os.environ.get("PROFILE_OUT", "/tmp/profile_tick.pstats"))
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)


@contextmanager
def wall_sampler(top: int, *, interval: float = 0.002) -> Iterator[None]:
    """Every thread's stack every `interval` seconds: where the poll workers spend their wall time."""
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = [0]
    stop = threading.Event()

    def name(frame) -> str:
        code = frame.f_code
        return f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_firstlineno}({code.co_name})"

    def sample() -> None:
        while not stop.wait(interval):
            samples[0] += 1
            for ident, frame in sys._current_frames().items():
                thread = threading._active.get(ident)  # type: ignore[attr-defined]
                if thread is None or not thread.name.startswith("poll"):
                    continue
                leaves[name(frame)] += 1
                seen = set()
                outer: FrameType | None = frame
                while outer is not None:
                    label = name(outer)
                    if label not in seen:
                        seen.add(label)
                        inclusive[label] += 1
                    outer = outer.f_back

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        total = sum(leaves.values()) or 1
        print(f"\nwall samples: {samples[0]} rounds, {total} worker stacks")
        print("-- innermost frame (share of worker wall time)")
        for label, count in leaves.most_common(top):
            print(f"{count / total:7.1%}  {label}")
        print("-- inclusive (share of worker wall time)")
        for label, count in inclusive.most_common(top * 2):
            print(f"{count / total:7.1%}  {label}")


@contextmanager
def timed_phases(ctx, azurite_pid: int) -> Iterator[dict[str, float]]:
    """Wall seconds of the tick's serial phases (listing the due index, postponing), Azurite's
    CPU seconds in each, and the relay's CPU and wall seconds in the postponing transactions."""

    phases: dict[str, float] = {}

    def timing(name, fn):
        def wrapper(*args, **kwargs):
            started, azurite = time.perf_counter(), process_cpu(azurite_pid)
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - started
                phases[f"{name}_azurite_cpu"] = process_cpu(azurite_pid) - azurite
        return wrapper

    due_polls = ctx.store.due_polls
    batches = ctx.store.tables.client("duepolls")  # the one client the due index writes its batches with

    def submit(fn):
        def wrapper(*args, **kwargs):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                phases["batch_cpu"] = phases.get("batch_cpu", 0.0) + time.thread_time() - cpu
                phases["batch_wall"] = phases.get("batch_wall", 0.0) + time.perf_counter() - started
        return wrapper

    batches.submit_transaction = submit(batches.submit_transaction)
    due_polls.list_due = timing("list_due", due_polls.list_due)
    due_polls.postpone_rows = timing("postpone_rows", due_polls.postpone_rows)
    try:
        yield phases
    finally:
        del due_polls.list_due, due_polls.postpone_rows, batches.submit_transaction


def prepare(stack: Stack, size: int, *, latency_ms: int):
    """What tick_benchmark does before the relay's measured tick (the naive poller aside)."""
    clock = SimulatedClock()
    ctx, transport = stack.context(_prefix("prof"), clock=clock, RELAY_FANOUT_THRESHOLD="0")  # inline
    stack.emulator.set_faults(latency_ms=0)
    records = seed(ctx, size, last_activity_ago=30)
    poll_tick(ctx)
    for record in records[::50]:
        bot_says(stack.emulator.url, record.conversation_id, "A new reply")
    clock.advance(TICK_SECONDS)  # the next tick, as tick_benchmark
    stack.emulator.set_faults(latency_ms=latency_ms)
    return ctx, transport


def one_run(stack: Stack, args: argparse.Namespace) -> dict:
    ctx, transport = prepare(stack, args.size, latency_ms=args.latency_ms)
    time.sleep(args.gap)  # the naive poller's turn in the benchmark: idle keep-alive connections time out
    transport.reset()
    stack.emulator.reset_counters()
    pids = {"emulator": _pid(stack.emulator), "azurite": _pid(stack.azurite), "simulator": _pid(stack.simulator)}
    ports = {stack.emulator.port: "emulator", stack.azurite.table_port: "azurite"}
    profiler = {"cpu": functools.partial(cpu_profile, args.top), "wall": functools.partial(wall_sampler, args.top)}
    load = os.getloadavg()[0]
    others_before = {name: process_cpu(pid) for name, pid in pids.items()}
    cpu_before = time.process_time()
    with counted_connections() as opened, timed_phases(ctx, pids["azurite"]) as phases, \
            profiler[args.profile]() if args.profile != "none" else _nothing():
        started = time.perf_counter()
        tick = poll_tick(ctx, **({"workers": args.workers} if args.workers else {}))
        seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    others = {name: process_cpu(pid) - others_before[name] for name, pid in pids.items()}
    ctx.directline.close()
    stack.emulator.set_faults(latency_ms=0)
    return {"seconds": seconds, "relay_cpu": cpu, **{f"{k}_cpu": v for k, v in others.items()},
            "due": tick.due, "worked": tick.worked, "quiet": tick.quiet, "failed": tick.failed,
            "delivered": tick.delivered, "table_tx": dict(transport.snapshot()),
            "dl_requests": sum(stack.directline_requests().values()),
            "connections": {ports.get(port, str(port)): n for port, n in opened.items()}, "load": load,
            "phases": phases}


def _pid(process) -> int:
    assert process.process is not None, f"{process} is not running"
    return process.process.pid


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_tick", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gap", type=float, default=6.0, help="idle seconds between the seeding and the tick")
    parser.add_argument("--latency-ms", type=int, default=50)
    parser.add_argument("--workers", type=int, default=0, help="poll_tick's workers (0: its default)")
    parser.add_argument("--profile", choices=("none", "cpu", "wall"), default="none")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    logs = Path(tempfile.mkdtemp(prefix="relay-profile-"))
    runs = []
    with local_stack(logs, child_env()) as stack:
        for number in range(args.runs):
            run = one_run(stack, args)
            runs.append(run)
            print(f"run {number + 1}: tick {run['seconds']:.2f} s, relay CPU {run['relay_cpu']:.2f} s, emulator CPU "
                  f"{run['emulator_cpu']:.2f} s, azurite CPU {run['azurite_cpu']:.2f} s, simulator CPU "
                  f"{run['simulator_cpu']:.2f} s; due {run['due']} quiet {run['quiet']} worked {run['worked']} "
                  f"failed {run['failed']} delivered {run['delivered']}; DL {run['dl_requests']}, table "
                  f"{run['table_tx']}; phases {', '.join(f'{k} {v:.2f} s' for k, v in run['phases'].items())}; "
                  f"connections opened {run['connections']}; load {run['load']:.2f}",
                  flush=True)
    print(f"median of {len(runs)}: tick {statistics.median(r['seconds'] for r in runs):.2f} s, relay CPU "
          f"{statistics.median(r['relay_cpu'] for r in runs):.2f} s, emulator CPU "
          f"{statistics.median(r['emulator_cpu'] for r in runs):.2f} s, azurite CPU "
          f"{statistics.median(r['azurite_cpu'] for r in runs):.2f} s (load average now {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
