"""The emulator mounted in-process answers exactly as it does over HTTP: one `respond` behind both, so the
in-process transport is no kinder (statuses, error bodies, headers, faults, tokens, watermarks)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from devstack.directline import EmulatorAdmin
from devstack.directline.server import API, Options, make_server
from devstack.directline.transport import InProcessEmulator
from tests.conftest import DIRECTLINE_TEST_SECRET
from tests.emulator.conftest import DirectLineCalls

VOLATILE = {"id", "conversationId", "token", "watermark", "timestamp", "streamUrl", "replyToId", "contentUrl"}
"""Keys whose values are drawn afresh by every emulator (ids, tokens, times): compared by presence only."""
CONNECTION_HEADERS = {"date", "server", "content-length", "connection"}


@dataclass
class Side:
    """One way to reach an emulator: its Direct Line calls and its admin API."""

    calls: DirectLineCalls
    admin: EmulatorAdmin


@pytest.fixture
def over_http() -> Iterator[Side]:
    """The HTTP server (the socket path every other emulator test uses), served from a thread of this process."""
    server, core = make_server(Options(secret=DIRECTLINE_TEST_SECRET, port=0, enhanced_auth=True))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    admin = EmulatorAdmin()
    admin.admin_url = f"{core.root_url}/_emulator"
    yield Side(DirectLineCalls(f"{core.root_url}{API}"), admin)
    server.shutdown()
    server.server_close()
    core.close()


@pytest.fixture
def in_process() -> Iterator[Side]:
    with InProcessEmulator(secret=DIRECTLINE_TEST_SECRET) as emulator:
        calls = DirectLineCalls(emulator.base_url)
        calls.http.mount(f"{emulator.url}/", emulator.transport)
        yield Side(calls, emulator)


def started(side: Side, **body: Any) -> dict[str, Any]:
    return side.calls.start(**body)


def post_without_sender(side: Side) -> requests.Response:
    return side.calls.post(started(side)["conversationId"], {"type": "message", "text": "who?"})


def watermark_of_another_conversation(side: Side) -> requests.Response:
    first, second = started(side)["conversationId"], started(side)["conversationId"]
    side.calls.say(first, "hi")
    watermark = side.calls.get(first).json()["watermark"]
    return side.calls.get(second, watermark)


def a_whole_turn(side: Side) -> requests.Response:
    conversation = started(side, user={"id": "dl_user1", "name": "Ann"})
    side.calls.say(conversation["conversationId"], "card", auth=conversation["token"])
    return side.calls.get(conversation["conversationId"], auth=conversation["token"])


def an_upload_served_back(side: Side) -> requests.Response:
    cid = started(side)["conversationId"]
    uploaded = side.calls.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_user1"},
                               files={"file": ("photo.png", b"\x89PNG-bytes", "image/png")})
    assert uploaded.status_code == 200, uploaded.text
    [activity] = [a for a in side.calls.all_activities(cid) if a.get("attachments")]
    return side.calls.http.get(activity["attachments"][0]["contentUrl"], timeout=10)


def expired_token(side: Side) -> requests.Response:
    conversation = started(side)
    side.admin.expire_tokens(conversation["conversationId"])
    return side.calls.get(conversation["conversationId"], auth=conversation["token"])


def refreshed_with_the_secret(side: Side) -> requests.Response:
    return side.calls.call("POST", "/tokens/refresh")


def throttled(side: Side) -> requests.Response:
    cid = started(side)["conversationId"]
    side.admin.set_faults(throttle_rate=1.0, retry_after="2", endpoints=["activities/get"])
    return side.calls.get(cid)


def polled_too_fast(side: Side) -> requests.Response:
    cid = started(side)["conversationId"]
    side.admin.set_faults(poll_limit=True)
    side.calls.get(cid)
    return side.calls.get(cid)


def failed_after_processing(side: Side) -> requests.Response:
    cid = started(side)["conversationId"]
    side.admin.set_faults(error_502_rate=1.0, phase="after", endpoints=["activities/post"], limit=1)
    failed = side.calls.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "arrived?"})
    assert failed.status_code == 502
    return side.calls.get(cid)  # stored, and answered by the bot, all the same


def stream_without_websocket(side: Side) -> requests.Response:
    stream_url = started(side)["streamUrl"]
    return side.calls.http.get(stream_url.replace("ws://", "http://", 1), timeout=10)


def reconnected_with_the_secret(side: Side) -> requests.Response:
    return side.calls.call("GET", f"/conversations/{started(side, user={'id': 'dl_ann'})['conversationId']}")


def from_a_foreign_origin(side: Side) -> requests.Response:
    token = side.calls.call("POST", "/tokens/generate", json={"trustedOrigins": ["https://shop.example"]})
    return side.calls.call("POST", "/conversations", auth=token.json()["token"],
                           headers={"Origin": "https://evil.example"})


def answered_without_content(side: Side) -> requests.Response:
    cid = started(side)["conversationId"]
    side.admin.set_faults(no_content_rate=1.0)
    return side.calls.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "no body"})


def aged_past_retention(side: Side) -> requests.Response:
    cid = started(side)["conversationId"]
    side.calls.say(cid, "yesterday")
    side.admin.advance_clock(24 * 3600 + 1)
    return side.calls.get(cid)


def invalidated_watermark(side: Side) -> requests.Response:
    cid = started(side)["conversationId"]
    side.calls.say(cid, "hi")
    watermark = side.calls.get(cid).json()["watermark"]
    side.admin.invalidate_watermarks(cid)
    return side.calls.get(cid, watermark)


def dropped(side: Side) -> requests.Response:
    cid = started(side)["conversationId"]
    side.admin.set_faults(drop_rate=1.0, endpoints=["activities/post"])
    return side.calls.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "lost answer"})


CASES: list[Any] = [
    pytest.param(lambda side: side.calls.call("GET", "/conversations/x/activities", auth=None), 401,
                 id="no Authorization header is 401"),
    pytest.param(lambda side: side.calls.get("nope", auth="forged.token"), 403, id="a forged token is 403"),
    pytest.param(lambda side: side.calls.get("nope"), 404, id="an unknown conversation is 404"),
    pytest.param(lambda side: side.calls.call("PUT", "/conversations"), 405, id="a method the resource lacks is 405"),
    pytest.param(lambda side: side.calls.call("GET", "/conversations/x/stream"), 401,
                 id="a stream URL without its token is 401"),
    pytest.param(stream_without_websocket, 426, id="a stream URL fetched without a WebSocket upgrade is 426"),
    pytest.param(reconnected_with_the_secret, 400, id="reconnect with the secret is 400 under enhanced auth"),
    pytest.param(from_a_foreign_origin, 201, id="a token's trusted origins bind no API call"),
    pytest.param(answered_without_content, 204, id="the no-content fault answers 204 without a body"),
    pytest.param(aged_past_retention, 200, id="activities past retention are gone once the clock moves"),
    pytest.param(invalidated_watermark, 400, id="an invalidated watermark is 400"),
    pytest.param(lambda side: side.calls.call("POST", "/conversations", data=b"{"), 400, id="a body not JSON is 400"),
    pytest.param(post_without_sender, 400, id="an activity without from.id is 400 MissingProperty"),
    pytest.param(watermark_of_another_conversation, 400, id="a watermark of another conversation is 400"),
    pytest.param(lambda side: side.calls.call("OPTIONS", "/conversations", auth=None, headers={
        "Origin": "https://shop.example", "Access-Control-Request-Headers": "authorization"}), 204,
                 id="a CORS preflight is 204 with the allowed methods"),
    pytest.param(lambda side: side.calls.call("POST", "/conversations", headers={"Origin": "https://shop.example"}),
                 201, id="a page's call from its own origin is answered with CORS headers"),
    pytest.param(a_whole_turn, 200, id="a whole turn with a token: the echo bot's card and suggested actions"),
    pytest.param(an_upload_served_back, 200, id="an uploaded file is served back at its contentUrl"),
    pytest.param(expired_token, 403, id="an expired token is 403 TokenExpired"),
    pytest.param(refreshed_with_the_secret, 403, id="refreshing the secret is 403"),
    pytest.param(throttled, 429, id="an injected throttle is 429 with its Retry-After"),
    pytest.param(polled_too_fast, 429, id="polling a conversation twice in a second is 429 under the poll limit"),
    pytest.param(failed_after_processing, 200, id="a fault after processing leaves the activity stored"),
    pytest.param(dropped, "ConnectionError", id="a dropped connection is a requests.ConnectionError"),
]


@pytest.mark.parametrize(("case", "expected"), CASES)
def test_the_in_process_transport_answers_as_the_http_server_does(over_http, in_process,
                                                                  case: Callable[[Side], requests.Response],
                                                                  expected):
    through_socket, in_memory = observed(case, over_http), observed(case, in_process)
    assert through_socket[0] == expected
    assert in_memory == through_socket


def observed(case: Callable[[Side], requests.Response], side: Side) -> tuple:
    """(status or exception name, reason, headers but the connection's, body with fresh ids and tokens masked)."""
    try:
        response = case(side)
    except requests.RequestException as error:
        return (type(error).__name__,)
    headers = {k.lower(): v for k, v in response.headers.items() if k.lower() not in CONNECTION_HEADERS}
    try:
        body = _masked(response.json())
    except ValueError:
        body = response.content
    return response.status_code, response.reason, headers, body


def _masked(value: Any, *, account: bool = False) -> Any:
    """`value` with fresh values masked; the ids of accounts (from, recipient) are the same everywhere and kept."""
    if isinstance(value, dict):
        return {k: ("<fresh>" if k in VOLATILE and v and not (account and k == "id")
                    else _masked(v, account=k in ("from", "recipient"))) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value
