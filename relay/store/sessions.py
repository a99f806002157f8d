"""Web Chat sessions of the token server: `{prefix}webchatsessions`.

One row per Direct Line conversation a page was given: PartitionKey = the escaped conversation id,
RowKey "session". A page proves it owns the session with its resume key, of which only hashes are
stored: the newest, the ones answered in the current grace period, the one the last resume used
and every key rotated away (presenting one of those revokes the session: someone copied it).
Every decision is written under the ETag of the row it was made on.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode

from relay.errors import ConcurrencyConflict
from relay.store.tables import UPDATE_ATTEMPTS, escape, get_json, pause_after_conflict, put_json, storage_errors

if TYPE_CHECKING:
    from relay.clock import Clock
    from relay.store.tables import Tables

__all__ = [
    "GRACE_KEYS_LIMIT",
    "RESUME_GRACE",
    "ResumeOutcome",
    "ResumeResult",
    "WebChatSession",
    "WebChatSessions",
    "hash_resume_key",
]

_TABLE = "webchatsessions"
_ROW = "session"
_PREVIOUS_KEYS_LIMIT = 20


class ResumeOutcome(StrEnum):
    """What presenting a resume key meant (WebChatSessions.resume_session); `accepted` for the first two."""

    RESUMED = "resumed"  # key matched: rotated to the new key, session extended
    RETRIED = "retried"  # the key the last resume used, again within the grace period: one more new key
    UNKNOWN_SESSION = "unknown_session"
    EXPIRED = "expired"
    REVOKED = "revoked"  # revoked earlier
    WRONG_KEY = "wrong_key"
    REUSED_KEY = "reused_key"  # an already rotated key: the session is revoked now (a stolen key)

    @property
    def accepted(self) -> bool:
        return self in (ResumeOutcome.RESUMED, ResumeOutcome.RETRIED)


RESUME_GRACE = timedelta(seconds=60)
"""How long a rotated-away key stays good for a retry while no key it was rotated to was used. A page
whose resume answer was lost retries with the key it still holds (relay-webchat.js after 1, 3, 7, 15
and 31 s while online); short, so that a copied key presented later still revokes the session."""
GRACE_KEYS_LIMIT = 8  # valid keys at once in a grace period (keeps the row small); past it a retry is a reuse


@dataclass(frozen=True)
class ResumeResult:
    outcome: ResumeOutcome
    session: WebChatSession | None = None

    @property
    def ok(self) -> bool:
        return self.outcome.accepted


@dataclass(frozen=True)
class WebChatSession:
    conversation_id: str
    user_id: str
    expires_at: datetime
    revoked: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    resume_key_hash: str = field(default="", repr=False)  # the newest key
    # Keys answered earlier in the grace period (retries of grace_key_hash): valid until one of them is used.
    retry_key_hashes: tuple[str, ...] = field(default=(), repr=False)
    grace_key_hash: str = field(default="", repr=False)  # the key the last resume used and rotated away
    rotated_at: datetime | None = None  # when that resume happened: the grace period starts then
    previous_key_hashes: tuple[str, ...] = field(default=(), repr=False)  # every key rotated away (poison)
    etag: str | None = field(default=None, repr=False, compare=False)

    def resume_outcome(self, resume_key: str, *, now: datetime) -> ResumeOutcome:
        """What presenting `resume_key` at `now` means (RESUMED or RETRIED: accepted), hashes compared in constant time.

        The key the last resume used is good once more (RETRIED) within RESUME_GRACE while none of
        the keys it was rotated to has been used: that resume's answer was lost, or two resumes raced.
        """
        presented = hash_resume_key(resume_key)
        current = _any_digest_equal(presented, (self.resume_key_hash, *self.retry_key_hashes))
        grace = bool(self.grace_key_hash) and hmac.compare_digest(presented, self.grace_key_hash)
        rotated = _any_digest_equal(presented, self.previous_key_hashes)
        if not (current or grace or rotated):
            # Whether the session was revoked or expired is the key holder's business only.
            return ResumeOutcome.WRONG_KEY
        if self.revoked:
            return ResumeOutcome.REVOKED
        if self.expires_at <= now:
            return ResumeOutcome.EXPIRED
        if current:
            return ResumeOutcome.RESUMED
        if (grace and self.rotated_at is not None and now < self.rotated_at + RESUME_GRACE
                and len(self.retry_key_hashes) + 1 < GRACE_KEYS_LIMIT):
            return ResumeOutcome.RETRIED
        if rotated:
            return ResumeOutcome.REUSED_KEY
        return ResumeOutcome.WRONG_KEY


class WebChatSessions:
    """Reads and writes of Web Chat sessions. Methods taking `now` use it instead of the clock."""

    def __init__(self, tables: Tables, *, clock: Clock):
        self._table = tables.table(_TABLE)
        self._clock = clock

    def create_session(self, conversation_id: str, *, user_id: str, resume_key: str, expires_at: datetime,
                       now: datetime | None = None) -> WebChatSession:
        """Store a new session; only the resume key's hash is kept. ConcurrencyConflict if one exists."""
        now = now or self._clock.now()
        session = WebChatSession(conversation_id, user_id, expires_at, created_at=now, updated_at=now,
                                 resume_key_hash=hash_resume_key(resume_key))
        with storage_errors("store a Web Chat session"):
            try:
                result = self._table.client.create_entity(_to_entity(session))
            except ResourceExistsError:
                raise ConcurrencyConflict("a Web Chat session for this conversation exists already") from None
        return replace(session, etag=result.get("etag"))

    def get_session(self, conversation_id: str) -> WebChatSession | None:
        """The session of `conversation_id`, or None when there is none."""
        entity = self._table.get(escape(conversation_id), _ROW)
        return None if entity is None else _from_entity(entity)

    def resume_session(self, conversation_id: str, *, resume_key: str, new_resume_key: str,
                       expires_at: datetime, now: datetime | None = None) -> ResumeResult:
        """Check a page's resume key (constant time) and rotate it.

        A key that was already rotated away revokes the session: whoever presents it copied it. The
        exception is WebChatSession.resume_outcome's grace period (RETRIED). Each decision is written
        under the ETag of the row it was made on, so two racing resumes with one key are decided one
        after the other: the second sees the first's rotation and is a retry, never a reuse.
        """
        now = now or self._clock.now()
        for attempt in range(UPDATE_ATTEMPTS):
            session = self.get_session(conversation_id)
            if session is None:
                return ResumeResult(ResumeOutcome.UNKNOWN_SESSION)
            outcome = session.resume_outcome(resume_key, now=now)
            if outcome == ResumeOutcome.RESUMED:
                # This key is used now: every other valid key becomes poison, and this one is the grace key.
                updated = replace(session, resume_key_hash=hash_resume_key(new_resume_key), retry_key_hashes=(),
                                  grace_key_hash=hash_resume_key(resume_key), rotated_at=now, expires_at=expires_at,
                                  previous_key_hashes=(*session.previous_key_hashes, session.resume_key_hash,
                                                       *session.retry_key_hashes)[-_PREVIOUS_KEYS_LIMIT:],
                                  updated_at=now)
            elif outcome == ResumeOutcome.RETRIED:
                # One more key; the ones answered before stay good (the page keeps whichever answer it got last).
                updated = replace(session, resume_key_hash=hash_resume_key(new_resume_key), expires_at=expires_at,
                                  retry_key_hashes=(*session.retry_key_hashes, session.resume_key_hash),
                                  updated_at=now)
            elif outcome == ResumeOutcome.REUSED_KEY:
                updated = replace(session, revoked=True, updated_at=now)
            elif outcome == ResumeOutcome.WRONG_KEY:
                return ResumeResult(ResumeOutcome.WRONG_KEY)
            else:
                return ResumeResult(outcome, session)
            with storage_errors("update a Web Chat session"):
                try:
                    result = self._table.client.update_entity(_to_entity(updated), mode=UpdateMode.REPLACE,
                                                              etag=session.etag,
                                                              match_condition=MatchConditions.IfNotModified)
                except (ResourceModifiedError, ResourceNotFoundError):
                    pause_after_conflict(self._clock, attempt)
                    continue
            return ResumeResult(outcome, replace(updated, etag=result.get("etag")))
        raise ConcurrencyConflict("the Web Chat session kept changing")

    def revoke_session(self, conversation_id: str, *, now: datetime | None = None) -> None:
        """Mark the session revoked (a no-op when there is none): its page must start a new conversation."""
        entity = {"PartitionKey": escape(conversation_id), "RowKey": _ROW, "revoked": True,
                  "updated_at": now or self._clock.now()}
        with storage_errors("revoke a Web Chat session"):
            try:
                self._table.client.update_entity(entity, mode=UpdateMode.MERGE)
            except ResourceNotFoundError:
                return

    def delete_expired(self, *, now: datetime, limit: int) -> int:
        """Delete up to `limit` sessions expired by `now` (a scan, for the sweep); how many went."""
        return self._table.delete_matching("expires_at lt @now", {"now": now}, limit=limit)


