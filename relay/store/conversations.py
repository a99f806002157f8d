"""Conversation records and their leases: `{prefix}conversations`.

One row per (channel, channel user): PartitionKey = `partition_of(key)`, the keyed hash of the
channel and the user's address (both kept in the `channel` and `user` properties), RowKey
"conversation". The record holds the user's Direct Line conversation, its token and when that token
wants refreshing (its due row may hold a newer one, which the next lease brings in), the watermark,
the activity ids already delivered, the schedule of its next poll and the lease of the one worker
that may work it.

Every write is conditional on the record's ETag: a conflicting update is re-applied on fresh data
or raised as ConcurrencyConflict, never silently overwritten. The due index (`due_polls`) follows
`next_poll_at` and `state` on every write, its row inserted before the record points at it.
A webhook never writes here: it only appends (the outbox, the due index's inbound rows), and the
worker holding the lease brings the record up to date with what arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode

from relay.errors import ConcurrencyConflict, LeaseLost
from relay.store.tables import UPDATE_ATTEMPTS, get_json, pause_after_conflict, put_json, storage_errors

if TYPE_CHECKING:
    from relay.clock import Clock
    from relay.store.due_polls import DueConversation, DuePolls
    from relay.store.tables import Budget, Tables

__all__ = [
    "DELIVERED_IDS_LIMIT",
    "ConversationKey",
    "ConversationRecord",
    "ConversationState",
    "Conversations",
    "partition_of",
]

log = logging.getLogger(__name__)


class ConversationState(StrEnum):
    """A record's `state` (stored as the value): ACTIVE until the bot or the idle timer ends it."""

    ACTIVE = "active"
    ENDED = "ended"


DELIVERED_IDS_LIMIT = 300
"""Activity ids remembered per conversation: far more than one watermark reset can replay in 24 h of chat."""

_TABLE = "conversations"
_ROW = "conversation"


@dataclass(frozen=True)
class ConversationKey:
    """Who a conversation belongs to: a channel and the user's address on it (phone number, wa id...)."""

    channel: str
    user: str


def partition_of(tables: Tables, key: ConversationKey) -> str:
    """The PartitionKey of a conversation's rows in every table keyed by conversation (32 hex digits)."""
    return tables.key_for("conversation", key.channel, key.user)


@dataclass(frozen=True)
class ConversationRecord:
    """One channel user's Direct Line conversation. Change it with dataclasses.replace inside update_record."""

    key: ConversationKey
    conversation_id: str
    user_id: str
    token: str = field(default="", repr=False)
    """The conversation's live token; empty when it has none (its tokens lapsed, or no conversation yet)."""
    token_expires_at: datetime | None = None
    token_refresh_at: datetime | None = None
    """When the token wants refreshing (about half its lifetime): the record's next poll is never later."""
    watermark: str | None = None
    delivered_ids: tuple[str, ...] = ()
    last_user_activity_at: datetime | None = None
    last_bot_activity_at: datetime | None = None
    next_poll_at: datetime | None = None
    poll_interval: float = 0.0
    state: ConversationState = ConversationState.ACTIVE
    reply_context: Mapping[str, Any] = field(default_factory=dict)
    pending_question: Mapping[str, Any] | None = None
    """The question the user was last asked and not yet answered (relay/cards.py `PendingQuestion.to_json`,
    at most PENDING_LIMIT_BYTES), so their next message can be mapped to what the bot expects; None: none."""
    peekable: bool = False
    """Settled: nothing waits in the outbox, so the poller may look for the bot's activities without the lease."""
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    etag: str | None = field(default=None, repr=False, compare=False)
    due_index_key: str | None = field(default=None, repr=False, compare=False)

    @property
    def active(self) -> bool:
        return self.state == ConversationState.ACTIVE

    def is_delivered(self, activity_id: str) -> bool:
        return activity_id in self.delivered_ids

    def with_delivered(self, *activity_ids: str) -> ConversationRecord:
        """This record remembering `activity_ids` as delivered (the oldest are forgotten past the bound)."""
        known = [i for i in self.delivered_ids if i not in activity_ids] + list(dict.fromkeys(activity_ids))
        return replace(self, delivered_ids=tuple(known[-DELIVERED_IDS_LIMIT:]))

    def without_token(self) -> ConversationRecord:
        """This record with no token: reads go with the secret, and the user's next message needs a new conversation."""
        return replace(self, token="", token_expires_at=None, token_refresh_at=None)

    def lease_held_by_other(self, owner: str, now: datetime) -> bool:
        return bool(self.lease_owner and self.lease_owner != owner and self.lease_expires_at
                    and self.lease_expires_at > now)

    def without_lease(self) -> ConversationRecord:
        return replace(self, lease_owner=None, lease_expires_at=None)

    @property
    def last_activity_at(self) -> datetime | None:
        times = [t for t in (self.last_user_activity_at, self.last_bot_activity_at, self.created_at) if t]
        return max(times) if times else None


