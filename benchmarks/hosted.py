"""Measurements 3 and 5, through the local Functions host: reply latency, and inbound webhooks.

Reply latency is the time from the bot putting its reply into the conversation (the emulator's
activity timestamp) to the provider simulator receiving it (its own clock; same machine).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import random
import re
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.stack import Stack
from devstack.channels import webhooks
from devstack.procs import ManagedProcess, http_ok, python_module, wait_until
from relay.settings import SETTINGS, Settings
from relay.store import RelayStore
from relay.store.conversations import ConversationKey

PROVIDER = "twilio"
SCHEDULE_SECONDS = 5
SCHEDULE = f"*/{SCHEDULE_SECONDS} * * * * *"
NEVER = "0 0 0 1 1 *"  # the timer stays out of the way (once a year)
CHASE_SECONDS = float(SETTINGS["RELAY_CHASE_SECONDS"].default or 0)
_EXECUTED = re.compile(r"Executed 'Functions\.(?P<name>\w+)' \(Succeeded, .*Duration=(?P<ms>\d+)ms\)")


@contextlib.contextmanager
def relay_host(stack: Stack, *, burst: float, env: dict[str, str], log_name: str, schedule: str = SCHEDULE,
               chase_seconds: float = CHASE_SECONDS) -> Iterator[tuple[str, RelayStore]]:
    """devstack.host serving function_app on the simulator's relay URL, on tables and a poll queue of its own
    (its queue triggers run poll_batch and chase: the chases its webhooks leave)."""
    prefix = f"bhost{uuid.uuid4().hex[:8]}"
    values = stack.settings_environ(prefix, RELAY_POLL_SCHEDULE=schedule, RELAY_BURST_POLL_SECONDS=f"{burst:g}",
                                    RELAY_CHASE_SECONDS=f"{chase_seconds:g}",
                                    RELAY_PUBLIC_BASE_URL=stack.simulator.relay_url)
    port = int(stack.simulator.relay_url.rsplit(":", 1)[1])
    host = ManagedProcess("host", python_module("devstack.host", "--port", str(port), "--settings",
                                                str(stack.logs / "absent.settings.json")),
                          env={**env, **values}, ready=lambda: http_ok(f"{stack.simulator.relay_url}/"),
                          log_path=stack.logs / log_name)
    store = RelayStore.from_settings(Settings.from_environ(values).storage)
    with host:
        yield stack.simulator.relay_url, store


def executions(log_path: Path, function: str) -> list[float]:
    """The durations (seconds) of the host's successful executions of `function`, from its log lines."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [int(m["ms"]) / 1000 for m in _EXECUTED.finditer(text) if m["name"] == function]


