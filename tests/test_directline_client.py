"""The Direct Line client against the emulator: every call, every error type, retries, no blind re-post."""

from __future__ import annotations

import email.utils
import logging
import socket
import threading
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from devstack.directline.transport import InProcessEmulator
from devstack.inprocess import Answer, InProcessTransport
from devstack.procs import free_port, wait_until
from relay.clock import ManualClock
from relay.directline import ActivitySet, DirectLineClient, RetryPolicy, UploadFile
from relay.errors import (
    AgentEndpointRefused,
    AuthenticationFailed,
    BadRequest,
    BotFailed,
    ConversationNotFound,
    DirectLineError,
    Throttled,
    TokenExpired,
    TransientError,
)
from relay.settings import DirectLineSettings


def make_client(emulator=None, *, secret: str | None = None, endpoint: str | None = None, timeout: float = 10,
                retry: RetryPolicy | None = None, clock: ManualClock | None = None) -> DirectLineClient:
    """A client on a ManualClock: its waits between tries are recorded in `clock.sleeps`, never waited."""
    settings = DirectLineSettings(secret=secret if secret is not None else emulator.secret,
                                  endpoint=endpoint or emulator.base_url, timeout_seconds=timeout,
                                  bot_ids=("relaybot",))
    return DirectLineClient(settings, retry=retry or RetryPolicy(), clock=clock or ManualClock())


@pytest.fixture
def client(directline_emulator):
    client = make_client(directline_emulator)
    yield client
    client.close()


@pytest.fixture
def emulator(start_emulator):
    """An emulator of this test's own, for faults."""
    return start_emulator()


def message(text: str, user_id: str = "dl_user1", client_id: str | None = None) -> dict:
    activity = {"type": "message", "from": {"id": user_id, "name": "User"}, "text": text}
    if client_id:
        activity["channelData"] = {"clientActivityID": client_id}
    return activity


def all_activities(client: DirectLineClient, conversation_id: str, **auth) -> list[dict]:
    page = client.get_activities(conversation_id, **auth)
    return list(page.activities)


# ------------------------------------------------------------------------------------------ every call


def test_generate_then_start_with_the_token(client):
    granted = client.generate_token(user_id="dl_web1", user_name="Web", trusted_origins=["https://shop.example"])
    assert granted.conversation_id and granted.token and granted.expires_in == 1800
    assert granted.stream_url is None

    started = client.start_conversation(token=granted.token)
    assert started.conversation_id == granted.conversation_id
    again = client.start_conversation(token=granted.token)  # 200 for the token's own conversation
    assert again.conversation_id == granted.conversation_id

    client.post_activity(granted.conversation_id, message("hi", user_id="someone-else"), token=granted.token)
    [user_activity, reply] = all_activities(client, granted.conversation_id, token=granted.token)
    assert user_activity["from"]["id"] == "dl_web1"  # the token's user wins
    assert reply["text"] == "You said: hi" and client.is_from_bot(reply) and not client.is_from_bot(user_activity)


def test_refresh_keeps_the_conversation_and_refuses_an_expired_token(client, directline_emulator):
    granted = client.generate_token(user_id="dl_web2")
    refreshed = client.refresh_token(token=granted.token)
    assert refreshed.conversation_id == granted.conversation_id
    assert refreshed.token != granted.token and refreshed.expires_in == 1800
    client.start_conversation(token=refreshed.token)

    directline_emulator.expire_tokens(granted.conversation_id)
    with pytest.raises(TokenExpired) as raised:
        client.refresh_token(token=refreshed.token)
    assert raised.value.upstream_status == 403 and raised.value.upstream_code == "TokenExpired"
    with pytest.raises(TokenExpired):
        client.get_activities(granted.conversation_id, token=refreshed.token)