class Conversations:
    """Reads and writes of conversation records. Methods taking `now` use it instead of the clock."""

    def __init__(self, tables: Tables, *, due_polls: DuePolls, clock: Clock):
        self._tables = tables
        self._table = tables.table(_TABLE)
        self._due_polls = due_polls
        self._clock = clock

    def get_record(self, key: ConversationKey, *, newest_token: bool = False,
                   token_lookahead: timedelta | None = None) -> ConversationRecord | None:
        """The stored record, or None when the user has none. With `newest_token`, with the newer token its due row
        holds, if it does (one read more, as acquire_lease reads it with `token_lookahead`): the token its next lease
        works with."""
        entity = self._table.get(partition_of(self._tables, key), _ROW)
        return None if entity is None else self._record(key, entity, newest_token, token_lookahead)

    def get_record_at(self, partition_key: str, *, newest_token: bool = False,
                      token_lookahead: timedelta | None = None) -> ConversationRecord | None:
        """The record whose PartitionKey is `partition_key` (what a poll queue message names a conversation by,
        so that no user's address is in a queue), or None; `newest_token` as get_record's."""
        entity = self._table.get(partition_key, _ROW)
        if entity is None:
            return None
        return self._record(ConversationKey(entity["channel"], entity["user"]), entity, newest_token, token_lookahead)

    def _record(self, key: ConversationKey, entity: TableEntity, newest_token: bool,
                token_lookahead: timedelta | None) -> ConversationRecord:
        record = _from_entity(key, entity)
        if not newest_token:
            return record
        return self._with_row_token(record, None, lookahead=token_lookahead, now=self._clock.now())

    def list_records(self, *, channel: str | None = None, limit: int = 100) -> list[ConversationRecord]:
        """Up to `limit` records, of `channel` only when given, in no particular order: a scan of the table (one
        request per 1000 records read), for an operator."""
        query, parameters = ("channel eq @channel", {"channel": channel}) if channel else ("", {})
        return [_from_entity(ConversationKey(e["channel"], e["user"]), e)
                for e in self._table.query(query, parameters, limit=limit)]

    def get_open_count(self) -> int:
        """How many conversations are open (not ended): a scan of the table (one request per 1000 records)."""
        return len(self._table.scan("state ne @ended", {"ended": ConversationState.ENDED.value}, select=["state"]))

    def update_record(
        self,
        key: ConversationKey,
        change: Callable[[ConversationRecord | None], ConversationRecord | None],
        *,
        current: ConversationRecord | None = None,
        lease_owner: str | None = None,
        keep_row: bool = False,
        now: datetime | None = None,
    ) -> ConversationRecord | None:
        """Create or change a conversation record under its ETag and return what is stored.

        `change` gets the stored record (None when there is none) and returns the record to store;
        returning its argument unchanged writes nothing. On a conflict it is called again on fresh
        data (so it must be free of side effects); after UPDATE_ATTEMPTS conflicts ConcurrencyConflict.
        Pass `current` (a record you just read, with its ETag) to save the first read. With
        `lease_owner`, LeaseLost is raised instead when the lease is no longer that owner's: another poller
        took it over, or took it and gave it back (a record without a lease is not ours to change).
        The due index follows `next_poll_at` and `state` automatically. With `keep_row`, a stored record keeps
        its row as it is, whatever changed: a lease taken, with the newer token the record took from its row.
        """
        for attempt in range(UPDATE_ATTEMPTS):
            stored = current if attempt == 0 and current is not None else self.get_record(key)
            if lease_owner is not None and (stored is None or stored.lease_owner != lease_owner):
                raise LeaseLost(f"the lease on a {key.channel} conversation is no longer held by this poller")
            wanted = change(stored)
            if wanted is None or wanted is stored or (stored is not None and wanted == stored):
                return stored
            if wanted.key != key:
                raise ValueError("change() must not change the conversation key")
            if keep_row and stored is not None and (wanted.next_poll_at, wanted.state) != (stored.next_poll_at,
                                                                                           stored.state):
                raise ValueError("change() must not move a conversation's schedule while it keeps its row")
            written_at = now or self._clock.now()
            wanted = replace(wanted, created_at=wanted.created_at or written_at, updated_at=written_at)
            old_index = stored.due_index_key if stored is not None else None
            new_index = (old_index if keep_row and stored is not None
                         else self._due_polls.schedule(wanted, previous=stored))
            entity = _to_entity(replace(wanted, due_index_key=new_index), partition_of(self._tables, key))
            with storage_errors("write a conversation record"):
                try:
                    if stored is None:
                        result = self._table.client.create_entity(entity)
                    else:
                        result = self._table.client.update_entity(entity, mode=UpdateMode.REPLACE, etag=stored.etag,
                                                                  match_condition=MatchConditions.IfNotModified)
                except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                    if new_index and new_index != old_index:
                        self._due_polls.delete_row(new_index)
                    log.info("conversation update conflicted; retrying on fresh data (attempt %d)", attempt + 1)
                    pause_after_conflict(self._clock, attempt)
                    continue
            if old_index and old_index != new_index:
                self._due_polls.delete_row(old_index)
            return replace(wanted, etag=result.get("etag"), due_index_key=new_index)
        raise ConcurrencyConflict(f"a {key.channel} conversation kept changing under {UPDATE_ATTEMPTS} attempts")

    def claim_due(self, due: DueConversation, *, owner: str, lease_seconds: float, user_id: str = "",
                  token_lookahead: timedelta | None = None, now: datetime | None = None) -> ConversationRecord | None:
        """Take the lease of a due conversation; None when it is not ours to work now.

        A schedule row is claimed only when the record is active and due; a stale one (the record
        moved on, ended or vanished) is removed here. The record takes the row's token when it is newer
        (acquire_lease). An inbound row (`due.inbound`: a message waits) is claimed whatever the schedule,
        creating the record with `user_id` when it has none; the worker removes it once the message is seen.
        """
        now = now or self._clock.now()
        if due.inbound:
            return self.acquire_lease(due.key, owner=owner, lease_seconds=lease_seconds, now=now,
                                      create_with_user_id=user_id or None, token_lookahead=token_lookahead)
        record = self.get_record(due.key)
        if record is None or record.due_index_key != due.index_key:
            self._due_polls.delete_row(due.index_key)
        if record is None or not record.active or record.next_poll_at is None or record.next_poll_at > now:
            return None
        if due.poll_interval > record.poll_interval:
            # Peeks back off on the row alone: the worker carries on from there (a token refresh is no news).
            record = replace(record, poll_interval=due.poll_interval)
        return self.acquire_lease(due.key, owner=owner, lease_seconds=lease_seconds, now=now, current=record,
                                  row=due, token_lookahead=token_lookahead)

    def acquire_lease(self, key: ConversationKey, *, owner: str, lease_seconds: float, now: datetime | None = None,
                      current: ConversationRecord | None = None, create_with_user_id: str | None = None,
                      token_lookahead: timedelta | None = None,
                      row: DueConversation | None = None) -> ConversationRecord | None:
        """Hold the conversation for `lease_seconds` (renews our own lease); None while another owner holds it.

        A lease ends on its own when its holder dies: after expiry anyone may take it over. With
        `create_with_user_id`, a conversation without a record gets one, with that Direct Line user
        id, inserted only if absent: concurrent creators all end up with the first one's record.
        Without it, None when there is no record.

        The lease brings into the record the newer token its due row holds (a quiet refresh puts its token
        there alone: poller.py), in the same write, so the holder never works with a token older than the
        row's. The row is the one given (`row`, as the caller read it), else read when it may hold one: a
        settled record with a token, from `token_lookahead` before its refresh time (the poller's idle
        ceiling: a quiet refresh is early by at most one idle interval; None: whatever the time).
        """
        now = now or self._clock.now()
        held_by_other = False

        def take(record: ConversationRecord | None) -> ConversationRecord | None:
            nonlocal held_by_other
            if record is None and create_with_user_id:
                record = ConversationRecord(key, conversation_id="", user_id=create_with_user_id)
            held_by_other = record is not None and record.lease_held_by_other(owner, now)
            if record is None or held_by_other:
                return record
            return replace(self._with_row_token(record, row, lookahead=token_lookahead, now=now), lease_owner=owner,
                           lease_expires_at=now + timedelta(seconds=lease_seconds))

        record = self.update_record(key, take, current=current, keep_row=True, now=now)
        return None if record is None or held_by_other else record

    def _with_row_token(self, record: ConversationRecord, row: DueConversation | None, *,
                        lookahead: timedelta | None, now: datetime) -> ConversationRecord:
        """`record` with its row's token when the row holds a newer one for the same Direct Line conversation."""
        if not (record.peekable and record.token and record.due_index_key):
            return record  # only a settled record's row is peeked, and so refreshed; a token let go stays gone
        if row is None or row.index_key != record.due_index_key:
            if (lookahead is not None and record.token_refresh_at is not None
                    and now + lookahead < record.token_refresh_at):
                return record  # too early for a peek to have refreshed the token
            row = self._due_polls.get_row(key=record.key, index_key=record.due_index_key)
        if (row is None or not row.token or row.conversation_id != record.conversation_id
                or row.token_expires_at is None  # written before rows kept it: never newer than the record's
                or (record.token_expires_at is not None and row.token_expires_at <= record.token_expires_at)):
            return record  # newer is later to expire (a refresh time is drawn at random within the token's life)
        return replace(record, token=row.token, token_refresh_at=row.token_refresh_at,
                       token_expires_at=row.token_expires_at)

    def release_lease(self, record: ConversationRecord, *, owner: str, now: datetime | None = None) -> None:
        """Give the lease back early (a no-op when it is no longer ours)."""

        def drop(stored: ConversationRecord | None) -> ConversationRecord | None:
            if stored is None or stored.lease_owner != owner:
                return stored
            return stored.without_lease()

        self.update_record(record.key, drop, current=record, now=now)

    def delete_inactive(self, *, idle_before: datetime, budget: Budget,
                        waiting: Callable[[ConversationKey], bool]) -> int:
        """Delete the records that ended or saw no activity since `idle_before`, and their index rows, but
        never one whose user still has messages `waiting` to be posted (Direct Line refusing them for days
        must not strand them).

        A table scan for the sweep, paged while `budget` lasts; a record that changed since it was
        read is left alone. Returns how many went."""
        deleted = self._table.delete_pages("state eq @ended or last_activity_at lt @cutoff",
                                           {"ended": ConversationState.ENDED, "cutoff": idle_before}, budget=budget,
                                           keep=lambda e: waiting(ConversationKey(e["channel"], e["user"])))
        for entity in deleted:
            if entity.get("due_index_key"):
                self._due_polls.delete_row(entity["due_index_key"])
        return len(deleted)


