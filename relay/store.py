"""Table Storage: the relay's only state between invocations.

The connection comes from the `AzureWebJobsStorage` settings, read the way the Functions host
reads them: a connection string (Azurite locally), or identity-based access in Azure
(`__tableServiceUri` or `__accountName`, `__credential=managedidentity`, `__clientId`).

Tables (each name starts with `RELAY_TABLE_PREFIX`, created on first use, once per process):

    {prefix}conversations   one row per (channel, channel user): PartitionKey = the key, RowKey "conversation"
    {prefix}duepolls        the due index: PartitionKey "due", RowKey "<next poll ms>|<key>|<nonce>", so the
                            timer reads only the rows that are due with one RowKey range; idle rows cost nothing.
                            A settled conversation's row also carries what a peek needs (conversation id,
                            watermark, last activity, next peek time `peek_after`): the poller looks for new
                            activities without reading the record or taking the lease, and when there are none
                            it only moves `peek_after` on, for up to 100 conversations in one batch
    {prefix}inbound         per conversation key: "dedupe|<provider message id>" rows (pending/posted/dead) and
                            "outbox|<received ms>|<id>" rows (messages not yet taken by Direct Line), written
                            together in one entity-group transaction so a message is never deduped but lost
    {prefix}deadletters     replies a provider refused and inbound messages Direct Line refused, with the reason
    {prefix}webchatsessions Web Chat sessions of the token server, by Direct Line conversation id
    {prefix}ratelimits      fixed-window counters per client address (hashed)

Every conditional write uses the entity's ETag: a conflicting update is re-applied on fresh data or
raised as ConcurrencyConflict, never silently overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import TableClient, TableServiceClient, TableTransactionError, UpdateMode
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from relay.errors import ConcurrencyConflict, LeaseLost, StoreError
from relay.settings import StorageSettings, get_settings

log = logging.getLogger(__name__)

# Short timeouts: a function invocation must fail fast and answer, not hang on storage.
CLIENT_OPTIONS = {"retry_total": 2}
TRANSPORT_OPTIONS = {"connection_timeout": 5, "read_timeout": 10}
CONNECTION_POOL_SIZE = 64  # as many as the poller's workers (requests keeps only 10 by default)


class PooledTransport(RequestsTransport):
    """azure-core's requests transport with a connection pool as large as the poller's worker pool.

    With the default pool of 10, concurrent workers open and drop a TCP connection per request."""

    def __init__(self, *, pool_size: int = CONNECTION_POOL_SIZE, **kwargs):
        super().__init__(**{**TRANSPORT_OPTIONS, **kwargs})
        self._pool_size = pool_size

    def _init_session(self, session) -> None:
        super()._init_session(session)
        adapter = HTTPAdapter(pool_maxsize=self._pool_size, max_retries=Retry(total=False, redirect=False,
                                                                               raise_on_status=False))
        for prefix in self._protocols:
            session.mount(prefix, adapter)


def storage_credential(storage: StorageSettings):
    """The token credential for identity-based storage (imported lazily: azure-identity is slow to load)."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if storage.credential == "managedidentity":
        return ManagedIdentityCredential(client_id=storage.client_id or None)
    return DefaultAzureCredential(managed_identity_client_id=storage.client_id or None)


# What `UseDevelopmentStorage=true` means: Azurite's well-known account on its default ports.
DEVELOPMENT_STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)


def table_service_client(storage: StorageSettings, **options) -> TableServiceClient:
    options = {**CLIENT_OPTIONS, **options}
    options.setdefault("transport", PooledTransport())
    if storage.connection_string:
        connection_string = storage.connection_string
        if connection_string.replace(" ", "").lower() == "usedevelopmentstorage=true":
            connection_string = DEVELOPMENT_STORAGE
        return TableServiceClient.from_connection_string(connection_string, **options)
    return TableServiceClient(endpoint=storage.table_service_uri, credential=storage_credential(storage), **options)


ACTIVE = "active"
ENDED = "ended"

PENDING = "pending"  # inbound message stored, waiting in the outbox for Direct Line
POSTED = "posted"  # Direct Line took it
DEAD = "dead"  # Direct Line refused it for good (dead letter)

DELIVERED_IDS_LIMIT = 300
"""Activity ids remembered per conversation: far more than one watermark reset can replay in 24 h of chat."""
PREVIOUS_KEYS_LIMIT = 20
UPDATE_ATTEMPTS = 5
_MAX_STRING = 30_000  # characters per string property (Table Storage allows 64 KiB of UTF-16)
_DUE_PARTITION = "due"
_BATCH_LIMIT = 100  # operations in one entity-group transaction
_CONVERSATION_ROW = "conversation"
_DEDUPE = "dedupe|"
_OUTBOX = "outbox|"


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ConversationKey:
    """Who a conversation belongs to: a channel and the user's address on it (phone number, wa id...)."""

    channel: str
    user: str

    @property
    def partition_key(self) -> str:
        return f"{_escape(self.channel)}|{_escape(self.user)}"


