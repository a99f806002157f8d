"""Meta WhatsApp Cloud API: the GET verification handshake, X-Hub-Signature-256 webhooks, Graph replies.

One POST may carry several messages and delivery `statuses[]`; statuses are acknowledged, not
relayed. Meta signs no time in a header, but each message's `timestamp` is in the signed body: a
message sent longer ago than the relay remembers message ids (DEDUPE_RETENTION, 7 days, as long as
Meta retries) is acknowledged and logged, not relayed, so a webhook replayed after its dedupe row was
swept reaches no bot. Acknowledged rather than refused: Meta retries every non-200 for days, and a
refusal would only tell a replaying party its replay was seen.

Media arrive as ids: `Media.url` is the Graph media object (`{API_BASE}/{media-id}`), marked
protected: `fetch_media` reads it with the access token (`{url, mime_type, sha256, file_size, id}`) and
downloads the short-lived `url` with the same bearer, as Meta documents.

A question's choices go out as interactive reply buttons or a list, each option's id the one the
question gave it (relay/cards.py); the user's `button_reply`/`list_reply` comes back as its title for
text and its id as `InboundMessage.reply_id`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from relay.channels.base import (
    Choice,
    InboundMessage,
    Media,
    MediaContent,
    OutboundMessage,
    WebhookAnswer,
    WebhookRequest,
)
from relay.channels.common import (
    AdapterBase,
    call_provider,
    download,
    identifier,
    json_body,
    media_file_name,
    message_text,
    require_header,
    response_json,
    same,
    send_parts,
    split_text,
    unix_time,
)
from relay.errors import BadPayload, ProviderRejected, ProviderUnavailable, SignatureInvalid, VerifyTokenMismatch
from relay.formatting import ChannelKind, format_for

__all__ = [
    "BUTTON_LIMIT",
    "BUTTON_TITLE_LIMIT",
    "CHOOSE_PROMPT",
    "INTERACTIVE_BODY_LIMIT",
    "LIST_DESCRIPTION_LIMIT",
    "LIST_ROW_LIMIT",
    "LIST_TITLE_LIMIT",
    "TEXT_LIMIT",
    "WhatsAppAdapter",
    "compute_signature",
    "interactive_object",
    "media_kind",
]

TEXT_LIMIT = 4096
BUTTON_LIMIT = 3
BUTTON_TITLE_LIMIT = 20
INTERACTIVE_BODY_LIMIT = 1024
LIST_ROW_LIMIT = 10
LIST_TITLE_LIMIT = 24
LIST_DESCRIPTION_LIMIT = 72
LIST_BUTTON = "Choose"
"""The list message's button (at most 20 characters), which opens the rows."""
CHOOSE_PROMPT = "Choose one:"
MEDIA_TYPES = ("image", "video", "audio", "document", "sticker")

log = logging.getLogger(__name__)