def hash_resume_key(resume_key: str) -> str:
    """Resume keys are random (>=128 bits), so a plain SHA-256 is a safe one-way fingerprint."""
    return hashlib.sha256(resume_key.encode()).hexdigest()


def _any_digest_equal(presented: str, stored: Iterable[str]) -> bool:
    """Compares with every stored hash (no early exit), each in constant time."""
    return any([hmac.compare_digest(presented, candidate) for candidate in stored])


def _to_entity(session: WebChatSession) -> dict[str, Any]:
    entity = {"PartitionKey": escape(session.conversation_id), "RowKey": _ROW,
              "conversation_id": session.conversation_id, "user_id": session.user_id,
              "expires_at": session.expires_at, "revoked": session.revoked, "created_at": session.created_at,
              "updated_at": session.updated_at, "resume_key_hash": session.resume_key_hash,
              "grace_key_hash": session.grace_key_hash, "rotated_at": session.rotated_at}
    put_json(entity, "retry_key_hashes", list(session.retry_key_hashes))
    put_json(entity, "previous_key_hashes", list(session.previous_key_hashes))
    return entity


def _from_entity(entity: TableEntity) -> WebChatSession:
    return WebChatSession(entity["conversation_id"], entity["user_id"], entity["expires_at"],
                          revoked=bool(entity.get("revoked")), created_at=entity.get("created_at"),
                          updated_at=entity.get("updated_at"), resume_key_hash=entity.get("resume_key_hash", ""),
                          retry_key_hashes=tuple(get_json(entity, "retry_key_hashes", [])),
                          grace_key_hash=entity.get("grace_key_hash", ""), rotated_at=entity.get("rotated_at"),
                          previous_key_hashes=tuple(get_json(entity, "previous_key_hashes", [])),
                          etag=entity.metadata["etag"])
