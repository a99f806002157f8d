"""The simulator signs inbound webhooks as the providers do (checked by our adapters and, where there
is one, by the provider's own library), checks reply credentials, serves its page and its CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from urllib.parse import parse_qsl

import pytest
import requests
import standardwebhooks
from messagebird.request_validator import RequestValidator as MessageBirdValidator
from twilio.request_validator import RequestValidator as TwilioValidator

from devstack.channels import DEV_VALUES
from devstack.procs import python_module
from relay.channels.base import Choice, OutboundMessage
from tests.channels.conftest import make_adapter
from tests.conftest import subprocess_env

SENDERS = {"twilio": "+15550001", "whatsapp": "15550001", "messagebird": "+31600000001", "bird": "+15550002",
           "generic": "user-1"}


@pytest.mark.parametrize("provider", list(SENDERS))
def test_inbound_webhooks_pass_our_verification_and_parse(sim, fake_relay, provider):
    media = [{"url": "https://cdn.example/photo.jpg"}]
    answer = sim.send_inbound(provider, SENDERS[provider], "Hallo Welt ✓", name="Ana Núñez", media=media)
    assert answer["status"] == 200, answer
    [(name, _, [message])] = fake_relay.received
    assert name == provider
    assert (message.message_id, message.user_id) == (answer["message_id"], SENDERS[provider])
    assert message.text == "Hallo Welt ✓"
    assert len(message.media) == 1
    [shown] = requests.get(f"{sim.url}/_sim/messages", params={"provider": provider}, timeout=10).json()["messages"]
    assert (shown["direction"], shown["text"]) == ("user", "Hallo Welt ✓")


def test_inbound_signatures_satisfy_the_providers_libraries(sim, fake_relay):
    for provider in ("twilio", "messagebird", "generic"):
        sim.send_inbound(provider, SENDERS[provider], "hi")
    (_, twilio_request, _), (_, messagebird_request, _), (_, generic_request, _) = fake_relay.received
    assert TwilioValidator(DEV_VALUES["TWILIO_AUTH_TOKEN"]).validate(
        twilio_request.url, dict(parse_qsl(twilio_request.body.decode())), twilio_request.header("X-Twilio-Signature"))
    assert MessageBirdValidator(DEV_VALUES["MESSAGEBIRD_SIGNING_KEY"]).validate_signature(
        messagebird_request.header("MessageBird-Signature-JWT"), messagebird_request.url, messagebird_request.body)
    assert standardwebhooks.Webhook(DEV_VALUES["GENERIC_WEBHOOK_SECRET"]).verify(
        generic_request.body, dict(generic_request.headers))["text"] == "hi"


def test_twilio_acknowledgement_reaches_the_simulator(sim):
    answer = sim.send_inbound("twilio", "+15550001", "hi")
    assert answer["content_type"] == "text/xml" and answer["body"].endswith("<Response/>")


def test_whatsapp_handshake_through_the_simulator(sim):
    ok = requests.post(f"{sim.url}/_sim/handshake", json={"challenge": "12345"}, timeout=10).json()
    assert (ok["status"], ok["body"]) == (200, "12345")
    refused = requests.post(f"{sim.url}/_sim/handshake", json={"verify_token": "guess"}, timeout=10).json()
    assert refused["status"] == 403


def test_reply_apis_check_credentials_like_the_providers(sim):
    checks = [
        ("post", f"/2010-04-01/Accounts/{DEV_VALUES['TWILIO_ACCOUNT_SID']}/Messages.json",
         {"auth": (DEV_VALUES["TWILIO_ACCOUNT_SID"], "wrong"), "data": {"To": "+1", "From": "+2", "Body": "x"}}),
        ("post", "/v19.0/100000000000001/messages", {"headers": {"Authorization": "Bearer wrong"}, "json": {}}),
        ("post", "/v1/conversations/c/messages", {"headers": {"Authorization": "AccessKey wrong"}, "json": {}}),
        ("post", "/workspaces/dev-workspace/channels/dev-channel/messages",
         {"headers": {"Authorization": "AccessKey wrong"}, "json": {}}),
        ("post", "/generic/callback", {"json": {"user": {"id": "u"}, "text": "unsigned"}}),
    ]
    for method, path, options in checks:
        response = requests.request(method, sim.url + path, timeout=10, **options)
        assert response.status_code == 401, (path, response.text)
    assert sim.replies() == []


def test_reply_apis_enforce_the_providers_limits(sim):
    twilio = requests.post(f"{sim.url}/2010-04-01/Accounts/{DEV_VALUES['TWILIO_ACCOUNT_SID']}/Messages.json",
                           auth=(DEV_VALUES["TWILIO_ACCOUNT_SID"], DEV_VALUES["TWILIO_AUTH_TOKEN"]),
                           data={"To": "+1", "From": "+2", "Body": "x" * 1601}, timeout=10)
    assert (twilio.status_code, twilio.json()["code"]) == (400, 21617)
    buttons = {"type": "button", "body": {"text": "pick"}, "action": {"buttons": [
        {"type": "reply", "reply": {"id": str(n), "title": f"Option {n}"}} for n in range(4)]}}
    whatsapp = requests.post(f"{sim.url}/v21.0/100000000000001/messages",
                             headers={"Authorization": f"Bearer {DEV_VALUES['WHATSAPP_ACCESS_TOKEN']}"},
                             json={"messaging_product": "whatsapp", "to": "1", "type": "interactive",
                                   "interactive": buttons}, timeout=10)
    assert whatsapp.status_code == 400


@pytest.mark.parametrize(("titles", "kind"), [(("Small", "Large"), "button_reply"),
                                              (("S", "M", "L", "XL"), "list_reply")])
def test_a_tap_on_a_whatsapp_button_or_list_row_reaches_the_relay_as_meta_sends_it(sim, fake_relay, titles, kind):
    offered = tuple(Choice(f"q9-0-{n}", t) for n, t in enumerate(titles, start=1))
    make_adapter("whatsapp", sim.api_bases()).send({"to": "15550001"}, OutboundMessage(text="Size?", choices=offered))
    [question] = sim.replies("whatsapp", "15550001")
    answer = sim.send_inbound("whatsapp", "15550001", reply_id=offered[1].id)
    assert answer["status"] == 200, answer
    [(_, request, [message])] = fake_relay.received
    sent = json.loads(request.body)["entry"][0]["changes"][0]["value"]["messages"][0]
    assert (sent["type"], sent["interactive"]["type"], sent["context"]["id"]) == ("interactive", kind,
                                                                                  question["id"])
    assert (message.text, message.reply_id) == (titles[1], offered[1].id)


def test_a_tap_on_a_reply_id_no_message_offered_is_refused(sim):
    refused = requests.post(f"{sim.url}/_sim/inbound", json={"provider": "whatsapp", "from": "15550001",
                                                              "reply_id": "nothing-0-1"}, timeout=10)
    assert refused.status_code == 400 and "reply_id" in refused.json()["error"]["message"]


def test_whatsapp_list_messages_are_held_to_metas_limits(sim):
    def send_list(rows: list[dict], button: str = "Choose") -> int:
        listed = {"type": "list", "body": {"text": "pick"}, "action": {"button": button, "sections": [{"rows": rows}]}}
        return requests.post(f"{sim.url}/v21.0/100000000000001/messages",
                             headers={"Authorization": f"Bearer {DEV_VALUES['WHATSAPP_ACCESS_TOKEN']}"},
                             json={"messaging_product": "whatsapp", "to": "1", "type": "interactive",
                                   "interactive": listed}, timeout=10).status_code

    assert send_list([{"id": f"r{n}", "title": f"Row {n}"} for n in range(10)]) == 200
    assert send_list([{"id": f"r{n}", "title": f"Row {n}"} for n in range(11)]) == 400
    assert send_list([{"id": "r1", "title": "x" * 25}]) == 400
    assert send_list([{"id": "r1", "title": "a"}, {"id": "r1", "title": "b"}]) == 400
    assert send_list([{"id": "r1", "title": "a"}], button="x" * 21) == 400


def test_admin_api_rejects_bad_requests(sim):
    bad_failure = requests.post(f"{sim.url}/_sim/failures", json={"provider": "nope", "status": 500}, timeout=10)
    bad_inbound = requests.post(f"{sim.url}/_sim/inbound", json={"provider": "twilio"}, timeout=10)
    assert bad_failure.status_code == bad_inbound.status_code == 400
    assert "error" in bad_inbound.json()


def test_page_and_cli(sim, fake_relay):
    page = requests.get(sim.page_url, timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "Provider simulator" in page.text
    result = subprocess.run(
        python_module("devstack.channels", "send", "bird", "--from", "+15550009", "--name", "Cli", "from the CLI",
                      "--simulator", sim.url),
        env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "relay answered 200" in result.stdout
    [(provider, _, [message])] = fake_relay.received
    assert (provider, message.user_id, message.text, message.user_name) == ("bird", "+15550009", "from the CLI", "Cli")


def test_whatsapp_media_ids_resolve_through_the_graph_media_endpoint(sim, fake_relay):
    video = b"\x00\x00\x00\x18ftypmp42 not really a video"
    sim.send_inbound("whatsapp", "15550001", "", media=[{"url": "data:video/mp4;base64," +
                                                          base64.b64encode(video).decode()}])
    [(_, _, [message])] = fake_relay.received
    media_url = message.media[0].url.replace("http://127.0.0.1:3001", sim.url)
    bearer = {"Authorization": f"Bearer {DEV_VALUES['WHATSAPP_ACCESS_TOKEN']}"}
    resolved = requests.get(media_url, headers=bearer, timeout=10).json()
    assert (resolved["mime_type"], resolved["file_size"]) == ("video/mp4", len(video))
    assert resolved["sha256"] == hashlib.sha256(video).hexdigest()
    assert requests.get(resolved["url"], timeout=10).status_code == 401  # like Meta's: only with the token
    assert requests.get(resolved["url"], headers=bearer, timeout=10).content == video
    assert json.loads(json.dumps(message.raw))["message"]["type"] == "video"
