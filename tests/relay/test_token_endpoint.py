"""Token endpoint mode: the relay in front of a Copilot Studio agent with no secret anywhere
(DIRECTLINE_TOKEN_ENDPOINT, the Direct Line base discovered from the agent's environment), against the
emulator's Copilot-like bot, whose answers come late and several at a time."""

from __future__ import annotations

from devstack.directline import copilot as agent
from devstack.directline.transport import DEFAULT_URL
from devstack.procs import wait_until
from relay.store.conversations import ConversationKey
from tests.relay.conftest import InProcessRelay

PHONE = "+15550017001"


def bot_messages(relay: InProcessRelay, conversation_id: str) -> list[dict]:
    """The agent's activities in its conversation (the emulator's own set, without auth)."""
    return [a for a in relay.emulator.conversation(conversation_id)["activities"]
            if (a.get("from") or {}).get("role") == "bot"]


def agent_answered(relay: InProcessRelay, key: ConversationKey, turns: int = 1) -> list[dict]:
    """Wait (in real time: the agent answers on its own thread) until it finished answering `turns` messages of
    the user (each answer ends with FOLLOW_UP); returns its replies to the user's messages (a greeting, which
    the relay may ask for, is not one)."""
    cid = relay.record(key).conversation_id
    wait_until(lambda: [a.get("text") for a in bot_messages(relay, cid)].count(agent.FOLLOW_UP) >= turns,
               timeout=15, interval=0.05, what=f"the agent's answers to {turns} messages")
    return [a for a in bot_messages(relay, cid) if a.get("replyToId")]


def agent_calls(relay: InProcessRelay) -> dict[str, int]:
    requests = relay.emulator.counters()["requests"]
    return {name: requests.get(name, 0) for name in ("agent/token", "agent/regionalchannelsettings")}


def test_a_channel_message_reaches_the_agent_and_its_late_answers_reach_the_phone_with_no_secret(inprocess_relay):
    relay = inprocess_relay(token_endpoint=True)
    assert relay.ctx.settings.directline.secret == "" and relay.ctx.directline.uses_token_endpoint
    key = relay.message("twilio", PHONE, "pricing")
    relay.work(key)
    record = relay.record(key)
    assert record.conversation_id and record.token
    assert relay.messages_at_bot(record.conversation_id) == ["pricing"]
    answers = agent_answered(relay, key)
    relay.time.advance(1)
    relay.work(key)
    replies = relay.replies(key)
    assert "Here is what I found" in replies[-2] and replies[-1] == agent.FOLLOW_UP  # several messages, in order
    activities = relay.emulator.conversation(record.conversation_id)["activities"]
    [asked] = [a for a in activities if a.get("text") == "pricing"]
    assert [a["replyToId"] for a in answers] == [asked["id"]] * 2
    assert agent_calls(relay) == {"agent/token": 1, "agent/regionalchannelsettings": 1}


def test_the_direct_line_host_is_discovered_once_and_an_explicit_endpoint_wins(inprocess_relay):
    relay = inprocess_relay(token_endpoint=True)
    for n in range(3):
        relay.work(relay.message("whatsapp", f"1555001710{n}", "hello"))
    assert relay.ctx.directline.endpoint == relay.emulator.base_url
    assert agent_calls(relay) == {"agent/token": 3, "agent/regionalchannelsettings": 1}

    explicit = inprocess_relay(token_endpoint=True, env={"DIRECTLINE_ENDPOINT": f"{DEFAULT_URL}/v3/directline"})
    explicit.work(explicit.message("whatsapp", "15550017110", "hello"))
    assert explicit.record(ConversationKey("whatsapp", "15550017110")).conversation_id
    assert agent_calls(explicit) == {"agent/token": 1, "agent/regionalchannelsettings": 0}


def test_the_poller_peeks_with_the_conversations_token_and_delivers_a_late_answer(inprocess_relay):
    relay = inprocess_relay(token_endpoint=True)
    key = relay.message("twilio", PHONE, "hello")
    relay.work(key)
    agent_answered(relay, key)
    relay.time.advance(1)
    relay.work(key)
    assert relay.replies(key)[-1] == agent.FOLLOW_UP
    relay.time.advance(10 * 60)  # past the time a reply is likely: the row is peeked, not worked
    assert relay.tick().quiet == 1  # read with the token: nothing new
    relay.bot_says(relay.record(key).conversation_id, "one more thing")
    relay.time.advance(60)
    relay.tick()
    assert relay.replies(key)[-1] == "one more thing"


def test_a_conversation_whose_token_lapsed_is_left_and_the_next_message_starts_a_new_one(inprocess_relay):
    relay = inprocess_relay(token_endpoint=True)
    key = relay.message("twilio", PHONE, "first")
    relay.work(key)
    agent_answered(relay, key)
    first = relay.record(key).conversation_id
    relay.emulator.expire_tokens(first)  # as if the relay had been out of reach longer than a token lives
    relay.time.advance(agent.COPILOT_TOKEN_SECONDS)
    result = relay.work(key)
    assert result.error == "" and relay.record(key).conversation_id == ""  # left: nothing can read it

    relay.message("twilio", PHONE, "second")
    relay.work(key)
    second = relay.record(key).conversation_id
    assert second not in ("", first) and relay.messages_at_bot(second) == ["second"]
    answers = agent_answered(relay, key)
    relay.time.advance(1)
    relay.work(key)
    assert relay.replies(key)[-1] == agent.FOLLOW_UP and "_second_" in answers[0]["text"]


def test_the_token_is_kept_fresh_for_as_long_as_the_conversation_is_open(inprocess_relay):
    relay = inprocess_relay(token_endpoint=True, env={"RELAY_IDLE_TIMEOUT_MINUTES": "600"})
    key = relay.message("twilio", PHONE, "hello")
    relay.work(key)
    agent_answered(relay, key)
    cid = relay.record(key).conversation_id
    for _ in range(4 * 60):  # four hours, four times a token's life, with the timer every minute
        relay.time.advance(60)
        relay.tick()
    assert relay.record(key).conversation_id == cid
    relay.message("twilio", PHONE, "still there?")
    relay.work(key)
    assert relay.record(key).conversation_id == cid and relay.messages_at_bot(cid) == ["hello", "still there?"]


def test_over_the_host_an_sms_reaches_the_agent_and_its_late_answers_reach_the_phone(relay_stack):
    stack = relay_stack(token_endpoint=True)
    assert stack.env["DIRECTLINE_SECRET"] == stack.env["DIRECTLINE_ENDPOINT"] == ""
    stack.send("twilio", PHONE, "opening hours")
    wait_until(lambda: agent.FOLLOW_UP in stack.replies("twilio", PHONE), timeout=30,
               what="the agent's answer on the phone")
    replies = stack.replies("twilio", PHONE)
    assert "Here is what I found" in replies[-2] and "opening hours" in replies[-2] and replies[-1] == agent.FOLLOW_UP
    record = stack.record("twilio", PHONE)
    assert stack.user_messages_at_bot(record.conversation_id) == ["opening hours"]
    requests = stack.emulator.counters()["requests"]
    assert requests["agent/token"] == 1 and requests["agent/regionalchannelsettings"] == 1
