"""Hostile input against every HTTP function through the local host, property-based (hypothesis).

Whatever arrives (random, truncated or invalid UTF-8 bodies, deep or huge JSON, wrong content
types, missing, garbage or repeated headers, odd route values; signed or not: escaped lone
surrogates, 400-digit numbers and numeric strings, lists and objects where strings belong, JWT
headers and timestamps of any shape, forms of too many fields), the answer comes, is never a 500,
and every refusal is the JSON error shape with a status that says whose mistake it was.
Fixed seed (derandomize) and a bounded number of examples, so CI runs the same cases every time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import itertools
import json
import string
import uuid
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.channels import DEV_VALUES, webhooks
from devstack.procs import wait_until
from relay.channels import bird, generic, messagebird, vonage
from relay.store.conversations import ConversationKey
from tests.security.conftest import ALLOWED_ORIGIN, PROVIDERS, sign

HOSTILE = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CLIENTS = itertools.count()
CONTENT_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain", "text/xml",
                 "multipart/form-data; boundary=xyz", "application/json; charset=utf-16", "", "*/*",
                 "application/octet-stream"]

LONE_SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\ude00b"])  # json.dumps writes "\\ud800"
HUGE_NUMBERS = st.integers(300, 500).map(lambda digits: "9" * digits)
hostile_scalars = (st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**400)
                   | st.floats(allow_nan=False) | st.text(max_size=20) | LONE_SURROGATES | HUGE_NUMBERS)
json_values = st.recursive(
    hostile_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def shaped_like(provider: str):
    """JSON that looks a little like the provider's payload: the right keys with the wrong kinds of values."""
    keys = {"whatsapp": ["object", "entry", "changes", "value", "messages", "contacts", "from", "id", "text",
                         "type", "body", "statuses"],
            "bird": ["service", "event", "payload", "id", "sender", "contact", "identifierValue", "body", "type",
                     "text", "direction"],
            "messagebird": ["type", "contact", "conversation", "message", "id", "content", "text", "from",
                            "direction", "msisdn"],
            "generic": ["type", "id", "user", "text", "media", "messages", "url", "locale", "name"],
            "twilio": ["From", "Body", "MessageSid", "NumMedia", "MediaUrl0", "To"],
            "vonage": ["channel", "message_uuid", "to", "from", "message_type", "text", "image", "url", "reply",
                       "id", "title", "profile", "name", "status"],
            "line": ["destination", "events", "type", "webhookEventId", "replyToken", "source", "userId", "message",
                     "postback", "data", "text", "timestamp", "deliveryContext", "isRedelivery", "mode"],
            "telegram": ["update_id", "message", "callback_query", "chat", "from", "id", "text", "photo", "file_id",
                         "caption", "date", "data", "document", "reply_markup", "inline_keyboard"]}[provider]
    return st.recursive(
        hostile_scalars | st.sampled_from(keys),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(keys), children,
                                                                           max_size=5),
        max_leaves=25,
    ).map(lambda value: json.dumps(value).encode())


