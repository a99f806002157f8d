"""Measurement 6: late-reply latency against cost, for each way the relay could find a late reply.

The candidates: the timer alone every 5, 2 or 1 s (RELAY_CHASE_SECONDS=0), and the 5 s timer with the
chase (RELAY_CHASE_SECONDS=10: each webhook leaves a chase queue message and the chase function looks
for the bot's reply every second until 10 s after the user's message). For each: prompt and late (3 s)
reply latency through the local host with the default burst, and an idle hour of simulated ticks at the
timer's interval (what waiting costs). The chase costs nothing while nobody writes, so its idle hour is
the 5 s timer's, not run twice; what it costs per message (its looks, each a short execution with one
record read and three queue transactions, and its Direct Line GETs) is measured apart, through the host
with the timer out of the way. The monthly cost of each comes from report.cost_model.
"""

from __future__ import annotations

import functools
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from azure.storage.queue import QueueClient

from benchmarks import fanout, hosted, polling
from benchmarks.stack import Stack
from devstack.procs import wait_until
from relay.fanout import CHASE_SUFFIX
from relay.settings import SETTINGS
from relay.store.conversations import ConversationKey


@dataclass(frozen=True)
class Candidate:
    name: str
    schedule: str  # RELAY_POLL_SCHEDULE
    timer_seconds: float
    chase_seconds: float  # RELAY_CHASE_SECONDS (0: off)


DEFAULT_SCHEDULE = SETTINGS["RELAY_POLL_SCHEDULE"].default
DEFAULT_BURST = float(SETTINGS["RELAY_BURST_POLL_SECONDS"].default or 0)
DEFAULT_CHASE = hosted.CHASE_SECONDS
CANDIDATES = (
    Candidate("5 s timer", "*/5 * * * * *", 5.0, 0.0),
    Candidate("2 s timer", "*/2 * * * * *", 2.0, 0.0),
    Candidate("1 s timer", "* * * * * *", 1.0, 0.0),
    Candidate("5 s timer + chase", "*/5 * * * * *", 5.0, 10.0),
)
QUEUE_TRANSACTIONS_PER_LOOK = 3  # its message's put (by the webhook or the look before), the trigger's get, its delete
TABLE_TRANSACTIONS_PER_LOOK = 1  # the conversation's record (a look that delivers works it as the timer would have)


def is_default(candidate: Candidate) -> bool:
    """The relay's own defaults: the schedule and the chase."""
    return candidate.schedule == DEFAULT_SCHEDULE and candidate.chase_seconds == DEFAULT_CHASE


def latency_cost_benchmark(stack: Stack, env: dict[str, str], *, samples: int = 16, idle_conversations: int = 200,
                           idle_hours: float = 1.0, latency_ms: int = 50) -> list[dict]:
    """Each candidate's reply latency (the relay's default settings but the schedule and the chase) and idle cost."""
    results: list[dict] = []
    idle_runs: dict[float, dict] = {}  # timer seconds -> the idle hour (the chase adds nothing while nobody writes)
    for candidate in CANDIDATES:
        print(f"  {candidate.name}: reply latency", flush=True)
        log_name = f"host-candidate-{candidate.timer_seconds:g}s-chase{candidate.chase_seconds:g}.log"
        stack.emulator.set_faults(latency_ms=latency_ms)
        try:
            with hosted.relay_host(stack, burst=DEFAULT_BURST, env=env, schedule=candidate.schedule,
                                   chase_seconds=candidate.chase_seconds, log_name=log_name) as (_, store):
                latency = hosted.reply_latency(stack, store, timer_seconds=candidate.timer_seconds, samples=samples)
        finally:
            stack.emulator.set_faults(latency_ms=0)
        row = {"name": candidate.name, "schedule": candidate.schedule, "timer_seconds": candidate.timer_seconds,
               "chase_seconds": candidate.chase_seconds, "default": is_default(candidate),
               "burst_seconds": DEFAULT_BURST, "latency": latency,
               "poll_batch_executions": len(hosted.executions(stack.logs / log_name, "chase"))}
        if candidate.timer_seconds in idle_runs:
            print(f"  {candidate.name}: idle cost as the {candidate.timer_seconds:g} s timer's (no messages, no "
                  "chase)", flush=True)
            row["idle_shared_with"] = next(r["name"] for r in results if r["timer_seconds"] == candidate.timer_seconds)
        else:
            print(f"  {candidate.name}: idle cost, {idle_conversations} conversations, {idle_hours:g} simulated "
                  "hour(s)", flush=True)
            idle_runs[candidate.timer_seconds] = polling.idle_benchmark(
                stack, conversations=idle_conversations, hours=idle_hours, tick_seconds=candidate.timer_seconds,
                latency_ms=latency_ms, keep_series=False)
        row["idle"] = idle_runs[candidate.timer_seconds]
        if candidate.chase_seconds:
            print(f"  {candidate.name}: what a chase costs", flush=True)
            row["chase"] = chase_cost(stack, env, chase_seconds=candidate.chase_seconds, samples=samples,
                                      latency_ms=latency_ms)
        results.append(row)
    return results


