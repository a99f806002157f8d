"""The LINE channel: signatures checked against line-bot-sdk (the official library), events parsed as LINE sends
them, and replies through the simulator's reply and push APIs: a reply token used once and only while fresh,
pushes retried without a second message, choices as quick reply buttons."""

from __future__ import annotations

import base64
import json

import pytest
from linebot.v3 import WebhookParser
from linebot.v3.exceptions import InvalidSignatureError
from linebot.v3.webhook import SignatureValidator

from devstack.channels import DEV_VALUES, webhooks
from relay.channels.base import Choice, InboundMessage, Media, OutboundMessage, WebhookRequest
from relay.channels.line import MESSAGES_PER_CALL, QUICK_REPLY_LIMIT, REPLY_TOKEN_SECONDS, compute_signature
from relay.clock import ManualClock
from relay.errors import BadPayload, ProviderRejected, ProviderUnavailable, SignatureInvalid
from tests.channels.conftest import make_adapter

SECRET = DEV_VALUES["LINE_CHANNEL_SECRET"]
USER = webhooks.line_user("test")
URL = "https://relay.example.net/api/channels/line"


def webhook(*, text: str = "hi", user: str = USER, **options) -> webhooks.Webhook:
    return webhooks.build("line", DEV_VALUES, "https://relay.example.net", sender=user, text=text, **options)


def request_of(hook: webhooks.Webhook, *, body: bytes | None = None, signature: str | None = None) -> WebhookRequest:
    headers = dict(hook.headers)
    if signature is not None:
        headers["X-Line-Signature"] = signature
    return WebhookRequest("POST", hook.url, headers, hook.body if body is None else body)


def signed(events: list[dict], **options) -> WebhookRequest:
    raw = json.dumps({"destination": "U" + "0" * 32, "events": events}).encode()
    return WebhookRequest("POST", URL, {"X-Line-Signature": compute_signature(SECRET, raw)}, raw, **options)


def event(kind: str = "message", **fields) -> dict:
    return {"type": kind, "webhookEventId": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "replyToken": "token-1",
            "deliveryContext": {"isRedelivery": False}, "mode": "active", "source": {"type": "user", "userId": USER},
            **fields}


# ---------------------------------------------------------------------------------------------- signatures
def test_the_official_validator_accepts_our_signature_and_we_accept_the_simulators():
    hook = webhook(text="Grüß Gott 👋")
    assert SignatureValidator(SECRET).validate(hook.body.decode(), compute_signature(SECRET, hook.body))
    [parsed] = WebhookParser(SECRET).parse(hook.body.decode(), hook.headers["X-Line-Signature"])
    assert parsed.webhook_event_id == hook.message_id
    make_adapter("line").verify(request_of(hook))


@pytest.mark.parametrize("tamper", ["body", "signature", "secret", "missing", "not base64"])
def test_a_tampered_or_unsigned_webhook_is_refused_as_the_official_library_refuses_it(tamper):
    hook = webhook()
    body, signature, secret = hook.body, hook.headers["X-Line-Signature"], SECRET
    if tamper == "body":
        body = body.replace(b'"hi"', b'"hI"')
    elif tamper == "signature":
        signature = base64.b64encode(b"\0" * 32).decode()
    elif tamper == "secret":
        secret = "another-secret"
    elif tamper == "missing":
        signature = ""
    else:
        signature = "%%%"
    if tamper != "missing":
        with pytest.raises(InvalidSignatureError):
            WebhookParser(secret).parse(body.decode(), signature)
    with pytest.raises(SignatureInvalid):
        make_adapter("line", {"LINE_CHANNEL_SECRET": secret}).verify(request_of(hook, body=body, signature=signature))


# ---------------------------------------------------------------------------------------------- parsing
def test_a_text_message_is_one_message_keyed_by_its_webhook_event_id_with_a_fresh_reply_token():
    clock = ManualClock()
    hook = webhook(text="hello", now=clock.now().timestamp())
    [message] = make_adapter("line", clock=clock).parse(request_of(hook))
    assert (message.message_id, message.user_id, message.text) == (hook.message_id, USER, "hello")
    assert message.reply_context == {"to": USER, "reply_token": hook.reply_tokens[0],
                                     "reply_by": f"{clock.now().timestamp() + REPLY_TOKEN_SECONDS:.0f}"}


def test_a_redelivered_event_is_relayed_without_its_reply_token():
    [message] = make_adapter("line").parse(signed([event(
        message={"type": "text", "id": "1", "text": "again"}, deliveryContext={"isRedelivery": True})]))
    assert message.reply_context == {"to": USER}