def hostile_bodies(genuine: bytes = b""):
    return st.one_of(
        st.binary(max_size=512),
        st.integers(0, max(0, len(genuine) - 1)).map(lambda n: genuine[:n]),  # truncated
        st.binary(min_size=1, max_size=32).map(lambda b: b'{"text": "\xff\xfe' + b + b'\xc3\x28"}'),  # bad UTF-8
        st.integers(50, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),  # deep
        st.integers(50, 100_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
        st.just(b'{"text":"' + b"x" * 1_100_000 + b'"}'),  # over RELAY_MAX_BODY_BYTES
        json_values.map(lambda value: json.dumps(value).encode()),
    )


def assert_json_error(response, allowed: set[int]) -> None:
    """The refusal a client can act on: an expected status and {"error": {"code", "message"}}."""
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unsigned_or_wrongly_signed_webhooks_are_refused_cleanly(exposed_relay, provider):
    genuine = exposed_relay.webhook(provider, "+15550300001", "genuine")
    signature_headers = [k for k in genuine.headers if k.lower() not in ("content-type", "user-agent")]

    @HOSTILE
    @given(body=hostile_bodies(genuine.body), content_type=st.sampled_from(CONTENT_TYPES),
           keep=st.lists(st.sampled_from(signature_headers), unique=True),
           garbage=st.text(string.printable.strip(), max_size=80))
    def check(body, content_type, keep, garbage):
        headers = {"Content-Type": content_type} if content_type else {}
        # Real signature headers (which sign the genuine body, not this one) or garbage in their place.
        headers |= {name: genuine.headers[name] if name in keep else garbage for name in signature_headers
                    if name in keep or garbage}
        response = exposed_relay.request("POST", f"/api/channels/{provider}", data=body, headers=headers)
        assert_json_error(response, {400, 401, 413})

    check()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_signed_garbage_is_a_bad_payload_never_a_crash(exposed_relay, provider):
    """Someone holding the key (or a provider's bug) sends validly signed nonsense: 400, or 200 for nothing."""
    url = f"{exposed_relay.public_url}/api/channels/{provider}"
    if provider == "twilio":
        sids = st.sampled_from(["SM" + "0" * 32, "MM" + "f" * 32, "SM" + "0" * 32 + "NumMedia0"])
        values = st.text(max_size=20) | sids | HUGE_NUMBERS | st.sampled_from(["100000000", "-1", "1e9"])
        bodies = st.dictionaries(st.sampled_from(["From", "Body", "MessageSid", "NumMedia", "MediaUrl0", "To",
                                                  "MediaContentType0", "AccountSid", "SmsSid"]),
                                 values, max_size=7).map(
            lambda form: "&".join(f"{quote(k)}={quote(v)}" for k, v in form.items()).encode())
    else:
        bodies = st.one_of(shaped_like(provider), hostile_bodies())

    @HOSTILE
    @given(body=bodies)
    def check(body):
        content_type = "application/x-www-form-urlencoded" if provider == "twilio" else "application/json"
        headers = {"Content-Type": content_type, **sign(provider, body, url)}
        response = exposed_relay.request("POST", f"/api/channels/{provider}", data=body, headers=headers)
        if response.status_code != 200:
            assert_json_error(response, {400, 413})

    check()


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"),
                      max_size=30).map(str.strip)
timestamps = st.one_of(HUGE_NUMBERS, st.integers(-10**20, 10**20).map(str), st.floats().map(str), header_text)


@pytest.mark.parametrize("provider", ["bird", "messagebird", "generic"])
def test_a_signed_timestamp_of_any_shape_is_refused_never_a_500(exposed_relay, provider):
    """The key holder signs whatever timestamp it likes (a 400-digit one once crashed all three): 401."""
    url = f"{exposed_relay.public_url}/api/channels/{provider}"
    body = b"{}"

    @HOSTILE
    @given(stamp=timestamps)
    def check(stamp):
        if provider == "bird":
            signature = bird.compute_signature(DEV_VALUES["BIRD_SIGNING_KEY"], stamp, url, body)
            headers = {"messagebird-request-timestamp": stamp, "messagebird-signature": signature}
        elif provider == "messagebird":  # the legacy scheme: the JWT one has no timestamp header
            signature = messagebird.compute_legacy_signature(DEV_VALUES["MESSAGEBIRD_SIGNING_KEY"], stamp, "", body)
            headers = {"MessageBird-Request-Timestamp": stamp, "MessageBird-Signature": signature}
        else:
            key = generic.secret_key(DEV_VALUES["GENERIC_WEBHOOK_SECRET"])
            headers = {"webhook-id": "msg_1", "webhook-timestamp": stamp,
                       "webhook-signature": generic.standard_signature(key, "msg_1", stamp, body)}
        response = exposed_relay.request("POST", f"/api/channels/{provider}", data=body,
                                         headers={"Content-Type": "application/json", **headers})
        assert_json_error(response, {400, 401})  # 400 only if the stamp happened to be a time inside the window

    check()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


not_strings = st.lists(json_values, max_size=3) | st.dictionaries(st.text(max_size=5), json_values, max_size=3) \
    | st.integers() | st.booleans() | st.none()