def _bot_reply_time(stack: Stack, store: RelayStore, user: str, text: str) -> float | None:
    record = store.conversations.get_record(ConversationKey(PROVIDER, user))
    if record is None or not record.conversation_id:
        return None
    for activity in stack.emulator.conversation(record.conversation_id)["activities"]:
        if (activity.get("from") or {}).get("role") == "bot" and activity.get("text") == text:
            return dt.datetime.fromisoformat(activity["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


def _sample(stack: Stack, store: RelayStore, send: str, reply: str, user: str, delay: float, *,
            timeout: float) -> float:
    time.sleep(delay)  # staggered starts, so samples fall at every phase of the timer (not synchronisation)
    answer = stack.simulator.send_inbound(PROVIDER, user, send)
    if answer["status"] != 200:
        raise RuntimeError(f"the relay answered {answer['status']}: {answer['body'][:200]}")

    def received() -> list[dict]:
        return [r for r in stack.simulator.replies(PROVIDER, user) if r["direction"] == "bot" and r["text"] == reply]

    wait_until(lambda: bool(received()), timeout=timeout, interval=0.02, what=f"{reply!r} for {user}")
    sent = _bot_reply_time(stack, store, user, reply)
    return received()[0]["at"] - sent


REPLIES = (("prompt", "hello", "You said: hello"), ("late (proactive)", "later", "Late reply: later"))


def reply_latency(stack: Stack, store: RelayStore, *, timer_seconds: float, samples: int) -> list[dict]:
    """Prompt and late reply latency through a running host: `samples` users each, starting at random moments
    over two timer periods."""
    rows = []
    for kind, send, reply in REPLIES:
        users = [f"+1777{random.randrange(10**7):07d}" for _ in range(samples)]
        delays = [random.uniform(0, 2 * timer_seconds) for _ in users]
        with ThreadPoolExecutor(samples) as pool:
            values = list(pool.map(functools.partial(_sample, stack, store, send, reply, timeout=60), users, delays))
        rows.append({"reply": kind, "samples": len(values), "p50": percentile(values, 50),
                     "p95": percentile(values, 95), "max": max(values), "timer_seconds": timer_seconds})
    return rows


def latency_benchmark(stack: Stack, env: dict[str, str], *, samples: int = 16, latency_ms: int = 50) -> list[dict]:
    stack.emulator.set_faults(latency_ms=latency_ms)
    results = []
    try:
        for burst in (2.0, 0.0):
            with relay_host(stack, burst=burst, env=env, log_name=f"host-latency-burst{burst:g}.log") as (_, store):
                results += [{"burst_seconds": burst, "chase_seconds": CHASE_SECONDS, **row}
                            for row in reply_latency(stack, store, timer_seconds=SCHEDULE_SECONDS, samples=samples)]
    finally:
        stack.emulator.set_faults(latency_ms=0)
    return results


def inbound_benchmark(stack: Stack, env: dict[str, str], *, count: int = 200, concurrency: int = 8,
                      latency_ms: int = 50) -> dict:
    """Signed webhooks through the host with burst polling and the chase off: what the relay takes to store and post
    one (the chase, an execution of its own, is measured in benchmarks/candidates.py)."""
    values = {name: value for name, value in stack.settings_environ("x").items()}
    stack.emulator.set_faults(latency_ms=latency_ms)
    try:
        with relay_host(stack, burst=0, env=env, log_name="host-inbound.log", schedule=NEVER,
                        chase_seconds=0) as (url, _):
            session = requests.Session()
            _post(session, webhooks.build(PROVIDER, values, url, sender="+18880000000", text="warm up"))
            durations: list[float] = []
            lock = threading.Lock()

            def one(number: int) -> None:
                hook = webhooks.build(PROVIDER, values, url, sender=f"+1888{number % 50:07d}", text=f"m{number}")
                elapsed = _post(requests, hook)
                with lock:
                    durations.append(elapsed)

            stack.emulator.reset_counters()
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(count)))
            wall = time.perf_counter() - started
            concurrent_dl = sum(stack.emulator.counters()["requests"].values())

            # One at a time: the relay's own time is a webhook's time less its Direct Line requests' latency.
            sequential: list[float] = []
            stack.emulator.reset_counters()
            for number in range(40):
                hook = webhooks.build(PROVIDER, values, url, sender=f"+1889{number % 10:07d}", text=f"s{number}")
                sequential.append(_post(session, hook))
            dl_per_webhook = sum(stack.emulator.counters()["requests"].values()) / len(sequential)
    finally:
        stack.emulator.set_faults(latency_ms=0)
    mean = statistics.mean(sequential)
    return {
        "webhooks": count, "concurrency": concurrency, "latency_ms": latency_ms, "burst_seconds": 0,
        "webhooks_per_second": count / wall, "p50_seconds": percentile(durations, 50),
        "p95_seconds": percentile(durations, 95), "directline_requests": concurrent_dl,
        "sequential_mean_seconds": mean, "directline_requests_per_webhook": dl_per_webhook,
        "relay_own_seconds": mean - dl_per_webhook * latency_ms / 1000,
    }


def _post(session, hook: webhooks.Webhook) -> float:
    started = time.perf_counter()
    response = session.post(hook.url, data=hook.body, headers=hook.headers, timeout=30)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"the relay answered {response.status_code}: {response.text[:200]}")
    return elapsed


def percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * percent / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def webhook_cost(stack: Stack, *, count: int = 40, burst: float = 0.0, latency_ms: int = 50) -> dict:
    """The relay's webhook handling in this process: Table transactions, Direct Line requests and time per webhook."""
    from relay.channels.base import WebhookRequest
    from relay.inbound import handle_webhook

    ctx, transport = stack.context(f"bhook{uuid.uuid4().hex[:8]}", RELAY_BURST_POLL_SECONDS=f"{burst:g}")
    values = stack.settings_environ("x")
    url = ctx.settings.relay.public_base_url

    def hook(number: int) -> WebhookRequest:
        built = webhooks.build(PROVIDER, values, url, sender=f"+1666{number % 10:07d}", text=f"w{number}")
        return WebhookRequest("POST", built.url, built.headers, built.body)

    handle_webhook(ctx, PROVIDER, hook(-1))  # tables created, connections open
    stack.emulator.set_faults(latency_ms=latency_ms)
    transport.reset()
    stack.emulator.reset_counters()
    seconds = []
    try:
        for number in range(count):
            request = hook(number)
            started = time.perf_counter()
            handle_webhook(ctx, PROVIDER, request)
            seconds.append(time.perf_counter() - started)
    finally:
        stack.emulator.set_faults(latency_ms=0)
        ctx.directline.close()
    dl = sum(stack.emulator.counters()["requests"].values()) / count
    mean = statistics.mean(seconds)
    return {"webhooks": count, "burst_seconds": burst, "latency_ms": latency_ms, "mean_seconds": mean,
            "table_transactions_per_webhook": transport.total / count,
            "table_by_kind": {k: v / count for k, v in transport.snapshot().items()},
            "directline_requests_per_webhook": dl, "relay_own_seconds": mean - dl * latency_ms / 1000}
