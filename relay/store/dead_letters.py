"""Dead letters: `{prefix}deadletters`, what could not be delivered and why.

Replies a provider refused ("reply"), media that could not be carried ("media") and inbound
messages Direct Line refused ("inbound"), with the reason and the payload, kept for an operator.
PartitionKey = the conversation's (`partition_of`), RowKey "<created ms>|<random>"; the sweep
removes them after 30 days.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from relay import telemetry
from relay.clock import Clock
from relay.store.conversations import ConversationKey, partition_of
from relay.store.tables import Budget, Tables, get_json, millis, put_json

__all__ = ["DeadLetter", "DeadLetterKind", "DeadLetters"]

log = logging.getLogger(__name__)

_TABLE = "deadletters"


class DeadLetterKind(StrEnum):
    """What could not be delivered (stored as the value)."""

    REPLY = "reply"  # a bot's reply the provider refused
    MEDIA = "media"  # a user's file the relay could not carry to the bot (the message itself was posted)
    INBOUND = "inbound"  # a user's message Direct Line refused
    EVENT = "event"  # a bot's event activity RELAY_EVENT_WEBHOOK_URL refused


@dataclass(frozen=True)
class DeadLetter:
    key: ConversationKey
    kind: DeadLetterKind
    reason: str
    payload: Mapping[str, Any] = field(repr=False)
    created_at: datetime
    row_key: str = field(default="", repr=False, compare=False)


class DeadLetters:
    """Reads and writes of dead letters."""

    def __init__(self, tables: Tables, *, clock: Clock):
        self._tables = tables
        self._table = tables.table(_TABLE)
        self._clock = clock

    def add_letter(self, key: ConversationKey, *, kind: DeadLetterKind, reason: str, payload: Mapping[str, Any],
                   now: datetime | None = None) -> DeadLetter:
        """Store a dead letter (the reason cut to 2000 characters), log that there is one and count it."""
        now = now or self._clock.now()
        row = f"{millis(now):015d}|{secrets.token_hex(6)}"
        entity = {"PartitionKey": partition_of(self._tables, key), "RowKey": row, "kind": kind, "reason": reason[:2000],
                  "created_at": now, "channel": key.channel, "user": key.user}
        put_json(entity, "payload", payload)
        self._table.create(entity)
        telemetry.count(telemetry.DEAD_LETTERS, channel=key.channel, kind=kind)
        log.warning("dead letter (%s) for a %s conversation: %s", kind, key.channel, reason[:200])
        return DeadLetter(key, kind, reason, dict(payload), now, row_key=row)

    def list_letters(self, key: ConversationKey | None = None, *, limit: int = 100) -> list[DeadLetter]:
        """Up to `limit` dead letters of one conversation, or of all when `key` is None."""
        if key is None:
            entities = self._table.query("", {}, limit=limit)
        else:
            entities = self._table.query("PartitionKey eq @pk", {"pk": partition_of(self._tables, key)}, limit=limit)
        return [DeadLetter(ConversationKey(e["channel"], e["user"]), DeadLetterKind(e["kind"]), e["reason"],
                           get_json(e, "payload"), e["created_at"], row_key=e["RowKey"]) for e in entities]

    def delete_old(self, *, created_before: datetime, budget: Budget) -> int:
        """Delete the dead letters created before `created_before` (a scan for the sweep, paged while `budget`
        lasts); how many went."""
        return self._table.delete_matching("created_at lt @cut", {"cut": created_before}, budget=budget)
