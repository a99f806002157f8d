"""The chaos run's own bookkeeping, on a stand-in for its stack: when it stops waiting for replies, and which
doubled reply is the documented window of the SIGKILL."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.chaos.soak import ECHO, ChaosOptions, ChaosRun, missing_replies


@dataclass
class SettledStack:
    """What settle() looks at: the provider's replies, and storage with no outbox row and no lease left."""

    workdir: Path
    replies: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.simulator = SimpleNamespace(replies=lambda: list(self.replies))
        self.store = SimpleNamespace(outbox=SimpleNamespace(list_messages=lambda key, limit: []),
                                     conversations=SimpleNamespace(get_record=lambda key: None))


def chaos_run(tmp_path: Path) -> tuple[ChaosRun, SettledStack]:
    stack = SettledStack(tmp_path)
    run = ChaosRun(ChaosOptions(conversations=2, messages=3, settle_timeout=0.3), stack)  # type: ignore[arg-type]
    return run, stack


def test_a_reply_the_provider_got_twice_does_not_stand_in_for_one_still_on_its_way(tmp_path):
    """After the SIGKILL a survivor may send a reply again (the documented at-least-once window): the run
    must still wait for a reply that has not come, or the audit calls it lost a moment before it arrives."""
    run, stack = chaos_run(tmp_path)
    first, second = run.users
    stack.replies = [{"provider": first.provider, "user": first.address, "text": ECHO + first.texts[0]}] * 2 + [
        {"provider": second.provider, "user": second.address, "text": ECHO + text} for text in second.texts]
    assert len(stack.replies) == len(first.texts) + len(second.texts)  # as many replies as expected

    run.settle()

    assert [p for p in run.report.problems if "waiting for every reply" in p]  # it waited, to the deadline
    assert missing_replies(run.users, stack.replies) == [(first, ECHO + first.texts[1])]


def test_the_run_stops_waiting_once_every_reply_came_at_least_once(tmp_path):
    run, stack = chaos_run(tmp_path)
    stack.replies = [{"provider": user.provider, "user": user.address, "text": ECHO + text}
                     for user in run.users for text in [*user.texts, *user.texts[:1]]]

    run.settle()

    assert run.report.problems == []
    assert missing_replies(run.users, stack.replies) == []


@pytest.mark.parametrize(("first", "again", "window"), [
    pytest.param(-0.5, 30.0, True, id="taken just before the kill, sent again once the lease ran out"),
    pytest.param(0.06, 31.5, True, id="the killed host's request still in the provider's socket at the kill"),
    pytest.param(-5.0, 30.0, False, id="taken long before the kill: its id was saved, a resend is a bug"),
    pytest.param(-30.0, -0.5, False, id="both copies before the kill: no crash explains it"),
])
def test_only_a_reply_taken_around_the_kill_and_sent_again_after_it_is_the_documented_window(tmp_path, first,
                                                                                             again, window):
    run, _ = chaos_run(tmp_path)
    user = run.users[0]
    run.killed_at = 1_000.0
    text = ECHO + user.texts[0]
    replies = [{"text": text, "at": run.killed_at + first, "id": "1"}, {"text": text, "at": run.killed_at + again,
                                                                         "id": "2"}]

    assert run.crash_resent(user, replies) == (1 if window else 0)
    assert len(run.report.crash_resends) == (1 if window else 0)