@HOSTILE
@given(header=st.fixed_dictionaries({"alg": not_strings | st.just("HS256") | LONE_SURROGATES},
                                    optional={"typ": json_values, "kid": json_values}),
       claims=st.dictionaries(st.sampled_from(["iss", "exp", "nbf", "iat", "url_hash", "payload_hash"]),
                              json_values, max_size=6))
def test_a_messagebird_jwt_of_any_shape_signed_with_the_key_is_refused_never_a_500(exposed_relay, header, claims):
    """`alg` as a list or an object once crashed the verifier: any header or claims of the wrong kind is a 401."""
    parts = [b64url(json.dumps(part).encode()) for part in (header, claims)]
    key = DEV_VALUES["MESSAGEBIRD_SIGNING_KEY"].encode()
    token = ".".join([*parts, b64url(hmac.new(key, ".".join(parts).encode(), hashlib.sha256).digest())])
    response = exposed_relay.request("POST", "/api/channels/messagebird", data=b"{}",
                                     headers={"Content-Type": "application/json", "MessageBird-Signature-JWT": token})
    assert_json_error(response, {401})


@HOSTILE
@given(header=st.fixed_dictionaries({"alg": not_strings | st.just("HS256") | LONE_SURROGATES},
                                    optional={"typ": json_values}),
       claims=st.dictionaries(st.sampled_from(["iat", "exp", "jti", "payload_hash", "application_id", "api_key"]),
                              json_values, max_size=6))
