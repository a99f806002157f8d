"""The sweep: the rare clean-up that keeps every table from growing without end.

What goes, each by the module that owns the table: ended and long-idle conversations with their
due-index rows, dedupe rows of handled messages past the dedupe window, expired Web Chat sessions
and rate-limit windows, and old dead letters. Pending messages are never swept. These are table
scans, meant for a rare timer (hourly); every delete is ETag-guarded, so a row that changed since
it was read is left alone. Each table is paged through until nothing is left to delete, up to 100
rows of a partition per transaction, within one time budget for the run: what the budget leaves
is found by the next run's scans, so a backlog of any size shrinks run after run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from relay.store.tables import Budget

if TYPE_CHECKING:
    from relay.store import RelayStore

__all__ = ["DEDUPE_RETENTION", "SweepResult", "sweep_tables"]

log = logging.getLogger(__name__)

SWEEP_BUDGET_SECONDS = 240.0
"""One run's time: well inside the 5-minute `functionTimeout` of host.json, leaving a minute for the last page."""

DEDUPE_RETENTION = timedelta(days=7)
"""How long a handled message's dedupe row is kept, so a provider's retry or a replay is recognised.
Meta retries for up to 7 days. A message signed as older than this is not relayed at all
(relay/channels/common.py:AdapterBase.outlived_dedupe): its dedupe row may be gone."""


@dataclass(frozen=True)
class SweepResult:
    conversations: int = 0
    dedupe_entries: int = 0
    webchat_sessions: int = 0
    rate_limits: int = 0
    dead_letters: int = 0
    complete: bool = True
    """False when the time budget ran out first: the next run goes on where this one stopped."""


def sweep_tables(store: RelayStore, *, now: datetime | None = None, idle_after: timedelta = timedelta(days=3),
                 dedupe_after: timedelta = DEDUPE_RETENTION, dead_letters_after: timedelta = timedelta(days=30),
                 budget_seconds: float = SWEEP_BUDGET_SECONDS) -> SweepResult:
    """Delete ended and long-idle conversations, old dedupe entries, expired sessions and counters, old dead
    letters: all of them, or as many as `budget_seconds` (on the store's clock) allows. What was removed comes
    back (and is logged)."""
    now = now or store.clock.now()
    budget = Budget(budget_seconds, clock=store.clock)
    result = SweepResult(
        conversations=store.conversations.delete_inactive(
            idle_before=now - idle_after, budget=budget,
            waiting=lambda key: bool(store.outbox.list_messages(key, limit=1))),
        dedupe_entries=store.outbox.delete_old_dedupe(received_before=now - dedupe_after, budget=budget),
        webchat_sessions=store.sessions.delete_expired(now=now, budget=budget),
        rate_limits=store.rate_limits.delete_expired(now=now, budget=budget),
        dead_letters=store.dead_letters.delete_old(created_before=now - dead_letters_after, budget=budget),
    )
    result = replace(result, complete=not budget.ran_out)
    log.info("sweep removed %s", result)
    return result
