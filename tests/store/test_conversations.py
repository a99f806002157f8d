"""Conversation records against Azurite: every field kept, ETags that lose no update, leases."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import pytest

from relay.clock import ManualClock
from relay.errors import ConcurrencyConflict, LeaseLost
from relay.store.conversations import DELIVERED_IDS_LIMIT, ConversationKey
from relay.store.tables import UPDATE_ATTEMPTS
from tests.store.conftest import T0, create, make_store, new_record


def test_conversation_round_trip_keeps_every_field(store):
    key = ConversationKey("whatsapp", "+1 555/0100#?%|x")  # characters Table keys forbid, and our separator
    record = new_record(
        key, token="dl-token-secret", token_expires_at=T0 + timedelta(minutes=30), watermark="0000a-42",
        delivered_ids=("c|1", "c|2"), last_user_activity_at=T0, next_poll_at=T0 + timedelta(seconds=5),
        poll_interval=5.0, reply_context={"to": "+1555", "nested": {"a": [1, 2]}},
    )
    stored = store.conversations.update_record(key, lambda _: record, now=T0)
    read = store.conversations.get_record(key)
    assert read == stored
    assert read.watermark == "0000a-42"
    assert read.reply_context == {"to": "+1555", "nested": {"a": [1, 2]}}
    assert read.token_expires_at == T0 + timedelta(minutes=30)
    assert read.created_at == T0
    assert store.conversations.get_record(ConversationKey("whatsapp", "+1 555")) is None
    assert "dl-token-secret" not in repr(read)


def test_a_pending_question_is_stored_and_forgotten_with_the_record(store):
    key = ConversationKey("twilio", "+1555")
    question = {"id": "ab12cd34", "step": 0, "steps": [{"kind": "choice", "prompt": "Size?", "input": "size",
                                                        "options": [{"title": "Small", "value": "S"}]}],
                "data": {"action": "order"}, "collected": {}, "consumed": []}
    store.conversations.update_record(key, lambda _: new_record(key, pending_question=question))
    assert store.conversations.get_record(key).pending_question == question
    store.conversations.update_record(key, lambda r: replace(r, pending_question=None))
    assert store.conversations.get_record(key).pending_question is None


def test_delivered_ids_are_bounded_and_keep_the_newest(store):
    key = ConversationKey("twilio", "+1555")
    record = new_record(key).with_delivered(*[f"c|{i}" for i in range(DELIVERED_IDS_LIMIT + 50)])
    store.conversations.update_record(key, lambda _: record)
    read = store.conversations.get_record(key)
    assert len(read.delivered_ids) == DELIVERED_IDS_LIMIT
    assert read.is_delivered(f"c|{DELIVERED_IDS_LIMIT + 49}")
    assert not read.is_delivered("c|0")


def test_unchanged_record_writes_nothing(store):
    key = ConversationKey("twilio", "+1555")
    first = create(store, key)
    again = store.conversations.update_record(key, lambda stored: stored)
    assert again.etag == first.etag


# ------------------------------------------------------------------------------------------ ETags


def test_conflicting_writers_both_changes_survive(store, other_store):
    key = ConversationKey("twilio", "+1555")
    stale = create(store, key)
    other_store.conversations.update_record(key, lambda r: replace(r, last_user_activity_at=T0 + timedelta(seconds=1)))
    calls = []

    def set_watermark(record):
        calls.append(record)
        return replace(record, watermark="7")

    result = store.conversations.update_record(key, set_watermark, current=stale)
    assert len(calls) == 2  # applied to the stale copy, refused by the ETag, applied again on fresh data
    read = other_store.conversations.get_record(key)
    assert read.watermark == "7"
    assert read.last_user_activity_at == T0 + timedelta(seconds=1)
    assert result.etag == read.etag


def test_persistent_conflict_is_reported_not_overwritten(store, other_store):
    key = ConversationKey("twilio", "+1555")
    create(store, key)
    rounds = iter(range(100))

    def competing_change(record):
        # another writer gets in between every read and write of ours
        other_store.conversations.update_record(key, lambda r: replace(r, watermark=f"other-{next(rounds)}"))
        return replace(record, watermark="mine")

    with pytest.raises(ConcurrencyConflict):
        store.conversations.update_record(key, competing_change)
    assert other_store.conversations.get_record(key).watermark.startswith("other-")


def test_a_write_not_told_the_time_takes_it_from_the_stores_clock(storage_connection_string, table_prefix):
    clock = ManualClock()
    store = make_store(storage_connection_string, table_prefix, clock=clock)
    key = ConversationKey("twilio", "+1555")
    create(store, key)
    clock.advance(90)
    store.conversations.update_record(key, lambda r: replace(r, watermark="7"))
    assert store.conversations.get_record(key).updated_at == clock.now()  # not the machine's wall clock


def test_conflicting_writes_back_off_on_the_stores_clock_without_waiting(storage_connection_string, table_prefix,
                                                                        other_store):
    clock = ManualClock(seed=3)
    store = make_store(storage_connection_string, table_prefix, clock=clock)
    key = ConversationKey("twilio", "+1555")
    create(store, key)
    rounds = iter(range(100))

    def competing_change(record):
        other_store.conversations.update_record(key, lambda r: replace(r, watermark=f"other-{next(rounds)}"))
        return replace(record, watermark="mine")

    started = clock.now()
    with pytest.raises(ConcurrencyConflict):
        store.conversations.update_record(key, competing_change)
    pauses = clock.sleeps
    assert len(pauses) == UPDATE_ATTEMPTS  # one random pause after each refused write, growing
    assert all(0 <= pause <= min(1.0, 0.01 * 2**attempt) for attempt, pause in enumerate(pauses))
    assert len(set(pauses)) == len(pauses)  # jittered: writers that collided do not retry in lockstep
    assert clock.now() == started + timedelta(seconds=sum(pauses))  # the pauses passed on the store's clock


def test_concurrent_writers_lose_no_update(storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(4)]
    create(stores[0], key)

    def deliver(worker: int):
        for n in range(3):
            stores[worker].conversations.update_record(key, lambda r, w=worker, n=n: r.with_delivered(f"c|{w}-{n}"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(deliver, range(4)))
    delivered = stores[0].conversations.get_record(key).delivered_ids
    assert set(delivered) == {f"c|{w}-{n}" for w in range(4) for n in range(3)}


def test_concurrent_creation_keeps_the_first_conversation(storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(4)]
    barrier = threading.Barrier(4)

    def start(worker: int) -> str:
        barrier.wait()
        record = stores[worker].conversations.update_record(
            key, lambda stored: stored or replace(new_record(key), conversation_id=f"conv-{worker}"))
        return record.conversation_id

    with ThreadPoolExecutor(4) as pool:
        winners = set(pool.map(start, range(4)))
    assert len(winners) == 1  # every instance ends up using the same Direct Line conversation


# ------------------------------------------------------------------------------------------ leases


def test_lease_excludes_others_until_it_expires_then_can_be_taken_over(store, other_store):
    key = ConversationKey("twilio", "+1555")
    create(store, key)
    mine = store.conversations.acquire_lease(key, owner="poller-a", lease_seconds=30, now=T0)
    assert mine.lease_owner == "poller-a"
    assert other_store.conversations.acquire_lease(key, owner="poller-b", lease_seconds=30,
                                                   now=T0 + timedelta(seconds=29)) is None
    renewed = store.conversations.acquire_lease(key, owner="poller-a", lease_seconds=30, now=T0 + timedelta(seconds=20))
    assert renewed.lease_expires_at == T0 + timedelta(seconds=50)
    assert other_store.conversations.acquire_lease(key, owner="poller-b", lease_seconds=30,
                                                   now=T0 + timedelta(seconds=49)) is None

    # poller-a dies: its lease runs out on its own and poller-b takes over
    taken = other_store.conversations.acquire_lease(key, owner="poller-b", lease_seconds=30,
                                                    now=T0 + timedelta(seconds=51))
    assert taken.lease_owner == "poller-b"
    with pytest.raises(LeaseLost):  # the old holder waking up cannot write over the new one
        store.conversations.update_record(key, lambda r: replace(r, watermark="stale"), lease_owner="poller-a")
    assert store.conversations.get_record(key).watermark is None

    other_store.conversations.update_record(key, lambda r: replace(r, watermark="9"), lease_owner="poller-b")
    other_store.conversations.release_lease(store.conversations.get_record(key), owner="poller-b")
    assert store.conversations.acquire_lease(key, owner="poller-a", lease_seconds=30,
                                             now=T0 + timedelta(seconds=52)) is not None
    assert store.conversations.get_record(key).watermark == "9"


def test_only_one_of_many_concurrent_pollers_gets_the_lease(storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(5)]
    create(stores[0], key)
    barrier = threading.Barrier(5)

    def claim(worker: int):
        barrier.wait()
        return stores[worker].conversations.acquire_lease(key, owner=f"poller-{worker}", lease_seconds=30, now=T0)

    with ThreadPoolExecutor(5) as pool:
        won = [r for r in pool.map(claim, range(5)) if r is not None]
    assert len(won) == 1
