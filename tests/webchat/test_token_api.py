"""The token server through the local host, with Azurite and the Direct Line emulator (echo bot)."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from azure.data.tables import TableServiceClient

from devstack.procs import wait_until
from relay.settings import SETTINGS
from relay.tokens import PAGE_TOKEN_REFRESH_AT
from tests.webchat.conftest import SHOP, Stack

EVIL = "https://evil.example"


def dl(stack: Stack, method: str, path: str, token: str, **options) -> requests.Response:
    """A call to Direct Line (the emulator) the way a page makes it, with the token it got."""
    headers = {"Authorization": f"Bearer {token}", **options.pop("headers", {})}
    return requests.request(method, f"{stack.emulator.base_url}{path}", headers=headers, timeout=10, **options)


def chat(stack: Stack, grant: dict, text: str) -> str:
    """Say `text` in the conversation as the page's user; the watermark after the bot's answer."""
    cid = grant["conversationId"]
    posted = dl(stack, "POST", f"/conversations/{cid}/activities", grant["token"],
                json={"type": "message", "from": {"id": grant.get("userId", "user")}, "text": text})
    assert posted.status_code == 200, posted.text
    page = dl(stack, "GET", f"/conversations/{cid}/activities", grant["token"]).json()
    assert page["activities"][-1]["text"] == f"You said: {text}"
    return page["watermark"]


def texts(activities: list[dict]) -> list[str]:
    return [a.get("text") for a in activities if a.get("type") == "message"]


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


# ------------------------------------------------------------------------------------------------ token


def test_token_starts_a_conversation_of_a_fresh_dl_user_with_a_resume_key(stack):
    first, second = stack.token(), stack.token()
    assert set(first) == {"token", "conversationId", "expires_in", "userId", "resumeKey", "domain"}
    assert first["domain"] == stack.emulator.base_url
    assert first["expires_in"] == 1800
    assert first["userId"].startswith("dl_") and len(first["userId"]) > 20
    assert len(first["resumeKey"]) >= 22  # 128 bits as URL-safe base64 at the very least
    assert first["conversationId"] != second["conversationId"]
    assert first["userId"] != second["userId"] and first["resumeKey"] != second["resumeKey"]

    # The page starts the conversation with its token; the user id bound in it is the one Direct Line uses.
    started = dl(stack, "POST", "/conversations", first["token"])
    assert started.status_code == 201 and started.json()["conversationId"] == first["conversationId"]
    posted = dl(stack, "POST", f"/conversations/{first['conversationId']}/activities", first["token"],
                json={"type": "message", "from": {"id": "someone-else"}, "text": "hi"})
    assert posted.status_code == 200
    activities = stack.emulator.conversation(first["conversationId"])["activities"]
    assert activities[0]["from"]["id"] == first["userId"]
    assert texts(activities) == ["hi", "You said: hi"]


def test_only_the_resume_keys_hash_is_stored(stack, storage_connection_string):
    grant = stack.token()
    service = TableServiceClient.from_connection_string(storage_connection_string)
    rows = list(service.get_table_client(f"{stack.table_prefix}webchatsessions").list_entities())
    row = next(r for r in rows if r["conversation_id"] == grant["conversationId"])
    assert row["resume_key_hash"] == hashlib.sha256(grant["resumeKey"].encode()).hexdigest()
    stored = " ".join(str(value) for r in rows for value in r.values())
    assert grant["resumeKey"] not in stored


def test_token_ignores_whatever_body_it_is_sent(stack):
    response = stack.post("token", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------------------------- refresh


def test_refresh_gives_a_new_token_for_the_same_conversation(stack):
    grant = stack.token()
    response = stack.refresh(grant["token"])
    assert response.status_code == 200, response.text
    fresh = response.json()
    assert set(fresh) == {"token", "conversationId", "expires_in"}
    assert fresh["conversationId"] == grant["conversationId"] and fresh["expires_in"] == 1800
    assert fresh["token"] != grant["token"]
    chat(stack, {**fresh, "userId": grant["userId"]}, "with the refreshed token")


def test_refresh_after_expiry_is_refused_with_token_expired(stack):
    grant = stack.token()
    stack.emulator.expire_tokens(grant["conversationId"])
    assert_error(stack.refresh(grant["token"]), 403, "TokenExpired")


def test_refresh_needs_a_bearer_token_direct_line_accepts(stack):
    assert_error(stack.post("refresh"), 401, "MissingToken")
    assert_error(stack.post("refresh", headers={"Authorization": "Basic abc"}), 401, "MissingToken")
    assert_error(stack.refresh("not-a-token"), 403, "InvalidToken")


def test_refresh_of_a_forgotten_conversation_says_start_over(stack):
    grant = stack.token()
    stack.emulator.forget(grant["conversationId"])
    assert_error(stack.refresh(grant["token"]), 404, "ConversationGone")


# ----------------------------------------------------------------------------------------------- resume


def test_resume_answers_a_fresh_token_of_the_same_conversation_and_user_and_rotates_the_key(stack):
    grant = stack.token()
    cid = grant["conversationId"]
    assert dl(stack, "POST", "/conversations", grant["token"]).ok
    chat(stack, grant, "first")
    stack.emulator.reset_counters()

    response = stack.resume(cid, grant["resumeKey"], watermark="7")  # older pages send one: ignored
    assert response.status_code == 200, response.text
    resumed = response.json()
    assert set(resumed) == {"token", "conversationId", "expires_in", "resumeKey", "userId", "domain"}
    assert resumed["conversationId"] == cid and resumed["userId"] == grant["userId"]
    assert resumed["token"] != grant["token"] and resumed["expires_in"] == 1800
    assert resumed["resumeKey"] != grant["resumeKey"] and len(resumed["resumeKey"]) >= 22
    assert resumed["domain"] == stack.emulator.base_url
    # The relay refreshed the token it holds; it never reconnected (with the secret or otherwise).
    assert stack.emulator.counters()["requests"].get("conversations/reconnect", 0) == 0
    history = dl(stack, "GET", f"/conversations/{cid}/activities", resumed["token"]).json()
    assert texts(history["activities"]) == ["first", "You said: first"]
    # The token carries the page's user: Direct Line takes it whatever the activity claims.
    posted = dl(stack, "POST", f"/conversations/{cid}/activities", resumed["token"],
                json={"type": "message", "from": {"id": "someone-else"}, "text": "second"})
    assert posted.status_code == 200, posted.text
    activities = stack.emulator.conversation(cid)["activities"]
    assert [a["from"]["id"] for a in activities if a.get("text") == "second"] == [grant["userId"]]

    again = stack.resume(cid, resumed["resumeKey"], watermark=7)  # the new key works, once more
    assert again.status_code == 200, again.text
    assert again.json()["conversationId"] == cid


def test_a_failed_direct_line_refresh_leaves_the_key_valid(stack):
    grant = stack.token()
    stack.emulator.set_faults(error_500_rate=1.0, endpoints=["tokens/refresh"])
    try:
        assert_error(stack.resume(grant["conversationId"], grant["resumeKey"]), 503, "DirectLineUnavailable")
    finally:
        stack.emulator.clear_faults()
    resumed = stack.resume(grant["conversationId"], grant["resumeKey"])
    assert resumed.status_code == 200, resumed.text


def test_a_wrong_key_is_refused_and_does_not_harm_the_session(stack):
    grant = stack.token()
    other = stack.token()
    assert_error(stack.resume(grant["conversationId"], other["resumeKey"]), 403, "InvalidResumeKey")
    assert_error(stack.resume(grant["conversationId"], "x" * 43), 403, "InvalidResumeKey")
    assert_error(stack.resume("NoSuchConversation", grant["resumeKey"]), 403, "InvalidResumeKey")
    assert stack.resume(grant["conversationId"], grant["resumeKey"]).status_code == 200


def test_a_rotated_key_presented_again_revokes_the_session(stack):
    grant = stack.token()
    cid = grant["conversationId"]
    owner = stack.resume(cid, grant["resumeKey"]).json()
    owner = stack.resume(cid, owner["resumeKey"]).json()  # the owner used its new key: the first is poison
    # Someone copied the first key and presents it now: the session is revoked for everyone.
    assert_error(stack.resume(cid, grant["resumeKey"]), 403, "ResumeKeyReused")
    assert_error(stack.resume(cid, owner["resumeKey"]), 403, "SessionRevoked")
    assert_error(stack.refresh(owner["token"]), 403, "SessionRevoked")


def test_a_resume_whose_answer_was_lost_is_retried_with_the_same_key(stack):
    grant = stack.token()
    cid = grant["conversationId"]
    chat(stack, grant, "before the network dropped")
    lost = stack.resume(cid, grant["resumeKey"])
    assert lost.status_code == 200  # the relay rotated the key, but the page never got this answer

    retried = stack.resume(cid, grant["resumeKey"])  # the page retries with what it holds
    assert retried.status_code == 200, retried.text
    resumed = retried.json()
    assert resumed["conversationId"] == cid and resumed["userId"] == grant["userId"]
    assert resumed["resumeKey"] not in (grant["resumeKey"], lost.json()["resumeKey"])
    chat(stack, {**resumed, "userId": grant["userId"]}, "after the retry")
    history = dl(stack, "GET", f"/conversations/{cid}/activities", resumed["token"]).json()
    assert texts(history["activities"]) == ["before the network dropped", "You said: before the network dropped",
                                            "after the retry", "You said: after the retry"]

    # The key it got works; once it was used, the first key is a copied key again.
    assert stack.resume(cid, resumed["resumeKey"]).status_code == 200
    assert_error(stack.resume(cid, grant["resumeKey"]), 403, "ResumeKeyReused")


def test_two_racing_resumes_with_one_key_both_succeed(stack):
    """A page's `online` and `visibilitychange` handlers (or two tabs) resuming at once."""
    grant = stack.token()
    cid = grant["conversationId"]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: stack.resume(cid, grant["resumeKey"]), range(2)))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    first, second = (a.json() for a in answers)
    assert first["resumeKey"] != second["resumeKey"]
    for resumed in (first, second):  # both tokens are good for the conversation
        assert dl(stack, "GET", f"/conversations/{cid}/activities", resumed["token"]).ok
    # Whichever answer the page kept, its key works.
    assert stack.resume(cid, second["resumeKey"]).status_code == 200