@dataclass(frozen=True)
class ConversationRecord:
    """One channel user's Direct Line conversation. Change it with dataclasses.replace inside update_conversation."""

    key: ConversationKey
    conversation_id: str
    user_id: str
    token: str = field(default="", repr=False)
    token_expires_at: datetime | None = None
    watermark: str | None = None
    delivered_ids: tuple[str, ...] = ()
    last_user_activity_at: datetime | None = None
    last_bot_activity_at: datetime | None = None
    next_poll_at: datetime | None = None
    poll_interval: float = 0.0
    state: str = ACTIVE
    reply_context: Mapping[str, Any] = field(default_factory=dict)
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
        return self.state == ACTIVE

    def is_delivered(self, activity_id: str) -> bool:
        return activity_id in self.delivered_ids

    def with_delivered(self, *activity_ids: str) -> ConversationRecord:
        """This record remembering `activity_ids` as delivered (the oldest are forgotten past the bound)."""
        known = [i for i in self.delivered_ids if i not in activity_ids] + list(dict.fromkeys(activity_ids))
        return replace(self, delivered_ids=tuple(known[-DELIVERED_IDS_LIMIT:]))

    def lease_held_by_other(self, owner: str, now: datetime) -> bool:
        return bool(self.lease_owner and self.lease_owner != owner and self.lease_expires_at
                    and self.lease_expires_at > now)

    def without_lease(self) -> ConversationRecord:
        return replace(self, lease_owner=None, lease_expires_at=None)

    @property
    def last_activity_at(self) -> datetime | None:
        times = [t for t in (self.last_user_activity_at, self.last_bot_activity_at, self.created_at) if t]
        return max(times) if times else None


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
    etag: str | None = field(default=None, repr=False, compare=False)

    @property
    def peekable(self) -> bool:
        return bool(self.conversation_id)


@dataclass(frozen=True)
class InboundMessage:
    """A provider message waiting in a conversation's outbox for Direct Line to take it.

    `in_doubt` is true once a post was attempted without a clear answer: look for the activity's
    clientActivityID in the conversation before posting it again.
    """

    key: ConversationKey
    message_id: str
    activity: Mapping[str, Any] = field(repr=False)
    received_at: datetime
    attempts: int = 0
    in_doubt: bool = False
    last_error: str = ""
    row_key: str = field(default="", repr=False, compare=False)
    etag: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class InboundResult:
    """What record_inbound found: a new message (in the outbox now) or a retried webhook's duplicate."""

    is_new: bool
    state: str  # PENDING, POSTED or DEAD
    message: InboundMessage | None = None  # the outbox entry when the message is new
    activity_id: str | None = None  # Direct Line's id once POSTED


@dataclass(frozen=True)
class DeadLetter:
    key: ConversationKey
    kind: str  # "reply" (a provider refused the bot's message) or "inbound" (Direct Line refused the user's)
    reason: str
    payload: Mapping[str, Any] = field(repr=False)
    created_at: datetime
    row_key: str = field(default="", repr=False, compare=False)


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

    def resume_outcome(self, resume_key: str, *, now: datetime) -> str:
        """What presenting `resume_key` at `now` means (RESUMED or RETRIED: accepted), hashes compared in constant time.

        The key the last resume used is good once more (RETRIED) within RESUME_GRACE while none of
        the keys it was rotated to has been used: that resume's answer was lost, or two resumes raced.
        """
        presented = hash_resume_key(resume_key)
        if self.revoked:
            return SESSION_REVOKED
        if self.expires_at <= now:
            return SESSION_EXPIRED
        if _any_digest_equal(presented, (self.resume_key_hash, *self.retry_key_hashes)):
            return RESUMED
        if (self.grace_key_hash and hmac.compare_digest(presented, self.grace_key_hash)
                and self.rotated_at is not None and now < self.rotated_at + RESUME_GRACE
                and len(self.retry_key_hashes) + 1 < GRACE_KEYS_LIMIT):
            return RETRIED
        if _any_digest_equal(presented, self.previous_key_hashes):
            return REUSED_KEY
        return WRONG_KEY


# Outcomes of resume_webchat_session
RESUMED = "resumed"  # key matched: rotated to the new key, session extended
RETRIED = "retried"  # the key the last resume used, again within the grace period: one more new key
UNKNOWN_SESSION = "unknown_session"
SESSION_EXPIRED = "expired"
SESSION_REVOKED = "revoked"  # revoked earlier
WRONG_KEY = "wrong_key"
REUSED_KEY = "reused_key"  # an already rotated key: the session is revoked now (a stolen key)

RESUME_GRACE = timedelta(seconds=60)
"""How long a rotated-away key stays good for a retry while no key it was rotated to was used. A page
whose resume answer was lost retries with the key it still holds (relay-webchat.js after 1, 3, 7, 15
and 31 s while online); short, so that a copied key presented later still revokes the session."""
GRACE_KEYS_LIMIT = 8  # valid keys at once in a grace period (keeps the row small); past it a retry is a reuse


@dataclass(frozen=True)
class ResumeResult:
    outcome: str
    session: WebChatSession | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in (RESUMED, RETRIED)


@dataclass(frozen=True)
class RateLimitResult:
    allowed: bool
    count: int
    limit: int
    retry_after: float  # seconds until the window resets (0 when allowed)


@dataclass(frozen=True)
class SweepResult:
    conversations: int = 0
    dedupe_entries: int = 0
    webchat_sessions: int = 0
    rate_limits: int = 0
    dead_letters: int = 0


# ------------------------------------------------------------------------------------------------ store

_created_tables: set[tuple[str, str]] = set()
_created_lock = threading.Lock()


