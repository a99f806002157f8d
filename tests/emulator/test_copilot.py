"""The emulator's Copilot-like bot (`--copilot`) and the routes of a Copilot Studio environment host."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from websockets.sync.client import connect

from devstack.directline import DirectLineEmulator
from devstack.directline import copilot as bot
from devstack.directline.server import AGENT_TOKEN_PATH
from devstack.procs import wait_until
from tests.conftest import subprocess_env
from tests.emulator.conftest import DirectLineCalls, calls_through, error_of, next_sets

QUICK = (0.05, 0.15)


@pytest.fixture
def agent(in_process) -> DirectLineCalls:
    """Calls against an in-process emulator running the Copilot-like bot, answering 50-150 ms late."""
    return calls_through(in_process(copilot=True, copilot_delay=QUICK))


def token_from_endpoint(calls: DirectLineCalls, url: str) -> dict[str, Any]:
    response = calls.http.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def start_with_endpoint(calls: DirectLineCalls) -> tuple[str, str]:
    """(conversation id, token): a token from the agent's token endpoint, then the conversation started with it."""
    granted = token_from_endpoint(calls, calls.base_url.removesuffix("/v3/directline") + AGENT_TOKEN_PATH)
    started = calls.start(auth=granted["token"])
    assert started["conversationId"] == granted["conversationId"]
    return granted["conversationId"], granted["token"]


