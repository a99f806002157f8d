"""What one poll tick costs, counted as the benchmarks count it (benchmarks/): requests, not estimates.

A settled conversation with nothing new is peeked (one Direct Line GET) without reading its record
or taking its lease, and its due-index row is moved on in a shared batch. When the bot speaks, the
next peek sends it down the full path, which delivers the reply exactly once.
"""

from __future__ import annotations

from benchmarks.polling import bot_says, seed
from benchmarks.stack import SimulatedClock, relay_context
from devstack.channels import DEV_VALUES
from relay.poller import poll_tick


def test_idle_conversations_cost_one_peek_each_and_one_batch_and_news_is_delivered_once(
        storage_connection_string, table_prefix, start_emulator, start_simulator):
    emulator = start_emulator()
    simulator = start_simulator(relay_url="http://127.0.0.1:9")
    clock = SimulatedClock()
    ctx, transport = relay_context({
        **DEV_VALUES, **simulator.api_bases(), "AzureWebJobsStorage": storage_connection_string,
        "RELAY_TABLE_PREFIX": table_prefix, "DIRECTLINE_SECRET": emulator.secret,
        "DIRECTLINE_ENDPOINT": emulator.base_url, "RELAY_PUBLIC_BASE_URL": "http://127.0.0.1:9",
    }, clock=clock)
    records = seed(ctx, 3, last_activity_ago=600)
    first = poll_tick(ctx)  # the tick after the users wrote: each one worked under its lease, then settled
    assert (first.worked, first.quiet, first.delivered) == (3, 0, 0)

    clock.advance(60)
    transport.reset()
    emulator.reset_counters()
    idle = poll_tick(ctx)
    assert (idle.due, idle.worked, idle.quiet) == (3, 0, 3)
    # The due index and the Web Chat sessions' refresh index, one query each; no record read, no lease, one batch.
    assert dict(transport.snapshot()) == {"query": 2, "batch": 1}
    assert emulator.counters()["requests"] == {"activities/get": 3}

    clock.advance(5)  # the rows were moved on: nothing is due yet
    assert poll_tick(ctx).due == 0

    bot_says(emulator.url, records[0].conversation_id, "Are you still there?")
    clock.advance(120)
    news = poll_tick(ctx)
    assert (news.worked, news.quiet, news.delivered) == (1, 2, 1)
    clock.advance(120)
    assert poll_tick(ctx).delivered == 0
    texts = [r["text"] for r in simulator.replies("twilio", records[0].key.user) if r["direction"] == "bot"]
    assert texts == ["Are you still there?"]
