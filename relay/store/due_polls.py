"""The due index: `{prefix}duepolls`, which conversations want polling and when.

PartitionKey "due", RowKey "<next poll ms>|<conversation's partition key>|<nonce>", so the timer
reads only the rows that are due with one RowKey range; idle rows cost nothing. A settled
conversation's row also carries what a peek needs (conversation id, watermark, last activity, next
peek time `peek_after`) and when its token wants refreshing (`token_refresh_at`): the poller looks
for new activities without reading the record or taking the lease, and when there are none it only
moves `peek_after` on, for up to 100 conversations in one batch, never past `token_refresh_at`. So
the row of an idle conversation is due at the latest when its token wants refreshing, and the
poller refreshes it at the last peek before that time (poller.py): the token is kept alive for as
long as the conversation is open, at the cost of one refresh per half-life. The row also carries
the conversation's token (`token`) and its expiry (`token_expires_at`), which a peek reads with: in
token endpoint mode there is no secret to read with. The row is written with the record's token; a
quiet refresh (poller.py) puts the new token into the row alone, in place, in the postponing batch,
so between two leased runs the row may hold a newer token than its record. Whoever takes the lease
brings it into the record (Conversations.acquire_lease): a record never works with an older token
than its row holds. Each token is good until it expires, well past `token_refresh_at`.

The record points at its row (`due_index_key`); a row is written before the record points at it,
so none is ever missing, and a row nothing points at any more is removed when it is claimed.

Inbound rows, "000000000000000|<conversation's partition key>|<message key>", one per message a
webhook took: "this message may wait in the outbox". A webhook upserts its message's row BEFORE
the message's outbox row (so an outbox entry never exists without one, whenever the webhook dies)
and never touches the record, so concurrent messages of one user never fight over a row. They sort
first, are always due, and send their conversation down the full path whatever its schedule. A
worker removes a row only after it saw the message in the outbox and scheduled the record after it
(or found the message handled, or the row orphaned by a webhook that died before storing it).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from azure.core import MatchConditions
from azure.core.exceptions import AzureError
from azure.data.tables import TableEntity, TableTransactionError, UpdateMode

from relay.clock import Clock
from relay.errors import StoreError
from relay.store.conversations import ConversationKey, ConversationRecord, ConversationState, partition_of
from relay.store.tables import BATCH_LIMIT, Tables, millis, storage_errors, transaction_error_code

__all__ = ["DueConversation", "DuePolls", "InboundMark", "Postponement"]

log = logging.getLogger(__name__)

_TABLE = "duepolls"
_PARTITION = "due"
_INBOUND_AT = f"{0:015d}"  # before every time: inbound rows are always due, and read first
POSTPONE_WORKERS = 4
"""Postponing transactions sent at a time (each of up to 100 rows of the one partition "due")."""


@dataclass(frozen=True)
class InboundMark:
    """An inbound row of the due index: message `message_id` of this conversation may wait in the outbox."""

    key: ConversationKey
    message_id: str
    marked_at: datetime
    row_key: str = field(repr=False)
    etag: str | None = field(default=None, repr=False, compare=False)
    """The row as it was read or written: clearing it leaves a row a provider's retry wrote since."""


@dataclass(frozen=True)
class DueConversation:
    """A row of the due index: this conversation wants polling at `due_at`.

    A settled conversation's row (`peekable`) carries its Direct Line conversation id, a watermark no
    newer than the record's, the last message of the user or the bot and its current idle interval:
    enough to look for new activities without reading the record. A stale copy only ever sends the
    poller down the full path."""

    key: ConversationKey
    due_at: datetime
    index_key: str = field(repr=False)
    conversation_id: str = ""
    watermark: str | None = None
    last_activity_at: datetime | None = None
    poll_interval: float = 0.0
    last_user_activity_at: datetime | None = None
    """The user's last message (None in rows written before it was kept): the schedule's fast phase follows it."""
    token_refresh_at: datetime | None = None
    """When the conversation's token wants refreshing: no postponement past it (the peek then refreshes it)."""
    token: str = field(default="", repr=False)
    """The conversation's token ("" when it had none): what a peek reads with; newer than the record's once a quiet
    refresh put its new token here."""
    token_expires_at: datetime | None = None
    """When `token` expires (None in rows written before rows kept it): the later of two tokens is the newer."""
    etag: str | None = field(default=None, repr=False, compare=False)
    inbound: tuple[InboundMark, ...] = ()
    """The conversation's inbound rows that were read: messages that may wait, whatever the schedule."""

    @property
    def peekable(self) -> bool:
        return bool(self.conversation_id) and not self.inbound


