"""Fan-out (relay/fanout.py): above RELAY_FANOUT_THRESHOLD a tick hands its due conversations to the poll queue,
and poll_batch workers work them, each bot reply delivered exactly once however many workers take the batches
and however often the queue delivers one.

In this process on Azurite (tables and queues), the Direct Line emulator and the provider simulator; the
batches are taken from the real queue as the host takes them (tests/test_host.py runs the host's trigger).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from azure.storage.queue import QueueClient

from benchmarks.polling import bot_says, seed
from benchmarks.stack import SimulatedClock, relay_context
from devstack.channels import DEV_VALUES
from devstack.procs import azurite_connection_string, wait_until
from relay.clock import SYSTEM_CLOCK, ManualClock
from relay.errors import StoreError
from relay.fanout import BATCH_ROWS, CHASE_SUFFIX, Chase, PollQueue, batches_of, parse_message
from relay.inbound import leave_chases
from relay.poller import poll_tick, work_poll_message
from relay.store.conversations import partition_of
from relay.store.tables import queue_client
from tests.relay.conftest import queue_exists_with_messages

DEAD_STORAGE = azurite_connection_string(9, 9, 9)  # nothing listens on port 9


@pytest.fixture
def fanout_stack(storage_connection_string, table_prefix, start_emulator, start_simulator):
    """make(threshold, **settings) -> (ctx, emulator, simulator, queue): a relay in this process whose poll queue
    is this test's own."""
    emulator = start_emulator()
    simulator = start_simulator(relay_url="http://127.0.0.1:9")

    def make(threshold: int, connection_string: str = storage_connection_string, clock=None, **values: str):
        queue_name = f"poll-{table_prefix}"
        ctx, _ = relay_context({
            **DEV_VALUES, **simulator.api_bases(), "AzureWebJobsStorage": connection_string,
            "RELAY_TABLE_PREFIX": table_prefix, "DIRECTLINE_SECRET": emulator.secret,
            "DIRECTLINE_ENDPOINT": emulator.base_url, "RELAY_PUBLIC_BASE_URL": "http://127.0.0.1:9",
            "RELAY_FANOUT_THRESHOLD": str(threshold), "RELAY_POLL_QUEUE": queue_name, **values,
        }, clock=clock or SimulatedClock())
        queue = QueueClient.from_connection_string(storage_connection_string, queue_name)
        return ctx, emulator, simulator, queue

    return make


def take_batches(queue: QueueClient) -> list[bytes]:
    """Every message in the queue, as the host's trigger decodes it (base64), deleted."""
    bodies = []
    for message in queue.receive_messages(messages_per_page=32, visibility_timeout=60):
        bodies.append(base64.b64decode(message.content))
        queue.delete_message(message)
    return bodies


def bot_replies(simulator, records) -> Counter[str]:
    return Counter(r["text"] for record in records for r in simulator.replies("twilio", record.key.user)
                   if r["direction"] == "bot")


def test_above_the_threshold_a_tick_hands_out_batches_and_workers_deliver_each_reply_once(fanout_stack):
    ctx, emulator, simulator, queue = fanout_stack(threshold=100)
    records = seed(ctx, 250, last_activity_ago=30)
    news = records[::10]
    for record in news:
        bot_says(emulator.url, record.conversation_id, f"news for {record.key.user}")

    tick = poll_tick(ctx)

    assert (tick.worked, tick.batches) == (0, 3)  # 250 due rows, 100 a batch; none worked by the timer itself
    assert bot_replies(simulator, records) == Counter()
    assert poll_tick(ctx).batches == 0  # the round is still in the queue: nothing handed out twice
    bodies = take_batches(queue)
    assert len(bodies) == 3
    # Two workers take every batch (the queue delivers at least once; a batch may be worked twice at once).
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda body: work_poll_message(ctx, body), bodies + bodies))
    assert all(result is not None for result in results)
    assert sum(result.delivered for result in results) == len(news)
    assert bot_replies(simulator, records) == Counter({f"news for {r.key.user}": 1 for r in news})

    ctx.clock.advance(2)
    after = poll_tick(ctx)  # everything was worked and scheduled: what is due again fits in one execution
    assert after.batches == 0 and after.due <= 100


