"""LINE Messaging API: X-Line-Signature webhooks in, reply-token replies or pushes out.

The signature is base64 HMAC-SHA256 of the raw body with the channel secret, compared in constant
time; no time is signed, so a replay is caught by the dedupe on each event's `webhookEventId` (in the
signed body), and an event whose signed `timestamp` is older than the relay remembers ids
(DEDUPE_RETENTION) is acknowledged, not relayed, as WhatsApp's are. LINE redelivers an event the
relay did not take (`deliveryContext.isRedelivery`, same `webhookEventId`) when redelivery is on.

Replies: an event's `replyToken` may be used once, within a minute of the webhook (LINE's reference:
"must be used within one minute"; it answers 400 "Invalid reply token" after), and reply messages are
free. The reply context keeps the token with the time it must be used by (REPLY_TOKEN_SECONDS, less
than LINE's minute, for the call itself); `spend` drops it, and the relay stores that before the
send, so a token is never sent twice: a later reply, or a retry after a failed one, pushes
(`POST /v2/bot/message/push`, which counts against the channel's monthly message quota) with an
`X-Line-Retry-Key` made from the bot activity's id, so a retried push reaches the user once (LINE
answers 409 for a key it already took). A redelivered event's token is never used (it is older than
the webhook that failed). A reply whose token LINE calls invalid (expired early) is pushed instead.

A message is at most MESSAGES_PER_CALL message objects per call (parts of the reply); a question's
choices go out as quick reply buttons on the last one (postback actions whose `data` is the choice's
id, shown in the chat as the choice's title), numbered in the text when they do not fit. A tap
comes back as a postback event whose `data` carries the choice's id (`InboundMessage.reply_id`, which
relay/cards.py turns into the card's `value`) and its title (the message's text).

Users' images, videos, audio and files are on LINE's content API behind the access token (protected
media); one LINE hosts elsewhere (`contentProvider.type` "external") has a public URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import mimetypes
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import requests

from relay.channels.base import Choice, InboundMessage, Media, MediaContent, OutboundMessage, WebhookRequest
from relay.channels.common import (
    AdapterBase,
    b64decode_or_none,
    call_provider,
    download,
    finite_number,
    identifier,
    json_body,
    media_file_name,
    message_text,
    require_header,
    response_json,
    same,
    send_parts,
    split_text,
)
from relay.errors import BadPayload, ProviderRejected, SignatureInvalid
from relay.formatting import ChannelKind, format_for

__all__ = [
    "LABEL_LIMIT",
    "MESSAGES_PER_CALL",
    "POSTBACK_DATA_LIMIT",
    "QUICK_REPLY_LIMIT",
    "REPLY_TOKEN_SECONDS",
    "TEXT_LIMIT",
    "LineAdapter",
    "compute_signature",
]

TEXT_LIMIT = 5000
MESSAGES_PER_CALL = 5
QUICK_REPLY_LIMIT = 13
LABEL_LIMIT = 20
POSTBACK_DATA_LIMIT = 300
DISPLAY_TEXT_LIMIT = 300
REPLY_TOKEN_SECONDS = 50
"""How long after its webhook a reply token is used: LINE keeps it for a minute; the rest is the call's own time."""
CHOOSE_PROMPT = "Choose one:"
MEDIA_TYPES = ("image", "video", "audio", "file")
EXPIRED_REPLY_MESSAGE = "Invalid reply token"
"""LINE's 400 message for a reply token used already or too late."""
RETRY_KEYS = uuid.UUID("6f1c2a4e-7d0b-4c59-9a51-4c1f0f3b2e77")
"""Namespace of the X-Line-Retry-Key values, each derived from the user, the bot activity and the part."""

log = logging.getLogger(__name__)