@dataclass(frozen=True)
class Postponement:
    """A quiet row's next peek moved to `peek_after` (never past its token's refresh), at idle interval `interval`.

    With `token_refresh_at`, the peek refreshed the row's token and `token` is the new one, expiring at
    `token_expires_at`: the row takes all three, and the record takes them from the row at its next lease."""

    row: DueConversation
    peek_after: datetime
    interval: float
    token: str = field(default="", repr=False)
    token_refresh_at: datetime | None = None
    token_expires_at: datetime | None = None


class DuePolls:
    """Reads and writes of the due index."""

    def __init__(self, tables: Tables, *, clock: Clock):
        self._tables = tables
        self._table = tables.table(_TABLE)
        self._clock = clock

    def mark_inbound(self, key: ConversationKey, message_id: str, *, now: datetime | None = None) -> InboundMark:
        """Make the conversation due for the provider's message `message_id`.

        An upsert of the message's own row: idempotent, and it cannot conflict with anything. Raises
        StoreError when it cannot be written (then the message must not be stored either)."""
        now = now or self._clock.now()
        row_key = f"{_INBOUND_AT}|{partition_of(self._tables, key)}|{self._tables.key_for('inbound', message_id)}"
        with storage_errors("mark a conversation due"):
            written = self._table.client.upsert_entity({"PartitionKey": _PARTITION, "RowKey": row_key,
                                                        "channel": key.channel, "user": key.user,
                                                        "message_id": message_id, "marked_at": now},
                                                       mode=UpdateMode.REPLACE)
        return InboundMark(key, message_id, now, row_key, etag=written.get("etag"))

    def clear_inbound(self, marks: Sequence[InboundMark]) -> None:
        """Remove inbound rows, up to 100 per transaction, each only as it was read (a row written again since,
        by a provider's retry, stays). Best effort: a row left is only worked once more."""
        for start in range(0, len(marks), BATCH_LIMIT):
            batch = marks[start:start + BATCH_LIMIT]
            try:
                self._table.delete_batch([{"PartitionKey": _PARTITION, "RowKey": mark.row_key} for mark in batch],
                                         etags=[mark.etag for mark in batch])
            except StoreError as error:
                log.warning("could not clear inbound rows: %s", error)

    def list_due(self, *, now: datetime | None = None, limit: int = 200,
                 rows: tuple[str, str] | None = None) -> list[DueConversation]:
        """Conversations whose next poll (or peek) time has come, earliest first: one RowKey range of the index.

        Conversations that are not due are not read at all, so thousands of idle ones cost nothing here
        (a query page of up to 1000 rows is one transaction). `rows`: only the rows from the first RowKey
        through the second (a batch of the poll queue, relay/fanout.py).
        """
        now = now or self._clock.now()
        query = self._table.client.query_entities(
            f"{self._due_filter(rows)} and not (peek_after gt @now )",
            parameters=self._due_parameters(now, rows),
            select=["RowKey", "channel", "user", "conversation_id", "watermark", "last_activity_at",
                    "last_user_activity_at", "poll_interval", "token_refresh_at", "token", "token_expires_at",
                    "message_id", "marked_at"],
            results_per_page=min(max(limit, 1), 1000),
        )
        due: dict[ConversationKey, DueConversation] = {}
        with storage_errors("read the due index"):
            for entity in query:
                key = ConversationKey(entity["channel"], entity["user"])
                if entity.get("message_id") is not None:
                    mark = InboundMark(key, entity["message_id"], entity.get("marked_at") or now, entity["RowKey"],
                                       etag=entity.metadata.get("etag"))
                    if key in due:
                        due[key] = replace(due[key], inbound=(*due[key].inbound, mark))
                        continue
                    due[key] = DueConversation(key, mark.marked_at, mark.row_key, inbound=(mark,))
                elif key not in due:
                    due[key] = _scheduled(key, entity)
                else:
                    continue
                if len(due) >= limit:
                    break
        return list(due.values())

    def get_row(self, key: ConversationKey, index_key: str) -> DueConversation | None:
        """Conversation `key`'s scheduled row `index_key` (the record's `due_index_key`), or None when it is gone."""
        entity = self._table.get(_PARTITION, index_key)
        return None if entity is None else _scheduled(key, entity)

    def list_due_rows(self, *, now: datetime | None = None, limit: int) -> list[str]:
        """The RowKeys of up to `limit` due rows, in order (what the timer splits into the poll queue's batches):
        the same rows as list_due reads, without their properties."""
        now = now or self._clock.now()
        query = self._table.client.query_entities(
            f"{self._due_filter(None)} and not (peek_after gt @now )", parameters=self._due_parameters(now, None),
            select=["RowKey"], results_per_page=1000)
        keys: list[str] = []
        with storage_errors("read the due index"):
            for entity in query:
                keys.append(entity["RowKey"])
                if len(keys) >= limit:
                    break
        return keys

    @staticmethod
    def _due_filter(rows: tuple[str, str] | None) -> str:
        # `not (... gt ...)` (appended by the callers): a row without peek_after (older code wrote none) is due by
        # its RowKey alone. (The space before ")" lets the SDK find the @now parameter.)
        bounds = " and RowKey ge @first and RowKey le @last" if rows else ""
        return f"PartitionKey eq @pk and RowKey lt @upper{bounds}"

    @staticmethod
    def _due_parameters(now: datetime, rows: tuple[str, str] | None) -> dict:
        parameters = {"pk": _PARTITION, "upper": f"{millis(now) + 1:015d}", "now": now}
        if rows:
            parameters |= {"first": rows[0], "last": rows[1]}
        return parameters

    def postpone_rows(self, postponements: Sequence[Postponement]) -> int:
        """Move the next peek of conversations that had nothing new, and bring a refreshed token into its row.

        A peek is never moved past the row's `token_refresh_at`: the token is refreshed in time however
        long the conversation stays idle. Rows are updated in place, up to 100 in one entity-group transaction
        (one billed transaction), up to POSTPONE_WORKERS transactions at a time: each waits mostly on the service,
        and 1,000 quiet conversations one batch after another took longer than peeking them. A plain postponement
        is made under the row's ETag: a row changed or removed meanwhile (a webhook, a worker's finish) is left
        alone, that schedule wins. A refreshed token goes into the row whatever its ETag, as long as the row
        exists: nothing else writes a row in place but postponements (a worker's schedule is a new row). Best
        effort: a row not moved is only peeked again, and one that missed its refreshed token stays due, its next
        peek refreshing the token again (the token it held is good until it expires, long after). Returns how
        many moved."""
        operations = [_postponing(postponement) for postponement in postponements
                      if postponement.row.etag or postponement.token_refresh_at]
        batches = [operations[start:start + BATCH_LIMIT] for start in range(0, len(operations), BATCH_LIMIT)]
        with ThreadPoolExecutor(max_workers=max(1, min(len(batches), POSTPONE_WORKERS)),
                                thread_name_prefix="postpone") as pool:
            return sum(pool.map(self._postpone_batch, batches))

    def _postpone_batch(self, batch: list) -> int:
        """One transaction of postpone_rows: how many of its rows moved."""
        for _ in range(3):  # a conflicting row fails its whole batch: drop it and try the rest again
            try:
                self._table.client.submit_transaction(batch)
            except TableTransactionError as error:
                if transaction_error_code(error) not in ("UpdateConditionNotSatisfied", "ResourceNotFound"):
                    log.warning("could not postpone due rows: %s", transaction_error_code(error))
                    return 0
                batch = batch[:error.index] + batch[error.index + 1:]
                if not batch:
                    return 0
                continue
            except AzureError as error:
                log.warning("could not postpone due rows: %s", type(error).__name__)
                return 0
            return len(batch)
        # rows kept changing under it: the refreshed tokens, which no change of a row refuses, still go in
        tokens = [operation for operation in batch if "etag" not in operation[2]]
        return self._postpone_batch(tokens) if tokens and len(tokens) < len(batch) else 0

    def schedule(self, record: ConversationRecord, *, previous: ConversationRecord | None) -> str | None:
        """The RowKey of the record's index row, inserted first when `previous` (the stored record) has none to keep.

        A row is kept while the schedule and what a peek relies on stay the same; None when the
        record wants no polling (ended, or nothing scheduled). Raises StoreError when the row cannot be written."""
        if record.state != ConversationState.ACTIVE or record.next_poll_at is None:
            return None
        old_index = previous.due_index_key if previous is not None else None
        reusable = previous is not None and _peek_view(previous) == _peek_view(record)
        prefix = f"{millis(record.next_poll_at):015d}|{partition_of(self._tables, record.key)}|"
        if reusable and old_index and old_index.startswith(prefix):
            return old_index
        index = f"{prefix}{secrets.token_hex(4)}"
        row = {"PartitionKey": _PARTITION, "RowKey": index, "channel": record.key.channel,
               "user": record.key.user, "peek_after": record.next_poll_at}
        if _peek_view(record):
            row |= {"conversation_id": record.conversation_id, "watermark": record.watermark,
                    "last_activity_at": max((t for t in (record.last_user_activity_at, record.last_bot_activity_at)
                                             if t), default=None),
                    "last_user_activity_at": record.last_user_activity_at,
                    "poll_interval": float(record.poll_interval), "token_refresh_at": record.token_refresh_at,
                    "token": record.token, "token_expires_at": record.token_expires_at}
        self._table.create(row)
        return index

    def delete_row(self, index_key: str) -> None:
        """Best effort: a leftover row is harmless (Conversations.claim_due removes it later)."""
        self._table.delete_quietly(_PARTITION, index_key)


