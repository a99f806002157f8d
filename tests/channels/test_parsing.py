"""Parsing realistic webhook payloads: media, several messages per POST, statuses, missing optional fields
and unicode; malformed bodies are BadPayload (400) naming the problem."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest

from relay.channels import twilio
from relay.channels.base import Media, WebhookRequest
from relay.clock import ManualClock
from relay.errors import BadPayload
from relay.store.sweep import DEDUPE_RETENTION
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
    status = {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered", "SmsStatus": "delivered",
              "To": "+14155550123", "From": "+15005550006", "AccountSid": "AC1", "ApiVersion": "2010-04-01"}
    assert make_adapter("twilio").parse(form(status)) == []
    answer = make_adapter("twilio").acknowledgement()
    assert (answer.status, answer.content_type) == (200, "text/xml")
    assert answer.body.endswith(b"<Response/>")


def test_twilio_json_body():
    body = {"MessageSid": "MM" + "2" * 32, "From": "+14155550123", "To": "+15005550006", "Body": "json ✓"}
    request = WebhookRequest("POST", URL + "?bodySHA256=abc", {"Content-Type": "application/json"},
                             json.dumps(body).encode())
    [message] = make_adapter("twilio").parse(request)
    assert (message.message_id, message.text) == ("MM" + "2" * 32, "json ✓")


@pytest.mark.parametrize(("body", "problem"), [
    ({"From": "+1", "To": "+2", "Body": "no sid"}, "MessageSid"),
    ({"MessageSid": "SM" + "1" * 32, "Body": "no numbers"}, "From"),
    ({"MessageSid": "SM" + "1" * 32, "From": "+1", "To": "+2", "Body": "x", "NumMedia": "two"}, "NumMedia"),
])
def test_twilio_malformed(body, problem):
    with pytest.raises(BadPayload, match=problem):
        make_adapter("twilio").parse(form(body))


# -- WhatsApp Cloud API -----------------------------------------------------------------------------

WHATSAPP_SENT_AT = 1717000000  # the payloads' message timestamps


def whatsapp_adapter(now: float = WHATSAPP_SENT_AT + 60):
    """The WhatsApp adapter on a clock a minute after the payloads were sent (older ones are not relayed)."""
    return make_adapter("whatsapp", clock=ManualClock(datetime.fromtimestamp(now, UTC)))


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
    first, second = whatsapp_adapter().parse(post(body))
    assert (first.message_id, first.user_id, first.user_name, first.text) == (
        "wamid.A1", "447700900001", "Zoë", "Hello 😀")
    assert dict(first.reply_context) == {"to": "447700900001", "phone_number_id": "100000000000001"}
    assert (second.user_name, second.text) == ("李雷", "看这个")
    assert second.media == (Media("http://127.0.0.1:3001/v21.0/1479537139650973", "image/jpeg", protected=True),)
    assert second.raw["message"]["id"] == "wamid.B1"


def test_whatsapp_statuses_only_yield_nothing():
    body = whatsapp_body({"statuses": [{"id": "wamid.OUT1", "status": "read", "timestamp": "1717000003",
                                        "recipient_id": "447700900001"}]})
    assert whatsapp_adapter().parse(post(body)) == []


def test_whatsapp_missing_optional_fields_and_username_users():
    body = whatsapp_body({
        "contacts": [{"user_id": "US.13491208655302741918"}],
        "messages": [{"id": "wamid.C1", "timestamp": "1717000000", "type": "interactive",
                      "interactive": {"type": "button_reply", "button_reply": {"id": "action-2", "title": "No"}}}],
    })
    [message] = whatsapp_adapter().parse(post(body))
    assert (message.user_id, message.user_name, message.text) == ("US.13491208655302741918", None, "No")
    assert message.reply_id == "action-2"


def test_whatsapp_list_reply_gives_the_rows_title_as_text_and_its_id_as_the_reply_id():
    body = whatsapp_body({"messages": [{
        "from": "1555", "id": "wamid.LR", "timestamp": "1717000000", "type": "interactive",
        "context": {"from": "15550100", "id": "wamid.Q"},
        "interactive": {"type": "list_reply", "list_reply": {"id": "ab12cd34-0-2", "title": "Large",
                                                             "description": "The large one"}}}]})
    [message] = whatsapp_adapter().parse(post(body))
    assert (message.text, message.reply_id) == ("Large", "ab12cd34-0-2")


def test_a_whatsapp_text_message_has_no_reply_id():
    body = whatsapp_body({"messages": [{"from": "1555", "id": "wamid.T", "timestamp": "1717000000", "type": "text",
                                        "text": {"body": "2"}}]})
    [message] = whatsapp_adapter().parse(post(body))
    assert message.reply_id is None


def test_whatsapp_document_and_location():
    body = whatsapp_body({"messages": [
        {"from": "1555", "id": "wamid.D", "type": "document",
         "document": {"filename": "invoice.pdf", "mime_type": "application/pdf", "id": "42"}},
        {"from": "1555", "id": "wamid.L", "type": "location",
         "location": {"latitude": 52.52, "longitude": 13.405, "name": "Brandenburger Tor"}},
    ]})
    document, location = whatsapp_adapter().parse(post(body))
    assert document.media[0].name == "invoice.pdf" and document.text == ""
    assert location.text == "Brandenburger Tor (52.52,13.405)"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"object": "whatsapp_business_account"}',
                                  json.dumps(whatsapp_body({"messages": [{"type": "text"}]})).encode()])
def test_whatsapp_malformed(body):
    with pytest.raises(BadPayload):
        whatsapp_adapter().parse(post(body))


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
    assert dict(message.reply_context) == {"conversation_id": "2e15efafec384e1c82e9842075e87beb",
                                           "platform": "whatsapp"}


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
                                           "platform": "whatsapp", "identifier_key": "phonenumber",
                                           "identifier_value": "+15550002"}


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


# -- Dedupe keys come from signed bytes only, in their documented form (issue 13) --------------------

def test_a_twilio_webhook_with_the_next_parameter_folded_into_its_message_sid_is_refused():
    """Twilio's signed string marks no end of a value: `MessageSid=SM…` + `NumMedia=0` signs the same as
    `MessageSid=SM…NumMedia0`. Only the documented form (SM/MM and 32 hex digits) is a dedupe key."""
    sid = TWILIO_SMS["MessageSid"]
    folded = {k: v for k, v in TWILIO_SMS.items() if k != "NumMedia"} | {"MessageSid": sid + "NumMedia0"}
    assert twilio.compute_signature("t", URL, folded) == twilio.compute_signature("t", URL, TWILIO_SMS)
    with pytest.raises(BadPayload, match="MessageSid"):
        make_adapter("twilio").parse(form(folded))


@pytest.mark.parametrize("field", ["From", "To"])
def test_a_twilio_webhook_with_the_next_parameter_folded_into_from_or_to_is_refused(field):
    """Folded into From, the next field makes a new user, whose dedupe rows know nothing of the message."""
    following = min(name for name in TWILIO_SMS if name > field)
    folded = {k: v for k, v in TWILIO_SMS.items() if k != following}
    folded[field] = TWILIO_SMS[field] + following + TWILIO_SMS[following]
    assert twilio.compute_signature("t", URL, folded) == twilio.compute_signature("t", URL, TWILIO_SMS)
    with pytest.raises(BadPayload, match=field):
        make_adapter("twilio").parse(form(folded))


@pytest.mark.parametrize("address", ["+14155550123", "whatsapp:+14155550123", "messenger:1234567890",
                                     "whatsapp:US.13491208655302741918"])
def test_twilio_addresses_of_every_channel_are_accepted(address):
    [message] = make_adapter("twilio").parse(form({**TWILIO_SMS, "From": address}))
    assert message.user_id == address


@pytest.mark.parametrize("sid", ["SM" + "a" * 31, "SM" + "a" * 33, "sm" + "a" * 32, "MG" + "a" * 32,
                                 "SM" + "g" * 32, "SM" + "a" * 32 + "\n", "SM1"])
def test_twilio_accepts_only_message_sids_of_the_documented_form(sid):
    fields = {**TWILIO_SMS, "MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid}
    with pytest.raises(BadPayload, match="MessageSid"):
        make_adapter("twilio").parse(form(fields))


def test_twilio_sms_and_mms_sids_of_either_case_are_accepted_when_every_sid_field_agrees():
    for sid in ("MM" + "0123456789ABCDEF" * 2, "SM" + "0123456789abcdef" * 2):
        fields = {**TWILIO_SMS, "MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid}
        assert make_adapter("twilio").parse(form(fields))[0].message_id == sid
    other = "SM" + "f" * 32
    with pytest.raises(BadPayload, match="differ"):
        make_adapter("twilio").parse(form({**TWILIO_SMS, "SmsMessageSid": other}))


def test_twilio_trusts_num_media_only_as_far_as_media_urls_exist():
    """NumMedia=100000000 in a signed form once cost 16 s of CPU: now it costs at most ten lookups."""
    fields = {**TWILIO_SMS, "NumMedia": "100000000", "MediaUrl0": "https://cdn.example/a.jpg",
              "MediaContentType0": "image/jpeg"}
    parsed: list = []
    worker = threading.Thread(target=lambda: parsed.extend(make_adapter("twilio").parse(form(fields))), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "parsing took over 5 s: NumMedia was believed"
    [message] = parsed
    assert message.media == (Media("https://cdn.example/a.jpg", "image/jpeg"),)
    eleven = {**TWILIO_SMS, "NumMedia": "11", **{f"MediaUrl{n}": f"https://cdn.example/{n}.jpg" for n in range(11)}}
    [message] = make_adapter("twilio").parse(form(eleven))
    assert len(message.media) == twilio.MEDIA_PER_MESSAGE  # Twilio sends at most ten


HMAC_VALUES = {"GENERIC_SIGNATURE_SCHEME": "hmac", "GENERIC_WEBHOOK_SECRET": "dev-only-plain-secret"}


def test_generic_hmac_scheme_takes_no_dedupe_key_from_the_unsigned_webhook_id_header():
    """Under `hmac` only the body is signed: a replay with a new webhook-id header would be a new message."""
    request = post({"user": {"id": "u-1"}, "text": "hi"}, **{"webhook-id": "msg_9"})
    with pytest.raises(BadPayload, match="an id in the signed body"):
        make_adapter("generic", HMAC_VALUES).parse(request)
    [message] = make_adapter("generic", HMAC_VALUES).parse(post({"id": "m-7", "user": {"id": "u-1"}, "text": "hi"},
                                                                **{"webhook-id": "msg_9"}))
    assert message.message_id == "m-7"


def test_whatsapp_messages_sent_before_the_dedupe_memory_are_acknowledged_but_not_relayed(caplog):
    """A replay after the dedupe rows were swept (7 days) would be new again: its signed timestamp gives it away."""
    retention = DEDUPE_RETENTION.total_seconds()
    body = whatsapp_body({"contacts": [{"profile": {"name": "Zoë"}, "wa_id": "447700900001"}], "messages": [
        {"from": "447700900001", "id": "wamid.OLD", "timestamp": str(WHATSAPP_SENT_AT), "type": "text",
         "text": {"body": "a week and a minute ago"}},
        {"from": "447700900001", "id": "wamid.NEW", "timestamp": str(WHATSAPP_SENT_AT + 120), "type": "text",
         "text": {"body": "a week less a minute ago"}}]})
    with caplog.at_level("WARNING", logger="relay.channels.whatsapp"):
        messages = whatsapp_adapter(now=WHATSAPP_SENT_AT + retention + 60).parse(post(body))
    assert [m.message_id for m in messages] == ["wamid.NEW"]
    assert "wamid.OLD" in caplog.text and "not relayed" in caplog.text


@pytest.mark.parametrize("timestamp", ["9" * 400, "-5", "1.5e9", "\u0661\u0667\u0661\u0667" + "\u0660" * 6,
                                       ["1717000000"], True])
def test_a_whatsapp_timestamp_that_is_not_unix_seconds_is_a_bad_payload(timestamp):
    body = whatsapp_body({"messages": [{"from": "1555", "id": "wamid.T", "timestamp": timestamp, "type": "text",
                                        "text": {"body": "when?"}}]})
    with pytest.raises(BadPayload, match="timestamp"):
        whatsapp_adapter().parse(post(body))


# -- Strings that UTF-8 cannot carry, and values of the wrong kind (issue 13) ---------------------

def test_lone_surrogates_in_signed_json_become_replacement_characters():
    """"\\ud800" is valid JSON but no UTF-8: storage and Direct Line could not take it. U+FFFD, as a decoder
    shows a broken sequence: the message arrives instead of failing later."""
    body = (b'{"id": "m-\\ud800", "user": {"id": "u-\\udfff", "name": "Zo\\ud83d"},'
            b' "text": "cut \\ud83d here \\ud83d\\ude00"}')
    [message] = make_adapter("generic").parse(post(body))
    assert (message.message_id, message.user_id, message.user_name) == ("m-\ufffd", "u-\ufffd", "Zo\ufffd")
    assert message.text == "cut \ufffd here 😀"
    assert json.dumps(message.raw, ensure_ascii=False).encode()  # now writable as UTF-8


@pytest.mark.parametrize(("provider", "body"), [
    ("generic", {"id": ["m-1"], "user": {"id": "u-1"}, "text": "list id"}),
    ("generic", {"id": "m-1", "user": {"id": {"nested": 1}}, "text": "object user"}),
    ("generic", {"id": "m-1", "user": {"id": "u-1", "name": 42}, "text": "number name"}),
    ("generic", {"id": "m-1", "user": {"id": "u-1"}, "text": "t", "locale": ["en"]}),
    ("generic", {"id": "m-1", "user": {"id": "u-1"}, "text": "t", "media": [{"url": 7}]}),
    ("generic", {"id": True, "user": {"id": "u-1"}, "text": "bool id"}),
    ("whatsapp", whatsapp_body({"messages": [{"from": "1555", "id": 12, "type": "text", "text": {"body": "x"}}]})),
    ("whatsapp", whatsapp_body({"contacts": [{"wa_id": "1555", "profile": {"name": ["Zoë"]}}], "messages": [
        {"from": "1555", "id": "wamid.N", "type": "text", "text": {"body": "x"}}]})),
    ("bird", bird_body({"type": "text", "text": {"text": "x"}}, id={"uuid": "4a8f"})),
    ("bird", bird_body({"type": "image", "image": {"images": [{"mediaUrl": ["https://media.bird.com/a.jpg"]}]}})),
    ("messagebird", messagebird_body({"type": "text", "content": {"text": "x"}, "id": ["6c9f"]})),
    ("messagebird", messagebird_body({"type": "text", "content": {"text": "x"}},
                                     contact={"id": "c1", "displayName": {"first": "Renée"}})),
])
def test_values_of_the_wrong_kind_are_a_bad_payload(provider, body):
    adapter = whatsapp_adapter() if provider == "whatsapp" else make_adapter(provider)
    with pytest.raises(BadPayload):
        adapter.parse(post(body))


def test_numeric_ids_are_read_as_their_digits():
    [message] = make_adapter("messagebird").parse(post(messagebird_body(
        {"type": "text", "content": {"text": "x"}, "id": 6123, "from": 31600000001})))
    assert (message.message_id, message.user_id) == ("6123", "31600000001")
