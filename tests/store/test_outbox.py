"""Inbound messages against Azurite: dedupe under concurrent webhooks, the outbox from received to posted."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from relay.errors import ConcurrencyConflict
from relay.store.conversations import ConversationKey
from relay.store.outbox import InboundState
from tests.store.conftest import T0, make_store


def test_dedupe_under_concurrent_inserts(storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(6)]
    barrier = threading.Barrier(6)
    activity = {"type": "message", "text": "hello", "channelData": {"clientActivityID": "SM1"}}

    def receive(worker: int):
        barrier.wait()
        return stores[worker].outbox.add_message(key, "SM1", activity)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(receive, range(6)))
    assert sum(r.is_new for r in results) == 1
    assert all(r.state == InboundState.PENDING for r in results)
    outbox = stores[0].outbox.list_messages(key)
    assert [m.message_id for m in outbox] == ["SM1"]
    assert outbox[0].activity == activity


def test_message_lifecycle_received_then_posted(store, other_store):
    key = ConversationKey("twilio", "+1555")
    first = store.outbox.add_message(key, "SM1", {"text": "a"}, now=T0)
    store.outbox.add_message(key, "SM2", {"text": "b"}, now=T0 + timedelta(milliseconds=5))
    assert [m.message_id for m in store.outbox.list_messages(key)] == ["SM1", "SM2"]

    # the webhook starts posting; a crash here leaves the message queued and marked in doubt
    attempt = store.outbox.mark_post_attempt(first.message)
    queued = other_store.outbox.list_messages(key)[0]
    assert queued.in_doubt and queued.attempts == 1
    with pytest.raises(ConcurrencyConflict):  # a second worker on the stale copy is refused
        other_store.outbox.mark_post_attempt(first.message)

    store.outbox.complete_message(attempt, activity_id="conv|0000001")
    retried = other_store.outbox.add_message(key, "SM1", {"text": "a"})
    assert (retried.is_new, retried.state, retried.activity_id) == (False, InboundState.POSTED, "conv|0000001")
    assert [m.message_id for m in store.outbox.list_messages(key)] == ["SM2"]
    with pytest.raises(ConcurrencyConflict):  # completing twice is detected, not repeated
        other_store.outbox.complete_message(attempt, activity_id="conv|0000001")


def test_failed_post_stays_queued_with_its_doubt(store):
    key = ConversationKey("twilio", "+1555")
    message = store.outbox.add_message(key, "SM1", {"text": "a"}).message
    message = store.outbox.mark_post_attempt(message)
    store.outbox.release_message(message, error="Throttled", in_doubt=False)
    queued = store.outbox.list_messages(key)[0]
    assert (queued.attempts, queued.in_doubt, queued.last_error) == (1, False, "Throttled")


def test_refused_inbound_becomes_a_dead_letter(store):
    key = ConversationKey("twilio", "+1555")
    message = store.outbox.add_message(key, "SM1", {"text": "a"}).message
    store.outbox.dead_letter_message(message, reason="400 BadArgument")
    assert store.outbox.list_messages(key) == []
    assert store.outbox.add_message(key, "SM1", {"text": "a"}).state == InboundState.DEAD
    [letter] = store.dead_letters.list_letters(key)
    assert (letter.kind, letter.reason, letter.payload["activity"]) == ("inbound", "400 BadArgument", {"text": "a"})


def test_large_activity_survives_the_outbox(store):
    key = ConversationKey("twilio", "+1555")
    activity = {"text": "x" * 70_000, "channelData": {"raw": "é" * 40_000}}
    store.outbox.add_message(key, "SM1", activity)
    assert store.outbox.list_messages(key)[0].activity == activity
