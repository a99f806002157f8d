"""Sending and receiving activities: ids, watermarks, paging, validation, the echo bot's replies."""

from __future__ import annotations

import json
import re

import pytest

from tests.emulator.conftest import DirectLineCalls, error_of


def test_echo_reply_carries_the_text_and_replies_to_the_message(dl):
    cid = dl.start()["conversationId"]
    sent = dl.say(cid, "hello there")
    user, reply = dl.all_activities(cid)
    assert user["id"] == sent and user["text"] == "hello there" and user["from"]["id"] == "dl_user1"
    assert reply["type"] == "message" and "hello there" in reply["text"]
    assert reply["from"] == {"id": "relaybot", "name": "Echo Bot", "role": "bot"}
    assert reply["replyToId"] == sent


def test_activity_ids_and_watermarks_have_the_production_shapes(dl):
    cid = dl.start()["conversationId"]
    dl.say(cid, "one")
    page = dl.get(cid).json()
    for activity in page["activities"]:
        assert re.fullmatch(re.escape(cid) + r"\|\d{7}", activity["id"])
    with pytest.raises(ValueError):
        int(page["watermark"])
    with pytest.raises(ValueError):
        float(page["watermark"])


def test_channel_data_and_client_activity_id_survive(dl):
    cid = dl.start()["conversationId"]
    activity = {"type": "message", "from": {"id": "dl_u"}, "text": "x", "channelData": {"clientActivityID": "abc-1"}}
    assert dl.post(cid, activity).status_code == 200
    assert dl.all_activities(cid)[0]["channelData"] == {"clientActivityID": "abc-1"}


def test_watermark_pages_until_empty_and_only_newer_activities_come_back(start_emulator):
    dl = DirectLineCalls(start_emulator(extra_args=("--page-size", "3")).base_url)
    cid = dl.start()["conversationId"]
    for n in range(4):
        dl.say(cid, f"m{n}")
    pages, watermark = [], None
    while True:
        page = dl.get(cid, watermark).json()
        if not page["activities"]:
            break
        pages.append(page["activities"])
        watermark = page["watermark"]
    assert [len(p) for p in pages] == [3, 3, 2]
    everything = [a for page in pages for a in page]
    assert [a["text"] for a in everything if a["from"].get("role") != "bot"] == ["m0", "m1", "m2", "m3"]
    assert len({a["id"] for a in everything}) == 8
    dl.say(cid, "later on")
    newer = dl.get(cid, watermark).json()["activities"]
    assert [a["text"] for a in newer] == ["later on", "You said: later on"]


def test_new_conversation_has_no_activities_and_no_watermark(dl):
    page = dl.get(dl.start()["conversationId"]).json()
    assert page == {"activities": []}


def test_invalid_watermark_is_400(dl):
    cid = dl.start()["conversationId"]
    dl.say(cid, "x")
    assert error_of(dl.get(cid, "7")) == (400, "BadArgument")
    other = dl.start()["conversationId"]
    dl.say(other, "y")
    assert error_of(dl.get(cid, dl.get(other).json()["watermark"])) == (400, "BadArgument")


@pytest.mark.parametrize(("activity", "status", "code"), [
    ({"type": "message", "text": "no sender"}, 400, "MissingProperty"),
    ({"type": "message", "from": {"name": "no id"}, "text": "x"}, 400, "MissingProperty"),
    ({"from": {"id": "dl_u"}, "text": "no type"}, 400, "MissingProperty"),
    ([{"type": "message"}], 400, "BadArgument"),
])
def test_post_validates_the_activity(dl, activity, status, code):
    cid = dl.start()["conversationId"]
    assert error_of(dl.post(cid, activity)) == (status, code)
    assert dl.all_activities(cid) == []


def test_post_rejects_bad_json(dl):
    cid = dl.start()["conversationId"]
    response = dl.call("POST", f"/conversations/{cid}/activities", data=b"{oops",
                       headers={"Content-Type": "application/json"})
    assert error_of(response) == (400, "BadArgument")


