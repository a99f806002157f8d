"""The chaos run in small (20 users, 150 messages) with every fault of the full `make soak`."""

from __future__ import annotations

import os

from tests.chaos.soak import ChaosOptions, run_chaos


def test_chaos_run_loses_and_doubles_nothing(tmp_path):
    options = ChaosOptions(conversations=int(os.environ.get("CHAOS_CONVERSATIONS", 20)),
                           messages=int(os.environ.get("CHAOS_MESSAGES", 150)), seed=7, workdir=tmp_path)
    report = run_chaos(options)
    print(report.summary())
    assert report.ok, report.summary()
    assert report.sent == options.messages
    assert report.at_bot == report.replies == options.messages
    # The faults really happened: otherwise this run proves nothing.
    assert report.duplicate_posts > 0
    assert {"429", "500", "502", "drop"} <= set(report.directline_faults)
    assert any("killed" in e for e in report.events) and any("Azurite started again" in e for e in report.events)
    # Tokens lived 60 s: the relay kept refreshing them, and carried on after every token of some lapsed.
    assert report.directline_calls.get("tokens/refresh", 0) > 0
    assert any("every token of" in e and "every token of 0 " not in e for e in report.events)
