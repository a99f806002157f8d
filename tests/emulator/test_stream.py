"""The WebSocket stream at streamUrl, read with the `websockets` client: ActivitySet frames with watermarks,
typing over the stream only, replay from a watermark, keep-alives, pings, the stream token's checks,
retention and a clean close."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest
import requests
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect

from tests.emulator.conftest import DirectLineCalls, error_of, next_sets

DAY = 24 * 3600


def texts(activity_set: dict) -> list[str | None]:
    return [a.get("text") for a in activity_set["activities"]]


def with_query(url: str, **changes: str | None) -> str:
    """`url` with query parameters replaced (None removes one)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode({k: v for k, v in query.items() if v is not None})))


def refusal(url: str) -> tuple[int, str]:
    """(status, Direct Line error code) of a stream the server refuses to open."""
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=10).close()
    response = refused.value.response
    body = json.loads(response.body)
    assert set(body) == {"error"} and body["error"]["message"], body
    return response.status_code, body["error"]["code"]


def test_each_new_activity_comes_as_an_activity_set_and_the_echo_types_first(dl):
    conversation = dl.start(user={"id": "dl_alice"})
    cid, token = conversation["conversationId"], conversation["token"]
    with connect(conversation["streamUrl"], open_timeout=10) as stream:
        sent = dl.say(cid, "hello stream", user="dl_alice", auth=token)
        mine, typing, echo = next_sets(stream, 3)
    assert [a["id"] for a in mine["activities"]] == [sent]
    assert typing["activities"][0]["type"] == "typing" and typing["activities"][0]["from"]["role"] == "bot"
    assert texts(echo) == ["You said: hello stream"] and echo["activities"][0]["replyToId"] == sent
    # The stream's watermarks are the activity set's: reading on from the first one gives the echo alone.
    assert [a["id"] for a in dl.get(cid, mine["watermark"]).json()["activities"]] == [echo["activities"][0]["id"]]
    assert typing["watermark"] == mine["watermark"]
    assert echo["watermark"] == dl.get(cid).json()["watermark"]
    assert "typing" not in [a["type"] for a in dl.all_activities(cid)]  # typing comes over the stream only


def test_a_watermark_in_the_stream_url_replays_what_came_after_it_and_none_means_only_newer(dl):
    conversation = dl.start()
    cid, token = conversation["conversationId"], conversation["token"]
    dl.say(cid, "one")
    watermark = dl.get(cid).json()["watermark"]
    dl.say(cid, "two")
    rejoined = dl.call("GET", f"/conversations/{cid}", auth=token, params={"watermark": watermark}).json()
    with connect(rejoined["streamUrl"], open_timeout=10) as stream:
        (replay,) = next_sets(stream, 1)
    assert texts(replay) == ["two", "You said: two"]
    assert replay["watermark"] == dl.get(cid).json()["watermark"]

    fresh = dl.call("GET", f"/conversations/{cid}", auth=token).json()
    with connect(fresh["streamUrl"], open_timeout=10) as stream:
        dl.say(cid, "three")
        first = next_sets(stream, 1)[0]
    assert texts(first) == ["three"]


def test_an_idle_stream_gets_empty_keep_alive_frames_and_answers_pings(start_emulator):
    emulator = start_emulator(extra_args=("--keepalive-seconds", "0.2"))
    dl = DirectLineCalls(emulator.base_url)
    conversation = dl.start()
    with connect(conversation["streamUrl"], open_timeout=10) as stream:
        assert [stream.recv(timeout=5), stream.recv(timeout=5)] == ["", ""]
        assert stream.ping().wait(timeout=5)
        stream.send("")  # DirectLineJS's own keep-alive: ignored
        dl.say(conversation["conversationId"], "still there?")
        assert texts(next_sets(stream, 1)[0]) == ["still there?"]
    assert emulator.counters()["requests"]["conversations/stream"] == 1


def test_forgetting_the_conversation_closes_its_stream_cleanly(dl, directline_emulator):
    conversation = dl.start()
    with connect(conversation["streamUrl"], open_timeout=10) as stream:
        directline_emulator.forget(conversation["conversationId"])
        with pytest.raises(ConnectionClosedOK):
            while True:
                stream.recv(timeout=10)
    assert stream.close_code == 1000


def test_a_stream_url_opens_only_with_a_fresh_stream_token_of_its_conversation(start_emulator):
    emulator = start_emulator()
    dl = DirectLineCalls(emulator.base_url)
    conversation, other = dl.start(), dl.start()
    url = conversation["streamUrl"]
    stream_token = parse_qs(urlsplit(url).query)["t"][0]
    assert refusal(with_query(url, t=None)) == (401, "BadArgument")
    assert refusal(with_query(url, t=stream_token[:-2] + "AA")) == (403, "BadArgument")
    assert refusal(with_query(url, t=conversation["token"])) == (403, "BadArgument")
    assert refusal(with_query(other["streamUrl"], t=stream_token)) == (403, "BadArgument")
    assert refusal(with_query(url, watermark="12")) == (400, "BadArgument")
    plain = requests.get(url.replace("ws://", "http://", 1), timeout=10)  # no WebSocket upgrade
    assert error_of(plain) == (426, "BadArgument")

    emulator.advance_clock(59)
    with connect(url, open_timeout=10):
        pass
    emulator.advance_clock(2)
    assert refusal(url) == (403, "TokenExpired")


def test_the_stream_replay_leaves_out_what_aged_past_retention(start_emulator):
    emulator = start_emulator(token_ttl=3 * DAY)
    dl = DirectLineCalls(emulator.base_url)
    conversation = dl.start()
    cid, token = conversation["conversationId"], conversation["token"]
    dl.say(cid, "zero")
    watermark = dl.get(cid).json()["watermark"]
    dl.say(cid, "old")
    emulator.advance_clock(DAY - 3600)
    dl.say(cid, "young")
    emulator.advance_clock(2 * 3600)
    rejoined = dl.call("GET", f"/conversations/{cid}", auth=token, params={"watermark": watermark}).json()
    with connect(rejoined["streamUrl"], open_timeout=10) as stream:
        (replay,) = next_sets(stream, 1)
    assert texts(replay) == ["young", "You said: young"]


def test_a_stopping_emulator_closes_its_streams_with_going_away(start_emulator):
    emulator = start_emulator()
    conversation = DirectLineCalls(emulator.base_url).start()
    with connect(conversation["streamUrl"], open_timeout=10) as stream:
        emulator.stop()
        with pytest.raises(ConnectionClosedOK):
            while True:
                stream.recv(timeout=10)
    assert stream.close_code == 1001