def test_start_post_and_page_activities_with_the_secret(client):
    conversation = client.start_conversation(user_id="dl_sms1")
    assert conversation.stream_url and conversation.expires_in == 1800
    first = client.get_activities(conversation.conversation_id)
    assert first == ActivitySet((), None)

    posted_id = client.post_activity(conversation.conversation_id, message("one", "dl_sms1"))
    page = client.get_activities(conversation.conversation_id)
    assert page.activities[0]["id"] == posted_id
    assert [a.get("text") for a in page.activities] == ["one", "You said: one"]
    assert page.watermark

    empty = client.get_activities(conversation.conversation_id, watermark=page.watermark)
    assert empty.activities == () and empty.watermark == page.watermark  # the same opaque string back

    client.post_activity(conversation.conversation_id, message("two", "dl_sms1"))
    newer = client.get_activities(conversation.conversation_id, watermark=page.watermark)
    assert [a.get("text") for a in newer.activities] == ["two", "You said: two"]


def test_reconnect_needs_a_live_token_of_the_conversation_and_keeps_its_user(client, directline_emulator):
    """The shared emulator runs with enhanced authentication, as many production sites do."""
    conversation = client.start_conversation(user_id="dl_sms2")
    client.post_activity(conversation.conversation_id, message("hello", "dl_sms2"), token=conversation.token)
    watermark = client.get_activities(conversation.conversation_id, token=conversation.token).watermark

    with_watermark = client.reconnect(conversation.conversation_id, watermark=watermark, token=conversation.token)
    without = client.reconnect(conversation.conversation_id, token=conversation.token)
    for token in (with_watermark, without):
        assert token.conversation_id == conversation.conversation_id and token.stream_url
        assert client.get_activities(conversation.conversation_id, watermark=watermark, token=token.token).activities \
            == ()
    client.post_activity(conversation.conversation_id, message("again", "someone-else"), token=without.token)
    assert [a["from"]["id"] for a in all_activities(client, conversation.conversation_id)
            if a.get("text") == "again"] == ["dl_sms2"]  # the token's user, the same as before
    with pytest.raises(BadRequest) as raised:
        client.reconnect(conversation.conversation_id, watermark="not-a-watermark-of-this-conversation",
                         token=conversation.token)
    assert raised.value.upstream_status == 400

    with pytest.raises(BadRequest) as raised:
        client.reconnect(conversation.conversation_id)  # with the secret
    assert (raised.value.upstream_status, raised.value.upstream_code) == (400, "MissingProperty")
    directline_emulator.expire_tokens(conversation.conversation_id)
    with pytest.raises(TokenExpired):
        client.reconnect(conversation.conversation_id, token=without.token)


def test_upload_files_with_an_activity(client):
    conversation = client.start_conversation(user_id="dl_sms3")
    activity_id = client.upload(
        conversation.conversation_id,
        [UploadFile("photo.png", b"\x89PNG fake image", "image/png"), UploadFile("note.txt", b"hello", "text/plain")],
        user_id="dl_sms3", activity={"type": "message", "text": "look", "from": {"id": "dl_sms3"}},
    )
    activities = all_activities(client, conversation.conversation_id)
    uploaded = next(a for a in activities if a["id"] == activity_id)
    assert uploaded["text"] == "look"
    assert [a["contentType"] for a in uploaded["attachments"]] == ["image/png", "text/plain"]
    assert requests.get(uploaded["attachments"][0]["contentUrl"], timeout=10).content == b"\x89PNG fake image"

    alone = client.upload(conversation.conversation_id, [UploadFile("a.txt", b"x", "text/plain")], user_id="dl_sms3")
    assert any(a["id"] == alone for a in all_activities(client, conversation.conversation_id))


def test_find_activity_by_client_id(client):
    conversation = client.start_conversation(user_id="dl_sms4")
    for n in range(3):
        client.post_activity(conversation.conversation_id, message(f"m{n}", "dl_sms4", client_id=f"SM{n}"))
    found = client.find_activity_by_client_id(conversation.conversation_id, "SM1")
    assert found["text"] == "m1"
    assert client.find_activity_by_client_id(conversation.conversation_id, "SM-unknown") is None


