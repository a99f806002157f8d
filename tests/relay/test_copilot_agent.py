"""A Copilot Studio agent behind the relay, end to end: the emulator's Copilot-like bot in token endpoint
mode (no secret configured anywhere), on each channel whose replies name the user: the greeting comes
before the answer, a card question is answered with the channel's own means and reaches the agent as
the `value` it checks, "agent" hands the user over to the event receiver, and nothing the agent says is
lost on the way."""

from __future__ import annotations

import pytest
import standardwebhooks

from devstack.channels import webhooks
from devstack.directline import copilot as agent
from devstack.procs import wait_until
from relay.store.conversations import ConversationKey
from tests.relay.conftest import EVENT_SECRET, EventReceiver, InProcessRelay

USERS = {"twilio": "+15550017201", "whatsapp": "15550017202", "bird": "+15550017203", "generic": "copilot-user-4"}
USERS["vonage"] = "whatsapp:15550017205"  # Vonage's WhatsApp channel: its own reply buttons
USERS["line"] = webhooks.line_user("copilot-user-5")
USERS["telegram"] = "5550017205"
BUTTONS = ("whatsapp", "vonage", "line", "telegram")
"""Channels whose card choices are buttons the user taps (WhatsApp reply buttons, also through Vonage; LINE quick
replies; Telegram's inline keyboard)."""
GREETING = agent.GREETINGS["en"]


def agent_activities(relay: InProcessRelay, key: ConversationKey) -> list[dict]:
    """The messages and events the agent sent in the user's conversation (the emulator's own set)."""
    activities = relay.emulator.conversation(relay.record(key).conversation_id)["activities"]
    return [a for a in activities
            if (a.get("from") or {}).get("role") == "bot" and a.get("type") in ("message", "event")]


def until_delivered(relay: InProcessRelay, key: ConversationKey, text: str) -> list[str]:
    """Work the conversation as the timer does until the provider got `text`, the agent answering in real
    time meanwhile; the provider's texts so far."""
    def delivered() -> bool:
        relay.time.advance(1)
        relay.work(key)
        return any(text in reply for reply in relay.replies(key))

    wait_until(delivered, timeout=20, interval=0.1, what=f"{text!r} delivered on {key.channel}")
    return relay.replies(key)


@pytest.mark.parametrize("provider", sorted(USERS))
def test_an_agent_greets_asks_a_card_question_and_hands_over_on_every_channel_with_no_secret(
        inprocess_relay, event_receiver: EventReceiver, provider):
    relay = inprocess_relay(token_endpoint=True, env={"RELAY_START_EVENT": "startConversation",
                                                      **event_receiver.env})
    assert relay.ctx.settings.directline.secret == ""
    user = USERS[provider]

    # The greeting, then the answer to the first message, in the agent's order.
    key = relay.message(provider, user, "hello")
    replies = until_delivered(relay, key, agent.FOLLOW_UP)
    assert GREETING in replies[0] and agent.FOLLOW_UP in replies[-1]

    # The card question (no fallbackText): a choice, then a note in the next message.
    relay.message(provider, user, "card")
    until_delivered(relay, key, agent.CARD_QUESTION)
    question = [r for r in relay.simulator.replies(provider, user) if agent.CARD_QUESTION in r["text"]][-1]
    if provider in BUTTONS:
        assert [c["title"] for c in question["choices"]] == list(agent.CARD_SIZES.values())  # reply buttons
        relay.message(provider, user, "", reply_id=question["choices"][1]["id"])
    else:
        assert "2. Medium" in question["text"]  # numbered text
        relay.message(provider, user, "2")
    relay.time.advance(1)
    relay.work(key)  # the choice is taken; the relay asks for the note
    relay.message(provider, user, "no onions")
    replies = until_delivered(relay, key, "You ordered")
    assert any("You ordered size M (Medium) with the note: no onions" in r for r in replies)
    assert not any(agent.CARD_WRONG_PREFIX in r for r in replies)

    # A handoff: the event reaches the desk once, signed, with the user and the transcript.
    relay.message(provider, user, "agent")
    until_delivered(relay, key, agent.HANDOFF_TEXT)
    wait_until(lambda: event_receiver.received, timeout=10, what="the handoff event at the receiver")
    relay.time.advance(1)
    relay.work(key)
    [(headers, body)] = event_receiver.received
    event = standardwebhooks.Webhook(EVENT_SECRET).verify(body, headers)
    assert event["data"]["event"]["name"] == "handoff.initiate"
    assert event["data"]["channel"] == provider and event["data"]["user"]["id"] == user
    assert any(m["text"] == "agent" for m in event["data"]["transcript"])

    # Nothing the agent sent was dropped: each of its messages and events was delivered (to the phone or the
    # desk), none became a dead letter, and the phone got as many messages as the agent sent it.
    record = relay.record(key)
    sent = agent_activities(relay, key)
    assert [a["id"] for a in sent if not record.is_delivered(a["id"])] == []
    assert relay.store.dead_letters.list_letters(limit=10) == []
    assert len(relay.replies(key)) >= len([a for a in sent if a["type"] == "message"])
