"""The due index against Azurite: only due rows are read, it follows the record, stale rows are cleaned,
and a webhook's inbound rows make a conversation due until a worker clears them."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from relay.store.conversations import ConversationKey, ConversationState
from relay.store.due_polls import Postponement
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


def test_an_inbound_row_makes_its_conversation_due_whatever_its_schedule_until_cleared(store):
    key = ConversationKey("twilio", "+1555")
    create(store, key, next_poll_at=T0 + timedelta(hours=1))  # settled: not due for an hour
    store.due_polls.mark_inbound(key, "SM1", now=T0)
    store.due_polls.mark_inbound(key, "SM1", now=T0)  # a retried webhook upserts the same row
    store.due_polls.mark_inbound(key, "SM2", now=T0)
    [due] = store.due_polls.list_due(now=T0)
    assert (due.key, sorted(m.message_id for m in due.inbound), due.peekable) == (key, ["SM1", "SM2"], False)

    record = store.conversations.claim_due(due, owner="poller-a", lease_seconds=30, now=T0)
    assert record.lease_owner == "poller-a"
    assert [d.key for d in store.due_polls.list_due(now=T0)] == [key]  # claiming leaves the rows to the worker
    store.due_polls.clear_inbound(due.inbound[:1])
    store.due_polls.clear_inbound(due.inbound)  # one of them is gone already: the other still goes
    assert store.due_polls.list_due(now=T0) == []


def test_an_inbound_row_of_a_conversation_without_a_record_claims_a_new_one(store, other_store):
    key = ConversationKey("whatsapp", "15550001")
    store.due_polls.mark_inbound(key, "wamid.1", now=T0)
    [due] = store.due_polls.list_due(now=T0)
    record = store.conversations.claim_due(due, owner="poller-a", lease_seconds=30, user_id="dl_whatsapp_1", now=T0)
    assert (record.user_id, record.conversation_id, record.lease_owner) == ("dl_whatsapp_1", "", "poller-a")
    assert other_store.conversations.claim_due(due, owner="poller-b", lease_seconds=30, user_id="dl_whatsapp_1",
                                               now=T0) is None


def test_an_inbound_row_written_again_since_it_was_read_is_not_cleared(store):
    """A provider's retry rewrote the row after a worker read it (and its message may be stored only now):
    the worker's clear leaves it, so the conversation stays due for the retried message."""
    key = ConversationKey("twilio", "+1555")
    store.due_polls.mark_inbound(key, "SM1", now=T0)
    [read] = store.due_polls.list_due(now=T0)
    store.due_polls.mark_inbound(key, "SM1", now=T0 + timedelta(minutes=6))  # the retry
    store.due_polls.clear_inbound(read.inbound)
    [due] = store.due_polls.list_due(now=T0 + timedelta(minutes=6))
    assert [m.message_id for m in due.inbound] == ["SM1"]
    store.due_polls.clear_inbound(due.inbound)  # as read now: it goes
    assert store.due_polls.list_due(now=T0 + timedelta(minutes=6)) == []


def test_a_peek_is_never_postponed_past_the_time_the_conversations_token_wants_refreshing(store):
    key = ConversationKey("twilio", "+1555")
    refresh_at = T0 + timedelta(seconds=30)
    create(store, key, token="t", token_expires_at=T0 + timedelta(seconds=60),
           token_refresh_at=refresh_at, peekable=True, next_poll_at=T0)
    [row] = store.due_polls.list_due(now=T0)
    assert row.peekable and row.token_refresh_at == refresh_at

    assert store.due_polls.postpone_rows([Postponement(row, T0 + timedelta(minutes=5), 60.0)]) == 1

    assert store.due_polls.list_due(now=refresh_at - timedelta(seconds=1)) == []
    assert [d.key for d in store.due_polls.list_due(now=refresh_at)] == [key]


def test_a_settled_row_carries_the_token_a_peek_reads_with_and_a_new_token_gets_a_new_row(store):
    """Token endpoint mode has no secret: the poller peeks with the conversation's token, so the row must hold the
    record's current one (a worker's change of token writes a new row), never in its repr."""
    key = ConversationKey("twilio", "+1556")
    record = create(store, key, token="first-token", token_expires_at=T0 + timedelta(hours=1),
                    token_refresh_at=T0 + timedelta(minutes=30), peekable=True, next_poll_at=T0)
    [row] = store.due_polls.list_due(now=T0)
    assert row.token == "first-token" and "first-token" not in repr(row)
    store.conversations.update_record(key, lambda r: replace(r, token="second-token",
                                                             token_refresh_at=T0 + timedelta(minutes=45)),
                                      current=record)
    [row] = store.due_polls.list_due(now=T0)
    assert row.token == "second-token"


