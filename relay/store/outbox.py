"""Inbound messages, deduped and queued for Direct Line: `{prefix}inbound`.

Per conversation key (the PartitionKey), two kinds of row:

    dedupe|<provider message id>          one per message the provider sent, in state PENDING, POSTED or DEAD
    outbox|<received ms>|<message id>     the messages not yet taken by Direct Line, oldest first

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
from relay.store.conversations import ConversationKey
from relay.store.dead_letters import DeadLetterKind, DeadLetters
from relay.store.tables import Tables, escape, get_json, millis, put_json, storage_errors, transaction_error_code

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
    """What Outbox.add_message found: a new message (in the outbox now) or a retried webhook's duplicate."""

    is_new: bool
    state: InboundState
    message: OutboxMessage | None = None  # the outbox entry when the message is new
    activity_id: str | None = None  # Direct Line's id once POSTED


class Outbox:
    """Reads and writes of inbound messages. Methods taking `now` use it instead of the clock."""

    def __init__(self, tables: Tables, *, dead_letters: DeadLetters, clock: Clock):
        self._table = tables.table(_TABLE)
        self._clock = clock
        self._dead_letters = dead_letters

    def add_message(self, key: ConversationKey, message_id: str, activity: Mapping[str, Any], *,
                    now: datetime | None = None) -> InboundResult:
        """Remember a provider message once and queue it for Direct Line, in one transaction.

        A retried webhook (same message id) gets is_new=False and the message's state: PENDING while
        it still waits in the outbox, POSTED once Direct Line took it, DEAD if Direct Line refused it.
        """
        now = now or self._clock.now()
        pk = key.partition_key
        outbox_row = f"{_OUTBOX}{millis(now):015d}|{escape(message_id)}"
        dedupe: dict[str, Any] = {"PartitionKey": pk, "RowKey": _DEDUPE + escape(message_id),
                                  "message_id": message_id, "state": InboundState.PENDING, "received_at": now,
                                  "outbox_row": outbox_row}
        outbox = {"PartitionKey": pk, "RowKey": outbox_row, "message_id": message_id, "received_at": now,
                  "attempts": 0, "in_doubt": False, "channel": key.channel, "user": key.user}
        put_json(outbox, "activity", activity)
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
        message = OutboxMessage(key, message_id, dict(activity), now, row_key=outbox_row,
                                etag=results[1].get("etag"))
        return InboundResult(is_new=True, state=InboundState.PENDING, message=message)

    def list_messages(self, key: ConversationKey, *, limit: int = 50) -> list[OutboxMessage]:
        """The conversation's messages still waiting for Direct Line, oldest first."""
        entities = self._table.query("PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                                     {"pk": key.partition_key, "lo": _OUTBOX, "hi": _OUTBOX[:-1] + "}"}, limit=limit)
        return [_from_entity(key, e) for e in entities]

    def mark_post_attempt(self, message: OutboxMessage) -> OutboxMessage:
        """Note that a post is starting (sets in_doubt). ConcurrencyConflict: someone else is working it."""
        return self._save(replace(message, attempts=message.attempts + 1, in_doubt=True))

    def release_message(self, message: OutboxMessage, *, error: str, in_doubt: bool) -> OutboxMessage:
        """A post failed: keep the message queued; `in_doubt` False when Direct Line surely did not take it."""
        return self._save(replace(message, last_error=error[:500], in_doubt=in_doubt))

    def complete_message(self, message: OutboxMessage, *, activity_id: str, now: datetime | None = None) -> None:
        """Direct Line took the message: out of the outbox and marked POSTED, atomically."""
        self._finish(message, {"state": InboundState.POSTED, "activity_id": activity_id,
                               "posted_at": now or self._clock.now()})

    def dead_letter_message(self, message: OutboxMessage, *, reason: str, now: datetime | None = None) -> None:
        """Direct Line refused the message for good (a 400): keep it as a dead letter and unblock the outbox."""
        self._dead_letters.add_letter(message.key, kind=DeadLetterKind.INBOUND, reason=reason, now=now,
                                      payload={"message_id": message.message_id, "activity": dict(message.activity)})
        self._finish(message, {"state": InboundState.DEAD, "reason": reason[:500]})

    def delete_old_dedupe(self, *, received_before: datetime, limit: int) -> int:
        """Forget up to `limit` handled messages received before `received_before` (a scan, for the sweep).

        Pending messages are never forgotten; a row that changed since it was read is left alone.
        Returns how many went."""
        return self._table.delete_matching(
            "RowKey ge @lo and RowKey lt @hi and state ne @pending and received_at lt @cut",
            {"lo": _DEDUPE, "hi": _DEDUPE[:-1] + "}", "pending": InboundState.PENDING, "cut": received_before},
            limit=limit)

    def _save(self, message: OutboxMessage) -> OutboxMessage:
        entity = {"PartitionKey": message.key.partition_key, "RowKey": message.row_key,
                  "message_id": message.message_id, "received_at": message.received_at,
                  "attempts": message.attempts, "in_doubt": message.in_doubt, "last_error": message.last_error,
                  "channel": message.key.channel, "user": message.key.user}
        put_json(entity, "activity", message.activity)
        with storage_errors("update an outbox message"):
            try:
                result = self._table.client.update_entity(entity, mode=UpdateMode.REPLACE, etag=message.etag,
                                                          match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                raise ConcurrencyConflict("the outbox message was changed or completed by another worker") from None
        return replace(message, etag=result.get("etag"))

    def _finish(self, message: OutboxMessage, dedupe_changes: dict[str, Any]) -> None:
        pk = message.key.partition_key
        dedupe = {"PartitionKey": pk, "RowKey": _DEDUPE + escape(message.message_id), **dedupe_changes}
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
                         attempts=entity.get("attempts", 0), in_doubt=bool(entity.get("in_doubt")),
                         last_error=entity.get("last_error") or "", row_key=entity["RowKey"],
                         etag=entity.metadata["etag"])