def chase_cost(stack: Stack, env: dict[str, str], *, chase_seconds: float, samples: int = 16,
               latency_ms: int = 50) -> dict:
    """What one user message's chase costs, through the host with the timer out of the way (so every chase
    execution is one and every GET after the webhook answered is the chase's): for a message the bot answers
    at once ("hello": the burst delivers the reply, the chase looks on until RELAY_CHASE_SECONDS) and one it
    answers again 3 s later ("later": the chase delivers the late reply, then ends a second later)."""
    log_name = f"host-chase-cost-{chase_seconds:g}s.log"
    by_reply = {}
    stack.emulator.set_faults(latency_ms=latency_ms)
    try:
        with hosted.relay_host(stack, burst=DEFAULT_BURST, env=env, schedule=hosted.NEVER, chase_seconds=chase_seconds,
                               log_name=log_name) as (_, store):
            chase_queue = stack.settings_environ(store.tables.prefix)["RELAY_POLL_QUEUE"] + CHASE_SUFFIX
            queue = QueueClient.from_connection_string(stack.azurite.connection_string, chase_queue)
            for kind, text, replies in (("prompt", "hello", 1), ("late", "later", 2)):
                by_reply[kind] = _chases(stack, store, queue, stack.logs / log_name, kind=kind, text=text,
                                         replies=replies, samples=samples, timeout=3 * chase_seconds + 30)
    finally:
        stack.emulator.set_faults(latency_ms=0)
    longest = max(by_reply.values(), key=lambda r: r["looks_per_chase"])
    return {"chase_seconds": chase_seconds, "burst_seconds": DEFAULT_BURST, "latency_ms": latency_ms,
            "by_reply": by_reply,
            # The cost model takes the kind with more looks for every message: an upper bound.
            "looks_per_chase": longest["looks_per_chase"],
            "seconds_per_look": longest["mean_seconds"],
            "directline_requests_per_chase": longest["directline_requests_per_chase"],
            "queue_transactions_per_chase": QUEUE_TRANSACTIONS_PER_LOOK * longest["looks_per_chase"],
            "table_transactions_per_chase": TABLE_TRANSACTIONS_PER_LOOK * longest["looks_per_chase"]}


def _chases(stack: Stack, store, queue: QueueClient, log_path: Path, *, kind: str, text: str, replies: int,
            samples: int, timeout: float) -> dict:
    """`samples` users write `text` at once; their chases' looks (chase executions) and GETs."""
    done_before = len(hosted.executions(log_path, "chase"))
    users = [f"+1444{kind == 'late':d}{number:06d}" for number in range(samples)]
    with ThreadPoolExecutor(samples) as pool:
        during_webhook = dict(zip(users, pool.map(lambda user: _webhook_gets(stack, store, user, text), users),
                                  strict=True))

    def replied(user: str) -> bool:
        return len([r for r in stack.simulator.replies(hosted.PROVIDER, user) if r["direction"] == "bot"]) >= replies

    def chased() -> bool:
        return (fanout.queued(queue) == 0
                and len(hosted.executions(log_path, "chase")) >= done_before + samples)

    for user in users:
        wait_until(functools.partial(replied, user), timeout=60, what=f"{replies} replies for {user}")
    wait_until(chased, timeout=timeout, what="every chase done")
    seconds = hosted.executions(log_path, "chase")[done_before:]
    gets = [_gets(stack, store, user) - before for user, before in during_webhook.items()]
    return {"looks": len(seconds), "messages": samples, "looks_per_chase": len(seconds) / samples,
            "mean_seconds": statistics.mean(seconds), "max_seconds": max(seconds),
            "directline_requests_per_chase": statistics.mean(gets)}


def _webhook_gets(stack: Stack, store, user: str, text: str) -> int:
    """Send the user's message; the GETs its conversation had when the webhook answered (its burst's): the
    chase's first look comes a second after that."""
    answer = stack.simulator.send_inbound(hosted.PROVIDER, user, text)
    if answer["status"] != 200:
        raise RuntimeError(f"the relay answered {answer['status']}: {answer['body'][:200]}")
    return _gets(stack, store, user)


def _gets(stack: Stack, store, user: str) -> int:
    record = store.conversations.get_record(ConversationKey(hosted.PROVIDER, user))
    if record is None or not record.conversation_id:
        raise RuntimeError(f"no conversation for {user}")
    counted = stack.emulator.counters()["conversations"].get(record.conversation_id, {})
    return counted.get("activities/get", 0)
