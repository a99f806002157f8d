"""The sweep against Azurite: what is old goes, what is pending or recent stays."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from relay.store.conversations import ConversationKey, ConversationState
from relay.store.dead_letters import DeadLetterKind
from relay.store.outbox import InboundState
from relay.store.sweep import sweep_tables
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
