"""Web Chat sessions of the token server: `{prefix}webchatsessions`.

One row per Direct Line conversation a page was given: PartitionKey = the keyed hash of the
conversation id (`Tables.key_for`: a resume names any id it likes, of any length), RowKey
"session". A page proves it owns the session with its resume key, of which only hashes are
stored: the newest, the ones answered in the current grace period, the one the last resume used
and every key rotated away (presenting one of those revokes the session: someone copied it).
Every decision is written under the ETag of the row it was made on. A malformed row (a value of the
wrong type, written by hand or by another version) reads as less, never as an error: no held token,
or a session that has ended.

The row also holds a token of the conversation (`HeldToken`), as a conversation record holds its
token: a bearer secret, in plain text in the table, out of every repr and log line. The relay keeps it
fresh for the session's life, so that a page back from any sleep gets a token of its conversation
(relay/tokens.py). What is due for a refresh is found without reading the sessions: refresh index rows,
PartitionKey "refresh", RowKey "<refresh time, ms, 15 digits>|<the session's PartitionKey>", read with
one RowKey range query (`list_due_refreshes`). A session points at its row (`refresh_index_key`); a row
is written before the session points at it, so none is missing, and one nothing points at any more (a
session rescheduled, revoked, expired, swept, or whose token lapsed) is deleted at once when that is
known, or else when the timer finds it due (`end_refresh`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode

from relay.errors import ConcurrencyConflict
from relay.store.tables import (
    UPDATE_ATTEMPTS,
    get_json,
    millis,
    pause_after_conflict,
    put_json,
    storage_errors,
)

if TYPE_CHECKING:
    from relay.clock import Clock
    from relay.store.tables import Budget, Tables

__all__ = [
    "GRACE_KEYS_LIMIT",
    "RESUME_GRACE",
    "DueRefresh",
    "HeldToken",
    "ResumeOutcome",
    "ResumeResult",
    "WebChatSession",
    "WebChatSessions",
    "hash_resume_key",
]

_TABLE = "webchatsessions"
_ROW = "session"
_REFRESH_PARTITION = "refresh"
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
class HeldToken:
    """A token of the session's conversation that the relay holds and refreshes at `refresh_at`.

    A bearer secret: given only to the page that proves it owns the session, never logged."""

    token: str = field(repr=False)
    expires_at: datetime
    refresh_at: datetime

    def alive(self, now: datetime) -> bool:
        return now < self.expires_at


@dataclass(frozen=True)
class DueRefresh:
    """A refresh index row whose time has come: the held token of `conversation_id`'s session wants refreshing."""

    conversation_id: str
    index_key: str = field(repr=False)


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
    held: HeldToken | None = None  # None: none (an older row), or it lapsed, or the session was revoked
    refresh_index_key: str = field(default="", repr=False)  # the refresh index row of `held`
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
        self._tables = tables
        self._table = tables.table(_TABLE)
        self._clock = clock

    def create_session(self, conversation_id: str, *, user_id: str, resume_key: str, expires_at: datetime,
                       held: HeldToken | None = None, now: datetime | None = None) -> WebChatSession:
        """Store a new session, holding `held` (refreshed from its `refresh_at` on); only the resume key's hash
        is kept. ConcurrencyConflict if one exists."""
        now = now or self._clock.now()
        partition = self._partition(conversation_id)
        index_key = self._write_index_row(conversation_id, partition, held)
        session = WebChatSession(conversation_id, user_id, expires_at, created_at=now, updated_at=now,
                                 resume_key_hash=hash_resume_key(resume_key), held=held, refresh_index_key=index_key)
        with storage_errors("store a Web Chat session"):
            try:
                result = self._table.client.create_entity(_to_entity(session, partition))
            except ResourceExistsError:
                raise ConcurrencyConflict("a Web Chat session for this conversation exists already") from None
        return replace(session, etag=result.get("etag"))

    def get_session(self, conversation_id: str) -> WebChatSession | None:
        """The session of `conversation_id`, or None when there is none; a malformed row reads as less (no held
        token, or ended: `_from_entity`), never as an error."""
        entity = self._table.get(self._partition(conversation_id), _ROW)
        return None if entity is None else _from_entity(conversation_id, entity)

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
                updated = _revoked(session, now)
            elif outcome == ResumeOutcome.WRONG_KEY:
                return ResumeResult(ResumeOutcome.WRONG_KEY)
            else:
                return ResumeResult(outcome, session)
            written = self._write_under_etag(session, updated, "update a Web Chat session")
            if written is None:
                pause_after_conflict(self._clock, attempt)
                continue
            return ResumeResult(outcome, written)
        raise ConcurrencyConflict("the Web Chat session kept changing")

    def extend_session(self, session: WebChatSession, *, expires_at: datetime, held: HeldToken | None = None,
                       now: datetime | None = None) -> bool:
        """Move the end of `session` (as read) to `expires_at` and, given `held`, keep that token from now on (as
        `hold_token`); False, and nothing written, when it changed since."""
        now = now or self._clock.now()
        if held is not None:
            updated = replace(session, expires_at=expires_at, held=held, updated_at=now)
            return self._write_under_etag(session, updated, "extend a Web Chat session") is not None
        entity = {"PartitionKey": self._partition(session.conversation_id), "RowKey": _ROW,
                  "expires_at": expires_at, "updated_at": now}
        with storage_errors("extend a Web Chat session"):
            try:
                self._table.client.update_entity(entity, mode=UpdateMode.MERGE, etag=session.etag,
                                                 match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                return False
        return True

    def get_live_count(self, *, now: datetime | None = None) -> int:
        """How many sessions can still be resumed (neither expired nor revoked): a scan of the table's session rows
        (one request per 1000 rows), for an operator."""
        now = now or self._clock.now()
        rows = self._table.scan("RowKey eq @row and expires_at gt @now", {"row": _ROW, "now": now},
                                select=["revoked"])
        return sum(1 for row in rows if not row.get("revoked"))

    def revoke_session(self, conversation_id: str, *, now: datetime | None = None) -> None:
        """Mark the session revoked and forget its held token (a no-op when there is none): its page must start a
        new conversation."""
        now = now or self._clock.now()

        def change(session: WebChatSession) -> WebChatSession | None:
            return None if session.revoked and session.held is None else _revoked(session, now)

        self._update(conversation_id, change, "revoke a Web Chat session")

    def hold_token(self, conversation_id: str, held: HeldToken, *, now: datetime | None = None,
                   current: WebChatSession | None = None) -> WebChatSession | None:
        """Keep `held` as the session's token, refreshed from `held.refresh_at` on; None (nothing kept) when the
        session is gone or revoked. `current`: the session as the caller read it (not read again unless it changed)."""
        now = now or self._clock.now()

        def change(session: WebChatSession) -> WebChatSession | None:
            return None if session.revoked else replace(session, held=held, updated_at=now)

        return self._update(conversation_id, change, "keep a Web Chat session's token", current=current)

    def postpone_refresh(self, conversation_id: str, token: str, *, refresh_at: datetime, now: datetime | None = None,
                         current: WebChatSession | None = None) -> WebChatSession | None:
        """Refresh the held token at `refresh_at` instead (its refresh failed), if the session still holds `token`
        (`current` as for hold_token)."""
        now = now or self._clock.now()

        def change(session: WebChatSession) -> WebChatSession | None:
            if session.revoked or session.held is None or session.held.token != token:
                return None
            return replace(session, held=replace(session.held, refresh_at=refresh_at), updated_at=now)

        return self._update(conversation_id, change, "reschedule a Web Chat session's refresh", current=current)

    def drop_token(self, conversation_id: str, token: str, *, now: datetime | None = None,
                   current: WebChatSession | None = None) -> None:
        """The held `token` lapsed (it can no longer be refreshed): forget it and stop refreshing, unless the
        session holds another token by now (`current` as for hold_token)."""
        now = now or self._clock.now()

        def change(session: WebChatSession) -> WebChatSession | None:
            if session.held is None or session.held.token != token:
                return None
            return replace(session, held=None, updated_at=now)

        self._update(conversation_id, change, "forget a Web Chat session's lapsed token", current=current)

    def list_due_refreshes(self, *, now: datetime | None = None, limit: int = 200) -> list[DueRefresh]:
        """The sessions whose held token is due for its refresh, earliest first: one RowKey range of the index."""
        now = now or self._clock.now()
        rows = self._table.query("PartitionKey eq @pk and RowKey lt @upper",
                                 {"pk": _REFRESH_PARTITION, "upper": f"{millis(now) + 1:015d}"}, limit=limit)
        return [DueRefresh(_text(row.get("conversation_id")), row["RowKey"]) for row in rows]

    def end_refresh(self, due: DueRefresh) -> None:
        """Delete a refresh index row its session no longer points at (best effort: the timer finds it again)."""
        self._table.delete_quietly(_REFRESH_PARTITION, due.index_key)

    def delete_expired(self, *, now: datetime, budget: Budget) -> int:
        """Delete the sessions expired by `now` (a scan for the sweep, paged while `budget` lasts); how many went.

        Their refresh index rows go when the timer finds them due."""
        return self._table.delete_matching("expires_at lt @now", {"now": now}, budget=budget)

    # ------------------------------------------------------------------------------------------ helpers

    def _partition(self, conversation_id: str) -> str:
        return self._tables.key_for("web chat session", conversation_id)

    def _update(self, conversation_id: str, change: Callable[[WebChatSession], WebChatSession | None],
                what: str, *, current: WebChatSession | None = None) -> WebChatSession | None:
        """Apply `change` (free of side effects; None: leave the session as it is) to the stored session under its
        ETag, on fresh data after a conflict (first on `current`, the session as the caller read it, when given);
        the session written, or None. ConcurrencyConflict after UPDATE_ATTEMPTS conflicts."""
        for attempt in range(UPDATE_ATTEMPTS):
            session = current if attempt == 0 and current is not None else self.get_session(conversation_id)
            updated = None if session is None else change(session)
            if session is None or updated is None:
                return None
            written = self._write_under_etag(session, updated, what)
            if written is not None:
                return written
            pause_after_conflict(self._clock, attempt)
        raise ConcurrencyConflict("the Web Chat session kept changing")

    def _write_under_etag(self, session: WebChatSession, updated: WebChatSession, what: str) -> WebChatSession | None:
        """Write `updated` over `session` (as read) under its ETag, its refresh index row first and the one it
        replaces deleted after; None when the row changed or went meanwhile."""
        partition = self._partition(session.conversation_id)
        same_schedule = (bool(session.refresh_index_key) and updated.held is not None and session.held is not None
                         and updated.held.refresh_at == session.held.refresh_at)
        index_key = session.refresh_index_key if same_schedule else \
            self._write_index_row(session.conversation_id, partition, updated.held)
        updated = replace(updated, refresh_index_key=index_key)
        with storage_errors(what):
            try:
                result = self._table.client.update_entity(_to_entity(updated, partition), mode=UpdateMode.REPLACE,
                                                          etag=session.etag,
                                                          match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                return None
        if session.refresh_index_key and session.refresh_index_key != index_key:
            self._table.delete_quietly(_REFRESH_PARTITION, session.refresh_index_key)
        return replace(updated, etag=result.get("etag"))

    def _write_index_row(self, conversation_id: str, partition: str, held: HeldToken | None) -> str:
        """The refresh index row of `held` (written now; idempotent), "" when nothing is held."""
        if held is None:
            return ""
        index_key = f"{millis(held.refresh_at):015d}|{partition}"
        with storage_errors("schedule a Web Chat session's refresh"):
            self._table.client.upsert_entity({"PartitionKey": _REFRESH_PARTITION, "RowKey": index_key,
                                              "conversation_id": conversation_id}, mode=UpdateMode.REPLACE)
        return index_key


def _revoked(session: WebChatSession, now: datetime) -> WebChatSession:
    """`session` revoked: it holds no token any more, so it is not refreshed either."""
    return replace(session, revoked=True, held=None, updated_at=now)


def hash_resume_key(resume_key: str) -> str:
    """Resume keys are random (>=128 bits), so a plain SHA-256 is a safe one-way fingerprint."""
    return hashlib.sha256(resume_key.encode()).hexdigest()


def _any_digest_equal(presented: str, stored: Iterable[str]) -> bool:
    """Compares with every stored hash (no early exit), each in constant time."""
    return any([hmac.compare_digest(presented, candidate) for candidate in stored])


def _to_entity(session: WebChatSession, partition_key: str) -> dict[str, Any]:
    entity = {"PartitionKey": partition_key, "RowKey": _ROW,
              "conversation_id": session.conversation_id, "user_id": session.user_id,
              "expires_at": session.expires_at, "revoked": session.revoked, "created_at": session.created_at,
              "updated_at": session.updated_at, "resume_key_hash": session.resume_key_hash,
              "grace_key_hash": session.grace_key_hash, "rotated_at": session.rotated_at,
              "refresh_index_key": session.refresh_index_key}
    if session.held is not None:
        entity |= {"token": session.held.token, "token_expires_at": session.held.expires_at,
                   "token_refresh_at": session.held.refresh_at}
    put_json(entity, "retry_key_hashes", list(session.retry_key_hashes))
    put_json(entity, "previous_key_hashes", list(session.previous_key_hashes))
    return entity


_ENDED = datetime(1970, 1, 1, tzinfo=UTC)
"""The end of a session whose end or user cannot be read: it has ended (the sweep deletes it once rewritten)."""


def _from_entity(conversation_id: str, entity: TableEntity) -> WebChatSession:
    """The session stored in `entity`, read tolerantly: a value of the wrong type (a row written by hand, or by
    another version) reads as missing, and missing means less, never an error. No readable token, expiry and
    refresh time: no held token (resume is SessionLapsed). No readable end or user: the session has ended
    (SessionExpired). A key hash, or list of them, that cannot be read matches no key. Anything else falsy or
    absent. A revoked flag of the wrong type that is not false reads as revoked."""
    token, token_expires_at, token_refresh_at = (_text(entity.get("token")), _moment(entity.get("token_expires_at")),
                                                 _moment(entity.get("token_refresh_at")))
    held = None
    if token and token_expires_at is not None and token_refresh_at is not None:
        held = HeldToken(token, token_expires_at, token_refresh_at)
    user_id, expires_at = _text(entity.get("user_id")), _moment(entity.get("expires_at"))
    if not user_id or expires_at is None:
        expires_at = _ENDED
    return WebChatSession(conversation_id, user_id, expires_at, revoked=bool(entity.get("revoked")),
                          created_at=_moment(entity.get("created_at")), updated_at=_moment(entity.get("updated_at")),
                          resume_key_hash=_text(entity.get("resume_key_hash")),
                          retry_key_hashes=_hashes(entity, "retry_key_hashes"),
                          grace_key_hash=_text(entity.get("grace_key_hash")),
                          rotated_at=_moment(entity.get("rotated_at")),
                          previous_key_hashes=_hashes(entity, "previous_key_hashes"),
                          held=held, refresh_index_key=_text(entity.get("refresh_index_key")),
                          etag=entity.metadata["etag"])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _moment(value: Any) -> datetime | None:
    """An aware datetime (what the table gives for an Edm.DateTime), else None."""
    return value if isinstance(value, datetime) and value.tzinfo is not None else None


def _hashes(entity: TableEntity, name: str) -> tuple[str, ...]:
    try:
        stored = get_json(entity, name, [])
    except (ValueError, TypeError):  # not JSON, or split over parts that are not all strings
        return ()
    return tuple(item for item in stored if isinstance(item, str)) if isinstance(stored, list) else ()
