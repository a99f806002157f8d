"""The sweep: the rare clean-up that keeps every table from growing without end.

What goes, each by the module that owns the table: ended and long-idle conversations with their
due-index rows, dedupe rows of handled messages past the dedupe window, expired Web Chat sessions
and rate-limit windows, and old dead letters. Pending messages are never swept. These are table
scans, meant for a rare timer (hourly); every delete is ETag-guarded, so a row that changed since
it was read is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.store import RelayStore

__all__ = ["DEDUPE_RETENTION", "SweepResult", "sweep_tables"]

log = logging.getLogger(__name__)

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


def sweep_tables(store: RelayStore, *, now: datetime | None = None, idle_after: timedelta = timedelta(days=3),
                 dedupe_after: timedelta = DEDUPE_RETENTION, dead_letters_after: timedelta = timedelta(days=30),
                 limit: int = 1000) -> SweepResult:
    """Delete ended and long-idle conversations, old dedupe entries, expired sessions and counters, old dead
    letters: up to `limit` rows of each. What was removed comes back (and is logged)."""
    now = now or store.clock.now()
    result = SweepResult(
        conversations=store.conversations.delete_inactive(idle_before=now - idle_after, limit=limit),
        dedupe_entries=store.outbox.delete_old_dedupe(received_before=now - dedupe_after, limit=limit),
        webchat_sessions=store.sessions.delete_expired(now=now, limit=limit),
        rate_limits=store.rate_limits.delete_expired(now=now, limit=limit),
        dead_letters=store.dead_letters.delete_old(created_before=now - dead_letters_after, limit=limit),
    )
    log.info("sweep removed %s", result)
    return result
