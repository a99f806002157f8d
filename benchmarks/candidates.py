"""Measurement 6: late-reply latency against cost, for each timer schedule the relay could run on.

For each candidate RELAY_POLL_SCHEDULE: prompt and late (3 s) reply latency through the local host with the
default burst, and an idle hour of simulated ticks at the candidate's interval (what waiting costs). The
monthly cost of each comes from report.cost_model, on the candidate's own ticks.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks import hosted, polling
from benchmarks.stack import Stack
from relay.settings import SETTINGS


@dataclass(frozen=True)
class Candidate:
    name: str
    schedule: str  # RELAY_POLL_SCHEDULE
    timer_seconds: float


CANDIDATES = (
    Candidate("5 s timer", "*/5 * * * * *", 5.0),
    Candidate("2 s timer", "*/2 * * * * *", 2.0),
    Candidate("1 s timer", "* * * * * *", 1.0),
)
DEFAULT_SCHEDULE = SETTINGS["RELAY_POLL_SCHEDULE"].default
DEFAULT_BURST = float(SETTINGS["RELAY_BURST_POLL_SECONDS"].default or 0)


def latency_cost_benchmark(stack: Stack, env: dict[str, str], *, samples: int = 16, idle_conversations: int = 200,
                           idle_hours: float = 1.0, latency_ms: int = 50) -> list[dict]:
    """Each candidate's reply latency (the relay's default settings but the schedule) and idle cost."""
    results = []
    for candidate in CANDIDATES:
        print(f"  {candidate.name}: reply latency", flush=True)
        stack.emulator.set_faults(latency_ms=latency_ms)
        try:
            with hosted.relay_host(stack, burst=DEFAULT_BURST, env=env, schedule=candidate.schedule,
                                   log_name=f"host-candidate-{candidate.timer_seconds:g}s.log") as (_, store):
                latency = hosted.reply_latency(stack, store, timer_seconds=candidate.timer_seconds, samples=samples)
        finally:
            stack.emulator.set_faults(latency_ms=0)
        print(f"  {candidate.name}: idle cost, {idle_conversations} conversations, {idle_hours:g} simulated hour(s)",
              flush=True)
        idle = polling.idle_benchmark(stack, conversations=idle_conversations, hours=idle_hours,
                                      tick_seconds=candidate.timer_seconds, latency_ms=latency_ms, keep_series=False)
        results.append({"name": candidate.name, "schedule": candidate.schedule,
                        "timer_seconds": candidate.timer_seconds, "default": candidate.schedule == DEFAULT_SCHEDULE,
                        "burst_seconds": DEFAULT_BURST, "latency": latency, "idle": idle})
    return results
