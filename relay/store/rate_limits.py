"""Rate-limit windows of the token server: `{prefix}ratelimits`.

One row per client address, stored only as a hash: PartitionKey = the first 40 hex digits of its
SHA-256, RowKey "window", with the window's start, its end (`expires_at`) and the requests counted
in it. Counting is ETag-guarded, so instances sharing the table never lose a hit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from relay.clock import Clock
from relay.errors import ConcurrencyConflict
from relay.store.tables import UPDATE_ATTEMPTS, Tables, pause_after_conflict, storage_errors

__all__ = ["RateLimitResult", "RateLimits"]

_TABLE = "ratelimits"
_ROW = "window"


@dataclass(frozen=True)
class RateLimitResult:
    allowed: bool
    count: int
    limit: int
    retry_after: float  # seconds until the window resets (0 when allowed)


class RateLimits:
    """Fixed-window request counters. Methods taking `now` use it instead of the clock."""

    def __init__(self, tables: Tables, *, clock: Clock):
        self._table = tables.table(_TABLE)
        self._clock = clock

    def count_request(self, client_address: str, *, limit: int, window_seconds: float = 60,
                      now: datetime | None = None) -> RateLimitResult:
        """Count one request for `client_address` in its window; allowed is False past `limit`.

        A window opens at the client's first request and lasts `window_seconds` (not aligned to the
        clock, so a burst cannot straddle two windows to get twice the limit). ConcurrencyConflict
        when the counter kept changing under every attempt.
        """
        now = now or self._clock.now()
        pk = hashlib.sha256(client_address.encode()).hexdigest()[:40]
        for _ in range(UPDATE_ATTEMPTS * 2):
            entity = self._table.get(pk, _ROW)
            if entity is None or entity["expires_at"] <= now:
                window_start, window_end, count = now, now + timedelta(seconds=window_seconds), 1
            else:
                window_start, window_end, count = entity["window_start"], entity["expires_at"], entity["count"] + 1
            if count > limit:
                return RateLimitResult(False, count - 1, limit, max((window_end - now).total_seconds(), 0.001))
            new = {"PartitionKey": pk, "RowKey": _ROW, "window_start": window_start, "expires_at": window_end,
                   "count": count}
            with storage_errors("count a request"):
                try:
                    if entity is None:
                        self._table.client.create_entity(new)
                    else:
                        self._table.client.update_entity(new, mode=UpdateMode.REPLACE, etag=entity.metadata["etag"],
                                                         match_condition=MatchConditions.IfNotModified)
                except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                    pause_after_conflict(self._clock, 0)
                    continue
            return RateLimitResult(True, count, limit, 0.0)
        raise ConcurrencyConflict("the rate-limit counter kept changing")

    def delete_expired(self, *, now: datetime, limit: int) -> int:
        """Delete up to `limit` windows that ended by `now` (a scan, for the sweep); how many went."""
        return self._table.delete_matching("expires_at lt @now", {"now": now}, limit=limit)