def compute_signature(app_secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 header value Meta sends for `body`."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def interactive_object(choices: tuple[Choice, ...]) -> dict[str, Any] | None:
    """Reply buttons when the choices fit them, else a list when they fit one, else None (body added by the caller).
    Vonage's WhatsApp channel sends the same object (relay/channels/vonage.py)."""
    titles = [c.title for c in choices]
    if len(choices) <= BUTTON_LIMIT and all(0 < len(t) <= BUTTON_TITLE_LIMIT for t in titles) \
            and len(set(titles)) == len(titles):
        return {"type": "button", "action": {"buttons": [
            {"type": "reply", "reply": {"id": c.id, "title": c.title}} for c in choices]}}
    if len(choices) <= LIST_ROW_LIMIT and all(c.title.strip() for c in choices):
        rows = []
        for choice in choices:
            title = choice.title.strip()
            row = {"id": choice.id, "title": title if len(title) <= LIST_TITLE_LIMIT
                   else title[:LIST_TITLE_LIMIT - 1] + "\u2026"}
            if len(title) > LIST_TITLE_LIMIT:
                row["description"] = title if len(title) <= LIST_DESCRIPTION_LIMIT \
                    else title[:LIST_DESCRIPTION_LIMIT - 1] + "\u2026"
            rows.append(row)
        return {"type": "list", "action": {"button": LIST_BUTTON, "sections": [{"rows": rows}]}}
    return None


def media_kind(content_type: str | None) -> str:
    major = (content_type or "").split("/")[0]
    return major if major in ("image", "video", "audio") else "document"


def _interactive_reply(message: dict[str, Any]) -> dict[str, Any]:
    """The button or list row an interactive reply chose ({id, title, ...}), else {}."""
    interactive = message.get("interactive") if message.get("type") == "interactive" else None
    if not isinstance(interactive, dict):
        return {}
    reply = interactive.get("button_reply") or interactive.get("list_reply")
    return reply if isinstance(reply, dict) else {}


class WhatsAppAdapter(AdapterBase):
    name = "whatsapp"

    def __init__(self, config: Mapping[str, str], **options):
        super().__init__(config, **options)
        self._app_secret = self._setting("WHATSAPP_APP_SECRET", required=True)
        self._verify_token = self._setting("WHATSAPP_VERIFY_TOKEN", required=True, why="for Meta's handshake")
        self._access_token = self._setting("WHATSAPP_ACCESS_TOKEN", required=True, why="to send replies")
        self.phone_number_id = self._setting("WHATSAPP_PHONE_NUMBER_ID", required=True, why="to send replies")
        self.api_base = (self._setting("WHATSAPP_API_BASE") or "https://graph.facebook.com/v21.0").rstrip("/")

    def handshake(self, request: WebhookRequest) -> WebhookAnswer | None:
        if request.method.upper() != "GET":
            return None
        query = dict(request.query) or dict(parse_qsl(urlsplit(request.url).query, keep_blank_values=True))
        token = query.get("hub.verify_token", "")
        if query.get("hub.mode") != "subscribe" or not same(self._verify_token, token):
            raise VerifyTokenMismatch("the hub.verify_token does not match WHATSAPP_VERIFY_TOKEN")
        return WebhookAnswer(200, query.get("hub.challenge", "").encode(), "text/plain")

    def verify(self, request: WebhookRequest) -> None:
        self.check_size(request)
        given = require_header(request, "X-Hub-Signature-256")
        if not same(compute_signature(self._app_secret, request.body), given.lower()):
            raise SignatureInvalid("the X-Hub-Signature-256 does not match the body")

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        body = json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("entry"), list):
            raise BadPayload("the WhatsApp webhook has no entry[] list")
        messages = []
        for entry in body["entry"]:
            for change in (entry or {}).get("changes") or []:
                value = (change or {}).get("value") or {}
                if isinstance(value, dict):
                    messages.extend(self._messages(value))
        return messages

    def _messages(self, value: dict[str, Any]) -> list[InboundMessage]:
        phone_number_id = str((value.get("metadata") or {}).get("phone_number_id") or self.phone_number_id)
        contacts = {}
        for contact in value.get("contacts") or []:
            for key in ("wa_id", "user_id"):
                if contact.get(key):
                    contacts[contact[key]] = contact
        found = []
        for message in value.get("messages") or []:
            if not isinstance(message, dict) or not message.get("id"):
                raise BadPayload("a WhatsApp message has no id")
            if self._outlived_dedupe(message):
                continue
            sender = message.get("from") or message.get("from_user_id")
            contact = contacts.get(sender) or (next(iter(contacts.values())) if len(contacts) == 1 else {})
            user = sender or contact.get("wa_id") or contact.get("user_id")
            if not user:
                raise BadPayload(f"WhatsApp message {message['id']} has no sender")
            content = self._content(message)
            if content is None:
                continue  # reactions, system notices, unsupported types: nothing for the bot
            text, media = content
            reply = _interactive_reply(message)
            found.append(InboundMessage(
                message_id=message["id"],
                user_id=user,
                text=text,
                user_name=(contact.get("profile") or {}).get("name"),
                media=media,
                reply_id=identifier(reply.get("id")),
                reply_context={"to": user, "phone_number_id": phone_number_id},
                raw={"message": message, "contact": contact, "metadata": value.get("metadata") or {}},
            ))
        return found

    def _outlived_dedupe(self, message: dict[str, Any]) -> bool:
        """True (and logged) for a message sent before the relay's dedupe memory began; BadPayload when its
        timestamp is not Unix seconds. A message without one is judged new."""
        sent = message.get("timestamp")
        if sent is None:
            return False
        sent_at = unix_time(identifier(sent) or "")
        if sent_at is None:
            raise BadPayload(f"WhatsApp message {message['id']} has a timestamp that is not Unix seconds")
        if not self.outlived_dedupe(sent_at):
            return False
        log.warning("WhatsApp message %s (sent at %d, Unix time) is older than the relay's dedupe memory: "
                    "acknowledged, not relayed (a replay, or a retry too late to tell from one)",
                    message["id"], sent_at)
        return True

    def _content(self, message: dict[str, Any]) -> tuple[str, tuple[Media, ...]] | None:
        kind = message.get("type")
        if kind == "text":
            return str((message.get("text") or {}).get("body", "")), ()
        if kind in MEDIA_TYPES:
            item = message.get(kind) or {}
            if not item.get("id"):
                raise BadPayload(f"WhatsApp {kind} message {message['id']} has no media id")
            media = Media(url=f"{self.api_base}/{quote(str(item['id']), safe='')}",
                          content_type=item.get("mime_type"), name=item.get("filename"), protected=True)
            return str(item.get("caption", "")), (media,)
        if kind == "interactive":
            reply = _interactive_reply(message)
            return str(reply.get("title") or reply.get("id") or ""), ()
        if kind == "button":
            button = message.get("button") or {}
            return str(button.get("text") or button.get("payload") or ""), ()
        if kind == "location":
            place = message.get("location") or {}
            label = ", ".join(str(place[k]) for k in ("name", "address") if place.get(k))
            coordinates = f"{place.get('latitude')},{place.get('longitude')}"
            return (f"{label} ({coordinates})" if label else coordinates), ()
        return None

    def fetch_media(self, media: Media, *, max_bytes: int) -> MediaContent:
        """The media object first (download URL, type, size, hash), then its bytes, both with the access token."""
        bearer = {"Authorization": f"Bearer {self._access_token}"}
        info = response_json(call_provider(self.session, self.name, "GET", media.url, headers=bearer,
                                                   clock=self.clock))
        if not isinstance(info.get("url"), str) or not info["url"].startswith(("https://", "http://")):
            raise ProviderRejected("the WhatsApp media object has no download url", reason="MediaNotFound")
        size = str(info.get("file_size") or "")
        if size.isdigit() and int(size) > max_bytes:
            raise ProviderRejected(f"the WhatsApp media has {size} bytes, over the {max_bytes} the relay forwards",
                                   reason="MediaTooLarge")
        content, served_type = download(self.session, self.name, info["url"], max_bytes=max_bytes, headers=bearer,
                                         clock=self.clock)
        expected = str(info.get("sha256") or "").lower()
        if expected and not hmac.compare_digest(hashlib.sha256(content).hexdigest(), expected):
            raise ProviderUnavailable("the WhatsApp media download does not match its sha256")
        content_type = (str(info.get("mime_type") or "") or served_type or media.content_type
                        or "application/octet-stream").split(";")[0].strip()
        name = media.name or media_file_name(str(info.get("id") or media.url.rsplit("/", 1)[-1]), content_type)
        return MediaContent(content, content_type, name)

    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        to = reply_context.get("to")
        if not to:
            raise ProviderRejected("the WhatsApp reply context needs 'to'")
        message = replace(message, text=format_for(ChannelKind.WHATSAPP, message.text))
        url = f"{self.api_base}/{reply_context.get('phone_number_id') or self.phone_number_id}/messages"
        return send_parts(self._bodies(message), lambda body: self._post(url, to, body), first_part=first_part)

    def _bodies(self, message: OutboundMessage) -> list[dict[str, Any]]:
        """Media first, then the text; a question's choices as reply buttons (up to BUTTON_LIMIT short titles) or
        a list (up to LIST_ROW_LIMIT rows), numbered in the text when neither fits (or several may be chosen).
        Text too long for an interactive body goes before it as text messages."""
        bodies: list[dict[str, Any]] = [
            {"type": media_kind(m.content_type), media_kind(m.content_type): {"link": m.url}} for m in message.media
        ]
        interactive = interactive_object(message.choices) if message.choices and not message.multiple else None
        if interactive is None:
            text = message_text(message)
        else:
            text, body = (message.text, "") if len(message.text) > INTERACTIVE_BODY_LIMIT else ("", message.text)
            interactive["body"] = {"text": body or CHOOSE_PROMPT}
        if text:
            bodies.extend({"type": "text", "text": {"body": piece, "preview_url": False}}
                          for piece in split_text(text, TEXT_LIMIT))
        if interactive is not None:
            bodies.append({"type": "interactive", "interactive": interactive})
        return bodies

    def _post(self, url: str, to: str, body: dict[str, Any]) -> str:
        payload = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, **body}
        response = call_provider(self.session, self.name, "POST", url, json=payload,
                                 headers={"Authorization": f"Bearer {self._access_token}"}, clock=self.clock)
        messages = response_json(response).get("messages") or [{}]
        return str(messages[0].get("id", ""))