def compute_signature(channel_secret: str, body: bytes) -> str:
    """The X-Line-Signature header value LINE sends for `body`."""
    return base64.b64encode(hmac.new(channel_secret.encode(), body, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class _Part:
    """One API call of a reply: its place in the reply and its message objects."""

    index: int
    messages: tuple[dict[str, Any], ...]


def _object(value: Any) -> dict[str, Any]:
    """A JSON object of the payload, or {} for anything else (absent, a list, a string)."""
    return value if isinstance(value, dict) else {}


def _label(title: str) -> str:
    title = " ".join(title.split())
    return title if len(title) <= LABEL_LIMIT else title[:LABEL_LIMIT - 1] + "\u2026"


def _postback_data(choice: Choice) -> str:
    """What a quick reply button posts back: the choice's id and, when it fits, its title (the text the bot
    gets should the question be forgotten meanwhile), as a query string, the form LINE's examples use."""
    with_title = urlencode({"choice": choice.id, "text": choice.title.strip()})
    return with_title if len(with_title) <= POSTBACK_DATA_LIMIT else urlencode({"choice": choice.id})


def _postback_answer(data: str) -> tuple[str, str | None]:
    """The text and the chosen id (None unless it is a quick reply button of ours) of a postback's data."""
    fields = dict(parse_qsl(data, keep_blank_values=True)) if len(data) <= POSTBACK_DATA_LIMIT else {}
    chosen = fields.get("choice") or None
    return (fields.get("text") or chosen or "", chosen) if chosen else (data, None)


def _quick_reply(choices: tuple[Choice, ...]) -> dict[str, Any] | None:
    """Quick reply buttons for the choices when they fit LINE's (at most 13, data of at most 300 characters,
    titles to show), else None."""
    if not 0 < len(choices) <= QUICK_REPLY_LIMIT or not all(c.title.strip() for c in choices) or \
            any(len(_postback_data(c)) > POSTBACK_DATA_LIMIT for c in choices):
        return None
    return {"items": [{"type": "action", "action": {
        "type": "postback", "label": _label(c.title), "data": _postback_data(c),
        "displayText": c.title.strip()[:DISPLAY_TEXT_LIMIT]}} for c in choices]}


class LineAdapter(AdapterBase):
    name = "line"

    def __init__(self, config: Mapping[str, str], **options):
        super().__init__(config, **options)
        self._channel_secret = self._setting("LINE_CHANNEL_SECRET", required=True)
        self._access_token = self._setting("LINE_CHANNEL_ACCESS_TOKEN", required=True,
                                           why="to send replies and read users' media")
        self.api_base = (self._setting("LINE_API_BASE") or "https://api.line.me").rstrip("/")
        self.data_api_base = (self._setting("LINE_DATA_API_BASE") or "https://api-data.line.me").rstrip("/")

    def verify(self, request: WebhookRequest) -> None:
        self.check_size(request)
        given = b64decode_or_none(require_header(request, "X-Line-Signature"))
        expected = base64.b64decode(compute_signature(self._channel_secret, request.body))
        if given is None or not same(expected, given):
            raise SignatureInvalid("the X-Line-Signature does not match the body")

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        body = json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise BadPayload("the LINE webhook has no events[] list")
        # An empty events[] is the console's "Verify" call: acknowledged.
        return [message for event in body["events"] if (message := self._message(event)) is not None]

    def _message(self, event: Any) -> InboundMessage | None:
        if not isinstance(event, dict):
            raise BadPayload("a LINE event is not an object")
        event_id = identifier(event.get("webhookEventId"))
        if not event_id:
            raise BadPayload("a LINE event has no webhookEventId")
        kind = event.get("type")
        if kind not in ("message", "postback"):
            return None  # follow, unfollow, unsend, join...: nothing for the bot
        if event.get("mode", "active") != "active":
            return None  # standby: another channel answers this user (LINE: "shouldn't send any messages")
        source = _object(event.get("source"))
        user = identifier(source.get("userId"))
        if source.get("type", "user") != "user":
            log.info("LINE event %s comes from a %s chat: only one-on-one chats are relayed", event_id,
                     str(source.get("type"))[:20])
            return None
        if not user:
            raise BadPayload(f"LINE event {event_id} has no source.userId")
        if self._outlived_dedupe(event, event_id):
            return None
        if kind == "postback":
            postback = _object(event.get("postback"))
            text, reply_id = _postback_answer(str(identifier(postback.get("data")) or ""))
            media: tuple[Media, ...] = ()
        else:
            content = self._content(event, event_id)
            if content is None:
                return None
            (text, media), reply_id = content, None
        return InboundMessage(
            message_id=event_id,
            user_id=user,
            text=text,
            media=media,
            reply_id=reply_id,
            reply_context=self._reply_context(event, user),
            raw=event,
        )

    def _outlived_dedupe(self, event: dict[str, Any], event_id: str) -> bool:
        """True (and logged) for an event sent before the relay's dedupe memory began; BadPayload when its
        timestamp is not a number of milliseconds. An event without one is judged new."""
        stamp = event.get("timestamp")
        if stamp is None:
            return False
        if not finite_number(stamp) or stamp < 0:
            raise BadPayload(f"LINE event {event_id} has a timestamp that is not milliseconds")
        if not self.outlived_dedupe(int(stamp // 1000)):
            return False
        log.warning("LINE event %s is older than the relay's dedupe memory: acknowledged, not relayed "
                    "(a replay, or a redelivery too late to tell from one)", event_id)
        return True

    def _reply_context(self, event: dict[str, Any], user: str) -> dict[str, str]:
        """Where replies go, with the event's reply token and the Unix time to use it by while it is fresh."""
        context = {"to": user}
        token = identifier(event.get("replyToken"))
        redelivered = _object(event.get("deliveryContext")).get("isRedelivery") is True
        if token and not redelivered:
            by = self.clock.now().timestamp() + REPLY_TOKEN_SECONDS
            context |= {"reply_token": token, "reply_by": f"{by:.0f}"}
        return context

    def _content(self, event: dict[str, Any], event_id: str) -> tuple[str, tuple[Media, ...]] | None:
        message = _object(event.get("message"))
        kind = message.get("type")
        if kind == "text":
            return str(message.get("text") or ""), ()
        if kind in MEDIA_TYPES:
            message_id = identifier(message.get("id"))
            if not message_id:
                raise BadPayload(f"LINE {kind} event {event_id} has no message id")
            provider = _object(message.get("contentProvider"))
            name = identifier(message.get("fileName"))
            content_type = (mimetypes.guess_type(name)[0] if name else None) or \
                {"image": "image/jpeg", "video": "video/mp4", "audio": "audio/m4a"}.get(kind)
            external = identifier(provider.get("originalContentUrl"))
            if provider.get("type") == "external" and external:
                return "", (Media(url=external, content_type=content_type, name=name),)
            url = f"{self.data_api_base}/v2/bot/message/{quote(message_id, safe='')}/content"
            return "", (Media(url=url, content_type=content_type, name=name, protected=True),)
        if kind == "location":
            label = ", ".join(str(message[k]) for k in ("title", "address") if message.get(k))
            coordinates = f"{message.get('latitude')},{message.get('longitude')}"
            return (f"{label} ({coordinates})" if label else coordinates), ()
        return None  # stickers and what LINE adds later: nothing for the bot

    def fetch_media(self, media: Media, *, max_bytes: int) -> MediaContent:
        """A user's file from the content API, with the access token."""
        if not media.url.startswith(self.data_api_base + "/"):
            raise ProviderRejected("the LINE media is not on the content API", reason="MediaNotFetched")
        content, served_type = download(self.session, self.name, media.url, max_bytes=max_bytes, clock=self.clock,
                                        headers=self._bearer())
        content_type = served_type or media.content_type or "application/octet-stream"
        stem = media.url.rsplit("/", 2)[-2]
        return MediaContent(content, content_type, media.name or media_file_name(stem, content_type))

    def spend(self, reply_context: Mapping[str, str]) -> Mapping[str, str]:
        return {k: v for k, v in reply_context.items() if k not in ("reply_token", "reply_by")}

    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        to = reply_context.get("to")
        if not to:
            raise ProviderRejected("the LINE reply context needs 'to'")
        message = replace(message, text=format_for(ChannelKind.PLAIN, message.text))
        objects = self._objects(message)
        parts = [_Part(index, tuple(objects[start:start + MESSAGES_PER_CALL]))
                 for index, start in enumerate(range(0, len(objects), MESSAGES_PER_CALL))]
        token = self._fresh_token(reply_context)

        def send_one(part: _Part) -> str:
            if part.index == 0 and token:
                sent = self._reply(token, part.messages)
                if sent is not None:
                    return sent
            return self._push(to, part, message.idempotency_key)

        return send_parts(parts, send_one, first_part=first_part)

    def _fresh_token(self, reply_context: Mapping[str, str]) -> str | None:
        by = reply_context.get("reply_by", "")
        if not reply_context.get("reply_token") or not by.isdigit():
            return None
        return reply_context["reply_token"] if self.clock.now().timestamp() < int(by) else None

    def _objects(self, message: OutboundMessage) -> list[dict[str, Any]]:
        """Images first (LINE shows only HTTPS ones), then the text with other media as links; a question's
        choices as quick reply buttons on the last message, or numbered in the text when they do not fit."""
        images = [m for m in message.media if (m.content_type or "").startswith("image/")
                  and m.url.startswith("https://")]
        links = [m.url for m in message.media if m not in images]
        objects: list[dict[str, Any]] = [
            {"type": "image", "originalContentUrl": m.url, "previewImageUrl": m.url} for m in images]
        quick_reply = _quick_reply(message.choices) if message.choices and not message.multiple else None
        text = message.text if quick_reply else message_text(message)
        text = "\n".join(piece for piece in (text, *links) if piece)
        if quick_reply and not text:
            text = CHOOSE_PROMPT
        objects.extend({"type": "text", "text": piece} for piece in split_text(text, TEXT_LIMIT) if piece)
        if quick_reply:
            objects[-1]["quickReply"] = quick_reply
        return objects

    def _bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._access_token}"}

    def _reply(self, token: str, messages: tuple[dict[str, Any], ...]) -> str | None:
        """Send with the reply token; None when LINE calls the token invalid (expired or used), so the caller
        pushes instead."""
        response = call_provider(self.session, self.name, "POST", f"{self.api_base}/v2/bot/message/reply",
                                 json={"replyToken": token, "messages": list(messages)}, headers=self._bearer(),
                                 clock=self.clock, answers=(400,))
        if response.status_code == 400:
            answer = response_json(response)
            if answer.get("message") != EXPIRED_REPLY_MESSAGE:
                details = [f"{d.get('property')}: {d.get('message')}" for d in answer.get("details") or []
                           if isinstance(d, dict)]
                problem = "; ".join([str(answer.get("message") or "no details"), *details])[:300]
                raise ProviderRejected(f"the LINE API rejected the reply with 400: {problem}")
            log.info("LINE called a reply token invalid (expired before its minute); pushing instead")
            return None
        return _request_id(response)

    def _push(self, to: str, part: _Part, idempotency_key: str) -> str:
        """Push one part; with the message's idempotency key, a retry LINE already took answers 409 (done)."""
        headers = self._bearer()
        if idempotency_key:
            headers["X-Line-Retry-Key"] = str(uuid.uuid5(RETRY_KEYS, f"{to}/{idempotency_key}/{part.index}"))
        response = call_provider(self.session, self.name, "POST", f"{self.api_base}/v2/bot/message/push",
                                 json={"to": to, "messages": list(part.messages)}, headers=headers,
                                 clock=self.clock, answers=(409,) if idempotency_key else ())
        if response.status_code == 409:
            log.info("LINE had already taken this push (its retry key was used): not sent again")
        return _request_id(response)


def _request_id(response: requests.Response) -> str:
    """LINE's id of the call that sent the messages (of the first accepted one, for a 409 retry)."""
    return response.headers.get("x-line-accepted-request-id") or response.headers.get("x-line-request-id") or ""
