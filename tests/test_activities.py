"""Activities built from channel messages and channel messages rendered from the bot's activities."""

import hashlib
import hmac
import json

import pytest

from relay.activities import (
    ACTIVITY_LIMIT_BYTES,
    build_inbound_activity,
    directline_user_id,
    is_interim,
    render_outbound,
)
from relay.channels.base import InboundMessage, Media


def keyed_with(secret: bytes):
    """A stand-in for Tables.key_for under `secret` (the real one keeps its secret in Table Storage)."""
    return lambda *ids: hmac.new(secret, json.dumps(ids).encode(), hashlib.sha256).hexdigest()[:32]


KEY_FOR = keyed_with(b"this relay's secret")
USER_ID = directline_user_id("twilio", "+15550001", key_for=KEY_FOR)


def message(**overrides):
    values = {"message_id": "SM123", "user_id": "+15550001", "text": "Hello ✓", "user_name": "Ada",
              "raw": {"Body": "Hello ✓", "From": "+15550001"}}
    values.update(overrides)
    return InboundMessage(**values)


def test_inbound_activity_carries_identity_text_media_and_omnichannel_data():
    activity = build_inbound_activity(
        message(media=(Media("https://m.example/1.jpg", "image/jpeg"),), locale="en-GB"),
        channel="twilio", user_id=USER_ID,
        omnichannel={"channeltype": "sms", "conversationcontext": {"Product": "Xbox"},
                     "customercontext": {"phonenumber": "{user_id}", "name": "{user_name}"}},
    )
    assert activity["type"] == "message"
    assert activity["text"] == "Hello ✓"
    assert activity["from"]["id"] == USER_ID
    assert activity["from"]["id"].startswith("dl_")
    assert "+15550001" not in activity["from"]["id"]
    assert activity["locale"] == "en-GB"
    assert activity["attachments"] == [{"contentType": "image/jpeg", "contentUrl": "https://m.example/1.jpg"}]
    data = activity["channelData"]
    assert data["clientActivityID"] == "twilio:SM123"
    assert data["channeltype"] == "sms"
    assert data["conversationcontext"] == {"Product": "Xbox"}
    assert data["customercontext"] == {"phonenumber": "+15550001", "name": "Ada"}
    assert data["relay"]["payload"] == {"Body": "Hello ✓", "From": "+15550001"}


def test_user_id_is_stable_per_channel_user_and_takes_the_relays_secret_to_work_out():
    assert directline_user_id("twilio", "+1", key_for=KEY_FOR) == directline_user_id("twilio", "+1", key_for=KEY_FOR)
    assert directline_user_id("twilio", "+1", key_for=KEY_FOR) != directline_user_id("whatsapp", "+1", key_for=KEY_FOR)
    # Knowing the number is not enough: without the secret nobody can post as this user.
    assert directline_user_id("twilio", "+1", key_for=KEY_FOR) != \
        directline_user_id("twilio", "+1", key_for=keyed_with(b"another secret"))
    assert directline_user_id("twilio", "+1", key_for=KEY_FOR) != \
        "dl_twilio_" + hashlib.sha256(b"twilio:+1").hexdigest()[:32]  # the unkeyed id of earlier versions


def test_oversized_activity_drops_optional_parts_but_never_the_text():
    text = "é" * 9000  # 18 KB of UTF-8: fits alone, not with a 20 KB raw payload
    activity = build_inbound_activity(message(text=text, raw={"blob": "x" * 20000}), channel="twilio",
                                      user_id=USER_ID)
    encoded = json.dumps(activity, ensure_ascii=False, separators=(",", ":")).encode()
    assert len(encoded) <= ACTIVITY_LIMIT_BYTES
    assert activity["text"] == text
    assert activity["channelData"]["clientActivityID"] == "twilio:SM123"
    assert activity["channelData"]["relay"]["trimmed"] is True


def test_small_activity_is_untouched():
    activity = build_inbound_activity(message(), channel="twilio", user_id=USER_ID)
    assert "trimmed" not in activity["channelData"]["relay"]


def test_render_text_hero_card_media_and_suggested_actions():
    rendered = render_outbound({
        "type": "message", "text": "Pick one",
        "suggestedActions": {"actions": [{"type": "imBack", "title": "Red", "value": "red"},
                                         {"type": "imBack", "value": "blue"}]},
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.hero",
             "content": {"title": "Card", "text": "Body", "images": [{"url": "https://i.example/a.png"}],
                         "buttons": [{"type": "imBack", "title": "Green", "value": "green"}]}},
            {"contentType": "application/pdf", "contentUrl": "https://f.example/x.pdf", "name": "x.pdf"},
        ],
    })
    assert rendered.text == "Pick one\n\nCard\nBody"
    assert [m.url for m in rendered.media] == ["https://i.example/a.png", "https://f.example/x.pdf"]
    assert [c.title for c in rendered.choices] == ["Green", "Red", "blue"]  # the card's buttons, then suggested


def test_nothing_to_deliver_for_typing_events_and_empty_messages():
    assert render_outbound({"type": "typing"}) is None
    assert render_outbound({"type": "event", "name": "x"}) is None
    assert render_outbound({"type": "message"}) is None


def test_adaptive_card_falls_back_to_its_text():
    rendered = render_outbound({"type": "message", "attachments": [
        {"contentType": "application/vnd.microsoft.card.adaptive", "content": {"fallbackText": "Plain version"}}]})
    assert rendered.text == "Plain version"


def streaminfo(stream_type: str) -> list[dict]:
    return [{"type": "streaminfo", "streamType": stream_type, "streamSequence": 1}]


@pytest.mark.parametrize(("activity", "interim"), [
    pytest.param({"type": "typing"}, True, id="typing"),
    pytest.param({"type": "typing", "text": "The ans", "entities": streaminfo("streaming")}, True,
                 id="a streamed step sent as typing"),
    pytest.param({"type": "message", "text": "The ans", "entities": streaminfo("streaming")}, True,
                 id="a streamed step sent as a message"),
    pytest.param({"type": "message", "text": "Searching...", "entities": streaminfo("informative")}, True,
                 id="an informative step"),
    pytest.param({"type": "message", "text": "The ans", "channelData": {"streamType": "streaming"}}, True,
                 id="a streamed step named in channelData"),
    pytest.param({"type": "message", "text": "The answer.", "entities": streaminfo("final")}, False,
                 id="the streamed answer's final message"),
    pytest.param({"type": "message", "text": "Hello", "entities": [{"type": "mention"}]}, False,
                 id="a plain message with other entities"),
])
def test_only_typing_and_a_streamed_answers_steps_are_interim(activity, interim):
    assert is_interim(activity) is interim