def test_at_or_below_the_threshold_the_tick_works_everything_itself(fanout_stack):
    ctx, emulator, simulator, queue = fanout_stack(threshold=20)
    records = seed(ctx, 20, last_activity_ago=30)
    bot_says(emulator.url, records[0].conversation_id, "hello again")

    tick = poll_tick(ctx)

    assert (tick.due, tick.worked, tick.batches, tick.delivered) == (20, 20, 0, 1)
    assert bot_replies(simulator, records) == Counter({"hello again": 1})
    assert take_batches_if_any(queue) == []


def take_batches_if_any(queue: QueueClient) -> list[bytes]:
    try:
        return take_batches(queue)
    except Exception as error:  # the queue was never created: nothing was handed out
        assert "QueueNotFound" in str(error)
        return []


def test_without_a_threshold_nothing_is_ever_fanned_out(fanout_stack):
    ctx, _, _, queue = fanout_stack(threshold=0)
    seed(ctx, 30, last_activity_ago=30)
    assert poll_tick(ctx, limit=1000).worked == 30
    assert take_batches_if_any(queue) == []


def test_when_the_queue_cannot_be_reached_the_tick_works_its_conversations_itself(fanout_stack,
                                                                                   storage_connection_string):
    no_queues = re.sub(r"QueueEndpoint=[^;]*;", "QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;",
                       storage_connection_string)
    ctx, emulator, simulator, _ = fanout_stack(threshold=5, connection_string=no_queues)
    records = seed(ctx, 12, last_activity_ago=30)
    bot_says(emulator.url, records[3].conversation_id, "still here")

    tick = poll_tick(ctx)

    assert (tick.batches, tick.delivered) == (0, 1)
    assert tick.worked >= 6  # what it had read: at least the threshold and one
    assert bot_replies(simulator, records) == Counter({"still here": 1})


def test_a_batch_that_cannot_read_the_due_index_raises_so_the_host_retries_it(fanout_stack):
    ctx, *_ = fanout_stack(threshold=5, connection_string=DEAD_STORAGE)
    body = b'{"from":"000000000000000|a","through":"999999999999999|z"}'
    with pytest.raises(StoreError, match="ServiceRequestError"):
        work_poll_message(ctx, body)


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'"text"', b'{"from": 1, "through": 2}',
                                  b'{"from": "b", "through": "a"}', b'{"from": "", "through": "a"}',
                                  b'{"from": "a"}', b"\xff\xfe",
                                  ('{"from": "a", "through": "' + "z" * 2000 + '"}').encode()])
def test_a_message_the_relay_did_not_write_is_dropped_without_a_retry(fanout_stack, body):
    ctx, *_ = fanout_stack(threshold=5)
    assert parse_message(body) is None
    assert work_poll_message(ctx, body) is None


def test_batches_are_consecutive_ranges_of_at_most_a_hundred_rows():
    keys = [f"{n:05d}" for n in range(250)]
    assert batches_of(keys) == [("00000", "00099"), ("00100", "00199"), ("00200", "00249")]
    assert batches_of([]) == []
    assert BATCH_ROWS == 100


# ------------------------------------------------------------------------------------------- chases


def user_wrote(ctx, record, text: str):
    """The user's `text` posted to the bot and its immediate echo read (what the webhook's burst does), so that
    only a later reply is left to find: the record as the webhook leaves it."""
    ctx.directline.post_activity(record.conversation_id, {"type": "message", "from": {"id": record.user_id},
                                                          "text": text}, token=record.token)
    page = ctx.directline.get_activities(record.conversation_id, watermark=record.watermark, token=record.token)
    now = ctx.clock.now()
    return ctx.store.conversations.update_record(
        record.key, lambda r: replace(r, watermark=page.watermark, last_user_activity_at=now))


