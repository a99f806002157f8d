"""Bird (api.bird.com): messagebird-signature webhooks in, channel message replies out.

Signed bytes: timestamp + "\\n" + the full URL as called + "\\n" + SHA-256(body) digest, HMAC-SHA256 with
the signing key, base64 in `messagebird-signature`; `messagebird-request-timestamp` must be inside
the replay window. Bird retries for hours: the relay dedupes on payload.id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
    response_json,
    same,
    send_parts,
)
from relay.errors import BadPayload, ProviderRejected, SignatureInvalid
from relay.formatting import ChannelKind, format_for

__all__ = ["BirdAdapter", "compute_signature"]


def compute_signature(signing_key: str, timestamp: str, url: str, body: bytes) -> str:
    signed = b"\n".join([timestamp.encode(), url.encode(), hashlib.sha256(body).digest()])
    return base64.b64encode(hmac.new(signing_key.encode(), signed, hashlib.sha256).digest()).decode()


class BirdAdapter(AdapterBase):
    name = "bird"

    def __init__(self, config: Mapping[str, str], **options):
        super().__init__(config, **options)
        self._signing_key = self._setting("BIRD_SIGNING_KEY", required=True)
        self._access_key = self._setting("BIRD_ACCESS_KEY", required=True, why="to send replies")
        self.workspace_id = self._setting("BIRD_WORKSPACE_ID", required=True, why="to send replies")
        self.channel_id = self._setting("BIRD_CHANNEL_ID", required=True, why="to send replies")
        self.api_base = (self._setting("BIRD_API_BASE") or "https://api.bird.com").rstrip("/")

    def verify(self, request: WebhookRequest) -> None:
        self.check_size(request)
        given = b64decode_or_none(require_header(request, "messagebird-signature"))
        timestamp = request.header("messagebird-request-timestamp")
        self.check_timestamp(timestamp, "messagebird-request-timestamp")
        expected = base64.b64decode(compute_signature(self._signing_key, str(timestamp).strip(), request.url,
                                                      request.body))
        if given is None or not same(expected, given):
            raise SignatureInvalid("the messagebird-signature does not match the request")

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        body = json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("payload"), dict):
            raise BadPayload("the Bird webhook has no payload object")
        payload = body["payload"]
        if not str(body.get("event", "")).endswith(".inbound") or payload.get("direction", "incoming") != "incoming":
            return []  # outbound echoes and status events: acknowledged, not relayed
        contact = (payload.get("sender") or {}).get("contact") or {}
        address = identifier(contact.get("identifierValue"))
        user, message_id = address or identifier(contact.get("id")), identifier(payload.get("id"))
        if not message_id or not user:
            raise BadPayload("the Bird message lacks payload.id or sender.contact")
        text, media = self._content(payload.get("body") or {})
        # The event names the platform ("whatsapp.inbound", "sms.inbound"): how the user's phone shows a reply.
        context = {"channel_id": identifier(payload.get("channelId")) or self.channel_id,
                   "platform": str(body.get("event", "")).rsplit(".", 1)[0]}
        if address:
            context |= {"identifier_key": identifier(contact.get("identifierKey")) or "", "identifier_value": address}
        else:
            context["contact_id"] = user
        name = (contact.get("annotations") or {}).get("name") or contact.get("displayName")
        return [InboundMessage(
            message_id=message_id,
            user_id=user,
            text=text,
            user_name=name or None,
            media=media,
            reply_context=context,
            raw=body,
        )]

    @staticmethod
    def _content(body: dict[str, Any]) -> tuple[str, tuple[Media, ...]]:
        kind = body.get("type")
        item = body.get(kind) if isinstance(kind, str) else None
        item = item if isinstance(item, dict) else {}
        if kind == "text":
            return str(item.get("text") or ""), ()
        if kind == "image":
            images = item.get("images") or []
            return str(item.get("text") or ""), tuple(
                Media(url=i["mediaUrl"], name=i.get("altText")) for i in images if i.get("mediaUrl"))
        if kind == "file":
            files = item.get("files") or []
            return str(item.get("text") or ""), tuple(
                Media(url=f["mediaUrl"], content_type=f.get("contentType"), name=f.get("filename"))
                for f in files if f.get("mediaUrl"))
        if kind == "location":
            return f"{item.get('coordinates', {}).get('latitude')},{item.get('coordinates', {}).get('longitude')}", ()
        return str(item.get("text") or ""), ()

    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        if reply_context.get("identifier_value"):
            receiver = {"identifierKey": reply_context.get("identifier_key") or "phonenumber",
                        "identifierValue": reply_context["identifier_value"]}
        elif reply_context.get("contact_id"):
            receiver = {"id": reply_context["contact_id"]}
        else:
            raise ProviderRejected("the Bird reply context needs 'identifier_value' or 'contact_id'")
        channel = reply_context.get("channel_id") or self.channel_id
        kind = ChannelKind.WHATSAPP if reply_context.get("platform") == "whatsapp" else ChannelKind.PLAIN
        message = replace(message, text=format_for(kind, message.text))
        url = f"{self.api_base}/workspaces/{self.workspace_id}/channels/{channel}/messages"
        bodies = []
        images = [m for m in message.media if (m.content_type or "").startswith("image/")]
        files = [m for m in message.media if m not in images]
        if images:
            bodies.append({"type": "image", "image": {"images": [{"mediaUrl": m.url} for m in images]}})
        if files:
            bodies.append({"type": "file", "file": {"files": [
                {"mediaUrl": m.url, "contentType": m.content_type or "application/octet-stream",
                 "filename": m.name or m.url.rsplit("/", 1)[-1] or "file"} for m in files]}})
        text = message_text(message)
        if text:
            bodies.append({"type": "text", "text": {"text": text}})

        def post(body: dict[str, Any]) -> str:
            response = call_provider(self.session, self.name, "POST", url,
                                     json={"receiver": {"contacts": [receiver]}, "body": body},
                                     headers={"Authorization": f"AccessKey {self._access_key}"}, clock=self.clock)
            return str(response_json(response).get("id", ""))

        return send_parts(bodies, post, first_part=first_part)
