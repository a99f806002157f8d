"""Fan-out (relay/fanout.py): above RELAY_FANOUT_THRESHOLD a tick hands its due conversations to the poll queue,
and poll_batch workers work them, each bot reply delivered exactly once however many workers take the batches
and however often the queue delivers one.

In this process on Azurite (tables and queues), the Direct Line emulator and the provider simulator; the
batches are taken from the real queue as the host takes them (tests/test_host.py runs the host's trigger).
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from azure.storage.queue import QueueClient

from benchmarks.polling import bot_says, seed
from benchmarks.stack import SimulatedClock, relay_context
from devstack.channels import DEV_VALUES
from devstack.procs import azurite_connection_string
from relay.errors import StoreError
from relay.fanout import BATCH_ROWS, batches_of, parse_batch
from relay.poller import poll_tick, work_batch

DEAD_STORAGE = azurite_connection_string(9, 9, 9)  # nothing listens on port 9


@pytest.fixture
def fanout_stack(storage_connection_string, table_prefix, start_emulator, start_simulator):
    """make(threshold, **settings) -> (ctx, emulator, simulator, queue): a relay in this process whose poll queue
    is this test's own."""
    emulator = start_emulator()
    simulator = start_simulator(relay_url="http://127.0.0.1:9")

    def make(threshold: int, connection_string: str = storage_connection_string, **values: str):
        queue_name = f"poll-{table_prefix}"
        ctx, _ = relay_context({
            **DEV_VALUES, **simulator.api_bases(), "AzureWebJobsStorage": connection_string,
            "RELAY_TABLE_PREFIX": table_prefix, "DIRECTLINE_SECRET": emulator.secret,
            "DIRECTLINE_ENDPOINT": emulator.base_url, "RELAY_PUBLIC_BASE_URL": "http://127.0.0.1:9",
            "RELAY_FANOUT_THRESHOLD": str(threshold), "RELAY_POLL_QUEUE": queue_name, **values,
        }, clock=SimulatedClock())
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
        results = list(pool.map(lambda body: work_batch(ctx, body), bodies + bodies))
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
        work_batch(ctx, body)


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'"text"', b'{"from": 1, "through": 2}',
                                  b'{"from": "b", "through": "a"}', b'{"from": "", "through": "a"}',
                                  b'{"from": "a"}', b"\xff\xfe",
                                  ('{"from": "a", "through": "' + "z" * 2000 + '"}').encode()])
def test_a_message_the_relay_did_not_write_is_dropped_without_a_retry(fanout_stack, body):
    ctx, *_ = fanout_stack(threshold=5)
    assert parse_batch(body) is None
    assert work_batch(ctx, body) is None


def test_batches_are_consecutive_ranges_of_at_most_a_hundred_rows():
    keys = [f"{n:05d}" for n in range(250)]
    assert batches_of(keys) == [("00000", "00099"), ("00100", "00199"), ("00200", "00249")]
    assert batches_of([]) == []
    assert BATCH_ROWS == 100
