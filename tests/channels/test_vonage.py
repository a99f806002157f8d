"""Vonage Messages API: signed webhooks checked against Vonage's own verifier (vonage-jwt), the four channels
parsed from the simulator's webhooks, replies and media through the simulator's API, and the settings."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from vonage_jwt import JwtClient, verify_signature

from devstack.channels import DEV_VALUES, webhooks
from devstack.procs import free_port
from relay.channels.base import Choice, Media, OutboundMessage, WebhookRequest
from relay.channels.vonage import channel_user
from relay.errors import BadPayload, ProviderRejected, SettingsError, SignatureInvalid, StaleTimestamp
from tests.channels.conftest import make_adapter

SECRET = DEV_VALUES["VONAGE_SIGNATURE_SECRET"]
RELAY = "https://relay.example.net"
PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


def webhook(sender: str = "whatsapp:447700900001", text: str = "hi", **options) -> WebhookRequest:
    hook = webhooks.build("vonage", DEV_VALUES, RELAY, sender=sender, text=text, **options)
    return WebhookRequest("POST", hook.url, hook.headers, hook.body)


def minted(body: bytes, *, secret: str = SECRET, **claims) -> WebhookRequest:
    """A webhook whose JWT PyJWT signs as Vonage does: HS256 with the signature secret over Vonage's claims."""
    token = jwt.encode({"iat": int(time.time()), "jti": str(uuid.uuid4()), "iss": "Vonage",
                        "payload_hash": hashlib.sha256(body).hexdigest(), "api_key": "abcd1234",
                        "application_id": DEV_VALUES["VONAGE_APPLICATION_ID"], **claims}, secret, algorithm="HS256")
    return WebhookRequest("POST", f"{RELAY}/api/channels/vonage", {"Authorization": f"Bearer {token}"}, body)


def application_auth() -> dict[str, str]:
    """The Authorization of a Messages API call, made by Vonage's own JwtClient."""
    client = JwtClient(DEV_VALUES["VONAGE_APPLICATION_ID"], DEV_VALUES["VONAGE_PRIVATE_KEY"])
    return {"Authorization": f"Bearer {client.generate_application_jwt().decode()}"}


def token_of(request: WebhookRequest) -> str:
    return str(request.header("Authorization")).removeprefix("Bearer ")


def test_the_simulators_signed_webhook_passes_vonages_verifier_and_ours():
    request = webhook()
    assert verify_signature(token_of(request), SECRET)
    make_adapter("vonage").verify(request)


def test_a_webhook_signed_by_pyjwt_as_vonage_signs_is_accepted():
    body = json.dumps({"channel": "sms", "message_uuid": str(uuid.uuid4()), "to": "447700900000",
                       "from": "447700900001", "message_type": "text", "text": "hi"}).encode()
    make_adapter("vonage").verify(minted(body))


def test_a_jwt_signed_with_another_secret_is_refused_as_vonages_verifier_refuses_it():
    request = minted(b"{}", secret="not-the-accounts-signature-secret")
    assert not verify_signature(token_of(request), SECRET)
    with pytest.raises(SignatureInvalid, match="VONAGE_SIGNATURE_SECRET"):
        make_adapter("vonage").verify(request)


def test_a_changed_body_is_refused_though_the_jwt_itself_verifies():
    request = webhook(text="pay 10")
    tampered = WebhookRequest("POST", request.url, request.headers, request.body.replace(b"pay 10", b"pay 99"))
    assert verify_signature(token_of(tampered), SECRET)  # the token alone does not cover the body
    with pytest.raises(SignatureInvalid, match="payload_hash"):
        make_adapter("vonage").verify(tampered)


@pytest.mark.parametrize("age", [-400, 400])
def test_a_jwt_issued_outside_the_replay_window_is_stale(age):
    request = minted(b"{}", iat=int(time.time()) - age)
    with pytest.raises(StaleTimestamp):
        make_adapter("vonage", window_seconds=300).verify(request)


def test_a_replayed_webhook_is_refused_once_its_iat_left_the_window():
    request = webhook(now=time.time() - 301)
    with pytest.raises(StaleTimestamp):
        make_adapter("vonage", window_seconds=300).verify(request)


@pytest.mark.parametrize("claims", [{"iat": None}, {"iat": "now"}, {"payload_hash": None},
                                    {"application_id": "another-application"}, {"application_id": None}])
