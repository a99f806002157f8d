"""What one poll tick costs, counted as the benchmarks count it (benchmarks/): requests, not estimates.

A settled conversation with nothing new is peeked (one Direct Line GET) without reading its record
or taking its lease, and its due-index row is moved on in a shared batch. When the bot speaks, the
next peek sends it down the full path, which delivers the reply exactly once.
"""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from benchmarks.polling import bot_says, seed
from benchmarks.stack import SimulatedClock, relay_context
from devstack.channels import DEV_VALUES
from relay.poller import poll_tick


@pytest.fixture
def relay(storage_connection_string, table_prefix, start_emulator, start_simulator):
    """(emulator, simulator, clock, a context on `schedule`, its table transport) for a RELAY_POLL_SCHEDULE."""
    def make(schedule: str = "*/5 * * * * *"):
        emulator = start_emulator()
        simulator = start_simulator(relay_url="http://127.0.0.1:9")
        clock = SimulatedClock()
        ctx, transport = relay_context({
            **DEV_VALUES, **simulator.api_bases(), "AzureWebJobsStorage": storage_connection_string,
            "RELAY_TABLE_PREFIX": table_prefix, "DIRECTLINE_SECRET": emulator.secret,
            "DIRECTLINE_ENDPOINT": emulator.base_url, "RELAY_PUBLIC_BASE_URL": "http://127.0.0.1:9",
            "RELAY_POLL_SCHEDULE": schedule,
        }, clock=clock)
        return emulator, simulator, clock, ctx, transport
    return make


def test_idle_conversations_cost_one_peek_each_and_one_batch_and_news_is_delivered_once(relay):
    emulator, simulator, clock, ctx, transport = relay()
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


def test_while_a_reply_is_likely_a_5_s_timer_peeks_at_every_tick_without_writing_the_rows(relay):
    emulator, _, clock, ctx, transport = relay("*/5 * * * * *")
    seed(ctx, 3, last_activity_ago=30)
    assert poll_tick(ctx).worked == 3
    for _ in range(3):  # the schedule says every 5 s: every tick, and the rows stay due as they are
        clock.advance(5)
        transport.reset()
        emulator.reset_counters()
        tick = poll_tick(ctx)
        assert (tick.due, tick.quiet) == (3, 3)
        assert dict(transport.snapshot()) == {"query": 2}
        assert emulator.counters()["requests"] == {"activities/get": 3}

    clock.advance(120)  # the reply is no longer likely: each step of the back-off (5, 10 s...) is one batch
    for _ in range(2):
        transport.reset()
        assert poll_tick(ctx).quiet == 3
        assert dict(transport.snapshot()) == {"query": 2, "batch": 1}
        clock.advance(5)
    assert poll_tick(ctx).due == 0


def test_a_faster_timer_keeps_a_likely_reply_to_one_peek_every_5_s(relay):
    emulator, _, clock, ctx, transport = relay("* * * * * *")
    seed(ctx, 3, last_activity_ago=30)
    assert poll_tick(ctx).worked == 3
    clock.advance(5)
    transport.reset()
    assert poll_tick(ctx).quiet == 3
    assert dict(transport.snapshot()) == {"query": 2, "batch": 1}
    emulator.reset_counters()
    for _ in range(4):
        clock.advance(1)
        assert poll_tick(ctx).due == 0
    clock.advance(1)
    assert poll_tick(ctx).quiet == 3
    assert emulator.counters()["requests"] == {"activities/get": 3}


@pytest.mark.parametrize("shares", [
    pytest.param((), id="tokens refreshed at a random share of their life"),
    pytest.param((0.5, 0.55, 0.55), id="a refresh due just after the hourly full poll"),
])
def test_a_token_refresh_rides_on_an_idle_conversations_peek_and_keeps_its_back_off(relay, shares):
    emulator, _, clock, ctx, _ = relay()
    draws = list(shares)
    if draws:  # the share of its life after which each new token wants refreshing, in turn
        clock.uniform = lambda low, high: draws.pop(0) if draws else (low + high) / 2
    seed(ctx, 1, last_activity_ago=3600)
    poll_tick(ctx)  # worked once after the user wrote, then idle: peeked less and less often
    peeks = []
    for second in range(0, 2 * 3600, 5):
        clock.advance(5)
        emulator.reset_counters()
        tick = poll_tick(ctx)
        if tick.due:
            peeks.append((second, emulator.counters()["requests"]))
    refreshes = [second for second, requests in peeks if "tokens/refresh" in requests]
    assert len(refreshes) >= 6  # the 30-minute token, refreshed at about half its life for two hours
    ceiling = ctx.settings.relay.poll_ceiling_seconds
    settled = [(second, requests) for second, requests in peeks if second >= refreshes[0] - ceiling]
    # Once at the ceiling (60 s) the peeks keep to it, refreshes and the hourly full poll under the lease and all: a
    # refresh is made at the last look before the token wants it, never at a look of its own, and it is no news,
    # so no 5, 10, 20, 40 s again after it.
    assert all(later[0] - earlier[0] == ceiling for earlier, later in itertools.pairwise(settled)), peeks
    assert all(requests == {"activities/get": 1, "tokens/refresh": 1} for second, requests in settled
               if second in refreshes), peeks


def test_idle_conversations_token_refreshes_cost_only_the_batch_their_rows_are_moved_in(relay):
    emulator, _, clock, ctx, transport = relay()
    seed(ctx, 3, last_activity_ago=3600)
    poll_tick(ctx)
    keys = [row.key for row in ctx.store.due_polls.list_due(now=clock.now() + timedelta(hours=2))]
    records = [ctx.store.conversations.get_record(key) for key in keys]
    refresh_at = max(record.token_refresh_at for record in records)
    clock.advance((refresh_at - clock.now()).total_seconds() + 1)
    transport.reset()
    emulator.reset_counters()

    tick = poll_tick(ctx)

    assert (tick.due, tick.quiet, tick.worked) == (3, 3, 0)
    assert emulator.counters()["requests"] == {"activities/get": 3, "tokens/refresh": 3}
    # The two queries of every tick, and one batch that moves every row's next peek on and gives it its new token:
    # no record read or written, no row written anew, no lease, no outbox.
    assert dict(transport.snapshot()) == {"query": 2, "batch": 1}
    rows = {row.key: row for row in ctx.store.due_polls.list_due(now=clock.now() + timedelta(hours=2))}
    for record in records:
        row = rows[record.key]
        assert row.index_key == record.due_index_key and row.token not in ("", record.token)
        assert row.token_expires_at > row.token_refresh_at > clock.now()

    # The next lease (the user's next message, the hourly full poll) brings the row's token into the record, in the
    # write that takes the lease: one read of the row more, and the row kept.
    transport.reset()
    leased = ctx.store.conversations.acquire_lease(records[0].key, owner="webhook", lease_seconds=60,
                                                   token_lookahead=ctx.token_lookahead)
    assert (leased.token, leased.due_index_key) == (rows[records[0].key].token, records[0].due_index_key)
    assert dict(transport.snapshot()) == {"read": 2, "write": 1}
    assert ctx.directline.get_activities(leased.conversation_id, token=leased.token) is not None