def test_a_conversation_direct_line_forgot_says_start_over(stack):
    grant = stack.token()
    cid = grant["conversationId"]
    stack.emulator.forget(cid)
    assert_error(stack.resume(cid, grant["resumeKey"]), 404, "ConversationGone")
    assert_error(stack.resume(cid, grant["resumeKey"]), 403, "SessionRevoked")


@pytest.mark.parametrize(("body", "code"), [
    (b"", "InvalidRequest"),
    (b"{not json", "InvalidJson"),
    (b"\xff\xfe", "InvalidJson"),
    (b"[]", "InvalidRequest"),
    (b'"text"', "InvalidRequest"),
    (b'{"conversationId": "c"}', "InvalidRequest"),
    (b'{"resumeKey": "k"}', "InvalidRequest"),
    (b'{"conversationId": 5, "resumeKey": "k"}', "InvalidRequest"),
    (b'{"conversationId": "c", "resumeKey": ["k"]}', "InvalidRequest"),
    (b'{"conversationId": "", "resumeKey": "k"}', "InvalidRequest"),
    (b'{"conversationId": "' + b"c" * 600 + b'", "resumeKey": "k"}', "InvalidRequest"),
])
def test_a_malformed_resume_request_is_400_saying_what_is_wrong(stack, body, code):
    assert_error(stack.post("resume", data=body, headers={"Content-Type": "application/json"}), 400, code)