def test_a_jwt_without_its_claims_or_for_another_application_is_refused(claims):
    request = minted(b"{}", **claims)
    with pytest.raises(SignatureInvalid):
        make_adapter("vonage").verify(request)


@pytest.mark.parametrize("authorization", [None, "Basic YWJjOmRlZg==", "Bearer ", "Bearer not.a.jwt",
                                           "Bearer " + jwt.encode({"iat": 1}, "", algorithm="none")])
def test_anything_but_a_bearer_hs256_jwt_is_refused(authorization):
    headers = {"Authorization": authorization} if authorization else {}
    with pytest.raises(SignatureInvalid):
        make_adapter("vonage").verify(WebhookRequest("POST", RELAY, headers, b"{}"))


@pytest.mark.parametrize(("sender", "channel", "ours"), [
    ("447700900001", "sms", "447700900000"),
    ("whatsapp:447700900001", "whatsapp", "447700900000"),
    ("messenger:3757346847612387", "messenger", "107083064136738"),
    ("viber_service:447700900001", "viber_service", "16273"),
])
def test_each_channel_gives_the_user_and_how_to_answer_them(sender, channel, ours):
    request = webhook(sender, "Grüß Gott", name="Jane")
    [message] = make_adapter("vonage").parse(request)
    assert (message.user_id, message.text) == (sender, "Grüß Gott")  # a number on SMS, "<channel>:<id>" elsewhere
    assert message.message_id == json.loads(request.body)["message_uuid"]
    assert dict(message.reply_context) == {"channel": channel, "to": sender.rpartition(":")[2], "from": ours}
    assert message.user_name == ("Jane" if channel == "whatsapp" else None)


def test_a_status_webhook_is_acknowledged_without_a_message():
    body = json.dumps({"message_uuid": str(uuid.uuid4()), "to": "447700900001", "from": "447700900000",
                       "timestamp": "2026-01-01T00:00:00Z", "status": "delivered", "channel": "whatsapp"}).encode()
    assert make_adapter("vonage").parse(minted(body)) == []


def test_a_message_on_a_channel_the_relay_cannot_answer_on_is_acknowledged_without_a_message():
    body = json.dumps({"channel": "rcs", "message_uuid": str(uuid.uuid4()), "to": "447700900000",
                       "from": "447700900001", "message_type": "text", "text": "hi"}).encode()
    assert make_adapter("vonage").parse(minted(body)) == []


def test_a_whatsapp_button_reply_carries_the_choices_id():
    body = json.dumps({"channel": "whatsapp", "message_uuid": str(uuid.uuid4()), "to": "447700900000",
                       "from": "447700900001", "message_type": "reply",
                       "reply": {"id": "q1-0-2", "title": "Large"}}).encode()
    [message] = make_adapter("vonage").parse(minted(body))
    assert (message.text, message.reply_id) == ("Large", "q1-0-2")


@pytest.mark.parametrize("body", [
    {"channel": "whatsapp", "to": "447700900000", "from": "447700900001", "message_type": "text", "text": "x"},
    {"channel": "whatsapp", "message_uuid": ["u"], "to": "1", "from": "2", "message_type": "text", "text": "x"},
    {"channel": "sms", "message_uuid": "u", "to": "1", "from": "2", "message_type": "image", "image": {"url": 3}},
], ids=["no message_uuid", "a list for an id", "an image without a url"])
def test_a_malformed_message_is_a_bad_payload(body):
    with pytest.raises(BadPayload):
        make_adapter("vonage").parse(minted(json.dumps(body).encode()))


def test_sms_splits_long_text_at_1000_characters_and_returns_vonages_message_uuids(sim):
    words = " ".join(f"word{n}" for n in range(400))  # about 3,200 characters
    ids = make_adapter("vonage", sim.api_bases()).send({"channel": "sms", "to": "447700900003",
                                                         "from": "447700900000"}, OutboundMessage(text=words))
    replies = sim.replies("vonage", "447700900003")
    assert ids == [r["id"] for r in replies] and len(ids) == 4
    assert all(len(r["text"]) <= 1000 for r in replies)
    assert " ".join(r["text"] for r in replies) == words


