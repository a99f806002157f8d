"""The seed's design as benchmarks/seed.py runs it (Microsoft's custom channel sample): a thread per conversation
that sees the bot's replies, late ones included, and keeps GETting at its interval while nothing happens."""

from __future__ import annotations

from benchmarks.seed import SeedRelay
from devstack.procs import wait_until


def test_the_seed_sees_prompt_and_late_replies_and_polls_on_at_its_interval(directline_emulator):
    relay = SeedRelay(directline_emulator.base_url, interval=0.2, secret=directline_emulator.secret)
    user = "+15550001919"
    try:
        relay.post(user, "later")
        wait_until(lambda: relay.seen_at(user, "Late reply: later") is not None, timeout=10,
                   what="the late reply seen by the conversation's thread")
        assert relay.seen_at(user, "You said: later") is not None
        conversation = relay.conversations[user]

        def gets() -> int:
            return directline_emulator.counters()["conversations"][conversation]["activities/get"]

        quiet_since = gets()
        wait_until(lambda: gets() >= quiet_since + 5, timeout=10, what="five more polls with nothing new")
    finally:
        relay.close()
    assert [a["text"] for a, _ in relay.seen[user] if a.get("type") == "message"] == [
        "You said: later", "Late reply: later"]  # each once: the watermark moves on