class RelayStore:
    """Every read and write the relay and the token server make to Table Storage.

    Methods taking `now` use it instead of the clock, so callers and tests decide time.
    """

    def __init__(self, service: TableServiceClient, *, prefix: str):
        self._service = service
        self._prefix = prefix
        self._tables: dict[str, TableClient] = {}

    @classmethod
    def from_settings(cls, storage: StorageSettings, **client_options) -> RelayStore:
        return cls(table_service_client(storage, **client_options), prefix=storage.table_prefix)

    def __repr__(self) -> str:
        return f"RelayStore(account={self._service.account_name!r}, prefix={self._prefix!r})"

    def _table(self, name: str) -> TableClient:
        client = self._tables.get(name)
        if client is None:
            full = f"{self._prefix}{name}"
            marker = (self._service.url, full)
            if marker not in _created_tables:
                with _created_lock:
                    if marker not in _created_tables:
                        try:
                            self._service.create_table_if_not_exists(full)
                        except AzureError as error:
                            raise StoreError(f"cannot create table {full}: {type(error).__name__}") from error
                        _created_tables.add(marker)
            client = self._tables[name] = self._service.get_table_client(full)
        return client

    # ------------------------------------------------------------------------------------ conversations

    def get_conversation(self, key: ConversationKey) -> ConversationRecord | None:
        entity = self._get("conversations", key.partition_key, _CONVERSATION_ROW)
        return None if entity is None else _conversation_from_entity(key, entity)

    def update_conversation(
        self,
        key: ConversationKey,
        change: Callable[[ConversationRecord | None], ConversationRecord | None],
        *,
        current: ConversationRecord | None = None,
        lease_owner: str | None = None,
        now: datetime | None = None,
    ) -> ConversationRecord | None:
        """Create or change a conversation record under its ETag and return what is stored.

        `change` gets the stored record (None when there is none) and returns the record to store;
        returning its argument unchanged writes nothing. On a conflict it is called again on fresh
        data (so it must be free of side effects); after UPDATE_ATTEMPTS conflicts ConcurrencyConflict.
        Pass `current` (a record you just read, with its ETag) to save the first read. With
        `lease_owner`, LeaseLost is raised instead when another poller has taken the lease over.
        The due index follows `next_poll_at` and `state` automatically.
        """
        table = self._table("conversations")
        for attempt in range(UPDATE_ATTEMPTS):
            stored = current if attempt == 0 and current is not None else self.get_conversation(key)
            if lease_owner is not None and (stored is None or (stored.lease_owner or lease_owner) != lease_owner):
                raise LeaseLost(f"the lease on a {key.channel} conversation is no longer held by this poller")
            wanted = change(stored)
            if wanted is None or wanted is stored or (stored is not None and wanted == stored):
                return stored
            if wanted.key != key:
                raise ValueError("change() must not change the conversation key")
            written_at = now or utcnow()
            wanted = replace(wanted, created_at=wanted.created_at or written_at, updated_at=written_at)
            old_index = stored.due_index_key if stored is not None else None
            new_index = self._schedule(wanted, old_index, reusable=stored is not None
                                       and _peek_view(stored) == _peek_view(wanted))
            entity = _conversation_to_entity(replace(wanted, due_index_key=new_index))
            try:
                if stored is None:
                    result = table.create_entity(entity)
                else:
                    result = table.update_entity(entity, mode=UpdateMode.REPLACE, etag=stored.etag,
                                                 match_condition=MatchConditions.IfNotModified)
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                if new_index != old_index:
                    self._delete_quietly("duepolls", _DUE_PARTITION, new_index)
                log.info("conversation update conflicted; retrying on fresh data (attempt %d)", attempt + 1)
                _pause_after_conflict(attempt)
                continue
            except AzureError as error:
                raise StoreError(f"cannot write a conversation record: {type(error).__name__}") from error
            if old_index and old_index != new_index:
                self._delete_quietly("duepolls", _DUE_PARTITION, old_index)
            return replace(wanted, etag=result.get("etag"), due_index_key=new_index)
        raise ConcurrencyConflict(f"a {key.channel} conversation kept changing under {UPDATE_ATTEMPTS} attempts")

    def _schedule(self, record: ConversationRecord, old_index: str | None, *, reusable: bool) -> str | None:
        """The due-index row for the record, inserted BEFORE the record points at it (so none is ever missing).

        The row is kept while the schedule and what a peek relies on (`reusable`) stay the same."""
        if record.state != ACTIVE or record.next_poll_at is None:
            return None
        if reusable and old_index and old_index.startswith(_due_prefix(record.next_poll_at, record.key)):
            return old_index
        index = f"{_due_prefix(record.next_poll_at, record.key)}{secrets.token_hex(4)}"
        row = {"PartitionKey": _DUE_PARTITION, "RowKey": index, "channel": record.key.channel,
               "user": record.key.user, "peek_after": record.next_poll_at}
        if _peek_view(record):
            row |= {"conversation_id": record.conversation_id, "watermark": record.watermark,
                    "last_activity_at": max((t for t in (record.last_user_activity_at, record.last_bot_activity_at)
                                             if t), default=None),
                    "poll_interval": float(record.poll_interval)}
        self._write("duepolls", row)
        return index

    def list_due_conversations(self, *, now: datetime | None = None, limit: int = 200) -> list[DueConversation]:
        """Conversations whose next poll (or peek) time has come, earliest first: one RowKey range of the index.

        Conversations that are not due are not read at all, so thousands of idle ones cost nothing here
        (a query page of up to 1000 rows is one transaction).
        """
        now = now or utcnow()
        query = self._table("duepolls").query_entities(
            # `not (... gt ...)`: a row without peek_after (older code wrote none) is due by its RowKey alone.
            # (The space before ")" lets the SDK find the @now parameter.)
            "PartitionKey eq @pk and RowKey lt @upper and not (peek_after gt @now )",
            parameters={"pk": _DUE_PARTITION, "upper": f"{_millis(now) + 1:015d}", "now": now},
            select=["RowKey", "channel", "user", "conversation_id", "watermark", "last_activity_at", "poll_interval"],
            results_per_page=min(max(limit, 1), 1000),
        )
        due: dict[ConversationKey, DueConversation] = {}
        try:
            for entity in query:
                key = ConversationKey(entity["channel"], entity["user"])
                if key not in due:
                    at = datetime.fromtimestamp(int(entity["RowKey"][:15]) / 1000, UTC)
                    due[key] = DueConversation(
                        key, at, entity["RowKey"], conversation_id=entity.get("conversation_id") or "",
                        watermark=entity.get("watermark"), last_activity_at=entity.get("last_activity_at"),
                        poll_interval=entity.get("poll_interval") or 0.0, etag=entity.metadata.get("etag"))
                    if len(due) >= limit:
                        break
        except AzureError as error:
            raise StoreError(f"cannot read the due index: {type(error).__name__}") from error
        return list(due.values())

    def postpone_due(self, postponements: Sequence[tuple[DueConversation, datetime, float]]) -> int:
        """Move the next peek of conversations that had nothing new: (row, peek after, idle interval) each.

        Rows are updated in place under their ETags, up to 100 in one entity-group transaction (one
        billed transaction). A row rescheduled or removed meanwhile (a webhook, a worker's finish) is
        left alone: that schedule wins. Best effort: a row not moved is only peeked again. Returns how
        many moved."""
        moved = 0
        operations = [("update", {"PartitionKey": _DUE_PARTITION, "RowKey": row.index_key, "peek_after": after,
                                  "poll_interval": float(interval)},
                       {"mode": UpdateMode.MERGE, "etag": row.etag, "match_condition": MatchConditions.IfNotModified})
                      for row, after, interval in postponements if row.etag]
        table = self._table("duepolls")
        for start in range(0, len(operations), _BATCH_LIMIT):
            batch = operations[start:start + _BATCH_LIMIT]
            for _ in range(3):  # a conflicting row fails its whole batch: drop it and try the rest again
                try:
                    table.submit_transaction(batch)
                except TableTransactionError as error:
                    if error.error_code not in ("UpdateConditionNotSatisfied", "ResourceNotFound"):
                        log.warning("could not postpone due rows: %s", error.error_code)
                        break
                    batch = batch[:error.index] + batch[error.index + 1:]
                    if not batch:
                        break
                    continue
                except AzureError as error:
                    log.warning("could not postpone due rows: %s", type(error).__name__)
                    break
                moved += len(batch)
                break
        return moved

    def claim_due(self, due: DueConversation, *, owner: str, lease_seconds: float,
                  now: datetime | None = None) -> ConversationRecord | None:
        """Take the lease of a due conversation; None when it is not ours to poll now.

        A stale index row (the record moved on, ended or vanished) is removed here.
        """
        now = now or utcnow()
        record = self.get_conversation(due.key)
        if record is None or record.due_index_key != due.index_key:
            self._delete_quietly("duepolls", _DUE_PARTITION, due.index_key)
        if record is None or not record.active or record.next_poll_at is None or record.next_poll_at > now:
            return None
        return self.acquire_lease(due.key, owner=owner, lease_seconds=lease_seconds, now=now, current=record)

    def acquire_lease(self, key: ConversationKey, *, owner: str, lease_seconds: float, now: datetime | None = None,
                      current: ConversationRecord | None = None) -> ConversationRecord | None:
        """Hold the conversation for `lease_seconds` (renews our own lease); None while another owner holds it.

        A lease ends on its own when its holder dies: after expiry anyone may take it over.
        """
        now = now or utcnow()
        held_by_other = False

        def take(record: ConversationRecord | None) -> ConversationRecord | None:
            nonlocal held_by_other
            held_by_other = record is not None and record.lease_held_by_other(owner, now)
            if record is None or held_by_other:
                return record
            return replace(record, lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))

        record = self.update_conversation(key, take, current=current, now=now)
        return None if record is None or held_by_other else record

    def release_lease(self, record: ConversationRecord, *, owner: str, now: datetime | None = None) -> None:
        """Give the lease back early (a no-op when it is no longer ours)."""

        def drop(stored: ConversationRecord | None) -> ConversationRecord | None:
            if stored is None or stored.lease_owner != owner:
                return stored
            return stored.without_lease()

        self.update_conversation(record.key, drop, current=record, now=now)

    # ------------------------------------------------------------------------------- inbound and outbox

    def record_inbound(self, key: ConversationKey, message_id: str, activity: Mapping[str, Any], *,
                       now: datetime | None = None) -> InboundResult:
        """Remember a provider message once and queue it for Direct Line, in one transaction.

        A retried webhook (same message id) gets is_new=False and the message's state: PENDING while
        it still waits in the outbox, POSTED once Direct Line took it, DEAD if Direct Line refused it.
        """
        now = now or utcnow()
        pk = key.partition_key
        outbox_row = f"{_OUTBOX}{_millis(now):015d}|{_escape(message_id)}"
        dedupe = {"PartitionKey": pk, "RowKey": _DEDUPE + _escape(message_id), "message_id": message_id,
                  "state": PENDING, "received_at": now, "outbox_row": outbox_row}
        outbox = {"PartitionKey": pk, "RowKey": outbox_row, "message_id": message_id, "received_at": now,
                  "attempts": 0, "in_doubt": False, "channel": key.channel, "user": key.user}
        _put_json(outbox, "activity", activity)
        table = self._table("inbound")
        try:
            results = table.submit_transaction([("create", dedupe), ("create", outbox)])
        except TableTransactionError as error:
            if error.error_code != "EntityAlreadyExists":
                raise StoreError(f"cannot store an inbound message: {error.error_code}") from error
            existing = self._get("inbound", pk, dedupe["RowKey"])
            if existing is None:  # swept between the two calls: it was handled long ago
                return InboundResult(is_new=False, state=POSTED)
            return InboundResult(is_new=False, state=existing.get("state", PENDING),
                                 activity_id=existing.get("activity_id"))
        except AzureError as error:
            raise StoreError(f"cannot store an inbound message: {type(error).__name__}") from error
        message = InboundMessage(key, message_id, dict(activity), now, row_key=outbox_row,
                                 etag=results[1].get("etag"))
        return InboundResult(is_new=True, state=PENDING, message=message)

    def list_outbox(self, key: ConversationKey, *, limit: int = 50) -> list[InboundMessage]:
        """The conversation's messages still waiting for Direct Line, oldest first."""
        entities = self._query("inbound", "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                               {"pk": key.partition_key, "lo": _OUTBOX, "hi": _OUTBOX[:-1] + "}"}, limit=limit)
        return [_inbound_from_entity(key, e) for e in entities]

    def mark_post_attempt(self, message: InboundMessage) -> InboundMessage:
        """Note that a post is starting (sets in_doubt). ConcurrencyConflict: someone else is working it."""
        updated = replace(message, attempts=message.attempts + 1, in_doubt=True)
        return self._save_inbound(updated)

    def release_inbound(self, message: InboundMessage, *, error: str, in_doubt: bool) -> InboundMessage:
        """A post failed: keep the message queued; `in_doubt` False when Direct Line surely did not take it."""
        return self._save_inbound(replace(message, last_error=error[:500], in_doubt=in_doubt))

    def complete_inbound(self, message: InboundMessage, *, activity_id: str, now: datetime | None = None) -> None:
        """Direct Line took the message: out of the outbox and marked POSTED, atomically."""
        self._finish_inbound(message, {"state": POSTED, "activity_id": activity_id, "posted_at": now or utcnow()})

    def dead_letter_inbound(self, message: InboundMessage, *, reason: str, now: datetime | None = None) -> None:
        """Direct Line refused the message for good (a 400): keep it as a dead letter and unblock the outbox."""
        self.add_dead_letter(message.key, kind="inbound", reason=reason,
                             payload={"message_id": message.message_id, "activity": dict(message.activity)}, now=now)
        self._finish_inbound(message, {"state": DEAD, "reason": reason[:500]})

    def _save_inbound(self, message: InboundMessage) -> InboundMessage:
        entity = {"PartitionKey": message.key.partition_key, "RowKey": message.row_key,
                  "message_id": message.message_id, "received_at": message.received_at,
                  "attempts": message.attempts, "in_doubt": message.in_doubt, "last_error": message.last_error,
                  "channel": message.key.channel, "user": message.key.user}
        _put_json(entity, "activity", message.activity)
        try:
            result = self._table("inbound").update_entity(entity, mode=UpdateMode.REPLACE, etag=message.etag,
                                                          match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            raise ConcurrencyConflict("the outbox message was changed or completed by another worker") from None
        except AzureError as error:
            raise StoreError(f"cannot update an outbox message: {type(error).__name__}") from error
        return replace(message, etag=result.get("etag"))

    def _finish_inbound(self, message: InboundMessage, dedupe_changes: dict[str, Any]) -> None:
        pk = message.key.partition_key
        dedupe = {"PartitionKey": pk, "RowKey": _DEDUPE + _escape(message.message_id), **dedupe_changes}
        operations = [("delete", {"PartitionKey": pk, "RowKey": message.row_key},
                       {"etag": message.etag, "match_condition": MatchConditions.IfNotModified}),
                      ("upsert", dedupe, {"mode": UpdateMode.MERGE})]
        try:
            self._table("inbound").submit_transaction(operations)
        except TableTransactionError as error:
            if error.error_code in ("UpdateConditionNotSatisfied", "ResourceNotFound"):
                raise ConcurrencyConflict("the outbox message was changed or completed by another worker") from None
            raise StoreError(f"cannot complete an outbox message: {error.error_code}") from error
        except AzureError as error:
            raise StoreError(f"cannot complete an outbox message: {type(error).__name__}") from error

    # ------------------------------------------------------------------------------------- dead letters

    def add_dead_letter(self, key: ConversationKey, *, kind: str, reason: str, payload: Mapping[str, Any],
                        now: datetime | None = None) -> DeadLetter:
        now = now or utcnow()
        row = f"{_millis(now):015d}|{secrets.token_hex(6)}"
        entity = {"PartitionKey": key.partition_key, "RowKey": row, "kind": kind, "reason": reason[:2000],
                  "created_at": now, "channel": key.channel, "user": key.user}
        _put_json(entity, "payload", payload)
        self._write("deadletters", entity)
        log.warning("dead letter (%s) for a %s conversation: %s", kind, key.channel, reason[:200])
        return DeadLetter(key, kind, reason, dict(payload), now, row_key=row)

    def list_dead_letters(self, key: ConversationKey | None = None, *, limit: int = 100) -> list[DeadLetter]:
        if key is None:
            entities = self._query("deadletters", "", {}, limit=limit)
        else:
            entities = self._query("deadletters", "PartitionKey eq @pk", {"pk": key.partition_key}, limit=limit)
        return [DeadLetter(ConversationKey(e["channel"], e["user"]), e["kind"], e["reason"], _get_json(e, "payload"),
                           e["created_at"], row_key=e["RowKey"]) for e in entities]

    # --------------------------------------------------------------------------------- Web Chat sessions

    def create_webchat_session(self, conversation_id: str, *, user_id: str, resume_key: str, expires_at: datetime,
                               now: datetime | None = None) -> WebChatSession:
        """Store a new session; only the resume key's hash is kept. ConcurrencyConflict if one exists."""
        now = now or utcnow()
        session = WebChatSession(conversation_id, user_id, expires_at, created_at=now, updated_at=now,
                                 resume_key_hash=hash_resume_key(resume_key))
        try:
            result = self._table("webchatsessions").create_entity(_session_to_entity(session))
        except ResourceExistsError:
            raise ConcurrencyConflict("a Web Chat session for this conversation exists already") from None
        except AzureError as error:
            raise StoreError(f"cannot store a Web Chat session: {type(error).__name__}") from error
        return replace(session, etag=result.get("etag"))

    def get_webchat_session(self, conversation_id: str) -> WebChatSession | None:
        entity = self._get("webchatsessions", _escape(conversation_id), "session")
        return None if entity is None else _session_from_entity(entity)

    def resume_webchat_session(self, conversation_id: str, *, resume_key: str, new_resume_key: str,
                               expires_at: datetime, now: datetime | None = None) -> ResumeResult:
        """Check a page's resume key (constant time) and rotate it.

        A key that was already rotated away revokes the session: whoever presents it copied it. The
        exception is WebChatSession.resume_outcome's grace period (RETRIED). Each decision is written
        under the ETag of the row it was made on, so two racing resumes with one key are decided one
        after the other: the second sees the first's rotation and is a retry, never a reuse.
        """
        now = now or utcnow()
        table = self._table("webchatsessions")
        for attempt in range(UPDATE_ATTEMPTS):
            session = self.get_webchat_session(conversation_id)
            if session is None:
                return ResumeResult(UNKNOWN_SESSION)
            outcome = session.resume_outcome(resume_key, now=now)
            if outcome == RESUMED:
                # This key is used now: every other valid key becomes poison, and this one is the grace key.
                updated = replace(session, resume_key_hash=hash_resume_key(new_resume_key), retry_key_hashes=(),
                                  grace_key_hash=hash_resume_key(resume_key), rotated_at=now, expires_at=expires_at,
                                  previous_key_hashes=(*session.previous_key_hashes, session.resume_key_hash,
                                                       *session.retry_key_hashes)[-PREVIOUS_KEYS_LIMIT:],
                                  updated_at=now)
            elif outcome == RETRIED:
                # One more key; the ones answered before stay good (the page keeps whichever answer it got last).
                updated = replace(session, resume_key_hash=hash_resume_key(new_resume_key), expires_at=expires_at,
                                  retry_key_hashes=(*session.retry_key_hashes, session.resume_key_hash),
                                  updated_at=now)
            elif outcome == REUSED_KEY:
                updated = replace(session, revoked=True, updated_at=now)
            elif outcome == WRONG_KEY:
                return ResumeResult(WRONG_KEY)
            else:
                return ResumeResult(outcome, session)
            try:
                result = table.update_entity(_session_to_entity(updated), mode=UpdateMode.REPLACE, etag=session.etag,
                                             match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                _pause_after_conflict(attempt)
                continue
            except AzureError as error:
                raise StoreError(f"cannot update a Web Chat session: {type(error).__name__}") from error
            return ResumeResult(outcome, replace(updated, etag=result.get("etag")))
        raise ConcurrencyConflict("the Web Chat session kept changing")

    def revoke_webchat_session(self, conversation_id: str, *, now: datetime | None = None) -> None:
        entity = {"PartitionKey": _escape(conversation_id), "RowKey": "session", "revoked": True,
                  "updated_at": now or utcnow()}
        try:
            self._table("webchatsessions").update_entity(entity, mode=UpdateMode.MERGE)
        except ResourceNotFoundError:
            return
        except AzureError as error:
            raise StoreError(f"cannot revoke a Web Chat session: {type(error).__name__}") from error

    # ------------------------------------------------------------------------------------ rate limiting

    def hit_rate_limit(self, client_address: str, *, limit: int, window_seconds: float = 60,
                       now: datetime | None = None) -> RateLimitResult:
        """Count one request for `client_address` in its window; allowed is False past `limit`.

        A window opens at the client's first request and lasts `window_seconds` (not aligned to the
        clock, so a burst cannot straddle two windows to get twice the limit). The address is stored
        only as a hash. Counting is ETag-guarded, so instances never lose a hit.
        """
        now = now or utcnow()
        pk = hashlib.sha256(client_address.encode()).hexdigest()[:40]
        table = self._table("ratelimits")
        for _ in range(UPDATE_ATTEMPTS * 2):
            entity = self._get("ratelimits", pk, "window")
            fresh = entity is None or entity["expires_at"] <= now
            if fresh:
                window_start, window_end, count = now, now + timedelta(seconds=window_seconds), 1
            else:
                window_start, window_end, count = entity["window_start"], entity["expires_at"], entity["count"] + 1
            if count > limit:
                return RateLimitResult(False, entity["count"], limit, max((window_end - now).total_seconds(), 0.001))
            new = {"PartitionKey": pk, "RowKey": "window", "window_start": window_start, "expires_at": window_end,
                   "count": count}
            try:
                if entity is None:
                    table.create_entity(new)
                else:
                    table.update_entity(new, mode=UpdateMode.REPLACE, etag=entity.metadata["etag"],
                                        match_condition=MatchConditions.IfNotModified)
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                _pause_after_conflict(0)
                continue
            except AzureError as error:
                raise StoreError(f"cannot count a request: {type(error).__name__}") from error
            return RateLimitResult(True, count, limit, 0.0)
        raise ConcurrencyConflict("the rate-limit counter kept changing")

    # ------------------------------------------------------------------------------------------- sweep

    def sweep(self, *, now: datetime | None = None, idle_after: timedelta = timedelta(days=3),
              dedupe_after: timedelta = timedelta(days=7), dead_letters_after: timedelta = timedelta(days=30),
              limit: int = 1000) -> SweepResult:
        """Delete ended and long-idle conversations, old dedupe entries, expired sessions and counters.

        Meant for a rare timer (hourly): these are table scans. Every delete is ETag-guarded, so a
        row that changed since it was read is left alone. Pending messages are never swept.
        """
        now = now or utcnow()
        idle_cutoff = now - idle_after
        conversations = 0
        for entity in self._query("conversations", "state eq @ended or last_activity_at lt @cutoff",
                                  {"ended": ENDED, "cutoff": idle_cutoff}, limit=limit):
            if self._delete_if_unchanged("conversations", entity):
                conversations += 1
                if entity.get("due_index_key"):
                    self._delete_quietly("duepolls", _DUE_PARTITION, entity["due_index_key"])
        dedupe = self._sweep("inbound", "RowKey ge @lo and RowKey lt @hi and state ne @pending and received_at lt @cut",
                             {"lo": _DEDUPE, "hi": _DEDUPE[:-1] + "}", "pending": PENDING,
                              "cut": now - dedupe_after}, limit)
        sessions = self._sweep("webchatsessions", "expires_at lt @now", {"now": now}, limit)
        counters = self._sweep("ratelimits", "expires_at lt @now", {"now": now}, limit)
        dead = self._sweep("deadletters", "created_at lt @cut", {"cut": now - dead_letters_after}, limit)
        result = SweepResult(conversations, dedupe, sessions, counters, dead)
        log.info("sweep removed %s", result)
        return result

    def _sweep(self, name: str, query: str, parameters: dict[str, Any], limit: int) -> int:
        return sum(self._delete_if_unchanged(name, e) for e in self._query(name, query, parameters, limit=limit))

    # ------------------------------------------------------------------------------------- table access

    def _get(self, name: str, pk: str, rk: str):
        try:
            return self._table(name).get_entity(pk, rk)
        except ResourceNotFoundError:
            return None
        except AzureError as error:
            raise StoreError(f"cannot read from {name}: {type(error).__name__}") from error

    def _write(self, name: str, entity: Mapping[str, Any]) -> None:
        try:
            self._table(name).create_entity(entity)
        except AzureError as error:
            raise StoreError(f"cannot write to {name}: {type(error).__name__}") from error

    def _query(self, name: str, query: str, parameters: dict[str, Any], *, limit: int) -> Iterable:
        try:
            if query:
                pages = self._table(name).query_entities(query, parameters=parameters,
                                                         results_per_page=min(limit, 1000))
            else:
                pages = self._table(name).list_entities(results_per_page=min(limit, 1000))
            return [e for _, e in zip(range(limit), pages, strict=False)]
        except AzureError as error:
            raise StoreError(f"cannot query {name}: {type(error).__name__}") from error

    def _delete_if_unchanged(self, name: str, entity) -> bool:
        try:
            self._table(name).delete_entity(entity["PartitionKey"], entity["RowKey"], etag=entity.metadata["etag"],
                                            match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        except AzureError as error:
            raise StoreError(f"cannot delete a row of {name}: {type(error).__name__}") from error
        return True

    def _delete_quietly(self, name: str, pk: str, rk: str) -> None:
        """Best-effort clean-up: a leftover index row is harmless (claim_due removes it later)."""
        try:
            self._table(name).delete_entity(pk, rk)
        except AzureError as error:
            log.warning("could not delete a %s row: %s", name, type(error).__name__)


@functools.lru_cache(maxsize=1)
def get_store() -> RelayStore:
    """The process's store on the app settings (one pooled connection for every invocation)."""
    return RelayStore.from_settings(get_settings().storage)


def _pause_after_conflict(attempt: int) -> None:
    """A short random pause so writers that collided do not collide again in lockstep."""
    time.sleep(random.uniform(0, 0.01 * 2**attempt))


def hash_resume_key(resume_key: str) -> str:
    """Resume keys are random (>=128 bits), so a plain SHA-256 is a safe one-way fingerprint."""
    return hashlib.sha256(resume_key.encode()).hexdigest()


def _any_digest_equal(presented: str, stored: Iterable[str]) -> bool:
    """Compares with every stored hash (no early exit), each in constant time."""
    return any([hmac.compare_digest(presented, candidate) for candidate in stored])


# ------------------------------------------------------------------------------------------- encoding

_UNSAFE_KEY_CHARS = set("/\\#?%|")


def _escape(value: str) -> str:
    """A value made safe for PartitionKey/RowKey (no / \\ # ? or control characters; | separates parts)."""
    return "".join(f"%{ord(c):02X}" if c in _UNSAFE_KEY_CHARS or ord(c) < 32 or 127 <= ord(c) < 160 else c
                   for c in value)


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _due_prefix(at: datetime, key: ConversationKey) -> str:
    return f"{_millis(at):015d}|{key.partition_key}|"


def _peek_view(record: ConversationRecord) -> tuple | None:
    """What the due-index row of a peekable record promises; a change needs a new row.

    The watermark is not part of it: a row's older watermark only makes a peek see activities the
    record already handled, which sends the poller down the full path (never a missed message)."""
    return (record.conversation_id,) if record.peekable and record.conversation_id else None


def _put_json(entity: dict[str, Any], name: str, value: Any) -> None:
    """JSON in one string property, or split over name_1, name_2... when longer than a property may be."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    parts = [text[i:i + _MAX_STRING] for i in range(0, len(text), _MAX_STRING)] or [""]
    entity[name] = parts[0]
    for number, part in enumerate(parts[1:], start=1):
        entity[f"{name}_{number}"] = part


def _get_json(entity: Mapping[str, Any], name: str, default: Any = None) -> Any:
    if entity.get(name) is None:
        return default
    parts, number = [entity[name]], 1
    while f"{name}_{number}" in entity:
        parts.append(entity[f"{name}_{number}"])
        number += 1
    return json.loads("".join(parts))


def _conversation_to_entity(record: ConversationRecord) -> dict[str, Any]:
    entity = {
        "PartitionKey": record.key.partition_key, "RowKey": _CONVERSATION_ROW,
        "channel": record.key.channel, "user": record.key.user,
        "conversation_id": record.conversation_id, "user_id": record.user_id, "token": record.token,
        "token_expires_at": record.token_expires_at, "watermark": record.watermark,
        "last_user_activity_at": record.last_user_activity_at, "last_bot_activity_at": record.last_bot_activity_at,
        "last_activity_at": record.last_activity_at, "next_poll_at": record.next_poll_at,
        "poll_interval": float(record.poll_interval), "state": record.state,
        "lease_owner": record.lease_owner, "lease_expires_at": record.lease_expires_at,
        "created_at": record.created_at, "updated_at": record.updated_at, "due_index_key": record.due_index_key,
        "peekable": record.peekable,
    }
    _put_json(entity, "delivered_ids", list(record.delivered_ids))
    _put_json(entity, "reply_context", dict(record.reply_context))
    return entity


def _conversation_from_entity(key: ConversationKey, entity) -> ConversationRecord:
    return ConversationRecord(
        key=key, conversation_id=entity["conversation_id"], user_id=entity["user_id"],
        token=entity.get("token") or "", token_expires_at=entity.get("token_expires_at"),
        watermark=entity.get("watermark"), delivered_ids=tuple(_get_json(entity, "delivered_ids", [])),
        last_user_activity_at=entity.get("last_user_activity_at"),
        last_bot_activity_at=entity.get("last_bot_activity_at"), next_poll_at=entity.get("next_poll_at"),
        poll_interval=entity.get("poll_interval") or 0.0, state=entity.get("state", ACTIVE),
        reply_context=_get_json(entity, "reply_context", {}), peekable=bool(entity.get("peekable")),
        lease_owner=entity.get("lease_owner"),
        lease_expires_at=entity.get("lease_expires_at"), created_at=entity.get("created_at"),
        updated_at=entity.get("updated_at"), etag=entity.metadata["etag"],
        due_index_key=entity.get("due_index_key"),
    )


def _inbound_from_entity(key: ConversationKey, entity) -> InboundMessage:
    return InboundMessage(key, entity["message_id"], _get_json(entity, "activity", {}), entity["received_at"],
                          attempts=entity.get("attempts", 0), in_doubt=bool(entity.get("in_doubt")),
                          last_error=entity.get("last_error") or "", row_key=entity["RowKey"],
                          etag=entity.metadata["etag"])


def _session_to_entity(session: WebChatSession) -> dict[str, Any]:
    entity = {"PartitionKey": _escape(session.conversation_id), "RowKey": "session",
              "conversation_id": session.conversation_id, "user_id": session.user_id,
              "expires_at": session.expires_at, "revoked": session.revoked, "created_at": session.created_at,
              "updated_at": session.updated_at, "resume_key_hash": session.resume_key_hash,
              "grace_key_hash": session.grace_key_hash, "rotated_at": session.rotated_at}
    _put_json(entity, "retry_key_hashes", list(session.retry_key_hashes))
    _put_json(entity, "previous_key_hashes", list(session.previous_key_hashes))
    return entity


def _session_from_entity(entity) -> WebChatSession:
    return WebChatSession(entity["conversation_id"], entity["user_id"], entity["expires_at"],
                          revoked=bool(entity.get("revoked")), created_at=entity.get("created_at"),
                          updated_at=entity.get("updated_at"), resume_key_hash=entity.get("resume_key_hash", ""),
                          retry_key_hashes=tuple(_get_json(entity, "retry_key_hashes", [])),
                          grace_key_hash=entity.get("grace_key_hash", ""), rotated_at=entity.get("rotated_at"),
                          previous_key_hashes=tuple(_get_json(entity, "previous_key_hashes", [])),
                          etag=entity.metadata["etag"])