class _JsonAnswer(BaseHTTPRequestHandler):
    """Answers every GET with `body`, JSON."""

    body = b"{}"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


class _NoWatermark(_JsonAnswer):
    body = b'{"activities": []}'


def test_an_answer_without_watermark_keeps_the_previous_one():
    # Direct Line has answered without a watermark; the emulator always sends one, so a two-line server stands in.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoWatermark)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = make_client(secret="s", endpoint=f"http://127.0.0.1:{server.server_port}/v3/directline")
        assert client.get_activities("c1", watermark="0000a-42") == ActivitySet((), "0000a-42")
        assert client.get_activities("c1").watermark is None
    finally:
        server.shutdown()
        server.server_close()


def test_the_environments_proxy_is_used_unless_no_proxy_names_the_host(forward_proxy, monkeypatch):
    """The environment is read once per client (not at every request), and still honoured."""
    forward_proxy.body = b'{"activities": [], "watermark": "1"}'
    client = make_client(secret="s", endpoint="http://directline.invalid/v3/directline", retry=RetryPolicy(attempts=1))
    assert client.get_activities("c1").watermark == "1"
    assert client.get_activities("c2").watermark == "1"
    assert forward_proxy.asked == ["http://directline.invalid/v3/directline/conversations/c1/activities",
                                   "http://directline.invalid/v3/directline/conversations/c2/activities"]

    monkeypatch.setenv("NO_PROXY", "directline.invalid")
    direct = make_client(secret="s", endpoint="http://directline.invalid/v3/directline", retry=RetryPolicy(attempts=1))
    with pytest.raises(TransientError):  # straight to a host that never resolves
        direct.get_activities("c3")
    assert len(forward_proxy.asked) == 2


@pytest.mark.parametrize("answer", [
    pytest.param(Answer(204), id="204 No Content"),
    pytest.param(Answer(200, {"Content-Type": "application/json"}), id="200 with an empty body"),
])
def test_a_post_answered_without_a_body_is_a_success_without_an_id(answer):
    """Some Direct Line deployments answer POST activities and upload with no body; a stand-in answers so."""
    asked: list[str] = []

    def respond(method, target, headers, body):
        asked.append(f"{method} {target.split('?')[0]}")
        return answer

    settings = DirectLineSettings(secret="s", endpoint="http://directline.invalid/v3/directline", timeout_seconds=10,
                                  bot_ids=("relaybot",))
    client = DirectLineClient(settings, clock=ManualClock(), transport=InProcessTransport(respond))
    assert client.post_activity("c1", message("hi")) is None
    assert client.upload("c1", [UploadFile("a.txt", b"x", "text/plain")], user_id="dl_user1") is None
    assert asked == ["POST /v3/directline/conversations/c1/activities",  # each once: taken, nothing to retry
                     "POST /v3/directline/conversations/c1/upload"]


# ------------------------------------------------------------------------------------------ errors


def test_error_types(client, directline_emulator):
    conversation = client.start_conversation(user_id="dl_sms5")
    with pytest.raises(BadRequest) as raised:
        client.post_activity(conversation.conversation_id, {"type": "message", "text": "no sender"})
    assert (raised.value.upstream_status, raised.value.upstream_code) == (400, "MissingProperty")

    with pytest.raises(AuthenticationFailed) as raised:
        make_client(directline_emulator, secret="wrong-secret").start_conversation()
    assert raised.value.upstream_status == 403

    with pytest.raises(AuthenticationFailed) as raised:
        make_client(directline_emulator, secret="").start_conversation()
    assert raised.value.upstream_status == 401

    directline_emulator.forget(conversation.conversation_id)
    with pytest.raises(ConversationNotFound) as raised:
        client.get_activities(conversation.conversation_id)
    assert raised.value.upstream_status == 404
    with pytest.raises(ConversationNotFound):
        client.reconnect(conversation.conversation_id)


