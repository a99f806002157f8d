"""Measurement 8: the poll fanned out over the queue, on 1, 2 and 4 local worker hosts.

2,000 conversations are due at once (seeded as the tick benchmark seeds them, idle at the ceiling so that a
conversation worked once is not due again during the run), a share of them with a bot reply waiting. Then N
hosts (devstack.host on function_app, through benchmarks/counted_host.py) share Azurite and the emulator (50 ms
added to every Direct Line request): one runs the timer at the default schedule, which fans the due rows out to
the poll queue (more than RELAY_FANOUT_THRESHOLD are due), the others only poll_batch
(AzureWebJobs.poller.Disabled). Measured: the time from the tick that fanned out until no row that was due at
the start is due any more and every waiting reply was delivered; each reply delivered exactly once (the
provider simulator's records: the run fails otherwise); ticks and poll_batch executions per host (their logs);
each host process's CPU time (/proc); Direct Line requests (the emulator's counters) and storage transactions (counted
in the hosts) per conversation. report.capacity_model turns these into instances for 10,000 and 100,000
active conversations.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from benchmarks import hosted, polling
from benchmarks.stack import SimulatedClock, Stack
from devstack.procs import ManagedProcess, free_port, http_ok, python_module, wait_until
from relay.clock import SYSTEM_CLOCK
from relay.poller import poll_tick
from relay.settings import SETTINGS

REPLY_TEXT = "A new reply"
SCHEDULE = SETTINGS["RELAY_POLL_SCHEDULE"].default or "*/5 * * * * *"
DEFAULT_THRESHOLD = int(SETTINGS["RELAY_FANOUT_THRESHOLD"].default or 0)
SEED_POLL_INTERVAL = float(SETTINGS["RELAY_POLL_CEILING_SECONDS"].default or 60)
_TICK_LINE = re.compile(r"poll tick: due=(?P<due>\d+) quiet=(?P<quiet>\d+) worked=(?P<worked>\d+) .* "
                        r"failed=(?P<failed>\d+) .* in (?P<ms>\d+) ms")
_BATCH_LINE = re.compile(r"poll batch: due=(?P<due>\d+) quiet=(?P<quiet>\d+) worked=(?P<worked>\d+) .* "
                         r"failed=(?P<failed>\d+) .* in (?P<ms>\d+) ms")


def fanout_benchmark(stack: Stack, env: dict[str, str], *, conversations: int = 2000,
                     hosts: tuple[int, ...] = (1, 2, 4), reply_share: float = 0.1, latency_ms: int = 50) -> dict:
    """One run per number of hosts, each on conversations of its own. RELAY_FANOUT_THRESHOLD is the default, or
    half the conversations when fewer (a small run still fans out)."""
    threshold = min(DEFAULT_THRESHOLD, conversations // 2)
    runs = []
    for count in hosts:
        print(f"  {count} host(s): seeding {conversations} due conversations", flush=True)
        runs.append(_run(stack, env, conversations=conversations, hosts=count, reply_share=reply_share,
                         latency_ms=latency_ms, threshold=threshold))
        run = runs[-1]
        print(f"  {count} host(s): {run['seconds']:.1f} s, {run['poll_batch_executions']} batches, "
              f"{run['cpu_seconds_per_conversation'] * 1000:.1f} ms CPU per conversation", flush=True)
    return {"conversations": conversations, "reply_share": reply_share, "latency_ms": latency_ms,
            "fanout_threshold": threshold,
            "schedule": SCHEDULE, "runs": runs}


def _run(stack: Stack, env: dict[str, str], *, conversations: int, hosts: int, reply_share: float,
         latency_ms: int, threshold: int) -> dict:
    prefix = f"bfan{uuid.uuid4().hex[:8]}"
    # Seeded and worked once (a conversation's first poll claims it; from then on it is peeked) on a clock a
    # ceiling and a bit in the past, so that each is due again now, as settled conversations fall due.
    past = SimulatedClock(SYSTEM_CLOCK.now() - timedelta(seconds=SEED_POLL_INTERVAL + 10))
    warm_up, _ = stack.context(prefix, clock=past, RELAY_FANOUT_THRESHOLD="0")
    stack.emulator.set_faults(latency_ms=0)
    records = polling.seed(warm_up, conversations, last_activity_ago=3600, poll_interval=SEED_POLL_INTERVAL)
    poll_tick(warm_up, limit=conversations)
    warm_up.directline.close()
    ctx, _ = stack.context(prefix)
    waiting = records[::round(1 / reply_share)]
    for record in waiting:
        polling.bot_says(stack.emulator.url, record.conversation_id, REPLY_TEXT)
    stack.simulator.clear()
    values = stack.settings_environ(prefix, RELAY_FANOUT_THRESHOLD=str(threshold), RELAY_POLL_SCHEDULE=SCHEDULE)
    queue = QueueClient.from_connection_string(stack.azurite.connection_string, values["RELAY_POLL_QUEUE"])
    due_at = ctx.clock.now()
    stack.emulator.set_faults(latency_ms=latency_ms)
    stack.emulator.reset_counters()
    try:
        with _hosts(stack, env, values, hosts, prefix) as running:
            cpu_before = [_cpu_seconds(h) for h in running]
            fanned_out = _wait_for(lambda: queued(queue) > 0,
                                   timeout=60, what="the timer to fan the due conversations out")

            def done() -> bool:
                return (not ctx.store.due_polls.list_due_rows(now=due_at, limit=1)
                        and len(_delivered(stack)) >= len(waiting))

            finished = _wait_for(done, timeout=max(120.0, conversations / 5), what="every due conversation worked",
                                 interval=0.25)
            wait_until(lambda: queued(queue) == 0, timeout=60, what="the poll queue drained")
            cpu = [_cpu_seconds(h) - before for h, before in zip(running, cpu_before, strict=True)]
            directline = sum(stack.directline_requests().values())
    finally:
        stack.emulator.set_faults(latency_ms=0)
        ctx.directline.close()
    delivered = Counter(r["user"] for r in _delivered(stack))
    expected = {record.reply_context["to"] for record in waiting}
    duplicates = sum(n - 1 for user, n in delivered.items() if user in expected and n > 1)
    missing = len(expected - set(delivered))
    strays = sum(n for user, n in delivered.items() if user not in expected)
    if duplicates or missing or strays:
        raise RuntimeError(f"fan-out on {hosts} host(s): {duplicates} replies delivered twice, {missing} never, "
                           f"{strays} to users who had none waiting")
    storage: Counter[str] = Counter()
    for host in running:
        storage.update(_counts(host))
    logs = [host.log_path for host in running if host.log_path is not None]
    batches = [hosted.executions(log, "poll_batch") for log in logs]
    lines = [m for log in logs for m in _BATCH_LINE.finditer(log.read_text(errors="replace"))]
    worked = [m for m in lines if int(m["due"])]
    # Conversations worked over the run: the batches', and the timer's own below the threshold (the replies'
    # conversations fall due again soon, and a conversation worked early may fall due again before the end).
    ticks = list(_TICK_LINE.finditer(logs[0].read_text(errors="replace")))
    inline = sum(_worked(m) for m in ticks)
    total = sum(_worked(m) for m in worked) + inline
    failed = sum(int(m["failed"]) for m in [*worked, *ticks])
    table = sum(n for kind, n in storage.items() if kind.startswith("table:"))
    queue_ops = sum(n for kind, n in storage.items() if kind.startswith("queue:"))
    return {
        "hosts": hosts, "conversations": conversations, "with_replies": len(waiting),
        "seconds": finished - fanned_out, "conversations_per_second": conversations / (finished - fanned_out),
        "ticks": len(hosted.executions(logs[0], "poller")),
        "poll_batch_executions": sum(len(b) for b in batches),
        "poll_batch_executions_per_host": [len(b) for b in batches],
        "batch_seconds_median": statistics.median(int(m["ms"]) / 1000 for m in worked) if worked else None,
        "batch_conversations_median": statistics.median(int(m["due"]) for m in worked) if worked else None,
        "batch_seconds_per_conversation": (sum(int(m["ms"]) for m in worked) / 1000
                                           / max(1, sum(_worked(m) for m in worked))),
        "delivered": sum(delivered.values()), "duplicates": duplicates, "missing": missing,
        "failed_attempts": failed,
        "conversations_worked": total, "conversations_worked_by_the_timer": inline,
        "cpu_seconds_per_host": cpu, "cpu_seconds_per_conversation": sum(cpu) / total,
        "directline_requests_per_conversation": directline / total,
        "table_transactions_per_conversation": table / total,
        "queue_transactions_per_conversation": queue_ops / total,
        "storage_by_kind": dict(storage),
    }


@contextlib.contextmanager
def _hosts(stack: Stack, env: dict[str, str], values: dict[str, str], count: int,
           prefix: str) -> Iterator[list[ManagedProcess]]:
    """`count` worker hosts on the same tables and queue; only the first runs the timers, and starts last (so that
    every host listens when the timer fans out)."""
    with contextlib.ExitStack() as started:
        running: list[ManagedProcess] = []
        for number in reversed(range(count)):
            port = free_port()
            disabled = {} if number == 0 else {"AzureWebJobs.poller.Disabled": "true",
                                                "AzureWebJobs.sweeper.Disabled": "true"}
            counts = stack.logs / f"{prefix}-host{number}.counts.json"
            ready = functools.partial(http_ok, f"http://127.0.0.1:{port}/")
            host = ManagedProcess(
                f"worker host {number}",
                python_module("benchmarks.counted_host", "--counts", str(counts), "--port", str(port), "--settings",
                              str(stack.logs / "absent.settings.json")),
                env={**env, **values, **disabled}, ready=ready,
                log_path=stack.logs / f"{prefix}-host{number}.log")
            running.insert(0, started.enter_context(host))
        yield running


def _worked(line: re.Match) -> int:
    """Conversations a tick's or batch's log line says were peeked or worked (a row another worker held is not)."""
    return int(line["quiet"]) + int(line["worked"])


def queued(queue: QueueClient) -> int:
    """Messages in the queue, waiting or being worked; 0 before it exists."""
    try:
        return queue.get_queue_properties().approximate_message_count or 0
    except ResourceNotFoundError:
        return 0


def _counts(host: ManagedProcess) -> Counter[str]:
    """What benchmarks/counted_host.py wrote when the host stopped."""
    path = Path(host.argv[host.argv.index("--counts") + 1])
    return Counter(json.loads(path.read_text())) if path.exists() else Counter()


def _cpu_seconds(host: ManagedProcess) -> float:
    """The host process's CPU time so far, user and system (/proc/<pid>/stat utime + stime)."""
    assert host.process is not None
    fields = Path(f"/proc/{host.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _delivered(stack: Stack) -> list[dict]:
    return [r for r in stack.simulator.replies(hosted.PROVIDER) if r["direction"] == "bot" and r["text"] == REPLY_TEXT]


def _wait_for(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1) -> float:
    """wait_until, returning when (time.time()) the condition was first seen true."""
    wait_until(condition, timeout=timeout, interval=interval, what=what)
    return time.time()

