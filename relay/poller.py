"""The timer functions: poll every due conversation, and sweep what is no longer needed.

A tick reads only the conversations whose next poll time has come (one range query on the due
index), works them concurrently with a bounded pool, each under its lease, and logs one line.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from relay.conversations import LEASE_SECONDS, RelayContext, WorkResult, new_owner, work_conversation
from relay.store import DueConversation

log = logging.getLogger(__name__)

MAX_CONVERSATIONS_PER_TICK = 1000
WORKERS = 32


@dataclass(frozen=True)
class TickResult:
    due: int
    worked: int
    posted: int
    delivered: int
    dead_letters: int
    ended: int
    failed: int
    seconds: float


def poll_tick(ctx: RelayContext, *, limit: int = MAX_CONVERSATIONS_PER_TICK, workers: int = WORKERS) -> TickResult:
    started = time.perf_counter()
    tick = new_owner("poller")
    due = ctx.store.list_due_conversations(limit=limit)

    def work(item: DueConversation) -> WorkResult | None:
        owner = f"{tick}:{item.key.partition_key}"
        try:
            record = ctx.store.claim_due(item, owner=owner, lease_seconds=LEASE_SECONDS)
            if record is None:
                return None  # not due after all, or another poller holds it
            return work_conversation(ctx, record, owner=owner)
        except Exception as error:  # one conversation's trouble never stops the others
            log.exception("poller: a %s conversation failed", item.key.channel)
            return WorkResult(error=type(error).__name__)

    if due:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(due))), thread_name_prefix="poll") as pool:
            results = [r for r in pool.map(work, due) if r is not None]
    else:
        results = []
    result = TickResult(
        due=len(due),
        worked=len(results),
        posted=sum(r.posted for r in results),
        delivered=sum(r.delivered for r in results),
        dead_letters=sum(r.dead_letters for r in results),
        ended=sum(r.ended for r in results),
        failed=sum(bool(r.error) for r in results),
        seconds=time.perf_counter() - started,
    )
    log.info("poll tick: due=%d worked=%d posted=%d delivered=%d dead_letters=%d ended=%d failed=%d in %.0f ms",
             result.due, result.worked, result.posted, result.delivered, result.dead_letters, result.ended,
             result.failed, result.seconds * 1000)
    return result


def sweep(ctx: RelayContext) -> None:
    """Remove ended and long-idle conversations, old dedupe rows, expired sessions and counters."""
    idle = timedelta(minutes=ctx.settings.relay.idle_timeout_minutes) * 2
    result = ctx.store.sweep(idle_after=max(idle, timedelta(days=1)))
    log.info("sweep: %s", result)