@pytest.mark.parametrize("events", [
    pytest.param([], id="the console's verify call"),
    pytest.param([event("follow")], id="follow"),
    pytest.param([event("unfollow", replyToken=None)], id="unfollow"),
    pytest.param([event(message={"type": "sticker", "id": "1", "packageId": "1", "stickerId": "1"})], id="sticker"),
    pytest.param([event(message={"type": "text", "id": "1", "text": "x"}, mode="standby")], id="standby"),
    pytest.param([event(message={"type": "text", "id": "1", "text": "x"},
                        source={"type": "group", "groupId": "C1", "userId": USER})], id="group chat"),
    pytest.param([event(message={"type": "text", "id": "1", "text": "x"}, timestamp=1_000_000_000_000)],
                 id="older than the dedupe memory"),
])
def test_events_with_nothing_for_the_bot_are_acknowledged_not_relayed(events):
    assert make_adapter("line").parse(signed(events)) == []


def test_a_quick_reply_postback_carries_the_choice_id_and_title():
    data = "choice=abcd1234-0-1&text=Medium+size"
    [message] = make_adapter("line").parse(signed([event("postback", postback={"data": data})]))
    assert (message.reply_id, message.text) == ("abcd1234-0-1", "Medium size")


def test_a_postback_of_the_accounts_own_rich_menu_reaches_the_bot_as_its_data():
    [message] = make_adapter("line").parse(signed([event("postback", postback={"data": "action=menu"})]))
    assert (message.reply_id, message.text) == (None, "action=menu")


def test_an_image_is_protected_media_on_the_content_api():
    [message] = make_adapter("line").parse(signed([event(message={"type": "image", "id": "325708",
                                                                  "contentProvider": {"type": "line"}})]))
    [media] = message.media
    assert media.url == f"{DEV_VALUES['LINE_DATA_API_BASE']}/v2/bot/message/325708/content" and media.protected


@pytest.mark.parametrize("events", [
    [{"type": "message"}],
    [event(source={"type": "user"}, message={"type": "text", "id": "1", "text": "x"})],
    [event(message={"type": "image"})],
    [event(message={"type": "text", "id": "1", "text": "x"}, timestamp="yesterday")],
])
def test_a_malformed_event_is_a_bad_payload(events):
    with pytest.raises(BadPayload):
        make_adapter("line").parse(signed(events))


# ---------------------------------------------------------------------------------------------- sending
def line_adapter(sim, clock=None, **values: str):
    return make_adapter("line", {**sim.api_bases(), **values}, **({"clock": clock} if clock else {}))


def issued(sim, text: str = "hi") -> tuple[dict[str, str], str]:
    """A user's message through the simulator (which issues its reply token), as the relay parses it."""
    answer = sim.send_inbound("line", USER, text)
    request = WebhookRequest("POST", answer["webhook"]["url"], answer["webhook"]["headers"],
                             base64.b64decode(answer["webhook"]["body_b64"]))
    [message] = make_adapter("line").parse(request)
    return dict(message.reply_context), message.message_id


def test_the_first_reply_uses_the_reply_token_and_a_later_one_pushes(sim):
    adapter = line_adapter(sim)
    context, _ = issued(sim)
    adapter.send(context, OutboundMessage(text="first", idempotency_key="a1"))
    adapter.send(adapter.spend(context), OutboundMessage(text="second", idempotency_key="a2"))
    replies = sim.replies("line", USER)
    assert [(r["text"], r["request"]["api"]) for r in replies] == [("first", "reply"), ("second", "push")]


def test_a_reply_token_past_its_time_is_not_used(sim):
    clock = ManualClock()
    context, _ = issued(sim)
    clock.advance(REPLY_TOKEN_SECONDS + 1)
    line_adapter(sim, clock=clock).send(context, OutboundMessage(text="late"))
    [reply] = sim.replies("line", USER)
    assert reply["request"]["api"] == "push"


def test_a_reply_token_line_no_longer_takes_falls_back_to_a_push(sim):
    adapter = line_adapter(sim)
    context, _ = issued(sim)
    adapter.send(context, OutboundMessage(text="first"))
    adapter.send(context, OutboundMessage(text="token used already"))  # the simulator answers "Invalid reply token"
    assert [(r["text"], r["request"]["api"]) for r in sim.replies("line", USER)] == [
        ("first", "reply"), ("token used already", "push")]


