"""Parsing realistic webhook payloads: media, several messages per POST, statuses, missing optional fields
and unicode; malformed bodies are BadPayload (400) naming the problem."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from relay.channels.base import Media, WebhookRequest
from relay.errors import BadPayload
from tests.channels.conftest import make_adapter

URL = "https://relay.example.net/api/channels/x"


def post(body: bytes | str | dict, content_type: str = "application/json", **headers: str) -> WebhookRequest:
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False)
    if isinstance(body, str):
        body = body.encode()
    return WebhookRequest("POST", URL, {"Content-Type": content_type, **headers}, body)


def form(fields: dict[str, str]) -> WebhookRequest:
    return post(urlencode(fields), "application/x-www-form-urlencoded")


# -- Twilio -----------------------------------------------------------------------------------------

TWILIO_SMS = {
    "ToCountry": "US", "ToState": "CA", "SmsMessageSid": "SM5e1d5fe2a2f9e3a9f4e0b7b5b0b3e0a1", "NumMedia": "0",
    "ToCity": "", "FromZip": "94105", "SmsSid": "SM5e1d5fe2a2f9e3a9f4e0b7b5b0b3e0a1", "FromState": "CA",
    "SmsStatus": "received", "FromCity": "SAN FRANCISCO", "Body": "Grüße aus Köln 👋", "FromCountry": "US",
    "To": "+15005550006", "ToZip": "", "NumSegments": "1", "MessageSid": "SM5e1d5fe2a2f9e3a9f4e0b7b5b0b3e0a1",
    "AccountSid": "AC00000000000000000000000000000dev", "From": "+14155550123", "ApiVersion": "2010-04-01",
}


def test_twilio_sms_with_unicode():
    [message] = make_adapter("twilio").parse(form(TWILIO_SMS))
    assert message.message_id == "SM5e1d5fe2a2f9e3a9f4e0b7b5b0b3e0a1"
    assert (message.user_id, message.text, message.user_name) == ("+14155550123", "Grüße aus Köln 👋", None)
    assert dict(message.reply_context) == {"to": "+14155550123", "from": "+15005550006"}
    assert message.raw["FromCity"] == "SAN FRANCISCO"


def test_twilio_whatsapp_with_two_media_and_no_text():
    fields = {**TWILIO_SMS, "From": "whatsapp:+4915112345678", "To": "whatsapp:+14155238886", "Body": "",
              "ProfileName": "Jürgen", "WaId": "4915112345678", "NumMedia": "2",
              "MediaUrl0": "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1",
              "MediaContentType0": "image/jpeg",
              "MediaUrl1": "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME2",
              "MediaContentType1": "application/pdf"}
    [message] = make_adapter("twilio", {"TWILIO_API_BASE": "https://api.twilio.com"}).parse(form(fields))
    assert message.user_id == "whatsapp:+4915112345678" and message.user_name == "Jürgen"
    assert message.text == ""
    # On Twilio's API host: readable only with the account's credentials, so the relay fetches them.
    assert message.media == (Media(fields["MediaUrl0"], "image/jpeg", protected=True),
                             Media(fields["MediaUrl1"], "application/pdf", protected=True))
    assert message.reply_context["from"] == "whatsapp:+14155238886"


def test_twilio_status_callback_is_acknowledged_not_relayed():
    status = {"MessageSid": "SM1", "MessageStatus": "delivered", "SmsStatus": "delivered", "To": "+14155550123",
              "From": "+15005550006", "AccountSid": "AC1", "ApiVersion": "2010-04-01"}
    assert make_adapter("twilio").parse(form(status)) == []
    answer = make_adapter("twilio").acknowledgement()
    assert (answer.status, answer.content_type) == (200, "text/xml")
    assert answer.body.endswith(b"<Response/>")


def test_twilio_json_body():
    body = {"MessageSid": "SM2", "From": "+14155550123", "To": "+15005550006", "Body": "json ✓"}
    request = WebhookRequest("POST", URL + "?bodySHA256=abc", {"Content-Type": "application/json"},
                             json.dumps(body).encode())
    [message] = make_adapter("twilio").parse(request)
    assert (message.message_id, message.text) == ("SM2", "json ✓")


@pytest.mark.parametrize(("body", "problem"), [
    ({"From": "+1", "To": "+2", "Body": "no sid"}, "MessageSid"),
    ({"MessageSid": "SM1", "Body": "no numbers"}, "From"),
    ({"MessageSid": "SM1", "From": "+1", "To": "+2", "Body": "x", "NumMedia": "two"}, "NumMedia"),
])
def test_twilio_malformed(body, problem):
    with pytest.raises(BadPayload, match=problem):
        make_adapter("twilio").parse(form(body))


# -- WhatsApp Cloud API -----------------------------------------------------------------------------

def whatsapp_body(value: dict) -> dict:
    return {"object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550100", "phone_number_id": "100000000000001"},
                **value}, "field": "messages"}]}]}


def test_whatsapp_several_messages_with_media_and_statuses_in_one_post():
    body = whatsapp_body({
        "contacts": [{"profile": {"name": "Zoë"}, "wa_id": "447700900001"},
                     {"profile": {"name": "李雷"}, "wa_id": "8613800000000"}],
        "messages": [
            {"from": "447700900001", "id": "wamid.A1", "timestamp": "1717000000", "type": "text",
             "text": {"body": "Hello 😀"}},
            {"from": "8613800000000", "id": "wamid.B1", "timestamp": "1717000001", "type": "image",
             "image": {"caption": "看这个", "mime_type": "image/jpeg", "sha256": "x", "id": "1479537139650973"}},
            {"from": "447700900001", "id": "wamid.A2", "timestamp": "1717000002", "type": "reaction",
             "reaction": {"message_id": "wamid.X", "emoji": "👍"}},
        ],
        "statuses": [{"id": "wamid.OUT1", "status": "delivered", "timestamp": "1717000003",
                      "recipient_id": "447700900001"}],
    })
    first, second = make_adapter("whatsapp").parse(post(body))
    assert (first.message_id, first.user_id, first.user_name, first.text) == (
        "wamid.A1", "447700900001", "Zoë", "Hello 😀")
    assert dict(first.reply_context) == {"to": "447700900001", "phone_number_id": "100000000000001"}
    assert (second.user_name, second.text) == ("李雷", "看这个")
    assert second.media == (Media("http://127.0.0.1:3001/v21.0/1479537139650973", "image/jpeg", protected=True),)
    assert second.raw["message"]["id"] == "wamid.B1"


def test_whatsapp_statuses_only_yield_nothing():
    body = whatsapp_body({"statuses": [{"id": "wamid.OUT1", "status": "read", "timestamp": "1717000003",
                                        "recipient_id": "447700900001"}]})
    assert make_adapter("whatsapp").parse(post(body)) == []


def test_whatsapp_missing_optional_fields_and_username_users():
    body = whatsapp_body({
        "contacts": [{"user_id": "US.13491208655302741918"}],
        "messages": [{"id": "wamid.C1", "timestamp": "1717000000", "type": "interactive",
                      "interactive": {"type": "button_reply", "button_reply": {"id": "action-2", "title": "No"}}}],
    })
    [message] = make_adapter("whatsapp").parse(post(body))
    assert (message.user_id, message.user_name, message.text) == ("US.13491208655302741918", None, "No")


def test_whatsapp_document_and_location():
    body = whatsapp_body({"messages": [
        {"from": "1555", "id": "wamid.D", "type": "document",
         "document": {"filename": "invoice.pdf", "mime_type": "application/pdf", "id": "42"}},
        {"from": "1555", "id": "wamid.L", "type": "location",
         "location": {"latitude": 52.52, "longitude": 13.405, "name": "Brandenburger Tor"}},
    ]})
    document, location = make_adapter("whatsapp").parse(post(body))
    assert document.media[0].name == "invoice.pdf" and document.text == ""
    assert location.text == "Brandenburger Tor (52.52,13.405)"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"object": "whatsapp_business_account"}',
                                  json.dumps(whatsapp_body({"messages": [{"type": "text"}]})).encode()])
def test_whatsapp_malformed(body):
    with pytest.raises(BadPayload):
        make_adapter("whatsapp").parse(post(body))


# -- MessageBird ------------------------------------------------------------------------------------

def messagebird_body(message: dict, kind: str = "message.created", contact: dict | None = None) -> dict:
    return {"type": kind,
            "contact": contact if contact is not None else {
                "id": "9354647c5c144a2b94aa5c3c2d8d7d4f", "msisdn": 31612345678, "firstName": "Renée",
                "lastName": "Ørsted", "customDetails": {}},
            "conversation": {"id": "2e15efafec384e1c82e9842075e87beb", "status": "active"},
            "message": {"id": "6c9ff6a8fbd946bd9e3f5e5b2f1e0fa1", "conversationId": "2e15efafec384e1c82e9842075e87beb",
                        "platform": "whatsapp", "to": "+31612345678", "from": "+31600000001",
                        "channelId": "619747f69cf940a98fb443140ce9aed2", "direction": "received",
                        "status": "received", **message}}


def test_messagebird_text_and_name():
    body = messagebird_body({"type": "text", "content": {"text": "Tschüß 👋"}})
    [message] = make_adapter("messagebird").parse(post(body))
    assert (message.message_id, message.user_id, message.user_name, message.text) == (
        "6c9ff6a8fbd946bd9e3f5e5b2f1e0fa1", "+31600000001", "Renée Ørsted", "Tschüß 👋")
    assert dict(message.reply_context) == {"conversation_id": "2e15efafec384e1c82e9842075e87beb"}


def test_messagebird_image_with_caption_and_contact_without_names():
    body = messagebird_body({"type": "image", "content": {"image": {"url": "https://media.messagebird.com/v1/media/1",
                                                                    "caption": "look"}}},
                            contact={"id": "c1"})
    [message] = make_adapter("messagebird").parse(post(body))
    assert message.media == (Media("https://media.messagebird.com/v1/media/1"),)
    assert (message.text, message.user_name) == ("look", None)


@pytest.mark.parametrize("body", [
    messagebird_body({"type": "text", "content": {"text": "x"}, "status": "delivered"}, kind="message.updated"),
    messagebird_body({"type": "text", "content": {"text": "our reply"}, "direction": "sent"}),
    {"type": "conversation.created", "conversation": {"id": "c"}},
])
def test_messagebird_updates_and_echoes_are_not_relayed(body):
    assert make_adapter("messagebird").parse(post(body)) == []


def test_messagebird_malformed():
    body = messagebird_body({"type": "text", "content": {"text": "x"}})
    del body["conversation"], body["message"]["conversationId"]
    with pytest.raises(BadPayload, match="conversation"):
        make_adapter("messagebird").parse(post(body))


# -- Bird -------------------------------------------------------------------------------------------

def bird_body(body: dict, event: str = "whatsapp.inbound", **payload) -> dict:
    return {"service": "channels", "event": event, "payload": {
        "id": "4a8f8a3e-3b5e-4d6b-9f9f-1b2c3d4e5f60", "channelId": "8f3e1b2c-0000-4000-8000-000000000001",
        "sender": {"contact": {"id": "c-1", "identifierKey": "phonenumber", "identifierValue": "+15550002",
                               "annotations": {"name": "Ana Núñez"}}},
        "body": body, "direction": "incoming", "status": "delivered", **payload}}


def test_bird_text():
    [message] = make_adapter("bird").parse(post(bird_body({"type": "text", "text": {"text": "¿Qué tal? 🌮"}})))
    assert (message.message_id, message.user_id, message.user_name, message.text) == (
        "4a8f8a3e-3b5e-4d6b-9f9f-1b2c3d4e5f60", "+15550002", "Ana Núñez", "¿Qué tal? 🌮")
    assert dict(message.reply_context) == {"channel_id": "8f3e1b2c-0000-4000-8000-000000000001",
                                           "identifier_key": "phonenumber", "identifier_value": "+15550002"}


def test_bird_images_and_files():
    images = bird_body({"type": "image", "image": {"images": [{"mediaUrl": "https://media.bird.com/a.jpg"},
                                                              {"mediaUrl": "https://media.bird.com/b.jpg"}]}})
    [message] = make_adapter("bird").parse(post(images))
    assert [m.url for m in message.media] == ["https://media.bird.com/a.jpg", "https://media.bird.com/b.jpg"]
    files = bird_body({"type": "file", "file": {"files": [{"mediaUrl": "https://media.bird.com/c.pdf",
                                                           "contentType": "application/pdf", "filename": "c.pdf"}]}})
    [message] = make_adapter("bird").parse(post(files))
    assert message.media == (Media("https://media.bird.com/c.pdf", "application/pdf", "c.pdf"),)


def test_bird_outbound_events_and_missing_names():
    assert make_adapter("bird").parse(post(bird_body({"type": "text", "text": {"text": "x"}},
                                                     event="whatsapp.outbound", direction="outgoing"))) == []
    body = bird_body({"type": "text", "text": {"text": "x"}})
    body["payload"]["sender"]["contact"].pop("annotations")
    [message] = make_adapter("bird").parse(post(body))
    assert message.user_name is None
    del body["payload"]["id"]
    with pytest.raises(BadPayload):
        make_adapter("bird").parse(post(body))


# -- Generic ----------------------------------------------------------------------------------------

def test_generic_single_and_batched_messages():
    single = {"id": "m-1", "user": {"id": "u-1", "name": "山田 太郎"}, "text": "こんにちは", "locale": "ja-JP",
              "media": [{"url": "https://cdn.example/x.png", "contentType": "image/png"}]}
    [message] = make_adapter("generic").parse(post(single))
    assert (message.message_id, message.user_id, message.user_name, message.text, message.locale) == (
        "m-1", "u-1", "山田 太郎", "こんにちは", "ja-JP")
    assert message.media == (Media("https://cdn.example/x.png", "image/png"),)
    batch = {"messages": [{"id": "m-2", "user": {"id": "u-1"}, "text": "a"},
                          {"type": "typing", "user": {"id": "u-1"}},
                          {"id": "m-3", "user": "u-2", "text": "b"}]}
    assert [(m.message_id, m.user_id) for m in make_adapter("generic").parse(post(batch))] == [
        ("m-2", "u-1"), ("m-3", "u-2")]


def test_generic_uses_the_webhook_id_when_the_message_has_none():
    [message] = make_adapter("generic").parse(post({"user": {"id": "u-1"}, "text": "hi"}, **{"webhook-id": "msg_9"}))
    assert message.message_id == "msg_9"
    assert dict(message.reply_context) == {"user_id": "u-1", "reply_to_id": "msg_9"}


@pytest.mark.parametrize("body", [{"text": "no user", "id": "m"}, {"user": {"id": "u"}, "text": "no id"},
                                  {"id": "m", "user": {"id": "u"}, "text": 5}, [1, 2]])
def test_generic_malformed(body):
    with pytest.raises(BadPayload):
        make_adapter("generic").parse(post(json.dumps(body)))