def test_throttling_is_retried_honouring_retry_after(emulator):
    clock = ManualClock()
    client = make_client(emulator, clock=clock)
    conversation = client.start_conversation(user_id="dl_t1")
    emulator.set_faults(throttle_rate=1.0, retry_after="2", limit=2, endpoints=["activities/post"])
    activity_id = client.post_activity(conversation.conversation_id, message("hi", "dl_t1"))
    assert clock.sleeps == [2.0, 2.0]  # waited exactly what the service asked, twice
    assert [a["id"] for a in all_activities(client, conversation.conversation_id)].count(activity_id) == 1


def test_throttling_beyond_the_budget_is_raised_with_retry_after(emulator):
    clock = ManualClock()
    client = make_client(emulator, clock=clock, retry=RetryPolicy(budget=10, max_retry_after=30))
    conversation = client.start_conversation(user_id="dl_t2")
    emulator.set_faults(throttle_rate=1.0, retry_after="20", endpoints=["activities/get"])
    with pytest.raises(Throttled) as raised:
        client.get_activities(conversation.conversation_id)
    # no point waiting past the budget: the caller reschedules
    assert raised.value.retry_after == 20 and clock.sleeps == []

    emulator.set_faults(retry_after="86400")
    with pytest.raises(Throttled) as raised:
        client.get_activities(conversation.conversation_id)
    assert raised.value.retry_after == 30  # capped

    emulator.set_faults(retry_after="1")
    with pytest.raises(Throttled):
        client.get_activities(conversation.conversation_id)
    assert clock.sleeps == [1.0, 1.0, 1.0]  # every attempt used, then given up


def test_a_retry_after_date_is_counted_from_the_clients_clock(emulator):
    clock = ManualClock()
    client = make_client(emulator, clock=clock)
    conversation = client.start_conversation(user_id="dl_t8")
    in_three_seconds = email.utils.format_datetime(clock.now() + timedelta(seconds=3), usegmt=True)
    emulator.set_faults(throttle_rate=1.0, retry_after=in_three_seconds, limit=1, endpoints=["activities/get"])
    client.get_activities(conversation.conversation_id)
    assert clock.sleeps == [3.0]  # the date the service named, on the client's clock, not the machine's


def test_backoff_jitter_comes_from_the_clock_and_repeats_with_its_seed(emulator):
    conversation = make_client(emulator).start_conversation(user_id="dl_t9")

    def backoffs(seed: int) -> list[float]:
        clock = ManualClock(seed=seed)
        client = make_client(emulator, clock=clock, retry=RetryPolicy(attempts=4, backoff=0.5, backoff_cap=4))
        emulator.set_faults(error_500_rate=1.0, limit=None, endpoints=["activities/get"])
        with pytest.raises(TransientError):
            client.get_activities(conversation.conversation_id)
        emulator.clear_faults()
        return clock.sleeps

    first = backoffs(seed=1)
    assert len(first) == 3 and first == backoffs(seed=1) and first != backoffs(seed=2)
    assert all(0 <= pause <= min(4, 0.5 * 2 ** n) for n, pause in enumerate(first))


def test_server_errors_on_reads_are_retried_with_backoff(emulator):
    clock = ManualClock()
    client = make_client(emulator, clock=clock, retry=RetryPolicy(backoff=0.5, backoff_cap=4))
    conversation = client.start_conversation(user_id="dl_t3")
    client.post_activity(conversation.conversation_id, message("hi", "dl_t3"))
    emulator.set_faults(error_500_rate=1.0, limit=1, endpoints=["activities/get"])
    assert len(client.get_activities(conversation.conversation_id).activities) == 2
    emulator.set_faults(error_500_rate=0.0, error_502_rate=1.0, limit=1)
    assert len(client.get_activities(conversation.conversation_id).activities) == 2
    emulator.set_faults(error_502_rate=0.0, drop_rate=1.0, limit=1)
    assert len(client.get_activities(conversation.conversation_id).activities) == 2
    # first retry: jitter within the first step
    assert len(clock.sleeps) == 3 and all(0 <= s <= 0.5 for s in clock.sleeps)

    emulator.set_faults(drop_rate=0.0, error_500_rate=1.0, limit=None)
    with pytest.raises(TransientError) as raised:
        client.get_activities(conversation.conversation_id)
    assert not raised.value.ambiguous and raised.value.upstream_status == 500
    assert all(s <= 4 for s in clock.sleeps)