def _to_entity(record: ConversationRecord, partition_key: str) -> dict[str, Any]:
    entity = {
        "PartitionKey": partition_key, "RowKey": _ROW,
        "channel": record.key.channel, "user": record.key.user,
        "conversation_id": record.conversation_id, "user_id": record.user_id, "token": record.token,
        "token_expires_at": record.token_expires_at, "token_refresh_at": record.token_refresh_at,
        "watermark": record.watermark,
        "last_user_activity_at": record.last_user_activity_at, "last_bot_activity_at": record.last_bot_activity_at,
        "last_activity_at": record.last_activity_at, "next_poll_at": record.next_poll_at,
        "poll_interval": float(record.poll_interval), "state": record.state,
        "lease_owner": record.lease_owner, "lease_expires_at": record.lease_expires_at,
        "created_at": record.created_at, "updated_at": record.updated_at, "due_index_key": record.due_index_key,
        "peekable": record.peekable,
    }
    put_json(entity, "delivered_ids", list(record.delivered_ids))
    put_json(entity, "reply_context", dict(record.reply_context))
    if record.pending_question:
        put_json(entity, "pending_question", dict(record.pending_question))
    return entity


def _from_entity(key: ConversationKey, entity: TableEntity) -> ConversationRecord:
    return ConversationRecord(
        key=key, conversation_id=entity["conversation_id"], user_id=entity["user_id"],
        token=entity.get("token") or "", token_expires_at=entity.get("token_expires_at"),
        token_refresh_at=entity.get("token_refresh_at"),
        watermark=entity.get("watermark"), delivered_ids=tuple(get_json(entity, "delivered_ids", [])),
        last_user_activity_at=entity.get("last_user_activity_at"),
        last_bot_activity_at=entity.get("last_bot_activity_at"), next_poll_at=entity.get("next_poll_at"),
        poll_interval=entity.get("poll_interval") or 0.0,
        state=ConversationState(entity.get("state", ConversationState.ACTIVE)),
        reply_context=get_json(entity, "reply_context", {}), peekable=bool(entity.get("peekable")),
        pending_question=get_json(entity, "pending_question") or None,
        lease_owner=entity.get("lease_owner"),
        lease_expires_at=entity.get("lease_expires_at"), created_at=entity.get("created_at"),
        updated_at=entity.get("updated_at"), etag=entity.metadata["etag"],
        due_index_key=entity.get("due_index_key"),
    )