def test_a_vonage_jwt_of_any_shape_signed_with_the_secret_is_refused_never_a_500(exposed_relay, header, claims):
    """A Bearer JWT signed with the signature secret but with claims of the wrong kind (or none) is a 401."""
    parts = [b64url(json.dumps(part).encode()) for part in (header, claims)]
    key = DEV_VALUES["VONAGE_SIGNATURE_SECRET"].encode()
    token = ".".join([*parts, b64url(hmac.new(key, ".".join(parts).encode(), hashlib.sha256).digest())])
    response = exposed_relay.request("POST", "/api/channels/vonage", data=b"{}",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert_json_error(response, {401})


def test_a_form_of_too_many_fields_is_refused_with_413_signed_or_not(exposed_relay):
    url = f"{exposed_relay.public_url}/api/channels/twilio"
    huge = b"&".join(b"a%d=" % n for n in range(160_000))[:1_000_000]
    signed_form = "&".join(f"F{n}=x" for n in range(1000)).encode()
    for body, headers in ((huge, {"X-Twilio-Signature": "forged"}), (signed_form, sign("twilio", signed_form, url))):
        response = exposed_relay.request("POST", "/api/channels/twilio", data=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", **headers})
        assert_json_error(response, {413})
        assert "fields" in response.json()["error"]["message"]


def test_signed_lone_surrogates_reach_the_bot_as_replacement_characters(exposed_relay):
    """"\\ud800" is valid JSON that UTF-8 (so storage and Direct Line) cannot carry: U+FFFD instead, never a 500."""
    url = f"{exposed_relay.public_url}/api/channels/generic"
    body = b'{"id": "m-\\ud800-' + uuid.uuid4().hex.encode() + b'", "user": {"id": "+1555031\\udfff",' \
        b' "name": "Zo\\ud83d"}, "text": "cut \\ud83d here"}'
    response = exposed_relay.request("POST", "/api/channels/generic", data=body,
                                     headers={"Content-Type": "application/json", **sign("generic", body, url)})
    assert response.status_code == 200, response.text
    key = ConversationKey("generic", "+1555031\ufffd")

    def posted() -> bool:
        record = exposed_relay.store.conversations.get_record(key)
        return bool(record and record.conversation_id) and not exposed_relay.store.outbox.list_messages(key)

    wait_until(posted, timeout=20, what="the message to be posted")
    conversation = exposed_relay.store.conversations.get_record(key).conversation_id
    texts = [a.get("text") for a in exposed_relay.emulator.conversation(conversation)["activities"]
             if a.get("type") == "message" and a["from"].get("role") != "bot"]
    assert texts == ["cut \ufffd here"]


@HOSTILE
@given(name=st.text(min_size=1, max_size=300), method=st.sampled_from(["GET", "POST"]))
def test_odd_channel_names_are_404(exposed_relay, name, method):
    response = exposed_relay.request(method, "/api/channels/" + quote(name, safe=""), data=b"{}")
    if name in PROVIDERS:
        assert response.status_code in (400, 401, 403, 405)
    else:
        assert_json_error(response, {404})


@HOSTILE
@given(name=st.text(min_size=1, max_size=300))
def test_odd_webchat_file_names_are_404(exposed_relay, name):
    response = exposed_relay.request("GET", "/api/webchat/" + quote(name, safe=""))
    if name == "relay-webchat.js":
        assert response.status_code == 200
    else:
        assert_json_error(response, {404})


@HOSTILE
@given(authorization=st.one_of(st.none(), st.text(string.printable.strip(), max_size=200),
                               st.text(string.ascii_letters + string.digits + "-_.", max_size=400).map(
                                   lambda t: "Bearer " + t)),
       body=hostile_bodies())
def test_refresh_with_anything_but_a_token_is_refused(exposed_relay, authorization, body):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = exposed_relay.request("POST", "/api/directline/refresh", data=body, headers=headers)
    assert_json_error(response, {401, 403, 413})


resume_bodies = st.one_of(
    hostile_bodies(),
    st.fixed_dictionaries({}, optional={"conversationId": json_values | st.text(max_size=600),
                                        "resumeKey": json_values | st.text(max_size=600),
                                        "watermark": json_values}).map(lambda d: json.dumps(d).encode()),
)


@HOSTILE
@given(body=resume_bodies, content_type=st.sampled_from(CONTENT_TYPES))
def test_resume_with_a_wrong_body_or_key_is_refused(exposed_relay, body, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    n = next(CLIENTS)
    headers["X-Forwarded-For"] = f"198.18.{n // 250}.{n % 250 + 1}"  # a client each: the rate limit is tested apart
    response = exposed_relay.request("POST", "/api/directline/resume", data=body, headers=headers)
    assert_json_error(response, {400, 403, 413})


@HOSTILE
@given(origin=st.text(string.printable.strip(), min_size=1, max_size=100), method=st.sampled_from(["POST", "OPTIONS"]),
       endpoint=st.sampled_from(["token", "refresh", "resume"]))
def test_token_endpoints_refuse_unknown_origins(exposed_relay, origin, method, endpoint):
    response = exposed_relay.request(method, f"/api/directline/{endpoint}", headers={"Origin": origin})
    if origin == ALLOWED_ORIGIN:
        return
    assert "Access-Control-Allow-Origin" not in response.headers
    assert_json_error(response, {403})


def test_token_issuance_answers_json_whatever_the_body(exposed_relay):
    """The token endpoint reads no body: small junk gets a token, a body over 4 KB a 413 before anything
    else (and without counting against the address's rate limit)."""
    client = {"X-Forwarded-For": "203.0.113.99"}
    for body in (b"\xff\xfe", b'{"user": {"id": "admin"}}'):
        response = exposed_relay.request("POST", "/api/directline/token", data=body, headers=client)
        assert response.status_code == 200, response.text
        assert response.json()["userId"].startswith("dl_") and response.json()["userId"] != "admin"
    for body in (b"[" * 50_000, b"x" * 1_100_000):
        response = exposed_relay.request("POST", "/api/directline/token", data=body, headers=client)
        assert_json_error(response, {413})
    assert exposed_relay.request("POST", "/api/directline/token", headers=client).status_code == 200


@HOSTILE
@given(query=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
def test_health_and_unknown_methods(exposed_relay, query, method):
    response = exposed_relay.request(method, "/api/health", params=query)
    if method == "GET":
        assert response.status_code == 200 and response.json()["status"] == "healthy"
    else:
        assert_json_error(response, {405})


@pytest.mark.parametrize("provider", PROVIDERS)
def test_repeated_and_missing_headers(exposed_relay, provider):
    """A signature header sent twice (genuine and forged) or not at all never gets a message through."""
    genuine = exposed_relay.webhook(provider, "+15550300002", "twice")
    host, port = exposed_relay.url.removeprefix("http://").split(":")
    signature_names = [k for k in genuine.headers if k.lower() not in ("content-type", "user-agent")]
    for forged_first in (True, False):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.putrequest("POST", f"/api/channels/{provider}")
        for name, value in genuine.headers.items():
            if name in signature_names and forged_first:
                connection.putheader(name, "forged")
            connection.putheader(name, value)
            if name in signature_names and not forged_first:
                connection.putheader(name, "forged")
        connection.putheader("Content-Length", str(len(genuine.body)))
        connection.endheaders(genuine.body)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        assert response.status in (200, 400, 401), payload
        if response.status != 200:
            assert json.loads(payload)["error"]["code"]
    missing = exposed_relay.request("POST", f"/api/channels/{provider}", data=genuine.body,
                                    headers={"Content-Type": genuine.headers.get("Content-Type", "")})
    assert_json_error(missing, {401})


def resigned(exposed_relay, provider: str, sender: str, change) -> object:
    """A genuine webhook from `sender` whose JSON body `change` alters, signed again as the key holder can."""
    hook = exposed_relay.webhook(provider, sender, "hi")
    body = json.loads(hook.body)
    change(body)
    raw = json.dumps(body).encode()
    headers = {key: value for key, value in hook.headers.items() if key.lower() != "authorization"}
    return exposed_relay.request("POST", hook.url.removeprefix(exposed_relay.public_url), data=raw,
                                 headers={**headers, **sign(provider, raw, hook.url)})


LONG_ID = "7" * 70_000
"""An id storage cannot keep in one property (PROPERTY_VALUE_TOO_LARGE): refused for good, or retried forever."""


@pytest.mark.parametrize(("provider", "sender", "where"), [
    ("vonage", "447700900301", ("message_uuid",)),
    ("vonage", "447700900302", ("from",)),
    ("line", webhooks.line_user("long-id-1"), ("events", 0, "source", "userId")),
    ("line", webhooks.line_user("long-id-2"), ("events", 0, "webhookEventId")),
    ("telegram", "5550303", ("message", "chat", "id")),
    ("generic", "+15550304", ("user", "id")),
])
def test_a_signed_id_too_long_to_store_is_a_bad_payload_never_a_503(exposed_relay, provider, sender, where):
    """A 503 here would be forever: the provider retries it, and on LINE holds back the rest of the batch."""
    def change(body):
        *path, last = where
        for step in path:
            body = body[step]
        body[last] = LONG_ID

    response = resigned(exposed_relay, provider, sender, change)
    assert_json_error(response, {400})
    assert "4096" in response.json()["error"]["message"]


def test_a_signed_400_digit_time_is_refused_never_a_500(exposed_relay):
    """10**400 cannot be compared with a clock (as a float it overflows): Vonage's iat, LINE's timestamp."""
    body = json.loads(exposed_relay.webhook("vonage", "447700900305", "hi").body)
    raw = json.dumps(body).encode()
    claims = {"iat": 10**400, "jti": str(uuid.uuid4()), "payload_hash": hashlib.sha256(raw).hexdigest(),
              "application_id": DEV_VALUES["VONAGE_APPLICATION_ID"]}
    token = vonage.signed_webhook_jwt(claims, DEV_VALUES["VONAGE_SIGNATURE_SECRET"])
    response = exposed_relay.request("POST", "/api/channels/vonage", data=raw,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert_json_error(response, {401})

    def huge_timestamp(body):
        body["events"][0]["timestamp"] = 10**400

    assert_json_error(resigned(exposed_relay, "line", webhooks.line_user("huge-time"), huge_timestamp), {400})


def test_a_telegram_message_dated_10_to_the_400_is_relayed_as_one_without_a_date(exposed_relay):
    """Telegram's date only tells a replay too old to dedupe: one that is no time is judged new, never a 500."""
    def huge_date(body):
        body["message"]["date"] = 10**400

    response = resigned(exposed_relay, "telegram", "5550306", huge_date)
    assert response.status_code == 200, response.text[:300]
