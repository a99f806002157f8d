"""The sweep against Azurite: what is old goes, what is pending or recent stays, and a backlog of any size goes
in the end."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from relay.clock import ManualClock
from relay.store import RelayStore
from relay.store.conversations import ConversationKey, ConversationState, partition_of
from relay.store.dead_letters import DeadLetterKind
from relay.store.outbox import InboundState
from relay.store.sweep import sweep_tables
from relay.store.tables import Budget
from tests.store.conftest import T0, create


def test_sweep_removes_ended_idle_and_old_entries_only(store):
    ended, idle, busy = (ConversationKey("twilio", u) for u in ("ended", "idle", "busy"))
    create(store, ended, next_poll_at=T0)
    store.conversations.update_record(ended, lambda r: replace(r, state=ConversationState.ENDED))
    create(store, idle, now=T0 - timedelta(days=4), next_poll_at=T0 + timedelta(hours=1))
    create(store, busy, now=T0 - timedelta(days=4), last_user_activity_at=T0 - timedelta(hours=1))
    old = store.outbox.add_message(busy, "old", {"text": "a"}, now=T0 - timedelta(days=8)).message
    store.outbox.complete_message(old, activity_id="c|1")
    store.outbox.add_message(busy, "old-but-pending", {"text": "b"}, now=T0 - timedelta(days=8))
    new = store.outbox.add_message(busy, "new", {"text": "c"}, now=T0 - timedelta(days=1)).message
    store.outbox.complete_message(new, activity_id="c|2")
    store.sessions.create_session("conv-old", user_id="dl_1", resume_key="k1", expires_at=T0 - timedelta(seconds=1))
    store.sessions.create_session("conv-new", user_id="dl_2", resume_key="k2", expires_at=T0 + timedelta(hours=1))
    store.rate_limits.count_request("10.0.0.1", limit=5, now=T0 - timedelta(minutes=2))
    store.dead_letters.add_letter(busy, kind=DeadLetterKind.REPLY, reason="old", payload={},
                                  now=T0 - timedelta(days=31))

    result = sweep_tables(store, now=T0)
    assert (result.conversations, result.dedupe_entries, result.webchat_sessions, result.rate_limits,
            result.dead_letters) == (2, 1, 1, 1, 1)
    assert store.conversations.get_record(ended) is None and store.conversations.get_record(idle) is None
    assert store.conversations.get_record(busy) is not None
    assert store.due_polls.list_due(now=T0 + timedelta(days=1)) == []  # the idle one's index row went too
    assert [m.message_id for m in store.outbox.list_messages(busy)] == ["old-but-pending"]
    assert store.outbox.add_message(busy, "old", {"text": "a"}, now=T0).is_new  # forgotten after the dedupe window
    assert store.outbox.add_message(busy, "new", {"text": "c"}, now=T0).state == InboundState.POSTED
    assert store.sessions.get_session("conv-old") is None and store.sessions.get_session("conv-new") is not None


def handled_dedupe_rows(store, count: int, *, received_at) -> None:
    """`count` rows as a handled message leaves them (Outbox.add_message, then complete_message), 100 users'
    worth at a time: written in batches directly, since 5,000 messages through the outbox would take minutes."""
    client = store.tables.client("inbound")
    for user in range(count // 100):
        pk = partition_of(store.tables, ConversationKey("twilio", f"+1555{user:07d}"))
        client.submit_transaction([("create", {"PartitionKey": pk, "RowKey": f"dedupe|{n:032x}", "message_id": f"SM{n}",
                                               "state": InboundState.POSTED, "received_at": received_at,
                                               "activity_id": f"c|{n}"})
                                   for n in range(100)])


class TickingClock(ManualClock):
    """A clock whose monotonic time moves a second each time it is read (the budget looks at it once a page)."""

    def monotonic(self) -> float:
        self.advance(1)
        return super().monotonic()


def test_a_backlog_of_5000_dedupe_rows_goes_page_by_page_and_a_run_out_of_time_is_resumed(store):
    handled_dedupe_rows(store, 5_000, received_at=T0 - timedelta(days=8))
    pending = ConversationKey("twilio", "+15559999999")
    store.outbox.add_message(pending, "still-waiting", {"text": "a"}, now=T0 - timedelta(days=8))

    cut_short = sweep_tables(RelayStore(store.tables, clock=TickingClock()), now=T0, budget_seconds=5)
    assert not cut_short.complete and 0 < cut_short.dedupe_entries < 5_000
    rest = sweep_tables(store, now=T0)
    assert rest.complete and cut_short.dedupe_entries + rest.dedupe_entries == 5_000
    assert sweep_tables(store, now=T0).dedupe_entries == 0
    assert [m.message_id for m in store.outbox.list_messages(pending)] == ["still-waiting"]


def test_an_idle_conversation_whose_messages_still_wait_is_not_swept(store):
    """Direct Line refused its messages for days (5xx, not for good): the record keeps them due."""
    key = ConversationKey("twilio", "+15550001111")
    create(store, key, now=T0 - timedelta(days=4), next_poll_at=T0 + timedelta(minutes=5))
    waiting = store.outbox.add_message(key, "SM-waiting", {"text": "still trying"}, now=T0 - timedelta(days=4)).message
    assert sweep_tables(store, now=T0).conversations == 0
    assert store.conversations.get_record(key) is not None
    store.outbox.complete_message(waiting, activity_id="c|9")
    assert sweep_tables(store, now=T0).conversations == 1  # nothing waits any more: idle, it goes


class ShortPages:
    """A query answer as Azure Table Storage may give it (not Azurite): short and empty pages with more behind."""

    def __init__(self, pages: list[list]):
        self.pages = pages

    def by_page(self):
        return iter(self.pages)


def test_the_sweep_reads_on_past_short_and_empty_pages(store, monkeypatch):
    keys = [ConversationKey("twilio", f"+1555000{n:04d}") for n in range(3)]
    for key in keys:
        create(store, key, now=T0 - timedelta(days=4))
    table = store.tables.table("conversations")
    rows = list(table.client.query_entities("PartitionKey ne ''"))
    assert len(rows) == 3
    # The service's way: an empty page, one row, an empty page, two rows (a scan stopped at 5 s or a server edge).
    monkeypatch.setattr(table.client, "query_entities",
                        lambda *args, **kwargs: ShortPages([[], rows[:1], [], rows[1:]]))
    assert store.conversations.delete_inactive(idle_before=T0 - timedelta(days=3), budget=Budget(60, clock=store.clock),
                                               waiting=lambda key: False) == 3
