"""MessageBird Conversations API: MessageBird-Signature-JWT or legacy MessageBird-Signature in, replies out.

JWT signing (current): an HS256/384/512 JWT with iss "MessageBird", exp, nbf or iat, url_hash (SHA-256
of the URL as called) and payload_hash (SHA-256 of the body, only when there is one).
Legacy signing: HMAC-SHA256 over timestamp + "\\n" + sorted url-encoded query + "\\n" + SHA-256(body)
digest, base64 in MessageBird-Signature, with MessageBird-Request-Timestamp inside the replay window.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode, urlsplit

from relay.channels.base import InboundMessage, Media, OutboundMessage, WebhookRequest
from relay.channels.common import (
    AdapterBase,
    b64decode_or_none,
    call_provider,
    finite_number,
    form_fields,
    identifier,
    json_body,
    message_text,
    response_json,
    same,
    send_parts,
)
from relay.errors import BadPayload, ProviderRejected, SignatureInvalid, StaleTimestamp
from relay.formatting import ChannelKind, format_for

__all__ = ["MessageBirdAdapter", "compute_legacy_signature"]

JWT_ALGORITHMS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
JWT_LEEWAY_SECONDS = 1
MEDIA_TYPES = ("image", "video", "audio", "file")


def _legacy_signed_bytes(timestamp: str, query: str, body: bytes) -> bytes:
    """What a legacy MessageBird-Signature covers; `query` is the URL's query string as called."""
    pairs = sorted(form_fields(query, "the URL's query"), key=lambda pair: pair[0])
    return b"\n".join([timestamp.encode(), urlencode(pairs).encode(), hashlib.sha256(body).digest()])


