"""Fan-out: a tick with more due conversations than RELAY_FANOUT_THRESHOLD hands them to the poll queue.

The timer is a singleton (the host runs it on one instance at a time), so past a few thousand due
conversations one execution cannot work them all. Above the threshold it works none itself: it lists
the due rows' keys and enqueues them in batches of BATCH_ROWS, each a RowKey range of the due index;
the queue-triggered `poll_batch` function (function_app.py) reads its range with one query and works
it as the timer would (poller.work_poll_message). Flex Consumption scales a queue-triggered function out by
the queue's length, so the poll runs on as many instances as the due conversations need, on the
platform's own machinery: no scheduler of ours.

Exactly once, with any number of workers: a conversation is worked only under its lease
(relay/store/conversations.py), so two batches that both cover a conversation (its inbound row in
one, its schedule row in the next) or a batch the queue delivers twice deliver nothing twice; a quiet
peek only moves its row's next peek, under the row's ETag.

Nothing waits on a lost batch: a row stays due until it is worked. A batch that keeps failing is
retried by the host and, after maxDequeueCount (5, host.json) attempts, moved to the poison queue
(RELAY_POLL_QUEUE + "-poison", kept for the operator); its conversations are simply due again at the
next tick. So a tick does not enqueue while an earlier round is still in the queue (its approximate
message count, one request): the queue holds at most one round of work, and a slow round delays the
next instead of piling up copies of it. A message lives MESSAGE_TTL_SECONDS at most: a range from long ago
is worth nothing.

A queue beside it carries chases (RELAY_POLL_QUEUE + "-chase", worked by the `chase` function). A
bot that answers later than the webhook's burst (Copilot Studio agents often take a few seconds, or
answer at once and then again) would wait for the timer; instead the webhook leaves a `Chase` per
user (after its burst; a queue that cannot take it is logged and the webhook answers as ever). A chase
is one look per execution: it looks for replies without the lease, delivers what arrived under the
lease (poller.work_chase), and unless it is over leaves its next look on the queue, invisible for a
second (`visibility_timeout`), until RELAY_CHASE_SECONDS after the user's message. So no execution
sleeps between looks: a burst of messages never leaves chases waiting for a slot behind others that
sleep (host.json lets an instance run 6 queue messages at once), and each look is a short execution
plus three queue transactions (put, get, delete). Chases have a queue of their own so that the
timer's "is the last round still there?" counts batches only, and so that they scale apart. At low
traffic far less than a timer every second, which bills every second of the month (Flex Consumption
bills an execution at least 1 s, executions side by side on one instance once); at 10,000
conversations a day about as much (docs/benchmarks.md compares them). A chase names its
conversation by the keyed hash of its key (no user's address in a queue). A look that fails is
retried by the host; an instance lost after leaving the next look but before its message was
deleted leaves two chases of one conversation until the chase's end: twice the looks, never a
reply twice (the lease).

Queue messages are JSON, base64-encoded as the Functions host expects (host.json
extensions.queues.messageEncoding; see relay/store/tables.py queue_client).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeGuard

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from relay.delivery import MIN_POLL_GAP
from relay.errors import StoreError
from relay.settings import Settings
from relay.store.tables import millis, queue_client, storage_errors

if TYPE_CHECKING:
    from azure.storage.queue import QueueClient

__all__ = ["BATCH_ROWS", "CHASE_SUFFIX", "MAX_FANOUT_ROWS", "Chase", "PollQueue", "batches_of", "parse_message"]

log = logging.getLogger(__name__)

BATCH_ROWS = 100
"""Due rows in one queue message: about a second of one worker's time (docs/benchmarks.md, fan-out)."""
MAX_FANOUT_ROWS = 100_000
"""Due rows one tick hands out at most (1,000 messages); the rest are due at the next tick."""
MESSAGE_TTL_SECONDS = 600
CHASE_SUFFIX = "-chase"
_MAX_ROW_KEY_CHARS = 1024  # Table Storage's limit for a RowKey
_PARTITION_KEY = re.compile(r"[0-9a-f]{16,64}")  # relay/store/conversations.py partition_of: a keyed hash in hex
_MAX_MILLIS = 253_402_300_800_000  # the year 10000
_MAX_COUNT = 1_000_000


def batches_of(row_keys: Sequence[str], *, size: int = BATCH_ROWS) -> list[tuple[str, str]]:
    """Ordered RowKeys as (first, last) ranges of at most `size` rows each."""
    return [(row_keys[start], row_keys[min(start + size, len(row_keys)) - 1])
            for start in range(0, len(row_keys), size)]