def chase_of(ctx, record, *, seconds: float) -> bytes:
    """A chase's first look as the webhook leaves it, but due now (the queue would have held it a second)."""
    now = ctx.clock.now()
    return Chase(partition_of(ctx.store.tables, record.key), now + timedelta(seconds=seconds), now, look_at=now
                 ).message().encode()


def chase_queue(ctx) -> QueueClient:
    return QueueClient.from_connection_string(ctx.settings.storage.connection_string,
                                              ctx.settings.relay.poll_queue + CHASE_SUFFIX)


def run_chase(ctx, body: bytes) -> int:
    """Work a chase as the host does, one look per message: this look, then each next look the chase leaves on its
    queue, once the queue shows it, until a look leaves none. The replies it delivered."""
    queue, delivered = chase_queue(ctx), 0
    while True:
        delivered += work_poll_message(ctx, body)
        if not queue_exists_with_messages(queue):
            return delivered
        body = next_message(queue)


def next_message(queue: QueueClient) -> bytes:
    """The queue's one message, once it is visible, deleted."""
    taken: list[bytes] = []
    wait_until(lambda: taken.extend(take_batches(queue)) or taken, timeout=5, what=f"a message on {queue.queue_name}")
    [body] = taken
    return body


def test_a_chase_delivers_the_bots_late_reply_once(fanout_stack):
    ctx, emulator, simulator, _ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    [record] = seed(ctx, 1, last_activity_ago=0)
    record = user_wrote(ctx, record, "later")  # the emulator's echo answers "Late reply: later" 3 s after
    emulator.reset_counters()

    assert run_chase(ctx, chase_of(ctx, record, seconds=10)) == 1

    assert bot_replies(simulator, [record]) == Counter({"Late reply: later": 1})
    # About one look a second, until the reply came and the bot had been quiet for a while: at most the chase's.
    assert 3 <= emulator.counters()["requests"].get("activities/get", 0) <= 10
    assert ctx.store.conversations.get_record(record.key).lease_owner is None


def test_a_chase_for_a_bot_that_never_answers_stops_when_its_time_is_up(fanout_stack):
    ctx, emulator, simulator, _ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    [record] = seed(ctx, 1, last_activity_ago=0)
    record = user_wrote(ctx, record, "hello")
    emulator.reset_counters()

    assert run_chase(ctx, chase_of(ctx, record, seconds=4)) == 0

    assert 2 <= emulator.counters()["requests"].get("activities/get", 0) <= 4  # one a second, for 4 s
    assert bot_replies(simulator, [record]) == Counter()


def test_a_chase_ends_at_once_when_the_user_wrote_again(fanout_stack, caplog):
    ctx, emulator, _, _ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    [record] = seed(ctx, 1, last_activity_ago=0)
    stale = chase_of(ctx, record, seconds=10)
    user_wrote(ctx, record, "hello again")  # that message's webhook chases on
    emulator.reset_counters()

    with caplog.at_level(logging.INFO, logger="relay.poller"):
        assert run_chase(ctx, stale) == 0
    assert emulator.counters()["requests"] == {}
    assert "chase: the user wrote again after 0 looks" in caplog.text


def test_a_chase_leaves_news_to_whoever_holds_the_conversation(fanout_stack):
    ctx, emulator, simulator, _ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    [record] = seed(ctx, 1, last_activity_ago=0)
    record = user_wrote(ctx, record, "hello")
    assert ctx.store.conversations.acquire_lease(record.key, owner="the-timer", lease_seconds=60) is not None
    bot_says(emulator.url, record.conversation_id, "an answer")

    assert run_chase(ctx, chase_of(ctx, record, seconds=3)) == 0
    assert bot_replies(simulator, [record]) == Counter()  # the holder delivers it; the chase never does
    assert ctx.store.conversations.get_record(record.key).lease_owner == "the-timer"


