"""The emulator's one clock (admin POST /_emulator/clock) and what follows it: token lifetimes, retention,
idle conversations, files and timestamps."""

from __future__ import annotations

import datetime as dt

import requests

from tests.emulator.conftest import DirectLineCalls, calls_through, error_of

DAY = 24 * 3600


def test_activities_older_than_retention_are_gone_and_watermarks_keep_counting(in_process):
    emulator = in_process()
    dl = calls_through(emulator)
    cid = dl.start()["conversationId"]
    dl.say(cid, "old news")
    watermark = dl.get(cid).json()["watermark"]
    emulator.advance_clock(DAY + 1)

    aged = dl.get(cid).json()
    assert aged["activities"] == []
    assert dl.get(cid, aged["watermark"]).json()["activities"] == []
    assert dl.get(cid, watermark).json()["activities"] == []  # a watermark from before still reads
    assert emulator.conversation(cid)["activities"] == []

    dl.say(cid, "fresh")
    newer = dl.get(cid, watermark).json()
    assert [a["text"] for a in newer["activities"]] == ["fresh", "You said: fresh"]
    assert dl.get(cid).json()["activities"] == newer["activities"]  # the old ones never come back
    assert dl.get(cid, newer["watermark"]).json()["activities"] == []


def test_only_the_activities_past_retention_age_out(in_process):
    emulator = in_process()
    dl = calls_through(emulator)
    cid = dl.start()["conversationId"]
    dl.say(cid, "yesterday")
    emulator.advance_clock(DAY - 60)
    dl.say(cid, "a minute before")
    emulator.advance_clock(61)
    assert [a["text"] for a in dl.all_activities(cid)] == ["a minute before", "You said: a minute before"]


def test_retention_seconds_flag_sets_how_long_activities_are_kept(start_emulator):
    emulator = start_emulator(extra_args=("--retention-seconds", "60"))
    dl = DirectLineCalls(emulator.base_url)
    cid = dl.start()["conversationId"]
    dl.say(cid, "short-lived")
    emulator.advance_clock(59)
    assert len(dl.all_activities(cid)) == 2
    emulator.advance_clock(2)
    assert dl.all_activities(cid) == []


def test_advancing_the_clock_expires_tokens_but_never_the_secret(in_process):
    emulator = in_process(token_ttl=1800)
    dl = calls_through(emulator)
    conversation = dl.start()
    cid = conversation["conversationId"]
    emulator.advance_clock(1799)
    refreshed = dl.call("POST", "/tokens/refresh", auth=conversation["token"]).json()["token"]
    emulator.advance_clock(1)
    assert error_of(dl.get(cid, auth=conversation["token"])) == (403, "TokenExpired")
    assert dl.get(cid, auth=refreshed).status_code == 200  # refreshed in time: a new 30 minutes
    assert dl.get(cid).status_code == 200


def test_an_idle_conversation_is_forgotten_once_the_clock_passes_conversation_ttl(in_process):
    emulator = in_process()
    dl = calls_through(emulator)
    idle, busy = dl.start()["conversationId"], dl.start()["conversationId"]
    emulator.advance_clock(10 * DAY)
    dl.say(busy, "still here")
    emulator.advance_clock(5 * DAY + 1)
    response = dl.get(idle)
    assert error_of(response) == (404, "BadArgument") and response.json()["error"]["message"] == "Unknown conversation"
    assert dl.get(busy).status_code == 200


def test_uploaded_files_are_served_for_24_hours_of_emulator_time(in_process):
    emulator = in_process()
    dl = calls_through(emulator)
    cid = dl.start()["conversationId"]
    uploaded = dl.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_u"}, data=b"photo",
                       headers={"Content-Type": "image/jpeg"})
    assert uploaded.status_code == 200, uploaded.text
    url = dl.all_activities(cid)[0]["attachments"][0]["contentUrl"]
    emulator.advance_clock(DAY - 1)
    assert dl.http.get(url, timeout=10).content == b"photo"
    emulator.advance_clock(2)
    assert error_of(dl.http.get(url, timeout=10)) == (404, "BadArgument")


def test_timestamps_follow_the_emulator_clock(in_process):
    emulator = in_process()
    dl = calls_through(emulator)
    cid = dl.start()["conversationId"]
    moved = emulator.advance_clock(7 * DAY)
    dl.say(cid, "next week")
    stamp = dt.datetime.fromisoformat(dl.all_activities(cid)[0]["timestamp"].replace("Z", "+00:00"))
    assert stamp >= dt.datetime.fromisoformat(moved["now"].replace("Z", "+00:00"))
    assert stamp - dt.datetime.now(dt.UTC) > dt.timedelta(days=6, hours=23)
    assert emulator.state()["clock"]["offset_seconds"] == 7 * DAY


def test_the_clock_only_moves_forward_by_a_number_of_seconds(start_emulator):
    emulator = start_emulator()
    for bad in ({"advance_seconds": -1}, {"advance_seconds": "60"}, {"advance_seconds": True}, {},
                {"advance_seconds": 1, "rewind": 1}):
        response = requests.post(f"{emulator.admin_url}/clock", json=bad, timeout=10)
        assert error_of(response) == (400, "BadArgument"), bad
    assert emulator.state()["clock"]["offset_seconds"] == 0
    assert emulator.advance_clock(90)["offset_seconds"] == 90