def test_a_conversation_whose_every_token_expired_says_start_over(stack):
    """Direct Line out of reach for longer than a token lives: the token the relay holds lapsed too."""
    grant = stack.token()
    cid = grant["conversationId"]
    stack.emulator.expire_tokens(cid)  # every token issued so far, the page's and the relay's
    assert_error(stack.resume(cid, grant["resumeKey"]), 403, "SessionLapsed")
    stack.emulator.reset_counters()
    assert_error(stack.resume(cid, grant["resumeKey"]), 403, "SessionLapsed")
    assert stack.emulator.counters()["requests"].get("tokens/refresh", 0) == 0  # known now: not asked again


def session_row(stack: Stack, service: TableServiceClient, conversation_id: str) -> dict:
    table = service.get_table_client(f"{stack.table_prefix}webchatsessions")
    return next(r for r in table.query_entities("RowKey eq 'session'") if r["conversation_id"] == conversation_id)


def test_the_timer_refreshes_the_token_it_holds_once_the_pages_own_refresh_was_due(new_stack,
                                                                                   storage_connection_string):
    ttl = 20
    short = new_stack(token_ttl=ttl, env={"RELAY_POLL_SCHEDULE": "* * * * * *"})
    service = TableServiceClient.from_connection_string(storage_connection_string)
    grant = short.token()
    issued = time.monotonic()
    cid = grant["conversationId"]
    first = session_row(short, service, cid)
    assert first["token"] == grant["token"]  # the relay holds the page's first token

    wait_until(lambda: session_row(short, service, cid)["token"] != grant["token"], timeout=ttl, interval=0.2,
               what="the held token's refresh")
    elapsed = time.monotonic() - issued
    second = session_row(short, service, cid)
    # The page has this token too and would have refreshed it by now (ticks every second).
    early, late = PAGE_TOKEN_REFRESH_AT
    assert ttl * early - 1 <= elapsed <= ttl * late + 3, elapsed
    assert second["token_expires_at"] > first["token_expires_at"]
    assert dl(short, "GET", f"/conversations/{cid}/activities", second["token"]).ok
    assert second["token"] not in short.log_text()