def test_a_chase_delivers_a_reply_the_holder_read_too_early_for(fanout_stack):
    """The timer works the conversation (its GET came back empty) as the bot's reply arrives: once the timer
    gives the conversation back, the chase delivers the reply instead of leaving it to the next tick."""
    ctx, emulator, simulator, _ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    [record] = seed(ctx, 1, last_activity_ago=0)
    record = user_wrote(ctx, record, "hello")
    held = ctx.store.conversations.acquire_lease(record.key, owner="the-timer", lease_seconds=60)
    assert held is not None
    bot_says(emulator.url, record.conversation_id, "an answer")
    emulator.reset_counters()
    chase = threading.Thread(target=run_chase, args=(ctx, chase_of(ctx, record, seconds=8)))
    chase.start()
    # It found the reply, could not take the conversation, and looked again.
    wait_until(lambda: emulator.counters()["requests"].get("activities/get", 0) >= 2, timeout=6,
               what="the chase looking again while the timer holds the conversation")
    ctx.store.conversations.release_lease(held, owner="the-timer")  # the timer read before the reply came
    chase.join(timeout=15)

    assert bot_replies(simulator, [record]) == Counter({"an answer": 1})


def test_a_look_leaves_the_next_for_a_second_later_instead_of_waiting_for_it(fanout_stack):
    """No execution sleeps between looks: a burst of chases never waits for slots others hold asleep."""
    ctx, emulator, _, _ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    [record] = seed(ctx, 1, last_activity_ago=0)
    record = user_wrote(ctx, record, "hello")
    emulator.reset_counters()
    first = chase_of(ctx, record, seconds=10)

    assert work_poll_message(ctx, first) == 0

    assert emulator.counters()["requests"].get("activities/get", 0) == 1
    queue = chase_queue(ctx)
    assert queue_exists_with_messages(queue)
    assert take_batches(queue) == []  # not visible yet: due a second after this look
    after = parse_message(next_message(queue))
    assert isinstance(after, Chase)
    assert (after.partition_key, after.until, after.polled_at, after.looks) == (
        parse_message(first).partition_key, parse_message(first).until, parse_message(first).polled_at, 1)


def test_a_chase_whose_next_look_cannot_be_queued_ends_and_leaves_the_conversation_to_the_timer(
        fanout_stack, caplog):
    ctx, *_ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    [record] = seed(ctx, 1, last_activity_ago=0)
    record = user_wrote(ctx, record, "hello")
    ctx.chase_queue = PollQueue(queue_client(replace(ctx.settings.storage, connection_string=DEAD_STORAGE), "chase"))

    with caplog.at_level(logging.INFO, logger="relay.poller"):
        assert work_poll_message(ctx, chase_of(ctx, record, seconds=10)) == 0  # no raise: no retry, no poison

    assert "its next look could not be queued" in caplog.text


def test_a_chase_a_relay_before_this_one_wrote_is_worked_as_its_first_look():
    """Chases in the queue while a deployment rolls out: a message without the look's fields."""
    chase = parse_message(b'{"chase":"' + b"ab" * 16 + b'","until":2000,"polled":1000}')
    assert isinstance(chase, Chase)
    assert (chase.due_at, chase.looks, chase.delivered) == (datetime.fromtimestamp(2, UTC), 0, 0)