def test_a_push_retried_after_line_took_it_reaches_the_user_once(sim):
    adapter = line_adapter(sim)
    message = OutboundMessage(text="once", idempotency_key="activity-7")
    adapter.send({"to": USER}, message)
    adapter.send({"to": USER}, message)  # LINE answers 409: the retry key was taken
    assert [r["text"] for r in sim.replies("line", USER)] == ["once"]


def test_choices_are_quick_reply_buttons_whose_postback_comes_back_as_the_choice(sim):
    adapter = line_adapter(sim)
    choices = (Choice("q1-0-0", "Small"), Choice("q1-0-1", "A rather long medium size"), Choice("q1-0-2", "Large"))
    adapter.send({"to": USER}, OutboundMessage(text="Which size?", choices=choices))
    [reply] = sim.replies("line", USER)
    assert reply["text"] == "Which size?"
    assert [c["title"] for c in reply["choices"]] == ["Small", "A rather long medium size", "Large"]
    answer = sim.send_inbound("line", USER, reply_id=reply["choices"][1]["id"])
    [message] = make_adapter("line").parse(WebhookRequest("POST", URL, answer["webhook"]["headers"],
                                                          base64.b64decode(answer["webhook"]["body_b64"])))
    assert (message.reply_id, message.text) == ("q1-0-1", "A rather long medium size")


def test_more_choices_than_quick_reply_buttons_are_numbered_in_the_text(sim):
    choices = tuple(Choice(f"q-0-{n}", f"Option {n}") for n in range(QUICK_REPLY_LIMIT + 1))
    line_adapter(sim).send({"to": USER}, OutboundMessage(text="Pick", choices=choices))
    [reply] = sim.replies("line", USER)
    assert reply["choices"] == [] and "14. Option 13" in reply["text"]


def test_more_messages_than_one_call_takes_go_in_calls_of_five(sim):
    images = tuple(Media(f"https://cdn.example/{n}.png", "image/png") for n in range(MESSAGES_PER_CALL + 1))
    ids = line_adapter(sim).send({"to": USER}, OutboundMessage(text="six images", media=images))
    replies = sim.replies("line", USER)
    assert len(ids) == len(replies) == 2
    assert [len(r["request"]["messages"]) for r in replies] == [MESSAGES_PER_CALL, 2]


PHOTO = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def sent_photo(sim, text: str = "") -> list[InboundMessage]:
    """The messages of a user's photo (and text) sent through the simulator, as the relay's adapter parses them."""
    url = "data:image/png;base64," + base64.b64encode(PHOTO).decode()
    answer = sim.send_inbound("line", USER, text, media=[{"url": url, "contentType": "image/png"}])
    return line_adapter(sim).parse(WebhookRequest("POST", URL, answer["webhook"]["headers"],
                                                  base64.b64decode(answer["webhook"]["body_b64"])))


def test_a_users_text_and_photo_are_two_messages_as_line_sends_them(sim):
    caption, photo = sent_photo(sim, "look")
    assert (caption.text, caption.media, photo.text, len(photo.media)) == ("look", (), "", 1)
    assert caption.message_id != photo.message_id


def test_a_users_image_is_fetched_from_the_content_api_with_the_access_token(sim):
    [message] = sent_photo(sim)
    fetched = line_adapter(sim).fetch_media(message.media[0], max_bytes=1000)
    assert (fetched.content, fetched.content_type) == (PHOTO, "image/png")


def test_media_with_the_wrong_token_is_refused_for_good_and_an_outage_is_transient(sim):
    [message] = sent_photo(sim)
    with pytest.raises(ProviderRejected) as caught:
        line_adapter(sim, LINE_CHANNEL_ACCESS_TOKEN="not-the-token").fetch_media(message.media[0], max_bytes=1000)
    assert "401" in str(caught.value) and "not-the-token" not in str(caught.value)
    sim.fail_next("line", 503, retry_after=7)
    with pytest.raises(ProviderUnavailable) as unavailable:
        line_adapter(sim).fetch_media(message.media[0], max_bytes=1000)
    assert unavailable.value.retry_after == 7


def test_a_reply_line_refuses_for_another_reason_is_refused_for_good_not_pushed(sim):
    context, _ = issued(sim)
    sim.fail_next("line", 400)
    with pytest.raises(ProviderRejected, match="400"):
        line_adapter(sim).send(context, OutboundMessage(text="refused"))
    assert sim.replies("line", USER) == []