@pytest.mark.parametrize("enhanced_auth", [True, False], ids=["enhanced-auth", "no-enhanced-auth"])
def test_resume_after_the_pages_token_expired_gets_its_conversation_and_user_back(new_stack, enhanced_auth):
    short = new_stack(token_ttl=6, enhanced_auth=enhanced_auth, env={"RELAY_POLL_SCHEDULE": "* * * * * *"})
    grant = short.token()
    cid = grant["conversationId"]
    chat(short, grant, "hello")
    wait_until(lambda: short.refresh(grant["token"]).status_code == 403, timeout=15, interval=0.25,
               what="the page's token to expire")
    assert_error(short.refresh(grant["token"]), 403, "TokenExpired")

    response = short.resume(cid, grant["resumeKey"])
    assert response.status_code == 200, response.text
    resumed = response.json()
    assert resumed["conversationId"] == cid and resumed["userId"] == grant["userId"]
    history = dl(short, "GET", f"/conversations/{cid}/activities", resumed["token"]).json()
    assert texts(history["activities"]) == ["hello", "You said: hello"]
    # The page posts as its user, as relay-webchat.js does (without enhanced authentication from.id is taken as
    # sent); under enhanced authentication the token's user wins whatever the activity says.
    sender = "someone-else" if enhanced_auth else resumed["userId"]
    posted = dl(short, "POST", f"/conversations/{cid}/activities", resumed["token"],
                json={"type": "message", "from": {"id": sender}, "text": "back again"})
    assert posted.status_code == 200, posted.text
    activities = short.emulator.conversation(cid)["activities"]
    assert [a["from"]["id"] for a in activities if a.get("text") == "back again"] == [grant["userId"]]
    assert short.emulator.counters()["requests"].get("conversations/reconnect", 0) == 0


