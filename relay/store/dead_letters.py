"""Dead letters: `{prefix}deadletters`, what could not be delivered and why.

Replies a provider refused ("reply"), media that could not be carried ("media") and inbound
messages Direct Line refused ("inbound"), with the reason and the payload, kept for an operator.
PartitionKey = the conversation's (`partition_of`), RowKey "<created ms>|<random>"; the sweep
removes them after 30 days. An operator names one by its id, "<created ms>-<random>-<PartitionKey>"
(`DeadLetter.letter_id`: no character a shell or a URL minds), and may replay it (relay/operations.py):
`replay_started_at` is set under the row's ETag before a replay sends anything, so a replay that died
half-way is never repeated blindly, and the row goes only once the replay succeeded.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode

from relay import telemetry
from relay.clock import Clock
from relay.errors import ConcurrencyConflict
from relay.store.conversations import ConversationKey, partition_of
from relay.store.tables import Budget, Tables, get_json, millis, put_json, storage_errors

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
    letter_id: str = field(default="", compare=False)
    """What an operator names it by (see the module docstring)."""
    replay_started_at: datetime | None = None
    """When a replay began sending it and has not finished (it may have reached its recipient); None: never."""
    parts_sent: int = 0
    """Parts of a multi-part reply the provider took before it refused the rest: a replay starts after them."""
    etag: str | None = field(default=None, repr=False, compare=False)


class DeadLetters:
    """Reads and writes of dead letters."""

    def __init__(self, tables: Tables, *, clock: Clock):
        self._tables = tables
        self._table = tables.table(_TABLE)
        self._clock = clock

    def add_letter(self, key: ConversationKey, *, kind: DeadLetterKind, reason: str, payload: Mapping[str, Any],
                   parts_sent: int = 0, now: datetime | None = None) -> DeadLetter:
        """Store a dead letter (the reason cut to 2000 characters), log that there is one and count it. `parts_sent`:
        parts of a multi-part reply the provider took before refusing the rest."""
        now = now or self._clock.now()
        pk = partition_of(self._tables, key)
        row = f"{millis(now):015d}|{secrets.token_hex(6)}"
        entity = {"PartitionKey": pk, "RowKey": row, "kind": kind, "reason": reason[:2000],
                  "created_at": now, "channel": key.channel, "user": key.user, "parts_sent": parts_sent}
        put_json(entity, "payload", payload)
        self._table.create(entity)
        telemetry.count(telemetry.DEAD_LETTERS, channel=key.channel, kind=kind)
        log.warning("dead letter (%s) for a %s conversation: %s", kind, key.channel, reason[:200])
        return DeadLetter(key, kind, reason, dict(payload), now, row_key=row, letter_id=_letter_id(pk, row),
                          parts_sent=parts_sent)

    def get_letter(self, letter_id: str) -> DeadLetter | None:
        """The dead letter named `letter_id`; None when there is none (or the id is not one: no request made)."""
        address = _address(letter_id)
        if address is None:
            return None
        entity = self._table.get(*address)
        return None if entity is None else _from_entity(entity)

    def list_letters(self, key: ConversationKey | None = None, *, kind: DeadLetterKind | None = None,
                     limit: int = 100) -> list[DeadLetter]:
        """Up to `limit` dead letters of one conversation (one partition), or of all when `key` is None (a scan of
        the table, one request per 1000 letters read), of `kind` only when given; oldest first within a
        conversation, conversations in no particular order."""
        clauses, parameters = [], {}
        if key is not None:
            clauses.append("PartitionKey eq @pk")
            parameters["pk"] = partition_of(self._tables, key)
        if kind is not None:
            clauses.append("kind eq @kind")
            parameters["kind"] = kind.value
        return [_from_entity(e) for e in self._table.query(" and ".join(clauses), parameters, limit=limit)]

    def get_counts(self) -> dict[DeadLetterKind, int]:
        """How many dead letters there are of each kind: a scan of the table (one request per 1000 letters)."""
        counts = dict.fromkeys(DeadLetterKind, 0)
        for entity in self._table.scan("", {}, select=["kind"]):
            kind = entity.get("kind")
            if kind in counts:
                counts[DeadLetterKind(kind)] += 1
        return counts

    def start_replay(self, letter: DeadLetter, *, now: datetime | None = None) -> DeadLetter:
        """Note that a replay of `letter` (as read) begins sending it; ConcurrencyConflict when the letter changed
        or went since (another replay got there first)."""
        now = now or self._clock.now()
        return self._merge(letter, {"replaying": True, "replay_started_at": now}, replay_started_at=now)

    def end_replay(self, letter: DeadLetter, *, parts_sent: int) -> DeadLetter:
        """A replay of `letter` (as `start_replay` returned it) surely failed: it may be replayed again, from part
        `parts_sent` on. ConcurrencyConflict when the letter changed since."""
        # A merge cannot remove a property: `replaying` says whether `replay_started_at` still stands.
        return self._merge(letter, {"replaying": False, "parts_sent": parts_sent}, replay_started_at=None,
                           parts_sent=parts_sent)

    def delete_letter(self, letter: DeadLetter) -> None:
        """Delete `letter` if unchanged since it was read (whatever it holds now when its `etag` is None; a no-op when
        it is gone then); ConcurrencyConflict when it changed or went since it was read."""
        pk, rk = _address(letter.letter_id) or ("", "")
        with storage_errors("remove a dead letter"):
            try:
                self._table.client.delete_entity(pk, rk, etag=letter.etag,
                                                 match_condition=MatchConditions.IfNotModified if letter.etag else None)
            except (ResourceModifiedError, ResourceNotFoundError):
                raise ConcurrencyConflict("the dead letter was changed or deleted meanwhile") from None

    def delete_old(self, *, created_before: datetime, budget: Budget) -> int:
        """Delete the dead letters created before `created_before` (a scan for the sweep, paged while `budget`
        lasts); how many went."""
        return self._table.delete_matching("created_at lt @cut", {"cut": created_before}, budget=budget)

    def _merge(self, letter: DeadLetter, changes: dict[str, Any], **fields: Any) -> DeadLetter:
        pk, rk = _address(letter.letter_id) or ("", "")
        with storage_errors("update a dead letter"):
            try:
                result = self._table.client.update_entity({"PartitionKey": pk, "RowKey": rk, **changes},
                                                          mode=UpdateMode.MERGE, etag=letter.etag,
                                                          match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                raise ConcurrencyConflict("the dead letter was changed or deleted meanwhile") from None
        return replace(letter, etag=result.get("etag"), **fields)


def _letter_id(pk: str, rk: str) -> str:
    return f"{rk.replace('|', '-')}-{pk}"


def _address(letter_id: str) -> tuple[str, str] | None:
    """(PartitionKey, RowKey) of a letter id; None when it cannot be one."""
    parts = letter_id.strip().split("-")
    if len(parts) != 3:
        return None
    created, nonce, pk = parts
    if not (len(created) == 15 and created.isdigit() and _is_hex(nonce, 12) and _is_hex(pk, 32)):
        return None
    return pk, f"{created}|{nonce}"


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def _from_entity(entity: TableEntity) -> DeadLetter:
    return DeadLetter(ConversationKey(entity["channel"], entity["user"]), DeadLetterKind(entity["kind"]),
                      entity["reason"], get_json(entity, "payload"), entity["created_at"], row_key=entity["RowKey"],
                      letter_id=_letter_id(entity["PartitionKey"], entity["RowKey"]),
                      replay_started_at=entity.get("replay_started_at") if entity.get("replaying") else None,
                      parts_sent=entity.get("parts_sent") or 0,
                      etag=entity.metadata.get("etag"))