def test_a_token_refreshed_on_a_quiet_peek_goes_into_its_row_in_place_and_the_next_lease_takes_it(store):
    """The poller's refresh of a quiet conversation: the postponing batch brings the token into the row, even one
    postponed meanwhile (its ETag changed), the record untouched; the next lease brings it into the record and
    keeps the row. A row its record moved away from stays gone."""
    key, gone = ConversationKey("twilio", "+1557"), ConversationKey("twilio", "+1558")
    for each in (key, gone):
        create(store, each, token="old-token", token_expires_at=T0 + timedelta(minutes=30),
               token_refresh_at=T0 + timedelta(minutes=15), peekable=True, next_poll_at=T0)
    rows = {row.key: row for row in store.due_polls.list_due(now=T0)}
    renewed, expires = T0 + timedelta(minutes=30), T0 + timedelta(minutes=45)
    assert store.due_polls.postpone_rows([Postponement(rows[key], T0 + timedelta(minutes=1), 60.0)]) == 1
    store.conversations.update_record(gone, lambda r: replace(r, next_poll_at=T0 + timedelta(seconds=1)))

    later = T0 + timedelta(minutes=2)
    assert store.due_polls.postpone_rows([Postponement(rows[each], later, 60.0, token="new-token",
                                                       token_refresh_at=renewed, token_expires_at=expires)
                                          for each in (key, gone)]) == 1

    [row] = [row for row in store.due_polls.list_due(now=T0 + timedelta(hours=1)) if row.key == key]
    assert (row.index_key, row.token, row.token_refresh_at, row.token_expires_at) == (
        rows[key].index_key, "new-token", renewed, expires)
    assert store.conversations.get_record(key).token == "old-token"
    assert [row.key for row in store.due_polls.list_due(now=later - timedelta(seconds=1))] == [gone]
    [moved] = [row for row in store.due_polls.list_due(now=T0 + timedelta(hours=1)) if row.key == gone]
    assert moved.index_key != rows[gone].index_key

    leased = store.conversations.acquire_lease(key, owner="webhook", lease_seconds=30, now=later)
    assert (leased.token, leased.token_refresh_at, leased.token_expires_at) == ("new-token", renewed, expires)
    assert leased.due_index_key == rows[key].index_key
    assert store.conversations.get_record(key).token == "new-token"


def _another_conversation(record):
    return replace(record, conversation_id="conv-new")


def _token_let_go(record):
    return record.without_token()


def _refreshed_under_the_lease_since(record):
    return replace(record, token="worker-token", token_refresh_at=T0 + timedelta(minutes=40),
                   token_expires_at=T0 + timedelta(minutes=55))


@pytest.mark.parametrize(("change", "token"), [
    pytest.param(_another_conversation, "old-token", id="a row of the conversation the record left is not taken"),
    pytest.param(_token_let_go, "", id="a token the record let go is not brought back"),
    pytest.param(_refreshed_under_the_lease_since, "worker-token",
                 id="a worker's newer token is not replaced by the row's older one"),
])
def test_a_lease_takes_only_a_newer_token_of_the_same_conversation_from_the_row(store, change, token):
    key = ConversationKey("twilio", "+1561")
    create(store, key, token="old-token", token_expires_at=T0 + timedelta(minutes=30),
           token_refresh_at=T0 + timedelta(minutes=15), peekable=True, next_poll_at=T0)
    [row] = store.due_polls.list_due(now=T0)
    store.due_polls.postpone_rows([Postponement(row, T0 + timedelta(minutes=1), 60.0, token="row-token",
                                                token_refresh_at=T0 + timedelta(minutes=30),
                                                token_expires_at=T0 + timedelta(minutes=45))])
    store.conversations.update_record(key, change, keep_row=True)

    leased = store.conversations.acquire_lease(key, owner="webhook", lease_seconds=30, now=T0 + timedelta(minutes=2))

    assert leased.token == token