# ------------------------------------------------------------------------------------------------- CORS


@pytest.mark.parametrize("path", ["token", "refresh", "resume"])
def test_preflight_is_answered_for_allowed_origins_only(stack, path):
    url = f"{stack.url}/api/directline/{path}"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = requests.options(url, headers={"Origin": SHOP, **preflight}, timeout=10)
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == SHOP
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in allowed.headers["Access-Control-Allow-Headers"].split(",")}
    refused = requests.options(url, headers={"Origin": EVIL, **preflight}, timeout=10)
    assert refused.status_code == 403
    assert not any(h.lower().startswith("access-control-") for h in refused.headers)


def test_cors_headers_go_to_allowed_origins_and_the_apps_own_pages_only(stack):
    allowed = stack.post("token", headers={"Origin": SHOP})
    assert allowed.status_code == 200 and allowed.headers["Access-Control-Allow-Origin"] == SHOP
    assert "Origin" in allowed.headers["Vary"]

    own = stack.post("token", headers={"Origin": stack.url})  # the demo page, served by the app itself
    assert own.status_code == 200 and own.headers["Access-Control-Allow-Origin"] == stack.url

    no_origin = stack.post("token")  # not a browser: no CORS involved
    assert no_origin.status_code == 200 and "Access-Control-Allow-Origin" not in no_origin.headers

    for path in ("token", "refresh", "resume"):
        refused = stack.post(path, headers={"Origin": EVIL, "Authorization": "Bearer x"})
        assert_error(refused, 403, "OriginNotAllowed")
        assert "Access-Control-Allow-Origin" not in refused.headers

    error = stack.post("resume", data=b"{", headers={"Origin": SHOP})  # errors reach allowed pages too
    assert error.status_code == 400 and error.headers["Access-Control-Allow-Origin"] == SHOP


# ------------------------------------------------------------------------------------------- rate limit


