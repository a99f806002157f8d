"""Inbound messages, deduped and queued for Direct Line: `{prefix}inbound`.

Per conversation (PartitionKey `partition_of(key)`), two kinds of row, keyed by the keyed hash of
the provider's message id (which is kept in the `message_id` property):

    dedupe|<message key>                  one per message the provider sent, in state PENDING, POSTED or DEAD
    outbox|<received ms>|<message key>    the messages not yet taken by Direct Line, oldest first, each with
                                          its activity and the reply context of the provider's webhook

A new message's two rows are written together in one entity-group transaction, so a message is
never deduped but lost; taking it out of the outbox and marking its dedupe row is one transaction
too. Outbox rows are updated under their ETags, so two workers never post one message concurrently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableEntity, TableTransactionError, UpdateMode

from relay.clock import Clock
from relay.errors import ConcurrencyConflict
from relay.store.conversations import ConversationKey, partition_of
from relay.store.dead_letters import DeadLetterKind, DeadLetters
from relay.store.tables import Budget, Tables, get_json, millis, put_json, storage_errors, transaction_error_code

__all__ = ["InboundResult", "InboundState", "Outbox", "OutboxMessage"]


class InboundState(StrEnum):
    """Where a provider message is (its dedupe row's `state`, stored as the value)."""

    PENDING = "pending"  # stored, waiting in the outbox for Direct Line
    POSTED = "posted"  # Direct Line took it
    DEAD = "dead"  # Direct Line refused it for good (dead letter)


_TABLE = "inbound"
_DEDUPE = "dedupe|"
_OUTBOX = "outbox|"


@dataclass(frozen=True)
class OutboxMessage:
    """A provider message waiting in a conversation's outbox for Direct Line to take it.

    `in_doubt` is true once a post was attempted without a clear answer: look for the activity's
    clientActivityID in the conversation before posting it again. `reply_context`: where the
    provider wants the replies to this message to go (empty when the message says nothing).
    """

    key: ConversationKey
    message_id: str
    activity: Mapping[str, Any] = field(repr=False)
    received_at: datetime
    reply_context: Mapping[str, Any] = field(default_factory=dict, repr=False)
    attempts: int = 0
    in_doubt: bool = False
    last_error: str = ""
    row_key: str = field(default="", repr=False, compare=False)
    etag: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class InboundResult:
    """What Outbox.add_message found: a new message (in the outbox now) or a retried webhook's duplicate."""

    is_new: bool
    state: InboundState
    message: OutboxMessage | None = None  # the outbox entry when the message is new
    activity_id: str | None = None  # Direct Line's id once POSTED


class Outbox:
    """Reads and writes of inbound messages. Methods taking `now` use it instead of the clock."""

    def __init__(self, tables: Tables, *, dead_letters: DeadLetters, clock: Clock):
        self._tables = tables
        self._table = tables.table(_TABLE)
        self._clock = clock
        self._dead_letters = dead_letters

    def add_message(self, key: ConversationKey, message_id: str, activity: Mapping[str, Any], *,
                    reply_context: Mapping[str, Any] | None = None, now: datetime | None = None) -> InboundResult:
        """Remember a provider message once and queue it for Direct Line, in one transaction.

        A retried webhook (same message id) gets is_new=False and the message's state: PENDING while
        it still waits in the outbox, POSTED once Direct Line took it, DEAD if Direct Line refused it.
        Messages of one conversation never conflict with each other: each writes rows of its own.
        """
        now = now or self._clock.now()
        pk = partition_of(self._tables, key)
        message_key = self._tables.key_for("message", message_id)
        outbox_row = f"{_OUTBOX}{millis(now):015d}|{message_key}"
        dedupe: dict[str, Any] = {"PartitionKey": pk, "RowKey": _DEDUPE + message_key, "message_id": message_id,
                                  "state": InboundState.PENDING, "received_at": now, "outbox_row": outbox_row}
        outbox = {"PartitionKey": pk, "RowKey": outbox_row, "message_id": message_id, "received_at": now,
                  "attempts": 0, "in_doubt": False, "channel": key.channel, "user": key.user}
        put_json(outbox, "activity", activity)
        put_json(outbox, "reply_context", dict(reply_context or {}))
        with storage_errors("store an inbound message"):
            try:
                results = self._table.client.submit_transaction([("create", dedupe), ("create", outbox)])
            except TableTransactionError as error:
                if transaction_error_code(error) != "EntityAlreadyExists":
                    raise  # storage_errors translates it
                existing = self._table.get(pk, dedupe["RowKey"])
                if existing is None:  # swept between the two calls: it was handled long ago
                    return InboundResult(is_new=False, state=InboundState.POSTED)
                return InboundResult(is_new=False, state=InboundState(existing.get("state", InboundState.PENDING)),
                                     activity_id=existing.get("activity_id"))
        message = OutboxMessage(key, message_id, dict(activity), now, dict(reply_context or {}), row_key=outbox_row,
                                etag=results[1].get("etag"))
        return InboundResult(is_new=True, state=InboundState.PENDING, message=message)

    def message_state(self, key: ConversationKey, message_id: str) -> InboundState | None:
        """PENDING, POSTED or DEAD for a message the relay stored; None for one it has no (or no longer a) row of."""
        entity = self._table.get(partition_of(self._tables, key), _DEDUPE + self._tables.key_for("message", message_id))
        return None if entity is None else InboundState(entity.get("state", InboundState.PENDING))

    def list_messages(self, key: ConversationKey, *, limit: int = 50) -> list[OutboxMessage]:
        """The conversation's messages still waiting for Direct Line, oldest first."""
        entities = self._table.query("PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                                     {"pk": partition_of(self._tables, key), "lo": _OUTBOX, "hi": _OUTBOX[:-1] + "}"},
                                     limit=limit)
        return [_from_entity(key, e) for e in entities]

    def get_backlog(self) -> tuple[int, datetime | None]:
        """(messages waiting in every outbox, when the oldest of them arrived; None when none waits): a scan of
        the table's outbox rows (one request per 1000 rows read), for an operator."""
        rows = self._table.scan("RowKey ge @lo and RowKey lt @hi", {"lo": _OUTBOX, "hi": _OUTBOX[:-1] + "}"},
                                select=["received_at"])
        return len(rows), min((r["received_at"] for r in rows if r.get("received_at")), default=None)

    def mark_post_attempt(self, message: OutboxMessage) -> OutboxMessage:
        """Note that a post is starting (sets in_doubt). ConcurrencyConflict: someone else is working it."""
        return self._save(replace(message, attempts=message.attempts + 1, in_doubt=True))

    def release_message(self, message: OutboxMessage, *, error: str, in_doubt: bool) -> OutboxMessage:
        """A post failed: keep the message queued; `in_doubt` False when Direct Line surely did not take it."""
        return self._save(replace(message, last_error=error[:500], in_doubt=in_doubt))

    def complete_message(self, message: OutboxMessage, *, activity_id: str | None,
                         now: datetime | None = None) -> None:
        """Direct Line took the message: out of the outbox and marked POSTED, atomically (`activity_id` None
        when Direct Line did not say)."""
        self._finish(message, {"state": InboundState.POSTED, "activity_id": activity_id,
                               "posted_at": now or self._clock.now()})

    def dead_letter_message(self, message: OutboxMessage, *, reason: str, now: datetime | None = None) -> None:
        """Direct Line refused the message for good (a 400): keep it as a dead letter and unblock the outbox."""
        self._dead_letters.add_letter(message.key, kind=DeadLetterKind.INBOUND, reason=reason, now=now,
                                      payload={"message_id": message.message_id, "activity": dict(message.activity)})
        self._finish(message, {"state": InboundState.DEAD, "reason": reason[:500]})

    def requeue_message(self, key: ConversationKey, message_id: str, activity: Mapping[str, Any], *,
                        now: datetime | None = None) -> InboundState:
        """Put a message Direct Line refused (DEAD) back in the outbox, as it was: its activity (its clientActivityID
        too) in its first outbox row, and its dedupe row PENDING again, in one transaction under that row's ETag.

        It goes back in doubt: the poster looks for its clientActivityID at Direct Line before posting it, so
        an earlier attempt that reached the bot after all is never doubled. Returns the state found: DEAD when
        it was queued now, PENDING or POSTED when it was already (a replay ran before; nothing written). A
        dedupe row the sweep removed is written again. The caller marks the conversation due first
        (DuePolls.mark_inbound), as a webhook does."""
        now = now or self._clock.now()
        pk = partition_of(self._tables, key)
        dedupe_key = _DEDUPE + self._tables.key_for("message", message_id)
        for _ in range(2):
            existing = self._table.get(pk, dedupe_key)
            state = InboundState(existing.get("state", InboundState.PENDING)) if existing else InboundState.DEAD
            if state != InboundState.DEAD:
                return state
            outbox_row = (existing.get("outbox_row") if existing else None) or \
                f"{_OUTBOX}{millis(now):015d}|{self._tables.key_for('message', message_id)}"
            dedupe: dict[str, Any] = {"PartitionKey": pk, "RowKey": dedupe_key, "message_id": message_id,
                                      "state": InboundState.PENDING, "received_at": now, "outbox_row": outbox_row}
            outbox = {"PartitionKey": pk, "RowKey": outbox_row, "message_id": message_id, "received_at": now,
                      "attempts": 0, "in_doubt": True, "channel": key.channel, "user": key.user}
            put_json(outbox, "activity", activity)
            put_json(outbox, "reply_context", {})
            write_dedupe: tuple = ("create", dedupe) if existing is None else \
                ("update", {**dedupe, "received_at": existing.get("received_at") or now},
                 {"mode": UpdateMode.REPLACE, "etag": existing.metadata["etag"],
                  "match_condition": MatchConditions.IfNotModified})
            with storage_errors("queue an inbound message again"):
                try:
                    self._table.client.submit_transaction([write_dedupe, ("create", outbox)])
                except TableTransactionError as error:
                    if transaction_error_code(error) not in ("EntityAlreadyExists", "UpdateConditionNotSatisfied",
                                                             "ResourceNotFound"):
                        raise  # storage_errors translates it
                    continue  # another replay got there first: its state is read again
            return InboundState.DEAD
        raise ConcurrencyConflict("the inbound message kept changing while it was queued again")

    def delete_old_dedupe(self, *, received_before: datetime, budget: Budget) -> int:
        """Forget the handled messages received before `received_before` (a scan for the sweep, paged while
        `budget` lasts).

        Pending messages are never forgotten; a row that changed since it was read is left alone.
        Returns how many went."""
        return self._table.delete_matching(
            "RowKey ge @lo and RowKey lt @hi and state ne @pending and received_at lt @cut",
            {"lo": _DEDUPE, "hi": _DEDUPE[:-1] + "}", "pending": InboundState.PENDING, "cut": received_before},
            budget=budget)

    def _save(self, message: OutboxMessage) -> OutboxMessage:
        entity = {"PartitionKey": partition_of(self._tables, message.key), "RowKey": message.row_key,
                  "message_id": message.message_id, "received_at": message.received_at,
                  "attempts": message.attempts, "in_doubt": message.in_doubt, "last_error": message.last_error,
                  "channel": message.key.channel, "user": message.key.user}
        put_json(entity, "activity", message.activity)
        put_json(entity, "reply_context", dict(message.reply_context))
        with storage_errors("update an outbox message"):
            try:
                result = self._table.client.update_entity(entity, mode=UpdateMode.REPLACE, etag=message.etag,
                                                          match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                raise ConcurrencyConflict("the outbox message was changed or completed by another worker") from None
        return replace(message, etag=result.get("etag"))

    def _finish(self, message: OutboxMessage, dedupe_changes: dict[str, Any]) -> None:
        pk = partition_of(self._tables, message.key)
        dedupe = {"PartitionKey": pk, "RowKey": _DEDUPE + self._tables.key_for("message", message.message_id),
                  **dedupe_changes}
        operations: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
            ("delete", {"PartitionKey": pk, "RowKey": message.row_key},
             {"etag": message.etag, "match_condition": MatchConditions.IfNotModified}),
            ("upsert", dedupe, {"mode": UpdateMode.MERGE})]
        with storage_errors("complete an outbox message"):
            try:
                self._table.client.submit_transaction(operations)
            except TableTransactionError as error:
                if transaction_error_code(error) in ("UpdateConditionNotSatisfied", "ResourceNotFound"):
                    raise ConcurrencyConflict("the outbox message was changed or completed by another worker") from None
                raise  # storage_errors translates it


def _from_entity(key: ConversationKey, entity: TableEntity) -> OutboxMessage:
    return OutboxMessage(key, entity["message_id"], get_json(entity, "activity", {}), entity["received_at"],
                         get_json(entity, "reply_context", {}), attempts=entity.get("attempts", 0),
                         in_doubt=bool(entity.get("in_doubt")), last_error=entity.get("last_error") or "",
                         row_key=entity["RowKey"], etag=entity.metadata["etag"])
