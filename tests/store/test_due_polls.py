"""The due index against Azurite: only due rows are read, it follows the record, stale rows are cleaned."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from relay.store.conversations import ConversationKey, ConversationState
from tests.store.conftest import T0, CountingTransport, create, make_store


def test_due_query_reads_only_due_rows(storage_connection_string, table_prefix):
    counter = CountingTransport()
    store = make_store(storage_connection_string, table_prefix, transport=counter)
    idle = 600
    table = store.tables.client("duepolls")
    # idle conversations scheduled far ahead, written in batches to keep the test quick
    rows = [{"PartitionKey": "due", "RowKey": f"{int((T0 + timedelta(hours=1)).timestamp() * 1000):015d}|idle|{i:05d}",
             "channel": "twilio", "user": f"idle-{i}"} for i in range(idle)]
    for start in range(0, idle, 100):
        table.submit_transaction([("create", row) for row in rows[start:start + 100]])
    due_keys = [ConversationKey("twilio", f"due-{i}") for i in range(3)]
    for n, key in enumerate(due_keys):
        create(store, key, next_poll_at=T0 - timedelta(seconds=n))
    create(store, ConversationKey("twilio", "later"), next_poll_at=T0 + timedelta(seconds=1))

    counter.requests.clear()
    due = store.due_polls.list_due(now=T0)
    assert [d.key for d in due] == list(reversed(due_keys))  # earliest first
    assert len(counter.requests) == 1  # one page, whatever the number of idle rows
    assert len(counter.requests) / idle <= 0.02

    assert {d.key for d in store.due_polls.list_due(now=T0 + timedelta(seconds=1))} == {
        *due_keys, ConversationKey("twilio", "later")}


def test_rescheduling_moves_the_index_and_ending_removes_it(store):
    key = ConversationKey("twilio", "+1555")
    create(store, key, next_poll_at=T0)
    store.conversations.update_record(key, lambda r: replace(r, next_poll_at=T0 + timedelta(seconds=60)))
    assert store.due_polls.list_due(now=T0 + timedelta(seconds=59)) == []
    assert [d.key for d in store.due_polls.list_due(now=T0 + timedelta(seconds=60))] == [key]
    store.conversations.update_record(key, lambda r: replace(r, state=ConversationState.ENDED))
    assert store.due_polls.list_due(now=T0 + timedelta(days=1)) == []


def test_claim_due_takes_the_lease_and_cleans_stale_index_rows(store, other_store):
    key = ConversationKey("twilio", "+1555")
    create(store, key, next_poll_at=T0)
    [due] = store.due_polls.list_due(now=T0)
    record = store.conversations.claim_due(due, owner="poller-a", lease_seconds=30, now=T0)
    assert record.lease_owner == "poller-a"
    assert other_store.conversations.claim_due(due, owner="poller-b", lease_seconds=30, now=T0) is None

    # an index row left behind by a crash between writes points at a record that moved on
    store.tables.client("duepolls").create_entity({"PartitionKey": "due", "RowKey": f"{0:015d}|orphan|x",
                                            "channel": "twilio", "user": "gone"})
    orphan = next(d for d in store.due_polls.list_due(now=T0) if d.key.user == "gone")
    assert store.conversations.claim_due(orphan, owner="poller-a", lease_seconds=30, now=T0) is None
    assert [d.key for d in store.due_polls.list_due(now=T0)] == [key]
