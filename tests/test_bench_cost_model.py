"""The benchmarks' cost model bills the timer as Flex Consumption does: each execution at least 1 s of an instance,
so a timer every second keeps one billed all month whatever the traffic, and every 5 s a fifth of that."""

from __future__ import annotations

import pytest

from benchmarks.report import INSTANCE_GB, MONTH_SECONDS, billed_seconds, cost_model


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