def test_502_after_a_post_is_not_reposted(emulator):
    client = make_client(emulator)
    conversation = client.start_conversation(user_id="dl_t4")
    emulator.set_faults(error_502_rate=1.0, limit=1, phase="after", endpoints=["activities/post"])
    with pytest.raises(BotFailed) as raised:
        client.post_activity(conversation.conversation_id, message("once", "dl_t4", client_id="SM-502"))
    assert raised.value.ambiguous and raised.value.upstream_status == 502
    # the activity did arrive; the client sent it once, and the ambiguity check finds it
    texts = [a["text"] for a in emulator.conversation(conversation.conversation_id)["activities"]
             if a["from"]["id"] == "dl_t4"]
    assert texts == ["once"]
    assert client.find_activity_by_client_id(conversation.conversation_id, "SM-502")["text"] == "once"

    emulator.set_faults(error_502_rate=0.0, error_500_rate=1.0, limit=1)  # a 500 after storing: as ambiguous
    with pytest.raises(TransientError) as raised:
        client.post_activity(conversation.conversation_id, message("twice?", "dl_t4"))
    assert raised.value.ambiguous and raised.value.upstream_status == 500
    texts = [a["text"] for a in emulator.conversation(conversation.conversation_id)["activities"]
             if a["from"]["id"] == "dl_t4"]
    assert texts == ["once", "twice?"]


def test_504_from_a_silent_bot_is_not_reposted(start_emulator):
    with socket.create_server(("127.0.0.1", free_port())) as silent_bot:  # accepts, never answers
        port = silent_bot.getsockname()[1]
        emulator = start_emulator(bot_url=f"http://127.0.0.1:{port}/api/messages",
                                  extra_args=("--bot-timeout", "0.5"))
        client = make_client(emulator)
        conversation = client.start_conversation(user_id="dl_t5")
        with pytest.raises(BotFailed) as raised:
            client.post_activity(conversation.conversation_id, message("slow", "dl_t5", client_id="SM-504"))
    assert raised.value.upstream_status == 504 and raised.value.ambiguous
    assert emulator.counters()["conversations"][conversation.conversation_id]["activities/post"] == 1
    assert client.find_activity_by_client_id(conversation.conversation_id, "SM-504") is not None


def test_read_timeout_or_dropped_connection_on_post_is_ambiguous(emulator):
    clock = ManualClock()
    patient = make_client(emulator, clock=clock)
    client = patient.with_options(timeout_seconds=0.3)  # same pool, the webhook's short deadline
    conversation = client.start_conversation(user_id="dl_t6")
    emulator.set_faults(latency_ms=1500, endpoints=["activities/post"])
    with pytest.raises(TransientError) as raised:
        client.post_activity(conversation.conversation_id, message("late", "dl_t6", client_id="SM-timeout"))
    assert raised.value.ambiguous and clock.sleeps == []
    emulator.clear_faults()
    # it did arrive after all: exactly why the caller must look before posting again
    wait_until(lambda: client.find_activity_by_client_id(conversation.conversation_id, "SM-timeout") is not None,
               timeout=10, what="the timed-out activity to be stored")

    emulator.set_faults(drop_rate=1.0, limit=1, endpoints=["activities/post"])
    with pytest.raises(TransientError) as raised:
        client.post_activity(conversation.conversation_id, message("dropped", "dl_t6"))
    assert raised.value.ambiguous and clock.sleeps == []
    assert emulator.counters()["conversations"][conversation.conversation_id]["activities/post"] == 2


