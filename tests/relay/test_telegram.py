"""Telegram end to end: a tap on an inline keyboard button reaches the bot as the value behind it (however long)
and stops the button's spinner once; a photo reaches the bot as a file it can open, with the bot token in no
URL the relay keeps or hands on; a retried update reaches the bot once."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time

import requests

from devstack.channels import DEV_VALUES
from devstack.procs import wait_until
from relay.channels import telegram
from tests.relay.conftest import InProcessRelay

TOKEN = DEV_VALUES["TELEGRAM_BOT_TOKEN"]
LONG_VALUE = {"order": "large pizza", "note": "x" * 200}  # far beyond callback_data's 64 bytes


def ask(relay: InProcessRelay, user: str) -> tuple[object, dict]:
    """The user says hello, then the bot asks with a hero card of postBack buttons; the key and the question as the
    user's phone shows it."""
    key = relay.message("telegram", user, "hello")
    relay.work(key)
    relay.bot_sends(relay.record(key).conversation_id, {"type": "message", "attachments": [{
        "contentType": "application/vnd.microsoft.card.hero",
        "content": {"text": "Which one?", "buttons": [
            {"type": "postBack", "title": "Small", "value": {"order": "small pizza"}},
            {"type": "postBack", "title": "Large", "value": LONG_VALUE}]}}]})
    wait_until(lambda: (relay.time.advance(1), relay.work(key), any(
        r["choices"] for r in relay.simulator.replies("telegram", user)))[-1], timeout=20, interval=0.1,
        what="the question on the phone")
    [question] = [r for r in relay.simulator.replies("telegram", user) if r["choices"]]
    return key, question


def test_a_tap_reaches_the_bot_as_the_buttons_value_and_is_answered_once(inprocess_relay):
    relay = inprocess_relay()
    user = "5550017301"
    key, question = ask(relay, user)
    assert question["text"] == "Which one?" and [c["title"] for c in question["choices"]] == ["Small", "Large"]
    assert all(len(c["id"].encode()) <= 64 for c in question["choices"])

    relay.message("telegram", user, "", reply_id=question["choices"][1]["id"])
    wait_until(lambda: (relay.time.advance(1), relay.work(key), len(relay.replies(key)) >= 3)[-1], timeout=20,
               interval=0.1, what="the echo of the tap")
    tapped = relay.activities_at_bot(relay.record(key).conversation_id)[-1]
    assert tapped["value"] == LONG_VALUE
    assert len(relay.simulator.telegram()["answered"]) == 1  # the spinner stopped with the reply, once
    assert relay.store.dead_letters.list_letters(limit=10) == []


def test_a_tap_is_answered_with_the_first_reply_only(inprocess_relay, caplog):
    """The bot may say several things after a tap: only the first reply answers it (Telegram refuses a second
    answerCallbackQuery, and each would cost a call under its rate limits)."""
    relay = inprocess_relay()
    user = "5550017304"
    key, question = ask(relay, user)
    relay.message("telegram", user, "", reply_id=question["choices"][0]["id"])
    with caplog.at_level(logging.INFO, logger="relay.channels.telegram"):
        wait_until(lambda: (relay.time.advance(1), relay.work(key), len(relay.replies(key)) >= 3)[-1], timeout=20,
                   interval=0.1, what="the echo of the tap")
        relay.bot_says(relay.record(key).conversation_id, "Anything else?")
        wait_until(lambda: (relay.time.advance(1), relay.work(key), len(relay.replies(key)) >= 4)[-1], timeout=20,
                   interval=0.1, what="the bot's second message after the tap")
    assert relay.replies(key)[-1] == "Anything else?"
    assert len(relay.simulator.telegram()["answered"]) == 1
    assert not [r for r in caplog.records if "not answered" in r.getMessage()]  # no second answerCallbackQuery
    assert "callback_query_id" not in relay.record(key).reply_context


def test_a_groups_message_is_acknowledged_and_reaches_no_bot(relay_stack):
    """In a group every member would see the bot's replies to one of them: the update is answered 200 (Telegram
    does not retry it) and relayed nowhere, while the same user's private chat is."""
    stack = relay_stack()
    member, group = "5550017305", -1001234567
    said = {"update_id": 917305, "message": {"message_id": 5, "date": int(time.time()), "from": {
        "id": int(member), "first_name": "Ana"}, "chat": {"id": group, "type": "supergroup", "title": "Team"},
        "text": "my account number is 12345678"}}
    response = requests.post(f"{stack.simulator.relay_url}/api/channels/telegram", data=json.dumps(said), timeout=30,
                             headers={"Content-Type": "application/json",
                                      telegram.WEBHOOK_HEADER: DEV_VALUES["TELEGRAM_WEBHOOK_SECRET"]})
    assert response.status_code == 200, response.text
    stack.send("telegram", member, "hello")
    assert stack.wait_for_replies("telegram", member, 1) == ["You said: hello"]
    assert stack.user_messages_at_bot(stack.record("telegram", member).conversation_id) == ["hello"]
    assert all(stack.record("telegram", user) is None for user in (str(group), f"{group}:{member}"))
    assert not [r for r in stack.simulator.replies("telegram") if str(group) in json.dumps(r)]


def test_a_photo_reaches_the_bot_as_a_file_and_the_token_is_in_no_url_the_relay_keeps(relay_stack):
    stack = relay_stack()
    user = "5550017302"
    photo = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20
    answer = stack.send("telegram", user, "look", media=[
        {"url": "data:image/jpeg;base64," + base64.b64encode(photo).decode(), "contentType": "image/jpeg"}])
    assert stack.wait_for_replies("telegram", user, 1) == ["You said: look"]
    record = stack.record("telegram", user)
    [activity] = [a for a in stack.emulator.conversation(record.conversation_id)["activities"]
                  if a.get("type") == "message" and (a.get("from") or {}).get("role") != "bot"]
    assert activity["channelData"]["clientActivityID"] == f"telegram:{answer['message_id']}"
    [attachment] = activity["attachments"]
    assert attachment["contentType"] == "image/jpeg"
    assert requests.get(attachment["contentUrl"], timeout=10).content == photo
    assert TOKEN not in json.dumps(activity)
    wait_until(lambda: stack.store.outbox.list_messages(record.key) == [], timeout=20, what="the outbox to empty")


def test_an_update_telegram_retries_reaches_the_bot_once(relay_stack):
    stack = relay_stack()
    user = "5550017303"
    answer = stack.send("telegram", user, "only once")
    results: list[int] = []
    retries = [threading.Thread(target=lambda: results.append(stack.replay(answer).status_code)) for _ in range(3)]
    for retry in retries:
        retry.start()
    for retry in retries:
        retry.join()
    assert results == [200, 200, 200]
    stack.send("telegram", user, "and then this")
    assert stack.wait_for_replies("telegram", user, 2) == ["You said: only once", "You said: and then this"]
    assert stack.user_messages_at_bot(stack.record("telegram", user).conversation_id) == ["only once",
                                                                                           "and then this"]