def test_messenger_text_is_cut_at_its_640_characters(sim):
    make_adapter("vonage", sim.api_bases()).send({"channel": "messenger", "to": "3757346847612387",
                                                  "from": "107083064136738"}, OutboundMessage(text="y" * 700))
    assert [len(r["text"]) for r in sim.replies("vonage", "messenger:3757346847612387")] == [640, 60]


def test_whatsapp_choices_go_as_interactive_buttons_with_the_questions_ids(sim):
    choices = (Choice("q1-0-1", "Yes"), Choice("q1-0-2", "No"))
    make_adapter("vonage", sim.api_bases()).send({"channel": "whatsapp", "to": "447700900004",
                                                  "from": "447700900000"},
                                                 OutboundMessage(text="Pick one", choices=choices))
    [reply] = sim.replies("vonage", "whatsapp:447700900004")
    assert reply["request"]["message_type"] == "custom" and reply["text"] == "Pick one"
    assert [(c["id"], c["title"]) for c in reply["choices"]] == [("q1-0-1", "Yes"), ("q1-0-2", "No")]


@pytest.mark.parametrize("channel", ["sms", "messenger", "viber_service"])
def test_choices_on_other_channels_are_numbered_text(sim, channel):
    ours = webhooks.VONAGE_ADDRESSES[channel]
    make_adapter("vonage", sim.api_bases()).send({"channel": channel, "to": "447700900005", "from": ours},
                                                 OutboundMessage(text="Pick", choices=(Choice("a", "Small"),)))
    [reply] = sim.replies("vonage", channel_user(channel, "447700900005"))
    assert reply["text"] == "Pick\n\n1. Small\n\nReply with the number of your choice."


def test_an_image_on_sms_goes_as_a_link_in_the_text(sim):
    make_adapter("vonage", sim.api_bases()).send(
        {"channel": "sms", "to": "447700900006", "from": "447700900000"},
        OutboundMessage(text="a cat", media=(Media("https://cdn.example/cat.png", "image/png"),)))
    [reply] = sim.replies("vonage", "447700900006")
    assert reply["text"] == "a cat\nhttps://cdn.example/cat.png"


def test_the_simulator_answers_as_vonage_does_to_basic_auth_and_invalid_params(sim):
    refused = requests_post(sim, {"Authorization": "Basic YWJjZDEyMzQ6c2VjcmV0"}, {"channel": "sms"})
    assert (refused.status_code, refused.headers["Content-Type"]) == (401, "application/problem+json")
    assert refused.json()["title"] == "Unauthorized" and refused.json()["type"].endswith("#unauthorized")
    invalid = requests_post(sim, application_auth(), {"channel": "sms", "to": "447700900007", "from": "447700900000",
                                                   "message_type": "text", "text": "z" * 1001})
    assert invalid.status_code == 422
    assert [p["name"] for p in invalid.json()["invalid_parameters"]] == ["text"]
    assert sim.replies("vonage") == []


def requests_post(sim, headers: dict[str, str], body: dict) -> requests.Response:
    return requests.post(f"{sim.url}/v1/messages", json=body, headers=headers, timeout=10)


def sent_photo(sim, fake_relay) -> Media:
    url = "data:image/png;base64," + base64.b64encode(PHOTO).decode()
    sim.send_inbound("vonage", "whatsapp:447700900008", "look", media=[{"url": url, "contentType": "image/png"}])
    [(_, _, [message])] = fake_relay.received
    assert message.text == "look"
    [media] = message.media
    return media


def test_the_users_photo_is_fetched_from_vonages_media_store_with_the_application_jwt(sim, fake_relay):
    media = sent_photo(sim, fake_relay)
    assert media.protected and "/v3/media/" in media.url
    fetched = make_adapter("vonage", sim.api_bases()).fetch_media(media, max_bytes=1_000_000)
    assert (fetched.content, fetched.content_type) == (PHOTO, "image/png")
    assert fetched.name.endswith(".png")


