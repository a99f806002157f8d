"""Inbound webhooks built and signed the way each provider builds and signs them.

`build(provider, values, relay_url, sender=..., text=...)` returns the request to POST to the relay:
the URL (relay_url + /api/channels/{provider}), headers with the provider's signature, raw body,
and the provider message id the relay will dedupe on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import mimetypes
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

from relay.channels import bird, generic, telegram, twilio, vonage, whatsapp
from relay.channels import line as line_channel

PROVIDERS = ("twilio", "whatsapp", "messagebird", "bird", "generic", "vonage", "line", "telegram")
TWILIO_SMS_NUMBER = "+15005550006"
TWILIO_WHATSAPP_NUMBER = "whatsapp:+14155238886"
WHATSAPP_DISPLAY_NUMBER = "15550100"
MESSAGEBIRD_CHANNEL_ID = "619747f69cf940a98fb443140ce9aed2"
MESSAGEBIRD_NUMBER = "+31612345678"
VONAGE_ADDRESSES = {"sms": "447700900000", "whatsapp": "447700900000", "messenger": "107083064136738",
                    "viber_service": "16273"}
"""Our side of each Vonage channel: the number, the Facebook page id, the Viber service id."""
VONAGE_API_KEY = "abcd1234"
TELEGRAM_BOT = {"id": 100000001, "is_bot": True, "first_name": "Relay dev bot", "username": "relay_dev_bot"}
"""The bot as Telegram shows it in a message it sent (its id is the number before the token's colon)."""


@dataclass(frozen=True)
class Attachment:
    url: str
    content_type: str = ""

    @classmethod
    def from_url(cls, url: str, content_type: str = "") -> Attachment:
        return cls(url, content_type or mimetypes.guess_type(url)[0] or "application/octet-stream")


@dataclass(frozen=True)
class InteractiveReply:
    """A WhatsApp user's tap on a reply button (`button_reply`) or a list row (`list_reply`) of the message
    `context_id` (its wamid)."""

    kind: str
    id: str
    title: str
    description: str = ""
    context_id: str = ""
    offered: tuple[tuple[str, str], ...] = ()
    """Telegram: the (callback_data, text) of every button of the tapped message's inline keyboard."""


@dataclass(frozen=True)
class Webhook:
    url: str
    headers: dict[str, str]
    body: bytes
    message_id: str
    conversation_id: str = ""
    media_ids: dict[str, Attachment] = field(default_factory=dict)
    reply_tokens: tuple[str, ...] = ()
    """LINE: its events' reply tokens, which the simulator then takes once each, for a minute."""
    callback_query_id: str = ""
    """Telegram: the id of the button tap this update carries, for answerCallbackQuery."""


def conversation_id(user: str) -> str:
    """MessageBird's conversation id for a user: stable, like the real one per contact and channel."""
    return hashlib.sha256(f"conversation:{user}".encode()).hexdigest()[:32]


def contact_id(user: str) -> str:
    return hashlib.sha256(f"contact:{user}".encode()).hexdigest()[:32]


def encode_jwt(claims: Mapping[str, object], key: str, algorithm: str = "HS256") -> str:
    """A compact HMAC JWT, as MessageBird signs its webhooks."""
    digests = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = part(json.dumps({"alg": algorithm, "typ": "JWT"}, separators=(",", ":")).encode())
    body = part(json.dumps(dict(claims), separators=(",", ":")).encode())
    signature = hmac.new(key.encode(), f"{head}.{body}".encode(), digests[algorithm]).digest()
    return f"{head}.{body}.{part(signature)}"


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def build(provider: str, values: Mapping[str, str], relay_url: str, *, sender: str, text: str = "",
          name: str = "", media: tuple[Attachment, ...] = (), now: float | None = None,
          reply: InteractiveReply | None = None) -> Webhook:
    """The signed webhook of a user's message; `reply` (whatsapp, vonage's whatsapp channel, line, telegram): a
    tap on a button, list row, LINE quick reply button (its postback) or inline keyboard button instead."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; one of {', '.join(PROVIDERS)}")
    if reply is not None and provider not in ("whatsapp", "vonage", "line", "telegram"):
        raise ValueError("only WhatsApp (also through Vonage), LINE and Telegram send button taps")
    now = time.time() if now is None else now
    url = f"{relay_url.rstrip('/')}/api/channels/{provider}"
    if reply is not None and provider in ("whatsapp", "vonage", "telegram"):
        return globals()[f"_{provider}"](values, url, sender, text, name, media, now, reply=reply)
    if provider == "line":
        return _line(values, url, sender, text, media, now, reply=reply)
    return globals()[f"_{provider}"](values, url, sender, text, name, media, now)


def _twilio(values, url, sender, text, name, media, now) -> Webhook:
    sid = "SM" + uuid.uuid4().hex
    on_whatsapp = sender.startswith("whatsapp:")
    params = {
        "ToCountry": "US", "SmsMessageSid": sid, "NumMedia": str(len(media)), "SmsSid": sid, "SmsStatus": "received",
        "Body": text, "To": TWILIO_WHATSAPP_NUMBER if on_whatsapp else TWILIO_SMS_NUMBER, "NumSegments": "1",
        "MessageSid": sid, "AccountSid": values.get("TWILIO_ACCOUNT_SID", ""), "From": sender,
        "ApiVersion": "2010-04-01",
    }
    if on_whatsapp:
        params |= {"ProfileName": name or "", "WaId": sender.removeprefix("whatsapp:+"), "MessageType": "text"}
    for index, item in enumerate(media):
        params |= {f"MediaContentType{index}": item.content_type, f"MediaUrl{index}": item.url}
    signature = twilio.compute_signature(values.get("TWILIO_AUTH_TOKEN", ""), url, params)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature,
               "I-Twilio-Idempotency-Token": str(uuid.uuid4()), "User-Agent": "TwilioProxy/1.1"}
    return Webhook(url, headers, urlencode(params).encode(), sid)


def _whatsapp(values, url, sender, text, name, media, now, reply: InteractiveReply | None = None) -> Webhook:
    wamid = "wamid." + base64.b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode().rstrip("=")
    message: dict[str, object] = {"from": sender, "id": wamid, "timestamp": str(int(now))}
    media_ids = {}
    if reply is not None:
        chosen = {"id": reply.id, "title": reply.title, **({"description": reply.description}
                                                            if reply.description else {})}
        message |= {"type": "interactive", "interactive": {"type": reply.kind, reply.kind: chosen}}
        if reply.context_id:
            message["context"] = {"from": WHATSAPP_DISPLAY_NUMBER, "id": reply.context_id}
    elif media:
        item = media[0]
        media_id = str(uuid.uuid4().int)[:16]
        media_ids[media_id] = item
        kind = whatsapp.media_kind(item.content_type)
        message |= {"type": kind, kind: {"mime_type": item.content_type, "sha256": "", "id": media_id,
                                         **({"caption": text} if text and kind != "audio" else {})}}
    else:
        message |= {"type": "text", "text": {"body": text}}
    body = {"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": WHATSAPP_DISPLAY_NUMBER,
                         "phone_number_id": values.get("WHATSAPP_PHONE_NUMBER_ID", "")},
            "contacts": [{"profile": {"name": name or sender}, "wa_id": sender}],
            "messages": [message],
        },
        "field": "messages",
    }]}]}
    raw = json.dumps(body, separators=(",", ":")).encode()  # Meta escapes non-ASCII as \\uXXXX
    headers = {"Content-Type": "application/json",
               "X-Hub-Signature-256": whatsapp.compute_signature(values.get("WHATSAPP_APP_SECRET", ""), raw)}
    return Webhook(url, headers, raw, wamid, media_ids=media_ids)


def _messagebird(values, url, sender, text, name, media, now) -> Webhook:
    conversation, contact = conversation_id(sender), contact_id(sender)
    message_id = uuid.uuid4().hex
    first, _, last = (name or "").partition(" ")
    content: dict[str, object] = {"text": text}
    kind = "text"
    if media:
        major = media[0].content_type.split("/")[0]
        kind = major if major in ("image", "video", "audio") else "file"
        content = {kind: {"url": media[0].url, **({"caption": text} if text else {})}}
    stamp = _iso(now)
    body = {
        "type": "message.created",
        "contact": {"id": contact, "href": "", "msisdn": sender.lstrip("+"), "displayName": name or sender,
                    "firstName": first, "lastName": last, "customDetails": {}, "attributes": {},
                    "createdDatetime": stamp, "updatedDatetime": stamp},
        "conversation": {"id": conversation, "contactId": contact, "status": "active", "createdDatetime": stamp,
                         "updatedDatetime": stamp, "lastReceivedDatetime": stamp},
        "message": {"id": message_id, "conversationId": conversation, "platform": "sms", "to": MESSAGEBIRD_NUMBER,
                    "from": sender, "channelId": MESSAGEBIRD_CHANNEL_ID, "type": kind, "content": content,
                    "direction": "received", "status": "received", "createdDatetime": stamp,
                    "updatedDatetime": stamp},
    }
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    claims = {"iss": "MessageBird", "nbf": int(now), "exp": int(now) + 60, "jti": str(uuid.uuid4()),
              "url_hash": hashlib.sha256(url.encode()).hexdigest(), "payload_hash": hashlib.sha256(raw).hexdigest()}
    headers = {"Content-Type": "application/json",
               "MessageBird-Signature-JWT": encode_jwt(claims, values.get("MESSAGEBIRD_SIGNING_KEY", ""))}
    return Webhook(url, headers, raw, message_id, conversation_id=conversation)


def _bird(values, url, sender, text, name, media, now) -> Webhook:
    message_id = str(uuid.uuid4())
    if media:
        images = [m for m in media if m.content_type.startswith("image/")]
        content = ({"type": "image", "image": {"images": [{"mediaUrl": m.url} for m in images], "text": text}}
                   if len(images) == len(media) else
                   {"type": "file", "file": {"files": [{"mediaUrl": m.url, "contentType": m.content_type,
                                                        "filename": m.url.rsplit("/", 1)[-1]} for m in media],
                                             "text": text}})
    else:
        content = {"type": "text", "text": {"text": text}}
    stamp = _iso(now)
    body = {"service": "channels", "event": "whatsapp.inbound", "payload": {
        "id": message_id, "channelId": values.get("BIRD_CHANNEL_ID", ""),
        "sender": {"contact": {"id": str(uuid.UUID(contact_id(sender))), "identifierKey": "phonenumber",
                               "identifierValue": sender, "annotations": {"name": name or sender}}},
        "receiver": {"connector": {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "bird-connector")),
                                   "identifierValue": "+15550100"}},
        "body": content, "status": "delivered", "reason": "", "direction": "incoming",
        "lastStatusAt": stamp, "createdAt": stamp, "updatedAt": stamp,
    }}
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    stamp_header = str(int(now))
    headers = {"Content-Type": "application/json", "messagebird-request-timestamp": stamp_header,
               "messagebird-signature": bird.compute_signature(values.get("BIRD_SIGNING_KEY", ""), stamp_header, url,
                                                               raw)}
    return Webhook(url, headers, raw, message_id)


def _generic(values, url, sender, text, name, media, now) -> Webhook:
    message_id = f"msg_{uuid.uuid4().hex}"
    body = {"id": message_id, "user": {"id": sender, **({"name": name} if name else {})}, "text": text}
    if media:
        body["media"] = [{"url": m.url, "contentType": m.content_type} for m in media]
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    key = generic.secret_key(values.get("GENERIC_WEBHOOK_SECRET", ""))
    headers = {"Content-Type": "application/json"}
    if (values.get("GENERIC_SIGNATURE_SCHEME") or "hmac").lower() == "standard":
        headers |= generic.standard_headers(key, message_id, raw, timestamp=int(now))
    else:
        stamp_header = values.get("GENERIC_TIMESTAMP_HEADER", "")
        stamp = str(int(now))
        prefix = values.get("GENERIC_SIGNATURE_PREFIX", "sha256=")
        prefix = "" if prefix.lower() == "none" else prefix
        signature = generic.hmac_signature(key, raw, timestamp=stamp if stamp_header else None,
                                           encoding=(values.get("GENERIC_SIGNATURE_ENCODING") or "hex").lower())
        headers[values.get("GENERIC_SIGNATURE_HEADER") or "X-Signature"] = prefix + signature
        if stamp_header:
            headers[stamp_header] = stamp
    return Webhook(url, headers, raw, message_id)


def vonage_address(sender: str) -> tuple[str, str]:
    """A simulated Vonage user, "<channel>:<id>" or an SMS number (vonage.channel_user's form), as (channel, id).
    Vonage writes numbers without a +: a simulated user may have one, and keeps it."""
    channel, _, user = sender.rpartition(":")
    channel = channel or "sms"
    if channel not in vonage.CHANNELS or (channel == "sms" and ":" in sender):
        raise ValueError(f"a Vonage user is '<channel>:<id>' ({', '.join(vonage.CHANNELS[1:])}) or an SMS number")
    return channel, user


def _vonage(values, url, sender, text, name, media, now, reply: InteractiveReply | None = None) -> Webhook:
    """A Messages API inbound webhook (v1): `sender` is "<channel>:<id>"; signed with a Bearer JWT (HS256, the
    signature secret) whose payload_hash covers the body."""
    channel, user = vonage_address(sender)
    if reply is not None and channel != "whatsapp":
        raise ValueError("only Vonage's WhatsApp channel sends interactive replies")
    message_uuid = str(uuid.uuid4())
    body: dict[str, object] = {"channel": channel, "message_uuid": message_uuid, "to": VONAGE_ADDRESSES[channel],
                               "from": user, "timestamp": _iso(now)}
    if channel == "whatsapp":
        body |= {"profile": {"name": name or user}, "context_status": "none"}
    if reply is not None:
        chosen = {"id": reply.id, "title": reply.title, **({"description": reply.description}
                                                            if reply.description else {})}
        body |= {"message_type": "reply", "reply": chosen, "context_status": "available",
                 "context": {"message_uuid": reply.context_id, "message_from": VONAGE_ADDRESSES[channel]}}
    elif media:
        kind = whatsapp.media_kind(media[0].content_type)
        kind = "file" if kind == "document" else kind
        body |= {"message_type": kind, kind: {"url": media[0].url, **({"caption": text} if text else {})}}
    else:
        body |= {"message_type": "text", "text": text}
    if channel == "sms":
        body |= {"sms": {"num_messages": "1"}, "usage": {"currency": "EUR", "price": "0.0057"}}
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    claims = {"iat": int(now), "jti": str(uuid.uuid4()), "iss": "Vonage",
              "payload_hash": hashlib.sha256(raw).hexdigest(), "api_key": VONAGE_API_KEY,
              "application_id": values.get("VONAGE_APPLICATION_ID", "")}
    token = vonage.signed_webhook_jwt(claims, values.get("VONAGE_SIGNATURE_SECRET", ""))
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    return Webhook(url, headers, raw, message_uuid)

def line_user(name: str) -> str:
    """A LINE user id for `name`: "U" and 32 hex digits, stable, as LINE gives each user of a channel."""
    return "U" + hashlib.sha256(f"line-user:{name}".encode()).hexdigest()[:32]


def _ulid() -> str:
    """A webhookEventId: 26 characters of Crockford base32, as LINE's ULIDs."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    number = (int(time.time() * 1000) << 80) | uuid.uuid4().int >> 48
    return "".join(alphabet[(number >> shift) & 31] for shift in range(125, -1, -5))


def _line(values, url, sender, text, media, now, *, reply: InteractiveReply | None = None) -> Webhook:
    """A LINE webhook from a one-on-one chat with `sender` (a LINE user id): a text message, a quick reply
    button's postback (`reply.id` is its data), or a media message. A LINE message is text or one file, never
    both: text with media is two events in one webhook, as LINE sends a user's text and photo; `message_id`
    is the first event's."""
    events: list[dict[str, object]] = []
    media_ids = {}
    if reply is not None:
        events.append({"type": "postback", "postback": {"data": reply.id}})
    if text and reply is None:
        events.append({"type": "message", "message": {"type": "text", "id": str(uuid.uuid4().int)[:18],
                                                      "quoteToken": uuid.uuid4().hex, "text": text}})
    for item in media[:1] if reply is None else ():
        message_id = str(uuid.uuid4().int)[:18]
        media_ids[message_id] = item
        major = item.content_type.split("/")[0]
        kind = major if major in ("image", "video", "audio") else "file"
        message: dict[str, object] = {"type": kind, "id": message_id, "quoteToken": uuid.uuid4().hex,
                                      "contentProvider": {"type": "line"}}
        if kind == "file":
            message |= {"fileName": item.url.rsplit("/", 1)[-1].split("?")[0][-100:] or "file", "fileSize": 0}
        events.append({"type": "message", "message": message})
    if not events:
        events.append({"type": "message", "message": {"type": "text", "id": str(uuid.uuid4().int)[:18],
                                                      "quoteToken": uuid.uuid4().hex, "text": text}})
    for event in events:
        event |= {"replyToken": uuid.uuid4().hex, "webhookEventId": _ulid(),
                  "deliveryContext": {"isRedelivery": False}, "timestamp": int(now * 1000),
                  "source": {"type": "user", "userId": sender}, "mode": "active"}
    body = {"destination": "U" + hashlib.sha256(b"line-bot").hexdigest()[:32], "events": events}
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "LineBotWebhook/2.0",
               "X-Line-Signature": line_channel.compute_signature(values.get("LINE_CHANNEL_SECRET", ""), raw)}
    return Webhook(url, headers, raw, str(events[0]["webhookEventId"]), media_ids=media_ids,
                   reply_tokens=tuple(str(event["replyToken"]) for event in events))


def _telegram(values, url, sender, text, name, media, now, reply: InteractiveReply | None = None) -> Webhook:
    """An Update as Telegram POSTs it (https://core.telegram.org/bots/api#update): a private chat's message, or
    a callback_query for a tap on an inline keyboard button; the secret_token in its header. Photos come in
    three sizes of one file, smallest first."""
    update_id = uuid.uuid4().int % 10**9
    first, _, last = (name or "").partition(" ")
    user = {"id": int(sender) if sender.isdigit() else sender, "is_bot": False, "first_name": first or sender,
            **({"last_name": last} if last else {}), "language_code": "en"}
    chat = {"id": user["id"], "first_name": user["first_name"], "type": "private"}
    media_ids, query_id = {}, ""
    update: dict[str, object] = {"update_id": update_id}
    if reply is not None:
        query_id = str(uuid.uuid4().int % 10**19)
        keyboard = [[{"text": title, "callback_data": data}] for data, title in reply.offered or ((reply.id,
                                                                                                 reply.title),)]
        update["callback_query"] = {
            "id": query_id, "from": user, "chat_instance": str(uuid.uuid5(uuid.NAMESPACE_OID, sender).int % 10**18),
            "message": {"message_id": int(reply.context_id) if reply.context_id.isdigit() else 1, "from": TELEGRAM_BOT,
                        "chat": chat, "date": int(now), "text": "", "reply_markup": {"inline_keyboard": keyboard}},
            "data": reply.id,
        }
    else:
        message: dict[str, object] = {"message_id": update_id % 10**6, "from": user, "chat": chat, "date": int(now)}
        if media:
            item = media[0]
            file_id = "AgAC" + base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            media_ids[file_id] = item
            if item.content_type.startswith("image/"):
                message["photo"] = [{"file_id": f"{file_id}-{side}" if side != 1280 else file_id,
                                     "file_unique_id": f"{file_id[:12]}{side}", "width": side, "height": side * 3 // 4}
                                    for side in (90, 320, 1280)]
            else:
                message["document"] = {"file_id": file_id, "file_unique_id": file_id[:12],
                                       "file_name": ("file" + (mimetypes.guess_extension(item.content_type) or "")
                                                     if item.url.startswith("data:")
                                                     else item.url.rsplit("/", 1)[-1][:64] or "file"),
                                       "mime_type": item.content_type}
            if text:
                message["caption"] = text
        else:
            message["text"] = text
        update["message"] = message
    raw = json.dumps(update, separators=(",", ":"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json",
               telegram.WEBHOOK_HEADER: values.get("TELEGRAM_WEBHOOK_SECRET", "")}
    return Webhook(url, headers, raw, str(update_id), media_ids=media_ids, callback_query_id=query_id)
