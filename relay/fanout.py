"""Fan-out: a tick with more due conversations than RELAY_FANOUT_THRESHOLD hands them to the poll queue.

The timer is a singleton (the host runs it on one instance at a time), so past a few thousand due
conversations one execution cannot work them all. Above the threshold it works none itself: it lists
the due rows' keys and enqueues them in batches of BATCH_ROWS, each a RowKey range of the due index;
the queue-triggered `poll_batch` function (function_app.py) reads its range with one query and works
it as the timer would (poller.work_batch). Flex Consumption scales a queue-triggered function out by
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
next instead of piling up copies of it. A message lives MESSAGE_TTL at most: a range from long ago
is worth nothing.

Queue messages are JSON, base64-encoded as the Functions host expects (host.json
extensions.queues.messageEncoding; see relay/store/tables.py queue_client).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from relay.errors import StoreError
from relay.settings import Settings
from relay.store.tables import queue_client, storage_errors

if TYPE_CHECKING:
    from azure.storage.queue import QueueClient

__all__ = ["BATCH_ROWS", "MAX_FANOUT_ROWS", "PollQueue", "batches_of", "parse_batch"]

log = logging.getLogger(__name__)

BATCH_ROWS = 100
"""Due rows in one queue message: about a second of one worker's time (docs/benchmarks.md, fan-out)."""
MAX_FANOUT_ROWS = 100_000
"""Due rows one tick hands out at most (1,000 messages); the rest are due at the next tick."""
MESSAGE_TTL_SECONDS = 600
_MAX_ROW_KEY_CHARS = 1024  # Table Storage's limit for a RowKey


def batches_of(row_keys: Sequence[str], *, size: int = BATCH_ROWS) -> list[tuple[str, str]]:
    """Ordered RowKeys as (first, last) ranges of at most `size` rows each."""
    return [(row_keys[start], row_keys[min(start + size, len(row_keys)) - 1])
            for start in range(0, len(row_keys), size)]


def parse_batch(body: bytes) -> tuple[str, str] | None:
    """The RowKey range of a poll queue message; None for anything this relay did not write."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(message, dict):
        return None
    first, last = message.get("from"), message.get("through")
    if not (isinstance(first, str) and isinstance(last, str) and first and first <= last
            and len(last) <= _MAX_ROW_KEY_CHARS):
        return None
    return first, last


class PollQueue:
    """The storage queue the timer hands its batches to (RELAY_POLL_QUEUE)."""

    def __init__(self, client: QueueClient):
        self._client = client

    @classmethod
    def from_settings(cls, settings: Settings) -> PollQueue:
        return cls(queue_client(settings.storage, settings.relay.poll_queue))

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

    def _send(self, content: str) -> None:
        with storage_errors("enqueue a poll batch"):
            try:
                self._client.send_message(content, time_to_live=MESSAGE_TTL_SECONDS)
            except ResourceNotFoundError:
                self._create()
                self._client.send_message(content, time_to_live=MESSAGE_TTL_SECONDS)

    def _create(self) -> None:
        """The queue, on first use (infra/ does not create it; the host's trigger treats a missing queue as empty)."""
        with contextlib.suppress(ResourceExistsError):
            self._client.create_queue()
