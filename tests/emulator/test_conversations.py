"""Start, reconnect, and the life and death of a conversation."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from devstack.procs import wait_until
from tests.emulator.conftest import DirectLineCalls, error_of


def test_start_with_the_secret_makes_a_new_conversation_each_time(dl):
    first, second = dl.start(), dl.start()
    assert first["conversationId"] != second["conversationId"]
    assert set(first) >= {"conversationId", "token", "expires_in", "streamUrl"}
    assert first["expires_in"] == 1800
    assert first["conversationId"] in first["streamUrl"]


def test_start_with_a_generated_token_is_201_then_200(dl):
    generated = dl.call("POST", "/tokens/generate").json()
    first = dl.call("POST", "/conversations", auth=generated["token"])
    again = dl.call("POST", "/conversations", auth=generated["token"])
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["conversationId"] == again.json()["conversationId"] == generated["conversationId"]


def test_start_rejects_a_malformed_body(dl):
    response = dl.call("POST", "/conversations", data=b"{not json", headers={"Content-Type": "application/json"})
    assert error_of(response) == (400, "BadArgument")
    assert error_of(dl.call("POST", "/conversations", json={"user": "alice"})) == (400, "BadArgument")


def test_reconnect_without_watermark_gives_a_new_token_and_stream(dl):
    conversation = dl.start()
    response = dl.call("GET", f"/conversations/{conversation['conversationId']}", auth=conversation["token"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["conversationId"] == conversation["conversationId"]
    assert body["token"] != conversation["token"]
    assert body["expires_in"] == 1800
    assert "watermark" not in parse_qs(urlsplit(body["streamUrl"]).query)
    assert dl.get(conversation["conversationId"], auth=body["token"]).status_code == 200


def test_reconnect_with_watermark_carries_it_into_the_stream_url(dl):
    conversation = dl.start()
    dl.say(conversation["conversationId"], "hello")
    watermark = dl.get(conversation["conversationId"]).json()["watermark"]
    response = dl.call("GET", f"/conversations/{conversation['conversationId']}", auth=conversation["token"],
                       params={"watermark": watermark})
    assert response.status_code == 200, response.text
    assert parse_qs(urlsplit(response.json()["streamUrl"]).query)["watermark"] == [watermark]


def test_reconnect_with_a_foreign_watermark_is_400(dl):
    conversation = dl.start()
    response = dl.call("GET", f"/conversations/{conversation['conversationId']}", auth=conversation["token"],
                       params={"watermark": "12"})
    assert error_of(response) == (400, "BadArgument")


def test_stream_urls_carry_a_short_lived_stream_token_not_the_conversation_token(dl):
    conversation = dl.start()
    stream_token = parse_qs(urlsplit(conversation["streamUrl"]).query)["t"][0]
    assert stream_token != conversation["token"]
    # good for opening the stream only: as a bearer token it is refused
    assert error_of(dl.get(conversation["conversationId"], auth=stream_token)) == (403, "BadArgument")


def test_invalidated_watermarks_are_refused_and_reading_without_one_recovers(dl, directline_emulator):
    conversation = dl.start()
    cid, token = conversation["conversationId"], conversation["token"]
    dl.say(cid, "before")
    everything = dl.all_activities(cid)
    old_watermark = dl.get(cid).json()["watermark"]
    directline_emulator.invalidate_watermarks(cid)
    assert error_of(dl.get(cid, old_watermark)) == (400, "BadArgument")
    assert error_of(dl.call("GET", f"/conversations/{cid}", auth=token,
                            params={"watermark": old_watermark})) == (400, "BadArgument")
    fresh = dl.get(cid).json()  # from no watermark: the whole history again, the same ids
    assert [a["id"] for a in fresh["activities"]] == [a["id"] for a in everything]
    dl.say(cid, "after")
    assert [a["text"] for a in dl.get(cid, fresh["watermark"]).json()["activities"]] == ["after", "You said: after"]


def test_unknown_conversation_is_404_everywhere(dl):
    for method, path in [("GET", "/conversations/nope"), ("GET", "/conversations/nope/activities"),
                         ("POST", "/conversations/nope/activities"), ("POST", "/conversations/nope/upload")]:
        response = dl.call(method, path, json={"type": "message", "from": {"id": "dl_x"}})
        assert error_of(response) == (404, "BadArgument"), path
        assert "Unknown conversation" in response.json()["error"]["message"]


def test_unknown_endpoint_and_wrong_method(dl):
    assert error_of(dl.call("GET", "/nothing")) == (404, "BadArgument")
    assert error_of(dl.call("DELETE", "/conversations/x/activities")) == (405, "BadArgument")


def test_forgotten_conversation_answers_404_even_to_its_token(dl, directline_emulator):
    conversation = dl.start()
    directline_emulator.forget(conversation["conversationId"])
    assert error_of(dl.get(conversation["conversationId"])) == (404, "BadArgument")
    assert error_of(dl.get(conversation["conversationId"], auth=conversation["token"])) == (404, "BadArgument")
    assert error_of(dl.call("POST", "/tokens/refresh", auth=conversation["token"])) == (404, "BadArgument")


def test_idle_conversation_is_forgotten_after_conversation_ttl(start_emulator):
    emulator = start_emulator(extra_args=("--conversation-ttl", "1"))
    dl = DirectLineCalls(emulator.base_url)
    conversation = dl.start()
    dl.say(conversation["conversationId"], "hello")
    assert dl.get(conversation["conversationId"]).status_code == 200  # polling does not keep it alive
    wait_until(lambda: dl.get(conversation["conversationId"]).status_code == 404, timeout=10, interval=0.2,
               what="the idle conversation to be forgotten")
    response = dl.get(conversation["conversationId"])
    assert error_of(response) == (404, "BadArgument")
    assert response.json()["error"]["message"] == "Unknown conversation"