def test_post_is_retried_when_it_surely_never_arrived(emulator):
    clock = ManualClock()
    client = make_client(emulator, clock=clock)
    conversation = client.start_conversation(user_id="dl_t7")
    emulator.set_faults(throttle_rate=1.0, retry_after="0", limit=1, endpoints=["activities/post"])
    client.post_activity(conversation.conversation_id, message("after 429", "dl_t7"))
    assert clock.sleeps == [0.0]

    nowhere = make_client(secret="s", endpoint=f"http://127.0.0.1:{free_port()}/v3/directline", clock=clock)
    with pytest.raises(TransientError) as raised:
        nowhere.post_activity("c1", message("x"))
    assert not raised.value.ambiguous  # connection refused: nothing was sent
    assert len(clock.sleeps) == 1 + 3  # and so it was tried again, up to the attempts


# ------------------------------------------------------------------------------------------ secrets


def test_secrets_and_tokens_stay_out_of_logs_errors_and_reprs(start_emulator, caplog):
    secret = "s3cr3t-" + uuid.uuid4().hex
    emulator = start_emulator(secret=secret)
    caplog.set_level(logging.DEBUG)
    client = make_client(emulator, clock=ManualClock())
    seen: list[str] = [repr(client)]

    granted = client.generate_token(user_id="dl_s1")
    conversation = client.start_conversation(user_id="dl_s2")
    seen += [repr(granted), str(granted), repr(conversation), repr(UploadFile("f", b"bytes"))]
    tokens = [granted.token, conversation.token, client.refresh_token(token=granted.token).token]
    emulator.set_faults(throttle_rate=1.0, limit=2)
    client.get_activities(conversation.conversation_id, token=conversation.token)
    emulator.clear_faults()
    emulator.expire_tokens(conversation.conversation_id)
    failures = [
        lambda: client.get_activities(conversation.conversation_id, token=conversation.token),
        lambda: client.refresh_token(token=conversation.token),
        lambda: make_client(emulator, secret=secret + "x").start_conversation(),
        lambda: client.get_activities(conversation.conversation_id, token=granted.token + "forged"),
    ]
    for fail in failures:
        with pytest.raises(DirectLineError) as raised:
            fail()
        seen += [str(raised.value), repr(raised.value), str(raised.value.__cause__ or ""), str(raised.value.args)]
    seen += [record.getMessage() for record in caplog.records]
    text = "\n".join(seen)
    assert caplog.records  # the retries were logged
    for value in (secret, *tokens, *(t[:20] for t in tokens)):
        assert value not in text


def test_an_agent_endpoint_that_refuses_is_agent_endpoint_refused_never_a_verdict_on_a_conversation():
    """A wrong DIRECTLINE_TOKEN_ENDPOINT (404 here) must not read as "Direct Line forgot the conversation"."""
    emulator = InProcessEmulator(secret="unused", copilot=True)
    wrong = f"{emulator.url}/powervirtualagents/bots/cr_agent/directline/token?api-version=2022-03-01-preview"
    client = DirectLineClient(DirectLineSettings(secret="", endpoint="", timeout_seconds=5, bot_ids=(),
                                                 token_endpoint=wrong),
                              retry=RetryPolicy(attempts=1), clock=ManualClock(), transport=emulator.transport)
    try:
        with pytest.raises(AgentEndpointRefused) as raised:
            client.start_conversation(user_id="dl_agent1")
        assert raised.value.upstream_status == 404 and not isinstance(raised.value, ConversationNotFound)
        assert client.endpoint == emulator.base_url  # the environment itself answers: discovery works
        with pytest.raises(ValueError, match="token endpoint mode"):
            client.get_activities("any")  # no token and no secret: a caller's mistake, never "Bearer "
    finally:
        client.close()
        emulator.close()