def compute_legacy_signature(signing_key: str, timestamp: str, query: str, body: bytes) -> str:
    digest = hmac.new(signing_key.encode(), _legacy_signed_bytes(timestamp, query, body), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _decode_jwt(token: str, key: str, *, now: float) -> dict[str, Any]:
    """The claims of an HMAC-signed JWT once its signature and time claims hold (SignatureInvalid else)."""
    try:
        header_part, claims_part, signature_part = token.split(".")
        header = json.loads(_b64url_decode(header_part))
        claims = json.loads(_b64url_decode(claims_part))
        signature = _b64url_decode(signature_part)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise SignatureInvalid("the MessageBird-Signature-JWT is not a JWT") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise SignatureInvalid("the MessageBird-Signature-JWT is not a JWT")
    algorithm = header.get("alg")
    digest = JWT_ALGORITHMS.get(algorithm) if isinstance(algorithm, str) else None
    if digest is None:
        raise SignatureInvalid("the MessageBird-Signature-JWT uses an algorithm other than HS256/384/512")
    expected = hmac.new(key.encode(), f"{header_part}.{claims_part}".encode(), digest).digest()
    if not same(expected, signature):
        raise SignatureInvalid("the MessageBird-Signature-JWT signature does not match the signing key")
    if claims.get("iss") != "MessageBird":
        raise SignatureInvalid("the MessageBird-Signature-JWT was not issued by MessageBird")
    start = claims.get("nbf", claims.get("iat"))
    expiry = claims.get("exp")
    if not finite_number(expiry) or not finite_number(start):
        raise SignatureInvalid("the MessageBird-Signature-JWT lacks exp and nbf/iat (as numbers)")
    if now > expiry + JWT_LEEWAY_SECONDS:
        raise StaleTimestamp("the MessageBird-Signature-JWT has expired")
    if now < start - JWT_LEEWAY_SECONDS:
        raise StaleTimestamp("the MessageBird-Signature-JWT is not valid yet")
    return claims


class MessageBirdAdapter(AdapterBase):
    name = "messagebird"

    def __init__(self, config: Mapping[str, str], **options):
        super().__init__(config, **options)
        self._signing_key = self._setting("MESSAGEBIRD_SIGNING_KEY", required=True)
        self._access_key = self._setting("MESSAGEBIRD_ACCESS_KEY", required=True, why="to send replies")
        self.api_base = (self._setting("MESSAGEBIRD_API_BASE") or "https://conversations.messagebird.com").rstrip("/")

    def verify(self, request: WebhookRequest) -> None:
        self.check_size(request)
        token = request.header("MessageBird-Signature-JWT")
        if token:
            self._verify_jwt(request, token.strip())
        elif request.header("MessageBird-Signature"):
            self._verify_legacy(request)
        else:
            raise SignatureInvalid("the MessageBird-Signature-JWT header is missing")

    def _verify_jwt(self, request: WebhookRequest, token: str) -> None:
        claims = _decode_jwt(token, self._signing_key, now=self.clock.now().timestamp())
        if not same(hashlib.sha256(request.url.encode()).hexdigest(), str(claims.get("url_hash", ""))):
            raise SignatureInvalid("the MessageBird-Signature-JWT was issued for another URL")
        payload_hash = claims.get("payload_hash")
        if request.body and not payload_hash:
            raise SignatureInvalid("the MessageBird-Signature-JWT does not cover a body, but there is one")
        if not request.body and payload_hash:
            raise SignatureInvalid("the MessageBird-Signature-JWT covers a body, but there is none")
        if request.body and not same(hashlib.sha256(request.body).hexdigest(), str(payload_hash)):
            raise SignatureInvalid("the MessageBird-Signature-JWT does not match the body")

    def _verify_legacy(self, request: WebhookRequest) -> None:
        timestamp = request.header("MessageBird-Request-Timestamp")
        self.check_timestamp(timestamp, "MessageBird-Request-Timestamp")
        given = b64decode_or_none(request.header("MessageBird-Signature", "") or "")
        expected = base64.b64decode(compute_legacy_signature(
            self._signing_key, str(timestamp).strip(), urlsplit(request.url).query, request.body))
        if given is None or not same(expected, given):
            raise SignatureInvalid("the MessageBird-Signature does not match the request")

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        body = json_body(request)
        if not isinstance(body, dict):
            raise BadPayload("the MessageBird webhook is not a JSON object")
        message = body.get("message")
        if body.get("type") != "message.created" or not isinstance(message, dict):
            return []  # message.updated (delivery status), conversation events: acknowledged, not relayed
        if message.get("direction") != "received":
            return []  # our own replies echoed back
        contact = body.get("contact") or {}
        conversation = body.get("conversation") or {}
        conversation_id = identifier(conversation.get("id") or message.get("conversationId"))
        # the phone number (or platform id) the user wrote from
        user = identifier(message.get("from") or contact.get("id"))
        message_id = identifier(message.get("id"))
        if not message_id or not conversation_id or not user:
            raise BadPayload("the MessageBird message lacks message.id, conversation.id or a contact")
        text, media = self._content(message)
        name = contact.get("displayName") or " ".join(
            filter(None, [contact.get("firstName"), contact.get("lastName")])) or None
        return [InboundMessage(
            message_id=message_id,
            user_id=user,
            text=text,
            user_name=name,
            media=media,
            reply_context={"conversation_id": conversation_id, "platform": str(message.get("platform") or "")},
            raw=body,
        )]

    @staticmethod
    def _content(message: dict[str, Any]) -> tuple[str, tuple[Media, ...]]:
        content = message.get("content") or {}
        kind = message.get("type")
        if kind in MEDIA_TYPES:
            item = content.get(kind) or {}
            media = (Media(url=item["url"], name=item.get("caption") if kind == "file" else None),) \
                if item.get("url") else ()
            return str(item.get("caption") or ""), media
        if kind == "location":
            place = content.get("location") or {}
            return f"{place.get('latitude')},{place.get('longitude')}", ()
        return str(content.get("text") or ""), ()

    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        conversation_id = reply_context.get("conversation_id")
        if not conversation_id:
            raise ProviderRejected("the MessageBird reply context needs 'conversation_id'")
        kind = ChannelKind.WHATSAPP if reply_context.get("platform") == "whatsapp" else ChannelKind.PLAIN
        message = replace(message, text=format_for(kind, message.text))
        url = f"{self.api_base}/v1/conversations/{conversation_id}/messages"
        bodies = [self._media_body(m) for m in message.media]
        text = message_text(message)
        if text:
            bodies.append({"type": "text", "content": {"text": text}})

        def post(body: dict[str, Any]) -> str:
            response = call_provider(self.session, self.name, "POST", url, json=body,
                                     headers={"Authorization": f"AccessKey {self._access_key}"}, clock=self.clock)
            return str(response_json(response).get("id", ""))

        return send_parts(bodies, post, first_part=first_part)

    @staticmethod
    def _media_body(media: Media) -> dict[str, Any]:
        major = (media.content_type or "").split("/")[0]
        kind = major if major in ("image", "video", "audio") else "file"
        return {"type": kind, "content": {kind: {"url": media.url}}}