def _postponing(postponement: Postponement) -> tuple:
    """The transaction operation of one postponement (DuePolls.postpone_rows)."""
    row, refresh_at = postponement.row, postponement.token_refresh_at or postponement.row.token_refresh_at
    entity = {"PartitionKey": _PARTITION, "RowKey": row.index_key,
              "peek_after": _before_refresh(postponement.peek_after, refresh_at),
              "poll_interval": float(postponement.interval)}
    if postponement.token_refresh_at:  # If-Match: *, the row as it is now
        return "update", entity | {"token": postponement.token, "token_refresh_at": refresh_at,
                                   "token_expires_at": postponement.token_expires_at}, {"mode": UpdateMode.MERGE}
    return "update", entity, {"mode": UpdateMode.MERGE, "etag": row.etag,
                              "match_condition": MatchConditions.IfNotModified}


def _scheduled(key: ConversationKey, entity: TableEntity) -> DueConversation:
    """A scheduled (not inbound) row as read."""
    return DueConversation(
        key, datetime.fromtimestamp(int(entity["RowKey"][:15]) / 1000, UTC), entity["RowKey"],
        conversation_id=entity.get("conversation_id") or "", watermark=entity.get("watermark"),
        last_activity_at=entity.get("last_activity_at"), last_user_activity_at=entity.get("last_user_activity_at"),
        poll_interval=entity.get("poll_interval") or 0.0, token_refresh_at=entity.get("token_refresh_at"),
        token=entity.get("token") or "", token_expires_at=entity.get("token_expires_at"),
        etag=entity.metadata.get("etag"))


def _before_refresh(peek_after: datetime, token_refresh_at: datetime | None) -> datetime:
    """A next peek never later than the token's refresh time: a peek comes before the token wants refreshing."""
    return min(peek_after, token_refresh_at) if token_refresh_at else peek_after


def _peek_view(record: ConversationRecord) -> tuple | None:
    """What the due-index row of a peekable record promises; a change needs a new row.

    The watermark is not part of it: a row's older watermark only makes a peek see activities the
    record already handled, which sends the poller down the full path (never a missed message). The
    token's refresh time is: a row must never let a peek run past it; and so is the token a peek reads with."""
    if not (record.peekable and record.conversation_id):
        return None
    return record.conversation_id, record.token_refresh_at, record.token
