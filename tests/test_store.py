"""The conversation store against Azurite: ETags, leases, dedupe, the due index, the sweep, sessions."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from azure.core.pipeline.transport import RequestsTransport

from relay.errors import ConcurrencyConflict, LeaseLost
from relay.settings import Settings
from relay.store import (
    DEAD,
    DELIVERED_IDS_LIMIT,
    ENDED,
    GRACE_KEYS_LIMIT,
    PENDING,
    POSTED,
    RESUME_GRACE,
    RESUMED,
    RETRIED,
    REUSED_KEY,
    SESSION_EXPIRED,
    SESSION_REVOKED,
    UNKNOWN_SESSION,
    WRONG_KEY,
    ConversationKey,
    ConversationRecord,
    RelayStore,
    table_service_client,
)

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


class CountingTransport(RequestsTransport):
    """Counts the HTTP requests (= billed table transactions) a store makes."""

    def __init__(self):
        super().__init__()
        self.requests: list[str] = []

    def send(self, request, **kwargs):
        self.requests.append(f"{request.method} {request.url}")
        return super().send(request, **kwargs)


def make_store(connection_string: str, prefix: str, **options) -> RelayStore:
    storage = Settings.from_environ({"DIRECTLINE_SECRET": "x", "AzureWebJobsStorage": connection_string,
                                     "RELAY_TABLE_PREFIX": prefix}).storage
    return RelayStore.from_settings(storage, **options)


@pytest.fixture
def store(storage_connection_string, table_prefix) -> RelayStore:
    return make_store(storage_connection_string, table_prefix)


@pytest.fixture
def other_store(storage_connection_string, table_prefix) -> RelayStore:
    """A second writer: its own client and connection, as another instance would have."""
    return make_store(storage_connection_string, table_prefix)


def new_record(key: ConversationKey, **fields) -> ConversationRecord:
    return ConversationRecord(key=key, conversation_id=f"conv-{key.user}", user_id=f"dl_{key.user}", **fields)


def create(store: RelayStore, key: ConversationKey, now: datetime = T0, **fields) -> ConversationRecord:
    return store.update_conversation(key, lambda stored: stored or new_record(key, **fields), now=now)


# ------------------------------------------------------------------------------------------ records


def test_conversation_round_trip_keeps_every_field(store):
    key = ConversationKey("whatsapp", "+1 555/0100#?%|x")  # characters Table keys forbid, and our separator
    record = new_record(
        key, token="dl-token-secret", token_expires_at=T0 + timedelta(minutes=30), watermark="0000a-42",
        delivered_ids=("c|1", "c|2"), last_user_activity_at=T0, next_poll_at=T0 + timedelta(seconds=5),
        poll_interval=5.0, reply_context={"to": "+1555", "nested": {"a": [1, 2]}},
    )
    stored = store.update_conversation(key, lambda _: record, now=T0)
    read = store.get_conversation(key)
    assert read == stored
    assert read.watermark == "0000a-42"
    assert read.reply_context == {"to": "+1555", "nested": {"a": [1, 2]}}
    assert read.token_expires_at == T0 + timedelta(minutes=30)
    assert read.created_at == T0
    assert store.get_conversation(ConversationKey("whatsapp", "+1 555")) is None
    assert "dl-token-secret" not in repr(read)


def test_delivered_ids_are_bounded_and_keep_the_newest(store):
    key = ConversationKey("twilio", "+1555")
    record = new_record(key).with_delivered(*[f"c|{i}" for i in range(DELIVERED_IDS_LIMIT + 50)])
    store.update_conversation(key, lambda _: record)
    read = store.get_conversation(key)
    assert len(read.delivered_ids) == DELIVERED_IDS_LIMIT
    assert read.is_delivered(f"c|{DELIVERED_IDS_LIMIT + 49}")
    assert not read.is_delivered("c|0")


def test_unchanged_record_writes_nothing(store):
    key = ConversationKey("twilio", "+1555")
    first = create(store, key)
    again = store.update_conversation(key, lambda stored: stored)
    assert again.etag == first.etag


# ------------------------------------------------------------------------------------------ ETags


def test_conflicting_writers_both_changes_survive(store, other_store):
    key = ConversationKey("twilio", "+1555")
    stale = create(store, key)
    other_store.update_conversation(key, lambda r: replace(r, last_user_activity_at=T0 + timedelta(seconds=1)))
    calls = []

    def set_watermark(record):
        calls.append(record)
        return replace(record, watermark="7")

    result = store.update_conversation(key, set_watermark, current=stale)
    assert len(calls) == 2  # applied to the stale copy, refused by the ETag, applied again on fresh data
    read = other_store.get_conversation(key)
    assert read.watermark == "7"
    assert read.last_user_activity_at == T0 + timedelta(seconds=1)
    assert result.etag == read.etag


def test_persistent_conflict_is_reported_not_overwritten(store, other_store):
    key = ConversationKey("twilio", "+1555")
    create(store, key)
    rounds = iter(range(100))

    def competing_change(record):
        # another writer gets in between every read and write of ours
        other_store.update_conversation(key, lambda r: replace(r, watermark=f"other-{next(rounds)}"))
        return replace(record, watermark="mine")

    with pytest.raises(ConcurrencyConflict):
        store.update_conversation(key, competing_change)
    assert other_store.get_conversation(key).watermark.startswith("other-")


def test_concurrent_writers_lose_no_update(storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(4)]
    create(stores[0], key)

    def deliver(worker: int):
        for n in range(3):
            stores[worker].update_conversation(key, lambda r, w=worker, n=n: r.with_delivered(f"c|{w}-{n}"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(deliver, range(4)))
    assert set(stores[0].get_conversation(key).delivered_ids) == {f"c|{w}-{n}" for w in range(4) for n in range(3)}


def test_concurrent_creation_keeps_the_first_conversation(storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(4)]
    barrier = threading.Barrier(4)

    def start(worker: int) -> str:
        barrier.wait()
        record = stores[worker].update_conversation(
            key, lambda stored: stored or replace(new_record(key), conversation_id=f"conv-{worker}"))
        return record.conversation_id

    with ThreadPoolExecutor(4) as pool:
        winners = set(pool.map(start, range(4)))
    assert len(winners) == 1  # every instance ends up using the same Direct Line conversation


# ------------------------------------------------------------------------------------------ leases


def test_lease_excludes_others_until_it_expires_then_can_be_taken_over(store, other_store):
    key = ConversationKey("twilio", "+1555")
    create(store, key)
    mine = store.acquire_lease(key, owner="poller-a", lease_seconds=30, now=T0)
    assert mine.lease_owner == "poller-a"
    assert other_store.acquire_lease(key, owner="poller-b", lease_seconds=30, now=T0 + timedelta(seconds=29)) is None
    renewed = store.acquire_lease(key, owner="poller-a", lease_seconds=30, now=T0 + timedelta(seconds=20))
    assert renewed.lease_expires_at == T0 + timedelta(seconds=50)
    assert other_store.acquire_lease(key, owner="poller-b", lease_seconds=30, now=T0 + timedelta(seconds=49)) is None

    # poller-a dies: its lease runs out on its own and poller-b takes over
    taken = other_store.acquire_lease(key, owner="poller-b", lease_seconds=30, now=T0 + timedelta(seconds=51))
    assert taken.lease_owner == "poller-b"
    with pytest.raises(LeaseLost):  # the old holder waking up cannot write over the new one
        store.update_conversation(key, lambda r: replace(r, watermark="stale"), lease_owner="poller-a")
    assert store.get_conversation(key).watermark is None

    other_store.update_conversation(key, lambda r: replace(r, watermark="9"), lease_owner="poller-b")
    other_store.release_lease(store.get_conversation(key), owner="poller-b")
    assert store.acquire_lease(key, owner="poller-a", lease_seconds=30, now=T0 + timedelta(seconds=52)) is not None
    assert store.get_conversation(key).watermark == "9"


def test_only_one_of_many_concurrent_pollers_gets_the_lease(storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(5)]
    create(stores[0], key)
    barrier = threading.Barrier(5)

    def claim(worker: int):
        barrier.wait()
        return stores[worker].acquire_lease(key, owner=f"poller-{worker}", lease_seconds=30, now=T0)

    with ThreadPoolExecutor(5) as pool:
        won = [r for r in pool.map(claim, range(5)) if r is not None]
    assert len(won) == 1


# ------------------------------------------------------------------------------------------ inbound


def test_dedupe_under_concurrent_inserts(storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(6)]
    barrier = threading.Barrier(6)
    activity = {"type": "message", "text": "hello", "channelData": {"clientActivityID": "SM1"}}

    def receive(worker: int):
        barrier.wait()
        return stores[worker].record_inbound(key, "SM1", activity)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(receive, range(6)))
    assert sum(r.is_new for r in results) == 1
    assert all(r.state == PENDING for r in results)
    outbox = stores[0].list_outbox(key)
    assert [m.message_id for m in outbox] == ["SM1"]
    assert outbox[0].activity == activity


def test_message_lifecycle_received_then_posted(store, other_store):
    key = ConversationKey("twilio", "+1555")
    first = store.record_inbound(key, "SM1", {"text": "a"}, now=T0)
    store.record_inbound(key, "SM2", {"text": "b"}, now=T0 + timedelta(milliseconds=5))
    assert [m.message_id for m in store.list_outbox(key)] == ["SM1", "SM2"]

    # the webhook starts posting; a crash here leaves the message queued and marked in doubt
    attempt = store.mark_post_attempt(first.message)
    queued = other_store.list_outbox(key)[0]
    assert queued.in_doubt and queued.attempts == 1
    with pytest.raises(ConcurrencyConflict):  # a second worker on the stale copy is refused
        other_store.mark_post_attempt(first.message)

    store.complete_inbound(attempt, activity_id="conv|0000001")
    retried = other_store.record_inbound(key, "SM1", {"text": "a"})
    assert (retried.is_new, retried.state, retried.activity_id) == (False, POSTED, "conv|0000001")
    assert [m.message_id for m in store.list_outbox(key)] == ["SM2"]
    with pytest.raises(ConcurrencyConflict):  # completing twice is detected, not repeated
        other_store.complete_inbound(attempt, activity_id="conv|0000001")


def test_failed_post_stays_queued_with_its_doubt(store):
    key = ConversationKey("twilio", "+1555")
    message = store.record_inbound(key, "SM1", {"text": "a"}).message
    message = store.mark_post_attempt(message)
    store.release_inbound(message, error="Throttled", in_doubt=False)
    queued = store.list_outbox(key)[0]
    assert (queued.attempts, queued.in_doubt, queued.last_error) == (1, False, "Throttled")


def test_refused_inbound_becomes_a_dead_letter(store):
    key = ConversationKey("twilio", "+1555")
    message = store.record_inbound(key, "SM1", {"text": "a"}).message
    store.dead_letter_inbound(message, reason="400 BadArgument")
    assert store.list_outbox(key) == []
    assert store.record_inbound(key, "SM1", {"text": "a"}).state == DEAD
    [letter] = store.list_dead_letters(key)
    assert (letter.kind, letter.reason, letter.payload["activity"]) == ("inbound", "400 BadArgument", {"text": "a"})


def test_large_activity_survives_the_outbox(store):
    key = ConversationKey("twilio", "+1555")
    activity = {"text": "x" * 70_000, "channelData": {"raw": "é" * 40_000}}
    store.record_inbound(key, "SM1", activity)
    assert store.list_outbox(key)[0].activity == activity


def test_reply_dead_letters(store):
    key = ConversationKey("whatsapp", "4915")
    store.add_dead_letter(key, kind="reply", reason="131026 undeliverable", payload={"id": "conv|3"})
    [letter] = store.list_dead_letters()
    assert (letter.key, letter.kind, letter.payload) == (key, "reply", {"id": "conv|3"})


# ------------------------------------------------------------------------------------------ due index


def test_due_query_reads_only_due_rows(storage_connection_string, table_prefix):
    counter = CountingTransport()
    store = make_store(storage_connection_string, table_prefix, transport=counter)
    idle = 600
    table = store._table("duepolls")
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
    due = store.list_due_conversations(now=T0)
    assert [d.key for d in due] == list(reversed(due_keys))  # earliest first
    assert len(counter.requests) == 1  # one page, whatever the number of idle rows
    assert len(counter.requests) / idle <= 0.02

    assert {d.key for d in store.list_due_conversations(now=T0 + timedelta(seconds=1))} == {
        *due_keys, ConversationKey("twilio", "later")}


def test_rescheduling_moves_the_index_and_ending_removes_it(store):
    key = ConversationKey("twilio", "+1555")
    create(store, key, next_poll_at=T0)
    store.update_conversation(key, lambda r: replace(r, next_poll_at=T0 + timedelta(seconds=60)))
    assert store.list_due_conversations(now=T0 + timedelta(seconds=59)) == []
    assert [d.key for d in store.list_due_conversations(now=T0 + timedelta(seconds=60))] == [key]
    store.update_conversation(key, lambda r: replace(r, state=ENDED))
    assert store.list_due_conversations(now=T0 + timedelta(days=1)) == []


def test_claim_due_takes_the_lease_and_cleans_stale_index_rows(store, other_store):
    key = ConversationKey("twilio", "+1555")
    create(store, key, next_poll_at=T0)
    [due] = store.list_due_conversations(now=T0)
    record = store.claim_due(due, owner="poller-a", lease_seconds=30, now=T0)
    assert record.lease_owner == "poller-a"
    assert other_store.claim_due(due, owner="poller-b", lease_seconds=30, now=T0) is None

    # an index row left behind by a crash between writes points at a record that moved on
    store._table("duepolls").create_entity({"PartitionKey": "due", "RowKey": f"{0:015d}|orphan|x",
                                            "channel": "twilio", "user": "gone"})
    orphan = next(d for d in store.list_due_conversations(now=T0) if d.key.user == "gone")
    assert store.claim_due(orphan, owner="poller-a", lease_seconds=30, now=T0) is None
    assert [d.key for d in store.list_due_conversations(now=T0)] == [key]


# ------------------------------------------------------------------------------------------ sweep


def test_sweep_removes_ended_idle_and_old_entries_only(store):
    ended, idle, busy = (ConversationKey("twilio", u) for u in ("ended", "idle", "busy"))
    create(store, ended, next_poll_at=T0)
    store.update_conversation(ended, lambda r: replace(r, state=ENDED))
    create(store, idle, now=T0 - timedelta(days=4), next_poll_at=T0 + timedelta(hours=1))
    create(store, busy, now=T0 - timedelta(days=4), last_user_activity_at=T0 - timedelta(hours=1))
    old = store.record_inbound(busy, "old", {"text": "a"}, now=T0 - timedelta(days=8)).message
    store.complete_inbound(old, activity_id="c|1")
    store.record_inbound(busy, "old-but-pending", {"text": "b"}, now=T0 - timedelta(days=8))
    new = store.record_inbound(busy, "new", {"text": "c"}, now=T0 - timedelta(days=1)).message
    store.complete_inbound(new, activity_id="c|2")
    store.create_webchat_session("conv-old", user_id="dl_1", resume_key="k1", expires_at=T0 - timedelta(seconds=1))
    store.create_webchat_session("conv-new", user_id="dl_2", resume_key="k2", expires_at=T0 + timedelta(hours=1))
    store.hit_rate_limit("10.0.0.1", limit=5, now=T0 - timedelta(minutes=2))
    store.add_dead_letter(busy, kind="reply", reason="old", payload={}, now=T0 - timedelta(days=31))

    result = store.sweep(now=T0)
    assert (result.conversations, result.dedupe_entries, result.webchat_sessions, result.rate_limits,
            result.dead_letters) == (2, 1, 1, 1, 1)
    assert store.get_conversation(ended) is None and store.get_conversation(idle) is None
    assert store.get_conversation(busy) is not None
    assert store.list_due_conversations(now=T0 + timedelta(days=1)) == []  # the idle one's index row went too
    assert [m.message_id for m in store.list_outbox(busy)] == ["old-but-pending"]
    assert store.record_inbound(busy, "old", {"text": "a"}, now=T0).is_new  # forgotten after the dedupe window
    assert store.record_inbound(busy, "new", {"text": "c"}, now=T0).state == POSTED
    assert store.get_webchat_session("conv-old") is None and store.get_webchat_session("conv-new") is not None


# ------------------------------------------------------------------------------------------ Web Chat


def test_webchat_resume_rotates_and_detects_a_reused_key(store):
    store.create_webchat_session("conv/1", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 now=T0)
    assert store.resume_webchat_session("conv/1", resume_key="nope", new_resume_key="x",
                                        expires_at=T0, now=T0).outcome == WRONG_KEY
    result = store.resume_webchat_session("conv/1", resume_key="key-1", new_resume_key="key-2",
                                          expires_at=T0 + timedelta(hours=2), now=T0)
    assert result.ok and result.session.expires_at == T0 + timedelta(hours=2)
    assert store.resume_webchat_session("conv/1", resume_key="key-2", new_resume_key="key-3",
                                        expires_at=T0 + timedelta(hours=2), now=T0).outcome == RESUMED
    # key-1 was rotated away: whoever shows it now copied it, so the session dies
    assert store.resume_webchat_session("conv/1", resume_key="key-1", new_resume_key="x",
                                        expires_at=T0, now=T0).outcome == REUSED_KEY
    assert store.get_webchat_session("conv/1").revoked
    assert store.resume_webchat_session("conv/1", resume_key="key-3", new_resume_key="x",
                                        expires_at=T0, now=T0).outcome == SESSION_REVOKED
    assert "key-" not in repr(store.get_webchat_session("conv/1"))


def test_webchat_unknown_expired_and_duplicate_sessions(store):
    assert store.resume_webchat_session("missing", resume_key="k", new_resume_key="x", expires_at=T0,
                                        now=T0).outcome == UNKNOWN_SESSION
    store.create_webchat_session("conv-1", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(minutes=1))
    assert store.resume_webchat_session("conv-1", resume_key="k", new_resume_key="x", expires_at=T0,
                                        now=T0 + timedelta(minutes=2)).outcome == SESSION_EXPIRED
    with pytest.raises(ConcurrencyConflict):
        store.create_webchat_session("conv-1", user_id="dl_other", resume_key="k2", expires_at=T0)
    store.revoke_webchat_session("conv-1")
    assert store.get_webchat_session("conv-1").revoked


def resume(store: RelayStore, key: str, new_key: str, at: datetime, conversation_id: str = "conv-g") -> str:
    """Present `key` at `at` (offering `new_key` as the next one); the outcome."""
    return store.resume_webchat_session(conversation_id, resume_key=key, new_resume_key=new_key,
                                        expires_at=at + timedelta(hours=1), now=at).outcome


@pytest.fixture
def session(store) -> str:
    """A session whose first key, key-1, was rotated to key-2 at T0 (the page may never have seen key-2)."""
    store.create_webchat_session("conv-g", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 now=T0)
    assert resume(store, "key-1", "key-2", T0) == RESUMED
    return "conv-g"


def test_webchat_a_lost_answer_is_retried_with_the_previous_key_within_the_grace_period(store, session):
    # The answer carrying key-2 never reached the page: it retries with the key it holds.
    result = store.resume_webchat_session(session, resume_key="key-1", new_resume_key="key-3",
                                          expires_at=T0 + timedelta(hours=3), now=T0 + timedelta(seconds=20))
    assert result.ok and result.outcome == RETRIED
    assert not result.session.revoked and result.session.expires_at == T0 + timedelta(hours=3)
    assert result.session.user_id == "dl_u"
    # The fresh key works (and rotates as usual); key-1 is poison from then on.
    assert resume(store, "key-3", "key-4", T0 + timedelta(seconds=30)) == RESUMED
    assert resume(store, "key-4", "key-5", T0 + timedelta(seconds=40)) == RESUMED
    assert resume(store, "key-1", "x", T0 + timedelta(seconds=45)) == REUSED_KEY
    assert store.get_webchat_session(session).revoked


def test_webchat_once_the_new_key_was_used_the_previous_one_revokes(store, session):
    assert resume(store, "key-2", "key-3", T0 + timedelta(seconds=5)) == RESUMED
    assert resume(store, "key-1", "x", T0 + timedelta(seconds=10)) == REUSED_KEY  # well within the window
    assert store.get_webchat_session(session).revoked
    assert resume(store, "key-3", "x", T0 + timedelta(seconds=11)) == SESSION_REVOKED


def test_webchat_unused_answers_of_the_grace_period_are_poison_once_one_is_used(store, session):
    assert resume(store, "key-1", "key-3", T0 + timedelta(seconds=1)) == RETRIED
    # Until one is used, every answer is good (racing resumes: the page keeps whichever arrived last).
    assert resume(store, "key-2", "key-4", T0 + timedelta(seconds=2)) == RESUMED
    assert resume(store, "key-3", "x", T0 + timedelta(seconds=3)) == REUSED_KEY
    assert store.get_webchat_session(session).revoked


def test_webchat_the_previous_key_revokes_after_the_grace_period(store, session):
    assert resume(store, "key-1", "x", T0 + RESUME_GRACE) == REUSED_KEY
    assert store.get_webchat_session(session).revoked


def test_webchat_retries_do_not_extend_the_grace_period(store, session):
    assert resume(store, "key-1", "key-3", T0 + RESUME_GRACE - timedelta(seconds=1)) == RETRIED
    assert resume(store, "key-1", "x", T0 + RESUME_GRACE + timedelta(seconds=1)) == REUSED_KEY
    assert store.get_webchat_session(session).revoked


def test_webchat_the_grace_period_answers_a_bounded_number_of_keys(store, session):
    moment = T0 + timedelta(seconds=1)
    retries = [resume(store, "key-1", f"retry-{n}", moment) for n in range(GRACE_KEYS_LIMIT - 1)]
    assert retries == [RETRIED] * (GRACE_KEYS_LIMIT - 1)
    assert resume(store, "key-1", "x", moment) == REUSED_KEY
    assert store.get_webchat_session(session).revoked


def test_webchat_only_the_latest_rotation_has_a_grace_period(store, session):
    assert resume(store, "key-2", "key-3", T0 + timedelta(seconds=1)) == RESUMED
    assert resume(store, "key-2", "key-4", T0 + timedelta(seconds=2)) == RETRIED  # key-3's answer was lost
    assert resume(store, "key-1", "x", T0 + timedelta(seconds=3)) == REUSED_KEY


class InterleavingTransport(RequestsTransport):
    """Runs `before_write` once, just before this store's next write of a Web Chat session: another
    instance's whole resume then lands between this one's read and its ETag-guarded write."""

    def __init__(self):
        super().__init__()
        self.before_write: Callable[[], None] | None = None

    def send(self, request, **kwargs):
        if self.before_write and request.method in ("PUT", "PATCH", "MERGE") and "webchatsessions" in request.url:
            run, self.before_write = self.before_write, None
            run()
        return super().send(request, **kwargs)


def test_webchat_two_racing_resumes_with_one_key_both_succeed(storage_connection_string, table_prefix, other_store):
    transport = InterleavingTransport()
    store = make_store(storage_connection_string, table_prefix, transport=transport)
    store.create_webchat_session("conv-race", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 now=T0)
    other: list[str] = []
    transport.before_write = lambda: other.append(resume(other_store, "key-1", "key-b", T0, "conv-race"))
    mine = resume(store, "key-1", "key-a", T0, "conv-race")
    # The other instance rotated first; this one's write then failed its ETag check, read again, and
    # found its key had just been rotated: a retry within the grace period, not a stolen key.
    assert (other, mine) == ([RESUMED], RETRIED)
    assert not store.get_webchat_session("conv-race").revoked
    # The page kept the answer that arrived last, either one: it works.
    assert resume(store, "key-b", "key-c", T0 + timedelta(seconds=1), "conv-race") == RESUMED
    assert resume(store, "key-c", "key-d", T0 + timedelta(seconds=2), "conv-race") == RESUMED


def test_webchat_many_concurrent_resumes_with_one_key_never_revoke(storage_connection_string, table_prefix):
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(4)]
    stores[0].create_webchat_session("conv-many", user_id="dl_u", resume_key="key-1",
                                     expires_at=T0 + timedelta(hours=1), now=T0)
    start = threading.Barrier(len(stores))

    def go(n: int) -> str:
        start.wait()
        return resume(stores[n], "key-1", f"key-{n}-next", T0, "conv-many")

    with ThreadPoolExecutor(len(stores)) as pool:
        outcomes = list(pool.map(go, range(len(stores))))
    assert sorted(outcomes) == sorted([RESUMED] + [RETRIED] * (len(stores) - 1))
    assert not stores[0].get_webchat_session("conv-many").revoked
    assert resume(stores[0], "key-2-next", "key-last", T0 + timedelta(seconds=1), "conv-many") == RESUMED


def test_rate_limit_counts_across_instances_in_a_fixed_window(storage_connection_string, table_prefix):
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(4)]
    barrier = threading.Barrier(8)

    def hit(n: int):
        barrier.wait()
        return stores[n % 4].hit_rate_limit("203.0.113.7", limit=5, window_seconds=60, now=T0 + timedelta(seconds=10))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(hit, range(8)))
    assert sum(r.allowed for r in results) == 5
    refused = next(r for r in results if not r.allowed)
    assert refused.retry_after == pytest.approx(60)  # the window opened at the first hit
    assert stores[0].hit_rate_limit("198.51.100.1", limit=5, now=T0 + timedelta(seconds=10)).allowed
    assert not stores[0].hit_rate_limit("203.0.113.7", limit=5, now=T0 + timedelta(seconds=69)).allowed
    assert stores[0].hit_rate_limit("203.0.113.7", limit=5, now=T0 + timedelta(seconds=70)).allowed


# ------------------------------------------------------------------------------------------ settings


def test_every_table_carries_the_prefix(store, storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    create(store, key, next_poll_at=T0)
    store.record_inbound(key, "SM1", {})
    store.add_dead_letter(key, kind="reply", reason="r", payload={})
    store.create_webchat_session("c", user_id="u", resume_key="k", expires_at=T0)
    store.hit_rate_limit("a", limit=1)
    service = make_store(storage_connection_string, table_prefix)._service
    names = {t.name for t in service.list_tables()}
    ours = {n for n in names if n.startswith(table_prefix)}
    assert ours == {f"{table_prefix}{n}" for n in ("conversations", "duepolls", "inbound", "deadletters",
                                                    "webchatsessions", "ratelimits")}


def test_identity_based_settings_build_a_managed_identity_client():
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    storage = Settings.from_environ({
        "DIRECTLINE_SECRET": "x", "AzureWebJobsStorage__accountName": "relaystore",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-000000000001",
    }).storage
    service = table_service_client(storage)
    assert service.url.startswith("https://relaystore.table.core.windows.net")
    assert isinstance(service.credential, ManagedIdentityCredential)

    default = Settings.from_environ({
        "DIRECTLINE_SECRET": "x", "AzureWebJobsStorage__tableServiceUri": "https://s.table.core.usgovcloudapi.net",
    }).storage
    service = table_service_client(default)
    assert service.url.startswith("https://s.table.core.usgovcloudapi.net")
    assert isinstance(service.credential, DefaultAzureCredential)
    assert "relaystore" in repr(RelayStore.from_settings(storage))


def test_development_storage_shorthand():
    storage = Settings.from_environ({"DIRECTLINE_SECRET": "x", "AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    service = table_service_client(storage.storage)
    assert service.url.startswith("http://127.0.0.1:10002/devstoreaccount1")
    assert service.account_name == "devstoreaccount1"
