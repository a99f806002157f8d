"""Any JSON webhook signed with HMAC-SHA256: a configurable header scheme, or Standard Webhooks.

Inbound JSON, one message or {"messages": [...]}:
    {"id": "m-1", "user": {"id": "u-1", "name": "Ann"}, "text": "hi", "locale": "en-US",
     "media": [{"url": "https://...", "contentType": "image/png", "name": "a.png"}]}
`id` is the dedupe key. Only signed bytes may give it: under Standard Webhooks a message without
`id` takes the signed `webhook-id` header; under the `hmac` scheme, which signs the body alone,
every message needs its `id` (a header could be changed on a replay and make it a new message).

Replies are POSTed as JSON to GENERIC_CALLBACK_URL:
    {"type": "message", "id": "<uuid>", "user": {"id": "u-1"}, "replyToId": "m-1", "text": "...",
     "media": [...], "suggestedActions": ["Yes", "No"]}
`text` is complete on its own: a question's choices are in it, numbered, with how to answer (the
user answers with a number or a title); `suggestedActions` repeats their titles for a receiver that
shows buttons (it sends the title back as the user's text).
signed the Standard Webhooks way (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`
over id + "." + timestamp + "." + body) with GENERIC_CALLBACK_SECRET (default: the webhook secret):
a `whsec_` secret is used base64-decoded, any other secret as its UTF-8 bytes (inbound too), so the
receiver verifies with `standardwebhooks.Webhook(secret)` or `Webhook(secret.encode())`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from relay.channels.base import InboundMessage, Media, OutboundMessage, WebhookRequest
from relay.channels.common import (
    AdapterBase,
    b64decode_or_none,
    call_provider,
    identifier,
    json_body,
    message_text,
    require_header,
    same,
    send_parts,
)
from relay.errors import BadPayload, ProviderRejected, SettingsError, SignatureInvalid
from relay.formatting import ChannelKind, format_for

__all__ = ["GenericAdapter", "hmac_signature", "secret_key", "standard_headers", "standard_signature"]

STANDARD_PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: base64-decoded after a whsec_ prefix, else the secret's bytes."""
    if not secret.startswith(STANDARD_PREFIX):
        return secret.encode()
    try:
        return base64.b64decode(secret[len(STANDARD_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError("a whsec_ secret must be base64 after the prefix") from None


def standard_signature(key: bytes, message_id: str, timestamp: str, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value (one v1 signature)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def standard_headers(key: bytes, message_id: str, body: bytes, *, timestamp: int) -> dict[str, str]:
    """The Standard Webhooks headers of `body`, signed at `timestamp` (Unix seconds)."""
    stamp = str(timestamp)
    return {"webhook-id": message_id, "webhook-timestamp": stamp,
            "webhook-signature": standard_signature(key, message_id, stamp, body)}


def hmac_signature(key: bytes, body: bytes, *, timestamp: str | None = None, encoding: str = "hex") -> str:
    """The configurable scheme's signature, without prefix: over body, or timestamp + "." + body."""
    signed = (timestamp.encode() + b"." + body) if timestamp else body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


class GenericAdapter(AdapterBase):
    name = "generic"

    def __init__(self, config: Mapping[str, str], **options):
        super().__init__(config, **options)
        secret = self._setting("GENERIC_WEBHOOK_SECRET", required=True)
        self.scheme = (self._setting("GENERIC_SIGNATURE_SCHEME") or "hmac").lower()
        if self.scheme not in ("hmac", "standard"):
            raise SettingsError("GENERIC_SIGNATURE_SCHEME must be 'hmac' or 'standard'")
        self.header = self._setting("GENERIC_SIGNATURE_HEADER") or "X-Signature"
        prefix = self._config.get("GENERIC_SIGNATURE_PREFIX", "sha256=")
        self.prefix = "" if prefix.strip().lower() == "none" else prefix.strip()
        self.encoding = (self._setting("GENERIC_SIGNATURE_ENCODING") or "hex").lower()
        if self.encoding not in ("hex", "base64"):
            raise SettingsError("GENERIC_SIGNATURE_ENCODING must be 'hex' or 'base64'")
        self.timestamp_header = self._setting("GENERIC_TIMESTAMP_HEADER")
        self.callback_url = self._setting("GENERIC_CALLBACK_URL", required=True, why="to send replies")
        if self.scheme == "standard" and not secret.startswith(STANDARD_PREFIX):
            raise SettingsError("GENERIC_WEBHOOK_SECRET must start with whsec_ for Standard Webhooks")
        self._key = secret_key(secret)
        self._callback_key = secret_key(self._setting("GENERIC_CALLBACK_SECRET") or secret)

    def verify(self, request: WebhookRequest) -> None:
        self.check_size(request)
        if self.scheme == "standard":
            self._verify_standard(request)
        else:
            self._verify_hmac(request)

    def _verify_hmac(self, request: WebhookRequest) -> None:
        given = require_header(request, self.header)
        if self.prefix and not given.startswith(self.prefix):
            raise SignatureInvalid(f"the {self.header} header does not start with {self.prefix!r}")
        given = given[len(self.prefix):]
        timestamp = None
        if self.timestamp_header:
            timestamp = require_header(request, self.timestamp_header)
            self.check_timestamp(timestamp, self.timestamp_header)
        expected = hmac_signature(self._key, request.body, timestamp=timestamp, encoding=self.encoding)
        matches = same(expected, given.lower()) if self.encoding == "hex" else same(expected, given)
        if not matches:
            raise SignatureInvalid(f"the {self.header} signature does not match the body")

    def _verify_standard(self, request: WebhookRequest) -> None:
        message_id = require_header(request, "webhook-id")
        timestamp = require_header(request, "webhook-timestamp")
        signatures = require_header(request, "webhook-signature")
        self.check_timestamp(timestamp, "webhook-timestamp")
        expected = base64.b64decode(standard_signature(self._key, message_id, timestamp, request.body)[3:])
        for candidate in signatures.split():
            version, _, value = candidate.partition(",")
            given = b64decode_or_none(value)
            if version == "v1" and given is not None and same(expected, given):
                return
        raise SignatureInvalid("no webhook-signature matches the body")

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        body = json_body(request)
        if isinstance(body, dict) and isinstance(body.get("messages"), list):
            items = body["messages"]
        elif isinstance(body, dict):
            items = [body]
        else:
            raise BadPayload("the body must be a JSON object")
        # The webhook-id header is signed under Standard Webhooks only: under hmac it names nothing.
        fallback_id = request.header("webhook-id") if self.scheme == "standard" else None
        messages = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise BadPayload(f"message {index} is not an object")
            if item.get("type", "message") != "message":
                continue  # other events are acknowledged, not relayed
            messages.append(self._message(item, index, fallback_id, len(items)))
        return messages

    @staticmethod
    def _message(item: dict[str, Any], index: int, fallback_id: str | None, count: int) -> InboundMessage:
        given_user = item.get("user")
        user: dict[str, Any] = given_user if isinstance(given_user, dict) else {"id": given_user}
        message_id = identifier(item.get("id")) or (
            fallback_id and (fallback_id if count == 1 else f"{fallback_id}:{index}"))
        user_id = identifier(user.get("id"))
        if not message_id or not user_id:
            id_source = "an id (or a webhook-id header)" if fallback_id is not None else "an id in the signed body"
            raise BadPayload(f"message {index} needs {id_source} and user.id")
        media = []
        for entry in item.get("media") or []:
            if not isinstance(entry, dict) or not entry.get("url"):
                raise BadPayload(f"message {index} has a media entry without url")
            media.append(Media(url=entry["url"], content_type=entry.get("contentType"), name=entry.get("name")))
        text = item.get("text", "")
        if not isinstance(text, str):
            raise BadPayload(f"message {index}: text must be a string")
        return InboundMessage(
            message_id=message_id,
            user_id=user_id,
            text=text,
            user_name=user.get("name"),
            media=tuple(media),
            locale=item.get("locale"),
            reply_context={"user_id": user_id, "reply_to_id": message_id},
            raw=item,
        )

    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        user_id = reply_context.get("user_id")
        if not user_id:
            raise ProviderRejected("the generic reply context needs 'user_id'")
        message = replace(message, text=format_for(ChannelKind.PLAIN, message.text))
        # Standard Webhooks receivers deduplicate on webhook-id: a resend of the same reply (after a
        # crash between sending and saving) carries the same id, so it is recognised as one message.
        key = message.idempotency_key
        message_id = f"msg_{hashlib.sha256(key.encode()).hexdigest()[:32] if key else uuid.uuid4().hex}"
        payload: dict[str, Any] = {"type": "message", "id": message_id, "user": {"id": user_id},
                                   "text": message_text(message)}
        if reply_context.get("reply_to_id"):
            payload["replyToId"] = reply_context["reply_to_id"]
        if message.media:
            payload["media"] = [{k: v for k, v in (("url", m.url), ("contentType", m.content_type), ("name", m.name))
                                 if v} for m in message.media]
        if message.choices:
            payload["suggestedActions"] = [choice.title for choice in message.choices]
        # One callback carries the whole reply: a single part, so its webhook-id stays the key's own.
        return send_parts([payload], self._post, first_part=first_part)

    def _post(self, payload: dict[str, Any]) -> str:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        signed = standard_headers(self._callback_key, payload["id"], body, timestamp=int(self.clock.now().timestamp()))
        headers = {"Content-Type": "application/json", **signed}
        call_provider(self.session, self.name, "POST", self.callback_url, data=body, headers=headers, clock=self.clock)
        return payload["id"]