@pytest.mark.parametrize("url", [
    "https://attacker.example/v3/media/1", "https://api.nexmo.com.attacker.example/1",
    "http://api-us.nexmo.com/v3/media/1",
    "http://api.nexmo.com/v3/media/1",  # the API host in clear: the JWT readable on the way
    "https://attacker.example\\@api-eu.vonage.com/v3/media/1",  # urllib3 (requests) connects to attacker.example
    "https://x@api.nexmo.com/v3/media/1", "https://api-eu.vonage.com%2f.attacker.example/v3/media/1",
    "https://evil.com\uff0fx.nexmo.com/v3/media/1",  # urlsplit raises ValueError: a 500 once
    "https://api-eu.vonage.com:99999/v3/media/1", "https://api-eu.vonage.com /v3/media/1",
    "https://attacker.example\x00.vonage.com/v3/media/1",
])
def test_a_media_url_off_vonages_hosts_never_gets_the_jwt(url):
    with pytest.raises(ProviderRejected, match="not on a Vonage host") as refused:
        make_adapter("vonage", {"VONAGE_API_BASE": "https://api.nexmo.com"}).fetch_media(
            Media(url, protected=True), max_bytes=1000)
    assert refused.value.reason == "MediaNotFetched"


@pytest.fixture
def capture() -> Iterator[tuple[int, list[str | None]]]:
    """A server on 127.0.0.1 that records the Authorization of every request it gets: (its port, those)."""
    seen: list[str | None] = []

    class Capture(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"png")

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("spelling", [
    "http://127.0.0.1:{capture}/v3/media/1",  # the API base's host, on another port
    "http://127.0.0.1:{capture}\\@127.0.0.1:{api}/v3/media/1",  # urlsplit reads the API base, requests the capture
    "http://x@127.0.0.1:{capture}/v3/media/1",
    "https://127.0.0.1:{api}/v3/media/1",
])
def test_a_media_url_that_only_looks_like_the_api_base_never_gets_the_jwt(capture, spelling):
    port, seen = capture
    api = free_port()
    adapter = make_adapter("vonage", {"VONAGE_API_BASE": f"http://127.0.0.1:{api}"})
    with pytest.raises(ProviderRejected, match="not on a Vonage host"):
        adapter.fetch_media(Media(spelling.format(capture=port, api=api), protected=True), max_bytes=1000)
    assert seen == []
    # The capture does see the JWT when it is the API base: the check above is not vacuous.
    make_adapter("vonage", {"VONAGE_API_BASE": f"http://127.0.0.1:{port}"}).fetch_media(
        Media(f"http://127.0.0.1:{port}/v3/media/1", protected=True), max_bytes=1000)
    assert [auth.split(" ")[0] for auth in seen if auth] == ["Bearer"]


def test_wrong_application_credentials_are_refused_by_the_media_store(sim, fake_relay):
    media = sent_photo(sim, fake_relay)
    with pytest.raises(ProviderRejected, match="401"):
        make_adapter("vonage", {**sim.api_bases(), "VONAGE_APPLICATION_ID": "another"}).fetch_media(
            media, max_bytes=1_000_000)


@pytest.mark.parametrize(("values", "message"), [
    ({"VONAGE_PRIVATE_KEY": "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----"}, "not a PEM"),
    ({"VONAGE_PRIVATE_KEY": ""}, "VONAGE_PRIVATE_KEY is not set"),
    ({"VONAGE_APPLICATION_ID": ""}, "VONAGE_APPLICATION_ID is not set"),
])
def test_unusable_settings_are_named_without_quoting_the_key(values, message):
    with pytest.raises(SettingsError, match=message) as caught:
        make_adapter("vonage", values)
    assert "not a key" not in str(caught.value)


def test_a_tap_on_a_simulated_whatsapp_button_comes_back_as_a_signed_reply_with_the_choices_id(sim, fake_relay):
    user = "whatsapp:447700900009"
    make_adapter("vonage", sim.api_bases()).send(
        {"channel": "whatsapp", "to": "447700900009", "from": "447700900000"},
        OutboundMessage(text="Size?", choices=(Choice("q7-0-1", "Small"), Choice("q7-0-2", "Large"))))
    answer = sim.send_inbound("vonage", user, reply_id="q7-0-2")
    assert answer["status"] == 200
    [(_, request, [message])] = fake_relay.received
    assert json.loads(request.body)["message_type"] == "reply"
    assert (message.user_id, message.text, message.reply_id) == (user, "Large", "q7-0-2")


def test_the_simulator_refuses_a_vonage_user_on_an_unknown_channel(sim):
    with pytest.raises(requests.HTTPError) as refused:
        sim.send_inbound("vonage", "telegram:12345", "hi")
    assert refused.value.response.status_code == 400
