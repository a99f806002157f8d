"""Fault injection (flags and admin API) and the request counters benchmarks read."""

from __future__ import annotations

import time

import pytest
import requests

from devstack.procs import wait_until
from tests.emulator.conftest import DirectLineCalls, error_of


@pytest.fixture
def emulator(start_emulator):
    return start_emulator()


@pytest.fixture
def calls(emulator) -> DirectLineCalls:
    return DirectLineCalls(emulator.base_url)


def test_throttling_answers_429_with_retry_after(emulator, calls):
    cid = calls.start()["conversationId"]
    emulator.set_faults(throttle_rate=1.0, retry_after="2", endpoints=["activities/get"], limit=1)
    throttled = calls.get(cid)
    assert error_of(throttled) == (429, "TooManyRequests")
    assert throttled.headers["Retry-After"] == "2"
    assert calls.get(cid).status_code == 200  # the limit of one fault is spent
    assert emulator.counters()["faults"] == {"429": 1}


def test_poll_limit_throttles_a_conversation_polled_faster_than_once_a_second(emulator, calls):
    first, second = calls.start()["conversationId"], calls.start()["conversationId"]
    emulator.set_faults(poll_limit=True)
    assert calls.get(first).status_code == 200
    too_soon = calls.get(first)
    assert error_of(too_soon) == (429, "TooManyRequests") and "Retry-After" in too_soon.headers
    assert calls.get(second).status_code == 200  # per conversation
    wait_until(lambda: calls.get(first).status_code == 200, timeout=5, interval=0.1,
               what="the poll after a second to be served")


@pytest.mark.parametrize(("setting", "status"), [("error_500_rate", 500), ("error_502_rate", 502)])
def test_server_errors_at_a_rate(emulator, calls, setting, status):
    cid = calls.start()["conversationId"]
    emulator.set_faults(**{setting: 1.0})
    response = calls.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "x"})
    assert error_of(response) == (status, "ServiceError")
    emulator.clear_faults()
    assert calls.all_activities(cid) == []  # "before": nothing was processed


def test_fault_after_processing_is_the_ambiguous_failure(emulator, calls):
    cid = calls.start()["conversationId"]
    emulator.set_faults(error_502_rate=1.0, phase="after", endpoints=["activities/post"], limit=1)
    activity = {"type": "message", "from": {"id": "dl_u"}, "text": "did it arrive?",
                "channelData": {"clientActivityID": "c-1"}}
    assert calls.post(cid, activity).status_code == 502
    stored = calls.all_activities(cid)
    assert [a["channelData"]["clientActivityID"] for a in stored if "channelData" in a] == ["c-1"]
    assert stored[-1]["text"] == "You said: did it arrive?"


def test_no_content_answers_204_without_a_body_once_the_post_is_processed(emulator, calls):
    cid = calls.start()["conversationId"]
    emulator.set_faults(no_content_rate=1.0)
    posted = calls.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "no receipt"})
    assert (posted.status_code, posted.content, posted.headers.get("Content-Type")) == (204, b"", None)
    uploaded = calls.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_u"}, data=b"file",
                          headers={"Content-Type": "text/plain"})
    assert (uploaded.status_code, uploaded.content) == (204, b"")
    read = calls.get(cid)  # other endpoints answer as usual
    assert read.status_code == 200
    texts = [a.get("text") for a in read.json()["activities"]]
    assert texts[:2] == ["no receipt", "You said: no receipt"] and len(texts) == 4
    assert emulator.counters()["faults"] == {"204": 2}


def test_no_content_never_hides_a_refusal(emulator, calls):
    cid = calls.start()["conversationId"]
    emulator.set_faults(no_content_rate=1.0)
    assert error_of(calls.post(cid, {"type": "message", "text": "no sender"})) == (400, "MissingProperty")


def test_dropped_connection(emulator, calls):
    cid = calls.start()["conversationId"]
    emulator.set_faults(drop_rate=1.0, endpoints=["activities/get"])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{emulator.base_url}/conversations/{cid}/activities",
                     headers={"Authorization": f"Bearer {emulator.secret}"}, timeout=10)
    assert emulator.counters()["faults"]["drop"] >= 1


def test_added_latency(emulator, calls):
    emulator.set_faults(latency_ms=2000, endpoints=["conversations/start"])
    began = time.monotonic()
    calls.start()
    assert time.monotonic() - began >= 2.0
    began = time.monotonic()
    calls.call("POST", "/tokens/generate")
    assert time.monotonic() - began < 2.0  # other endpoints do not wait the added latency


def test_faults_from_command_line_flags(start_emulator):
    emulator = start_emulator(extra_args=("--throttle-rate", "1", "--retry-after", "5", "--no-content-rate", "0.5"))
    response = DirectLineCalls(emulator.base_url).call("POST", "/conversations")
    assert error_of(response) == (429, "TooManyRequests") and response.headers["Retry-After"] == "5"
    assert emulator.state()["faults"]["throttle_rate"] == 1.0
    assert emulator.state()["faults"]["no_content_rate"] == 0.5


def test_bad_fault_settings_are_400(emulator):
    for bad in ({"throttle_rate": 2}, {"no_content_rate": -0.5}, {"no_such_fault": 1}, {"endpoints": ["nope"]},
                {"phase": "during"}):
        response = requests.put(f"{emulator.admin_url}/faults", json=bad, timeout=10)
        assert error_of(response) == (400, "BadArgument"), bad
    assert emulator.state()["faults"]["throttle_rate"] == 0


def test_counters_per_endpoint_and_conversation_and_their_reset(emulator, calls):
    conversation = calls.start()
    cid = conversation["conversationId"]
    calls.say(cid, "hi")
    calls.get(cid)
    calls.get(cid)
    calls.call("POST", "/tokens/refresh", auth=conversation["token"])
    counters = emulator.counters()
    assert counters["requests"] == {"conversations/start": 1, "activities/post": 1, "activities/get": 2,
                                    "tokens/refresh": 1}
    assert counters["conversations"][cid] == {"activities/post": 1, "activities/get": 2}
    emulator.reset_counters()
    assert emulator.counters() == {"requests": {}, "conversations": {}, "faults": {}}


def test_admin_on_an_unknown_conversation_is_404(emulator):
    for action in ("forget", "expire-tokens", "reset-watermark", "invalidate-watermarks"):
        response = requests.post(f"{emulator.admin_url}/conversations/nope/{action}", timeout=10)
        assert error_of(response) == (404, "BadArgument")


def test_state_never_shows_the_secret(emulator):
    assert emulator.secret not in requests.get(f"{emulator.admin_url}/", timeout=10).text
    assert emulator.secret not in repr(emulator)


def test_connection_dropped_after_processing_still_delivers_the_activity(emulator, calls):
    cid = calls.start()["conversationId"]
    emulator.set_faults(drop_rate=1.0, phase="after", endpoints=["activities/post"], limit=1)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{emulator.base_url}/conversations/{cid}/activities", timeout=10,
                      headers={"Authorization": f"Bearer {emulator.secret}"},
                      json={"type": "message", "from": {"id": "dl_u"}, "text": "lost answer"})
    assert [a["text"] for a in calls.all_activities(cid)] == ["lost answer", "You said: lost answer"]