@dataclass(frozen=True)
class Chase:
    """A chase queue message: look for the bot's reply in one conversation at `look_at`, and every second after
    until `until` (RELAY_CHASE_SECONDS after the user's message, polled at `polled_at`). It carries what the
    chase's last look logs: the looks done, the replies delivered and the longest a look waited in the queue."""

    partition_key: str
    until: datetime
    polled_at: datetime
    look_at: datetime | None = None  # None: MIN_POLL_GAP after polled_at, the webhook's first look
    looks: int = 0
    delivered: int = 0
    longest_wait_ms: int = 0

    @property
    def due_at(self) -> datetime:
        return self.look_at or self.polled_at + MIN_POLL_GAP

    def after_look(self, *, started: datetime, looked: bool, delivered: int) -> Chase:
        """The chase once this execution (started at `started`) made its look or not, delivering `delivered`
        replies: what its next message carries, and its last logs."""
        waited = max(0, millis(started) - millis(self.due_at))
        return replace(self, looks=self.looks + int(looked), delivered=self.delivered + delivered,
                       longest_wait_ms=max(self.longest_wait_ms, waited))

    def next_look(self, now: datetime) -> Chase:
        """This chase's next look, a second from `now` and never sooner than a second after this one (clocks
        of instances differ)."""
        return replace(self, look_at=max(now, self.due_at) + MIN_POLL_GAP)

    def message(self) -> str:
        return json.dumps({"chase": self.partition_key, "until": millis(self.until), "polled": millis(self.polled_at),
                           "at": millis(self.due_at), "looks": self.looks, "delivered": self.delivered,
                           "waited": self.longest_wait_ms}, separators=(",", ":"))


def parse_message(body: bytes) -> tuple[str, str] | Chase | None:
    """A poll queue message: a batch's RowKey range, or a chase; None for anything this relay did not write."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(message, dict):
        return None
    if "chase" in message:
        return _chase(message)
    first, last = message.get("from"), message.get("through")
    if not (isinstance(first, str) and isinstance(last, str) and first and first <= last
            and len(last) <= _MAX_ROW_KEY_CHARS):
        return None
    return first, last


def _chase(message: dict) -> Chase | None:
    """A chase; one a relay before re-enqueued looks wrote (no "at" and counts) is its first look."""
    partition_key, until, polled = message.get("chase"), message.get("until"), message.get("polled")
    if not (isinstance(partition_key, str) and _PARTITION_KEY.fullmatch(partition_key)):
        return None
    if not (_is_millis(until) and _is_millis(polled)):
        return None
    look_at = message.get("at")
    counts = [message.get(name, 0) for name in ("looks", "delivered", "waited")]
    if not ((look_at is None or _is_millis(look_at))
            and all(type(count) is int and 0 <= count < _MAX_COUNT for count in counts)):
        return None
    return Chase(partition_key, _moment(until), _moment(polled), None if look_at is None else _moment(look_at), *counts)


def _moment(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


def _is_millis(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 < value < _MAX_MILLIS


class PollQueue:
    """A storage queue of poll work: the timer's batches (RELAY_POLL_QUEUE) or the webhooks' chases (the same
    name + CHASE_SUFFIX, a queue of its own, so that chases never count as a round of batches still being
    worked, and scale apart from them)."""

    def __init__(self, client: QueueClient):
        self._client = client

    @classmethod
    def for_batches(cls, settings: Settings) -> PollQueue:
        return cls(queue_client(settings.storage, settings.relay.poll_queue))

    @classmethod
    def for_chases(cls, settings: Settings) -> PollQueue:
        return cls(queue_client(settings.storage, settings.relay.poll_queue + CHASE_SUFFIX))

    @property
    def name(self) -> str:
        return self._client.queue_name

    def pending(self) -> int:
        """Messages in the queue, visible or being worked (approximate, as the service counts them); 0 when
        the queue does not exist yet."""
        try:
            with storage_errors("read the poll queue's length"):
                return self._client.get_queue_properties().approximate_message_count or 0
        except StoreError as error:
            if isinstance(error.__cause__, ResourceNotFoundError):
                return 0
            raise

    def send(self, batches: Sequence[tuple[str, str]]) -> int:
        """Enqueue each (first, last) RowKey range; returns how many were sent before any failure (which raises
        StoreError: the rows not sent are simply due again at the next tick)."""
        sent = 0
        for first, last in batches:
            self._send(json.dumps({"from": first, "through": last}, separators=(",", ":")))
            sent += 1
        return sent

    def send_chases(self, chases: Sequence[Chase]) -> None:
        """Enqueue each chase, visible at its next look (whole seconds, as the service counts them); StoreError
        when one could not be (the conversations are polled anyway)."""
        for chase in chases:
            self._send(chase.message(), visible_in=MIN_POLL_GAP)

    def _send(self, content: str, *, visible_in: timedelta | None = None) -> None:
        delay = math.ceil(visible_in.total_seconds()) if visible_in else None
        with storage_errors(f"enqueue to {self.name}"):
            try:
                self._client.send_message(content, visibility_timeout=delay, time_to_live=MESSAGE_TTL_SECONDS)
            except ResourceNotFoundError:
                self._create()
                self._client.send_message(content, visibility_timeout=delay, time_to_live=MESSAGE_TTL_SECONDS)

    def _create(self) -> None:
        """The queue, on first use (infra/ does not create it; the host's trigger treats a missing queue as empty)."""
        with contextlib.suppress(ResourceExistsError):
            self._client.create_queue()