def test_a_lease_long_before_the_tokens_refresh_time_does_not_read_the_row(storage_connection_string, table_prefix):
    counter = CountingTransport()
    store = make_store(storage_connection_string, table_prefix, transport=counter)
    key = ConversationKey("twilio", "+1562")
    create(store, key, token="t", token_expires_at=T0 + timedelta(minutes=30),
           token_refresh_at=T0 + timedelta(minutes=15), peekable=True, next_poll_at=T0)
    lookahead = timedelta(seconds=65)

    counter.requests.clear()
    store.conversations.acquire_lease(key, owner="a", lease_seconds=30, token_lookahead=lookahead,
                                      now=T0 + timedelta(minutes=13))
    assert [request.split()[0] for request in counter.requests] == ["GET", "PUT"]  # the record, read and written

    counter.requests.clear()
    store.conversations.acquire_lease(key, owner="b", lease_seconds=30, token_lookahead=lookahead,
                                      now=T0 + timedelta(minutes=14, seconds=30))
    assert [request.split()[0] for request in counter.requests] == ["GET", "GET", "PUT"]  # and its row, maybe newer


def settled_rows_due_at_t0(store, name: str, count: int) -> list[dict]:
    """`count` peekable due rows of users "<name>-<n>", due at T0 (as a settled conversation's row, without its
    record), written 100 to a transaction."""
    at = f"{int(T0.timestamp() * 1000):015d}"
    rows = [{"PartitionKey": "due", "RowKey": f"{at}|{name}{i:04d}|n", "channel": "twilio", "user": f"{name}-{i}",
             "conversation_id": f"conv-{i}", "watermark": "1", "peek_after": T0} for i in range(count)]
    table = store.tables.client("duepolls")
    for start in range(0, len(rows), 100):
        table.submit_transaction([("create", row) for row in rows[start:start + 100]])
    return rows


def test_a_refreshed_token_goes_into_its_row_however_many_rows_of_its_batch_changed_meanwhile(store):
    key = ConversationKey("twilio", "+1560")
    create(store, key, token="old-token", token_expires_at=T0 + timedelta(minutes=30),
           token_refresh_at=T0 + timedelta(minutes=15), peekable=True, next_poll_at=T0)
    table = store.tables.client("duepolls")
    others = settled_rows_due_at_t0(store, "busy", 4)
    rows = store.due_polls.list_due(now=T0)
    for row in others:
        table.upsert_entity({**row, "watermark": "2"})  # every other row rewritten after the tick read it
    renewed = T0 + timedelta(minutes=30)

    store.due_polls.postpone_rows([
        Postponement(row, T0 + timedelta(minutes=1), 60.0,
                     **({"token": "new-token", "token_refresh_at": renewed, "token_expires_at": renewed}
                        if row.key == key else {}))
        for row in rows])

    [row] = [row for row in store.due_polls.list_due(now=T0 + timedelta(hours=1)) if row.key == key]
    assert (row.token, row.token_refresh_at) == ("new-token", renewed)
    assert sorted(row.key.user for row in store.due_polls.list_due(now=T0)) == [f"busy-{i}" for i in range(4)]


def test_a_record_that_keeps_its_row_cannot_move_its_schedule(store):
    key = ConversationKey("twilio", "+1559")
    create(store, key, token="t", peekable=True, next_poll_at=T0)
    with pytest.raises(ValueError, match="schedule"):
        store.conversations.update_record(key, lambda r: replace(r, next_poll_at=T0 + timedelta(minutes=1)),
                                          keep_row=True)


def test_quiet_rows_of_several_transactions_are_all_postponed_but_a_row_rewritten_meanwhile_keeps_its_schedule(store):
    """Quiet conversations are postponed in transactions of 100 sent side by side: every row moves, except
    one a webhook or a worker rewrote since it was read, which fails only its own transaction's first try."""
    table = store.tables.client("duepolls")
    rows = settled_rows_due_at_t0(store, "quiet", 250)
    due = store.due_polls.list_due(now=T0, limit=1000)
    assert len(due) == 250 and all(d.peekable for d in due)
    table.upsert_entity({**rows[150], "watermark": "2"})  # rewritten after the tick read it

    later = T0 + timedelta(minutes=5)
    assert store.due_polls.postpone_rows([Postponement(row, later, 60.0) for row in due]) == 249

    assert [d.key.user for d in store.due_polls.list_due(now=T0, limit=1000)] == ["quiet-150"]
    assert len(store.due_polls.list_due(now=later, limit=1000)) == 250