def test_token_issuance_is_rate_limited_per_client_address_across_instances(new_stack):
    first = new_stack(env={"WEBCHAT_TOKEN_RATE_LIMIT": "3"})
    client = {"X-Forwarded-For": "198.51.100.7:50123"}
    for _ in range(3):
        assert first.post("token", headers=client).status_code == 200
    limited = first.post("token", headers=client)
    assert_error(limited, 429, "TooManyRequests")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # What a client claims before the platform's own entry does not make it someone else.
    assert first.post("token", headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7:4000"}).status_code == 429
    assert first.post("token", headers={"X-Forwarded-For": "198.51.100.8:50123"}).status_code == 200
    assert first.post("token", headers={"X-Forwarded-For": "[2001:db8::5]:443"}).status_code == 200

    # A second instance on the same storage counts the same window.
    second = new_stack(env={"WEBCHAT_TOKEN_RATE_LIMIT": "3", "RELAY_TABLE_PREFIX": first.table_prefix})
    assert_error(second.post("token", headers=client), 429, "TooManyRequests")
    # Refresh and resume are not limited: they need a token or a key.
    grant = second.token(**{"X-Forwarded-For": "198.51.100.9"})
    for _ in range(4):
        assert second.refresh(grant["token"]).status_code == 200


# -------------------------------------------------------------------------------------- static files


def test_the_script_demo_and_bundle_are_served(stack):
    script = requests.get(f"{stack.url}/api/webchat/relay-webchat.js", timeout=10)
    assert script.status_code == 200 and "RelayWebChat" in script.text
    assert script.headers["Content-Type"].startswith("application/javascript")
    demo = requests.get(f"{stack.url}/api/webchat/demo", timeout=10)
    assert demo.status_code == 200 and demo.headers["Content-Type"].startswith("text/html")
    assert 'src="webchat.js"' in demo.text and 'src="relay-webchat.js"' in demo.text
    bundle = requests.get(f"{stack.url}/api/webchat/webchat.js", timeout=30)
    assert bundle.status_code == 200 and len(bundle.content) > 1_000_000
    assert_error(requests.get(f"{stack.url}/api/webchat/secrets.txt", timeout=10), 404, "NotFound")


def test_a_deployed_demo_loads_web_chat_from_the_configured_url(new_stack, packaged_app):
    """Azure gets no node_modules: the page's webchat.js is a redirect to WEBCHAT_BUNDLE_URL."""
    assert not (packaged_app / "node_modules").exists()
    bundle_url = "https://cdn.example/botframework-webchat/4.18.1/webchat.js"
    deployed = new_stack(app=packaged_app, env={"WEBCHAT_DEMO_ENABLED": "true", "WEBCHAT_BUNDLE_URL": bundle_url})
    demo = requests.get(f"{deployed.url}/api/webchat/demo", timeout=10)
    assert demo.status_code == 200 and 'src="webchat.js"' in demo.text
    bundle = requests.get(f"{deployed.url}/api/webchat/webchat.js", timeout=10, allow_redirects=False)
    assert bundle.status_code == 302 and bundle.headers["Location"] == bundle_url
    assert requests.get(f"{deployed.url}/api/webchat/relay-webchat.js", timeout=10).status_code == 200
    # Unset, the demo uses Microsoft's bundle of the version the local demo is tested with.
    default = new_stack(app=packaged_app, env={"WEBCHAT_DEMO_ENABLED": "true"})
    bundle = requests.get(f"{default.url}/api/webchat/webchat.js", timeout=10, allow_redirects=False)
    assert bundle.headers["Location"] == SETTINGS["WEBCHAT_BUNDLE_URL"].default
    assert bundle.headers["Location"].startswith("https://cdn.botframework.com/botframework-webchat/")


def test_the_demo_is_off_unless_enabled(new_stack):
    off = new_stack()
    for name in ("demo", "webchat.js"):
        assert_error(requests.get(f"{off.url}/api/webchat/{name}", timeout=10), 404, "DemoDisabled")
    assert requests.get(f"{off.url}/api/webchat/relay-webchat.js", timeout=10).status_code == 200


# --------------------------------------------------------------------------------------------- secrets


def test_no_secret_token_or_key_in_any_answer_or_log_line(stack):
    """Runs last in this module: checks what every test above made the app answer and log (at DEBUG)."""
    grant = stack.token(Origin=SHOP)
    refreshed = stack.refresh(grant["token"]).json()
    resumed = stack.resume(grant["conversationId"], grant["resumeKey"]).json()
    retried = stack.resume(grant["conversationId"], grant["resumeKey"]).json()  # within the grace period
    again = stack.resume(grant["conversationId"], retried["resumeKey"]).json()
    stack.resume(grant["conversationId"], grant["resumeKey"])  # reused: revokes, logs a warning
    stack.refresh("not-a-token")

    secret = stack.emulator.secret
    assert all(secret not in answer.text for answer in stack.answers)
    log = stack.log_text()
    assert "Executed 'Functions.directline_resume'" in log
    for value in (secret, grant["token"], refreshed["token"], resumed["token"], grant["resumeKey"],
                  resumed["resumeKey"], retried["token"], retried["resumeKey"], again["resumeKey"], "not-a-token"):
        assert value not in log
    # Every token the emulator handed out, and every key, across all tests of the module.
    issued = [a.json() for a in stack.answers if a.ok and a.headers.get("Content-Type", "").startswith("app")]
    for body in issued:
        for name in ("token", "resumeKey"):
            if body.get(name):
                assert body[name] not in log, name