def bot_messages(calls: DirectLineCalls, cid: str, token: str, count: int) -> list[dict[str, Any]]:
    """Wait until the bot sent at least `count` messages and events; returns them, in order."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        found[:] = [a for a in calls.all_activities(cid, auth=token) if a["from"].get("role") == "bot"]
        return len(found) >= count

    wait_until(enough, timeout=15, interval=0.05, what=f"{count} activities of the bot")
    return found


def say(calls: DirectLineCalls, cid: str, token: str, text: str = "", **fields: Any) -> str:
    response = calls.post(cid, {"type": "message", "from": {"id": "dl_user"}, "text": text, **fields}, auth=token)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def at(activity: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(activity["timestamp"])


def test_the_token_endpoint_needs_no_auth_and_gives_hour_long_tokens_that_start_a_conversation(agent):
    url = agent.base_url.removesuffix("/v3/directline") + AGENT_TOKEN_PATH
    granted = token_from_endpoint(agent, url)
    assert set(granted) == {"token", "expires_in", "conversationId"} and granted["expires_in"] == 3600
    started = agent.start(auth=granted["token"])
    assert started["conversationId"] == granted["conversationId"] and started["expires_in"] > 3500
    assert error_of(agent.http.get(url.partition("?")[0], timeout=10)) == (400, "BadArgument")  # no api-version


def test_regional_channel_settings_name_the_emulator_as_the_direct_line_host(agent):
    root = agent.base_url.removesuffix("/v3/directline")
    answer = agent.http.get(f"{root}/powervirtualagents/regionalchannelsettings?api-version=2022-03-01-preview",
                            timeout=10).json()
    assert answer == {"channelUrlsById": {"directline": f"{root}/"}}
    assert answer["channelUrlsById"]["directline"] + "v3/directline" == agent.base_url


def test_the_agent_greets_only_on_start_conversation_in_the_locale_it_was_given(agent):
    cid, token = start_with_endpoint(agent)
    asked = say(agent, cid, token, "hello")
    answers = bot_messages(agent, cid, token, 2)
    assert all(a.get("replyToId") == asked for a in answers)  # no greeting came first
    assert not any(a["text"] in bot.GREETINGS.values() for a in answers)
    event = agent.post(cid, {"type": "event", "name": "startConversation", "locale": "fr-FR",
                             "from": {"id": "dl_user"}}, auth=token)
    assert event.status_code == 200, event.text
    greeting = bot_messages(agent, cid, token, 3)[2]
    assert (greeting["text"], greeting["locale"]) == (bot.GREETINGS["fr"], "fr-FR")
    agent.post(cid, {"type": "event", "name": "somethingElse", "from": {"id": "dl_user"}}, auth=token)
    say(agent, cid, token, "again")
    later = bot_messages(agent, cid, token, 5)
    assert [a.get("replyToId") for a in later[3:]] == [later[3]["replyToId"]] * 2  # the other event got nothing


def test_answers_come_after_the_post_returned_and_at_least_the_delay_later(in_process):
    agent = calls_through(in_process(copilot=True, copilot_delay=(0.4, 0.5)))
    cid, token = start_with_endpoint(agent)
    asked = say(agent, cid, token, "what is direct line")
    user_message, = [a for a in agent.all_activities(cid, auth=token) if a["id"] == asked]
    answers = bot_messages(agent, cid, token, 2)
    assert all((at(a) - at(user_message)).total_seconds() >= 0.4 for a in answers)


def test_a_turn_holds_several_markdown_messages(agent):
    cid, token = start_with_endpoint(agent)
    say(agent, cid, token, "pricing")
    first, second = bot_messages(agent, cid, token, 2)
    assert "**Here is what I found**" in first["text"] and "_pricing_" in first["text"]
    assert "\n- " in first["text"] and "](https://" in first["text"] and "[1]" in first["text"]
    assert second["text"] == bot.FOLLOW_UP


def test_turns_are_answered_in_order_a_greeting_asked_first_comes_first(in_process):
    agent = calls_through(in_process(copilot=True, copilot_delay=(0.3, 0.6), seed=7))
    cid, token = start_with_endpoint(agent)
    agent.post(cid, {"type": "event", "name": "startConversation", "from": {"id": "dl_user"}}, auth=token)
    say(agent, cid, token, "first")
    say(agent, cid, token, "second")
    texts = [a["text"] for a in bot_messages(agent, cid, token, 5)]
    assert texts[0] == bot.GREETINGS["en"]
    assert "_first_" in texts[1] and "_second_" in texts[3]


def test_a_multiple_choice_question_comes_as_suggested_actions_and_takes_a_value(agent):
    cid, token = start_with_endpoint(agent)
    say(agent, cid, token, "choice")
    question, = bot_messages(agent, cid, token, 1)
    actions = question["suggestedActions"]["actions"]
    assert {a["type"] for a in actions} == {"imBack", "postBack"} and all(a["value"] for a in actions)
    premium = next(a for a in actions if a["title"] == "Premium")
    say(agent, cid, token, premium["value"])
    assert bot_messages(agent, cid, token, 3)[1]["text"] == "You chose Premium."
    say(agent, cid, token, "choice")
    say(agent, cid, token, "Platinum")
    assert bot_messages(agent, cid, token, 6)[4]["text"] == "Platinum is not one of the options."


def card_question(agent: DirectLineCalls, cid: str, token: str, seen: int) -> dict[str, Any]:
    say(agent, cid, token, "card")
    message = bot_messages(agent, cid, token, seen + 1)[seen]
    [attachment] = message["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    return attachment["content"]


def test_an_adaptive_card_question_checks_the_value_it_gets_back(agent):
    cid, token = start_with_endpoint(agent)
    card = card_question(agent, cid, token, 0)
    assert "fallbackText" not in card
    inputs = {item["id"]: item for item in card["body"] if item["type"].startswith("Input.")}
    assert inputs["size"]["type"] == "Input.ChoiceSet" and inputs["note"]["type"] == "Input.Text"
    medium = next(c["value"] for c in inputs["size"]["choices"] if c["title"] == "Medium")
    [submit] = card["actions"]
    say(agent, cid, token, value={**submit["data"], "size": medium, "note": "gift wrap"})
    assert bot_messages(agent, cid, token, 3)[1]["text"] == "You ordered size M (Medium) with the note: gift wrap"

    card_question(agent, cid, token, 3)
    say(agent, cid, token, "Medium")  # the title typed back, not the value the card asked for
    wrong = bot_messages(agent, cid, token, 6)[4]
    assert wrong["text"].startswith(bot.CARD_WRONG_PREFIX) and "no value" in wrong["text"]


def test_asking_for_an_agent_sends_handoff_initiate_with_context_and_transcript(agent):
    cid, token = start_with_endpoint(agent)
    say(agent, cid, token, "my order is late")
    bot_messages(agent, cid, token, 2)
    say(agent, cid, token, "agent")
    notice, handoff = bot_messages(agent, cid, token, 4)[2:]
    assert notice["text"] == bot.HANDOFF_TEXT
    assert (handoff["type"], handoff["name"]) == ("event", "handoff.initiate")
    assert handoff["value"]["va_LastPhrases"] == "agent"
    [transcript] = handoff["attachments"]
    texts = [entry["text"] for entry in transcript["content"]["transcript"]]
    assert texts[0] == "my order is late" and bot.FOLLOW_UP in texts


@pytest.fixture(scope="module")
def agent_over_http(tmp_path_factory) -> Iterator[DirectLineEmulator]:
    emulator = DirectLineEmulator(secret="copilot-test-secret", copilot=True, copilot_delay=(0.2, 0.3),
                                  env=subprocess_env(), log_path=tmp_path_factory.mktemp("dl") / "directline.log")
    with emulator:
        yield emulator


def test_a_streamed_answer_is_typing_with_streaminfo_then_the_final_message(agent_over_http):
    calls = DirectLineCalls(agent_over_http.base_url, secret=agent_over_http.secret)
    granted = requests.get(agent_over_http.token_endpoint, timeout=10).json()
    conversation = calls.start(auth=granted["token"])
    cid, token = conversation["conversationId"], conversation["token"]
    with connect(conversation["streamUrl"], open_timeout=10) as stream:
        say(calls, cid, token, "stream")
        activities: list[dict[str, Any]] = []
        while not any(a["type"] == "message" and a["from"].get("role") == "bot" for a in activities):
            activities += [a for s in next_sets(stream, 1) for a in s["activities"]]
    from_bot = [a for a in activities if a["from"].get("role") == "bot"]
    assert from_bot[0]["type"] == "typing" and "entities" not in from_bot[0]  # the turn's typing first
    streamed = from_bot[1:-1]
    infos = [next(e for e in a["entities"] if e["type"] == "streaminfo") for a in streamed]
    assert [a["type"] for a in streamed] == ["typing"] * len(streamed) and len(streamed) >= 2
    assert [i["streamSequence"] for i in infos] == list(range(1, len(streamed) + 1))
    assert "streamId" not in infos[0] and {i["streamId"] for i in infos[1:]} == {streamed[0]["id"]}
    final = from_bot[-1]
    assert final["entities"] == [{"type": "streaminfo", "streamType": "final", "streamId": streamed[0]["id"]}]
    assert final["text"].startswith(streamed[-1]["text"])
    polled = [a for a in calls.all_activities(cid, auth=token) if a["from"].get("role") == "bot"]
    assert [a["id"] for a in polled] == [final["id"]]  # typing, streamed or not, is never in the activity set


def test_bye_ends_the_conversation_after_a_goodbye(agent):
    cid, token = start_with_endpoint(agent)
    asked = say(agent, cid, token, "bye")
    goodbye, end = bot_messages(agent, cid, token, 2)
    assert (goodbye["text"], end["type"]) == (bot.GOODBYE_TEXT, "endOfConversation")
    assert goodbye["replyToId"] == end["replyToId"] == asked
