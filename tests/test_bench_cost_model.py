"""The benchmarks' cost model bills the timer as Flex Consumption does: each execution at least 1 s of an instance,
so a timer every second keeps one billed all month whatever the traffic, and every 5 s a fifth of that."""

from __future__ import annotations

import math

import pytest

from benchmarks.report import (
    DAYS_PER_MONTH,
    INSTANCE_GB,
    MESSAGES_PER_CONVERSATION,
    MONTH_SECONDS,
    QUEUE_CONCURRENCY,
    billed_seconds,
    busy_instances,
    capacity_model,
    cost_model,
)


def _results(tick_seconds: float) -> dict:
    idle = {"tick_seconds": tick_seconds, "ticks": int(3600 / tick_seconds), "hours": 1.0, "conversations": 200,
            "empty_tick_seconds": 0.004, "fixed_table_transactions_per_tick": 2,
            "table_transactions_total": 2 * int(3600 / tick_seconds) + 200 * 7,
            "directline_requests_per_conversation_hour": 85.0}
    return {"idle": idle, "ticks": [{"conversations": 1000, "relay": {"seconds": 2.0}}],
            "webhook_cost_burst": {"mean_seconds": 1.27, "table_transactions_per_webhook": 15.0,
                                   "directline_requests_per_webhook": 3.9}}


@pytest.mark.parametrize(("seconds", "billed"), [(0.004, 1.0), (1.0, 1.0), (1.01, 1.1), (1.27, 1.3), (2.4, 2.4)])
def test_an_execution_is_billed_at_least_a_second_then_by_tenths(seconds, billed):
    assert billed_seconds(seconds) == pytest.approx(billed)


def test_a_timer_every_second_is_billed_a_month_of_an_instance_and_every_5_s_a_fifth():
    every_second = cost_model(_results(1.0))[0]
    every_5_s = cost_model(_results(5.0))[0]
    assert every_second["timer_gb_seconds"] == pytest.approx(INSTANCE_GB * MONTH_SECONDS)
    assert every_5_s["timer_gb_seconds"] == pytest.approx(INSTANCE_GB * MONTH_SECONDS / 5)
    assert every_second["fixed_table_transactions"] == pytest.approx(2 * MONTH_SECONDS)
    assert every_second["usd"]["functions"] > 4 * every_5_s["usd"]["functions"]


CHASE = {"looks_per_chase": 6.0, "seconds_per_look": 0.05, "directline_requests_per_chase": 7.0,
         "queue_transactions_per_chase": 18.0, "table_transactions_per_chase": 6.0}


@pytest.mark.parametrize("running", [0.01, 0.5, 3.0, 40.0])
def test_chases_that_overlap_share_instances_up_to_the_queue_concurrency(running):
    busy = busy_instances(running, per_instance=QUEUE_CONCURRENCY)
    assert running / QUEUE_CONCURRENCY <= busy <= min(running, running / QUEUE_CONCURRENCY + 1)
    if running < 0.05:
        assert busy == pytest.approx(1 - math.exp(-running))  # one instance, busy while any chase runs


def test_a_chase_per_message_adds_its_looks_gets_and_transactions():
    without, with_chase = cost_model(_results(5.0))[1], cost_model(_results(5.0), chase=CHASE)[1]
    messages = 1_000 * DAYS_PER_MONTH * MESSAGES_PER_CONVERSATION
    assert with_chase["executions"] - without["executions"] == pytest.approx(6 * messages)  # one per look
    assert with_chase["directline_requests"] - without["directline_requests"] == pytest.approx(7 * messages)
    assert with_chase["queue_transactions"] == pytest.approx(18 * messages)
    assert with_chase["table_transactions"] - without["table_transactions"] == pytest.approx(6 * messages)
    chase_gb_seconds = with_chase["gb_seconds"] - without["gb_seconds"]
    # Billed as the instances the looks keep busy: never more than a billed second of its own for each look.
    assert 0 < chase_gb_seconds <= 6 * messages * INSTANCE_GB * 1.0


def test_the_capacity_model_takes_the_fewer_conversations_of_wall_time_and_cpu():
    run = {"hosts": 1, "batch_seconds_per_conversation": 0.01, "cpu_seconds_per_conversation": 0.004,
           "directline_requests_per_conversation": 1.0, "table_transactions_per_conversation": 0.05,
           "queue_transactions_per_conversation": 0.03}
    capacity = capacity_model({"runs": [run]})
    assert capacity["per_instance"] == pytest.approx(min(QUEUE_CONCURRENCY / 0.01, 1 / 0.004))
    small, large = capacity["rows"]
    assert large["due_per_second"] == pytest.approx(10 * small["due_per_second"])
    assert large["instances"] == math.ceil(large["due_per_second"] / capacity["per_instance"])