def test_activity_over_the_size_limit_is_413_and_not_stored(start_emulator):
    dl = DirectLineCalls(start_emulator(extra_args=("--max-activity-chars", "2000")).base_url)
    cid = dl.start()["conversationId"]
    big = {"type": "message", "from": {"id": "dl_u"}, "text": "x" * 2000}
    assert error_of(dl.post(cid, big)) == (413, "MessageSizeTooBig")
    small = {"type": "message", "from": {"id": "dl_u"}, "text": "x" * 1000}
    assert len(json.dumps(small)) < 2000 and dl.post(cid, small).status_code == 200
    assert len(dl.all_activities(cid)) == 2


def test_default_size_limit_is_256k_characters(dl):
    cid = dl.start()["conversationId"]
    assert error_of(dl.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "é" * 262144})) == (
        413, "MessageSizeTooBig")


def test_typing_is_accepted_but_never_polled(dl):
    cid = dl.start()["conversationId"]
    response = dl.post(cid, {"type": "typing", "from": {"id": "dl_u"}})
    assert response.status_code == 200 and response.json()["id"].startswith(cid + "|")
    assert dl.all_activities(cid) == []


def test_card_command_gets_a_hero_card_with_suggested_actions(dl):
    cid = dl.start()["conversationId"]
    dl.say(cid, "card")
    (reply,) = dl.wait_for_bot(cid, 1)
    assert reply["attachments"][0]["contentType"] == "application/vnd.microsoft.card.hero"
    assert reply["attachments"][0]["content"]["buttons"]
    assert [a["value"] for a in reply["suggestedActions"]["actions"]] == ["yes", "no"]


def test_bye_ends_the_conversation_from_the_bot(dl):
    cid = dl.start()["conversationId"]
    dl.say(cid, "bye")
    replies = dl.wait_for_bot(cid, 2)
    assert [r["type"] for r in replies] == ["message", "endOfConversation"]


def test_later_gets_an_extra_reply_after_the_turn(dl):
    cid = dl.start()["conversationId"]
    sent = dl.say(cid, "later")
    immediate = [a for a in dl.all_activities(cid) if a["from"].get("role") == "bot"]
    assert [a["text"] for a in immediate] == ["You said: later"]
    replies = dl.wait_for_bot(cid, 2)
    assert replies[1]["text"] == "Late reply: later"
    assert replies[0]["replyToId"] == sent


def test_client_end_of_conversation_is_stored_and_the_conversation_stays_usable(dl):
    cid = dl.start()["conversationId"]
    assert dl.post(cid, {"type": "endOfConversation", "from": {"id": "dl_u"}}).status_code == 200
    assert [a["type"] for a in dl.all_activities(cid)] == ["endOfConversation"]
    dl.say(cid, "still here")
    assert dl.all_activities(cid)[-1]["text"] == "You said: still here"


def test_reset_watermark_replays_the_whole_history_once(dl, directline_emulator):
    cid = dl.start()["conversationId"]
    dl.say(cid, "a")
    everything = dl.all_activities(cid)
    watermark = dl.get(cid).json()["watermark"]
    assert dl.get(cid, watermark).json()["activities"] == []
    directline_emulator.reset_watermark(cid)
    replay = dl.get(cid, watermark).json()
    assert [a["id"] for a in replay["activities"]] == [a["id"] for a in everything]
    assert dl.get(cid, replay["watermark"]).json()["activities"] == []


def test_bot_activity_can_be_injected_through_the_connector_endpoint(dl, directline_emulator):
    cid = dl.start()["conversationId"]
    response = dl.http.post(f"{directline_emulator.url}/v3/conversations/{cid}/activities",
                            json={"type": "message", "text": "proactive"}, timeout=10)
    assert response.status_code == 200
    (activity,) = dl.all_activities(cid)
    assert activity["id"] == response.json()["id"]
    assert activity["from"]["role"] == "bot" and activity["from"]["id"] == "relaybot"