@pytest.mark.parametrize("message", [
    {"chase": "not-hex", "until": 1, "polled": 1}, {"chase": "ab" * 16, "until": "1", "polled": 1},
    {"chase": "ab" * 16, "until": 1}, {"chase": "ab" * 16, "until": True, "polled": 1},
    {"chase": "ab" * 16, "until": 10**20, "polled": 1}, {"chase": 5, "until": 1, "polled": 1},
    {"chase": "ab" * 16, "until": 1, "polled": 1, "at": "1"}, {"chase": "ab" * 16, "until": 1, "polled": 1, "at": 0},
    {"chase": "ab" * 16, "until": 1, "polled": 1, "looks": -1},
    {"chase": "ab" * 16, "until": 1, "polled": 1, "waited": 1.5},
])
def test_a_chase_the_relay_did_not_write_is_dropped(fanout_stack, message):
    ctx, *_ = fanout_stack(threshold=0)
    body = json.dumps(message).encode()
    assert parse_message(body) is None
    assert work_poll_message(ctx, body) is None


@pytest.mark.parametrize(("starts_in", "lasts"), [(3600, 5), (0, 3600)], ids=["starting later", "lasting an hour"])
def test_a_chase_outside_the_times_a_webhook_writes_is_dropped_at_once(fanout_stack, starts_in, lasts):
    """Else it holds an execution asleep, or polling every second, until the host's timeout, and on every retry."""
    clock = ManualClock(SYSTEM_CLOCK.now().replace(microsecond=0))
    ctx, emulator, _, _ = fanout_stack(threshold=0, clock=clock)
    [record] = seed(ctx, 1, last_activity_ago=0)
    record = user_wrote(ctx, record, "hello")
    emulator.reset_counters()
    started = clock.now()
    polled = started + timedelta(seconds=starts_in)
    body = Chase(partition_of(ctx.store.tables, record.key), polled + timedelta(seconds=lasts), polled).message()

    assert work_poll_message(ctx, body.encode()) is None

    assert clock.now() - started < timedelta(seconds=1)  # nothing slept
    assert emulator.counters()["requests"] == {}


def test_a_chase_of_a_conversation_that_is_gone_does_nothing(fanout_stack):
    ctx, emulator, _, _ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    now = ctx.clock.now()
    body = Chase("ab" * 16, now + timedelta(seconds=5), now).message().encode()
    assert work_poll_message(ctx, body) == 0
    assert emulator.counters()["requests"].get("activities/get", 0) == 0


def test_chases_waiting_in_their_queue_do_not_hold_up_the_timers_batches(fanout_stack, storage_connection_string):
    """A busy deployment always has some user's chase waiting: the tick's "is the last round still there?"
    counts batches only, so its due conversations are still handed out (a finding of the attack on issue 19)."""
    ctx, emulator, simulator, queue = fanout_stack(threshold=5, clock=SYSTEM_CLOCK)
    records = seed(ctx, 12, last_activity_ago=30)
    bot_says(emulator.url, records[3].conversation_id, "still here")
    leave_chases(ctx, [records[0].key], until=ctx.clock.now() + timedelta(seconds=10))  # as a webhook does
    chases = QueueClient.from_connection_string(storage_connection_string, queue.queue_name + CHASE_SUFFIX)
    assert chases.get_queue_properties().approximate_message_count == 1

    tick = poll_tick(ctx)

    assert tick.batches == 1
    [body] = take_batches(queue)
    assert work_poll_message(ctx, body).delivered == 1
    assert bot_replies(simulator, records) == Counter({"still here": 1})


def test_a_chase_after_a_prompt_answer_ends_once_the_bot_was_quiet_for_a_while(fanout_stack):
    ctx, emulator, _, _ = fanout_stack(threshold=0, clock=SYSTEM_CLOCK)
    [record] = seed(ctx, 1, last_activity_ago=0)
    record = user_wrote(ctx, record, "hello")
    answered = ctx.clock.now()  # the burst delivered the echo
    ctx.store.conversations.update_record(record.key, lambda r: replace(r, last_bot_activity_at=answered))
    emulator.reset_counters()

    assert run_chase(ctx, chase_of(ctx, record, seconds=30)) == 0

    # One look a second until the bot had been quiet for CHASE_QUIET (5 s), not for the chase's 30 s.
    assert 3 <= emulator.counters()["requests"].get("activities/get", 0) <= 6
