"""Vonage Messages API: signed webhooks in, `POST /v1/messages` replies out, for the SMS, WhatsApp,
Messenger and Viber channels Vonage relays, each answered on the channel it came from.

A signed webhook carries `Authorization: Bearer <JWT>`, HS256 with the account's signature secret, whose
claims hold `payload_hash` (hex SHA-256 of the raw body), `iat`, `jti`, `api_key` and `application_id`.
The body is signed only through `payload_hash`, so it is compared (in constant time) before anything in
the body is read; `iat` must be inside the replay window, and a token not issued for our application of
the same account (the secret is the account's) is refused. The dedupe key is the body's `message_uuid`.
Status webhooks, and messages on a channel the relay cannot answer on (MMS, RCS), are acknowledged and
not relayed: Vonage would retry a refusal.

Replies are authenticated as Vonage recommends for the Messages API (its Authentication guide: Basic
auth "does not support webhooks or advanced features"): a short-lived RS256 JWT made with the
application's private key (VONAGE_APPLICATION_ID + VONAGE_PRIVATE_KEY). The same JWT opens a user's
media when the application has "Secure inbound media" on; without it the URL needs none (valid 48 h).
Media URLs on any other host never get it.

A question's choices go out as WhatsApp interactive buttons or a list (a `custom` message carrying the
object Meta defines, relay/channels/whatsapp.py) and come back as a `reply` message whose id is the
choice's; on SMS, Messenger and Viber they are numbered in the text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from urllib3.util import parse_url

from relay.channels.base import InboundMessage, Media, MediaContent, OutboundMessage, WebhookRequest
from relay.channels.common import (
    AdapterBase,
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
from relay.channels.whatsapp import CHOOSE_PROMPT, INTERACTIVE_BODY_LIMIT, interactive_object
from relay.errors import BadPayload, ProviderRejected, SettingsError, SignatureInvalid, StaleTimestamp
from relay.formatting import ChannelKind, format_for

__all__ = [
    "CHANNELS",
    "MEDIA_TYPES",
    "TEXT_LIMITS",
    "VonageAdapter",
    "application_jwt",
    "channel_user",
    "signed_webhook_jwt",
]

TEXT_LIMITS = {"sms": 1000, "whatsapp": 4096, "messenger": 640, "viber_service": 1000}
"""The channels Vonage relays for us and the most text one message may carry on each (Messages API reference)."""
CHANNELS = tuple(TEXT_LIMITS)
MEDIA_TYPES = {
    "whatsapp": ("image", "video", "audio", "file"),
    "messenger": ("image", "video", "audio", "file"),
    "viber_service": ("image", "video", "file"),
    "sms": (),
}
"""What each channel can send as media; anything else goes as a link in the text."""
APPLICATION_JWT_SECONDS = 15 * 60
"""How long a reply's JWT is valid: Vonage's SDKs give theirs 15 minutes."""
VONAGE_MEDIA_HOSTS = (".nexmo.com", ".vonage.com")
_UNSAFE_AUTHORITY = re.compile(r"[@\\%]|[^\x21-\x7e]")
"""What no media URL's authority may hold: userinfo, a backslash or percent escape (read differently by urlsplit
and urllib3), a blank, a control character or a non-ASCII one (NFKC could turn it into a separator)."""

log = logging.getLogger(__name__)


def channel_user(channel: str, address: str) -> str:
    """The relay's id of a Vonage user: the number on SMS, "<channel>:<id>" elsewhere (as Twilio writes its
    WhatsApp users), so one number on SMS and on WhatsApp is two conversations, each answered where it began."""
    return address if channel == "sms" else f"{channel}:{address}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def signed_webhook_jwt(claims: Mapping[str, object], signature_secret: str) -> str:
    """An HS256 JWT with `claims`, as Vonage signs a webhook with the account's signature secret."""
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signature = _hmac_sha256(signature_secret.encode(), f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64url(signature)}"


def application_jwt(application_id: str, private_key: rsa.RSAPrivateKey, *, now: float) -> str:
    """The RS256 JWT that authenticates one Messages API call (claims as Vonage's JwtClient makes them)."""
    head = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"application_id": application_id, "iat": int(now), "jti": str(uuid.uuid4()),
              "exp": int(now) + APPLICATION_JWT_SECONDS}
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = private_key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64url(signature)}"


def _private_key(pem: str) -> rsa.RSAPrivateKey:
    """The application's RSA private key from its PEM text (escaped `\\n` line breaks accepted, as an app
    setting often holds them); SettingsError otherwise, never quoting the key."""
    text = pem.replace("\\n", "\n").strip()
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SettingsError("VONAGE_PRIVATE_KEY is not a PEM private key (the private.key file of the Vonage "
                            "application, unencrypted)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SettingsError("VONAGE_PRIVATE_KEY is not an RSA key: Vonage applications sign with RSA (RS256)")
    return key


class VonageAdapter(AdapterBase):
    name = "vonage"

    def __init__(self, config: Mapping[str, str], **options):
        super().__init__(config, **options)
        self._signature_secret = self._setting("VONAGE_SIGNATURE_SECRET", required=True)
        self.application_id = self._setting("VONAGE_APPLICATION_ID", required=True, why="to send replies")
        self._private_key = _private_key(self._setting("VONAGE_PRIVATE_KEY", required=True, why="to send replies"))
        self.api_base = (self._setting("VONAGE_API_BASE") or "https://api.nexmo.com").rstrip("/")

    # -- inbound ------------------------------------------------------------------------------
    def verify(self, request: WebhookRequest) -> None:
        self.check_size(request)
        scheme, _, token = require_header(request, "Authorization").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise SignatureInvalid("the Authorization header is not a Bearer token")
        claims = self._claims(token.strip())
        issued = claims.get("iat")
        if not finite_number(issued):
            raise SignatureInvalid("the Vonage webhook JWT has no iat (as a number)")
        now = self.clock.now().timestamp()
        if abs(now - issued) > self.window_seconds:
            raise StaleTimestamp(f"the Vonage webhook JWT was issued outside the {self.window_seconds:g}s window")
        expiry = claims.get("exp")
        if expiry is not None and (not finite_number(expiry) or now > expiry):
            raise StaleTimestamp("the Vonage webhook JWT has expired")
        if claims.get("application_id") != self.application_id:
            raise SignatureInvalid("the Vonage webhook JWT was not issued for this application (application_id)")
        if not same(hashlib.sha256(request.body).hexdigest(), str(claims.get("payload_hash") or "")):
            raise SignatureInvalid("the Vonage webhook JWT's payload_hash does not match the body")

    def _claims(self, token: str) -> dict[str, Any]:
        """The claims of an HS256 JWT signed with the signature secret; SignatureInvalid for anything else."""
        try:
            head_part, claims_part, signature_part = token.split(".")
            head = json.loads(_b64url_decode(head_part))
            claims = json.loads(_b64url_decode(claims_part))
            signature = _b64url_decode(signature_part)
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
            raise SignatureInvalid("the Vonage webhook's Bearer token is not a JWT") from None
        if not isinstance(head, dict) or not isinstance(claims, dict):
            raise SignatureInvalid("the Vonage webhook's Bearer token is not a JWT")
        if head.get("alg") != "HS256":
            raise SignatureInvalid("the Vonage webhook JWT is not signed with HS256")
        expected = _hmac_sha256(self._signature_secret.encode(), f"{head_part}.{claims_part}".encode())
        if not same(expected, signature):
            raise SignatureInvalid("the Vonage webhook JWT is not signed with VONAGE_SIGNATURE_SECRET")
        return claims

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        body = json_body(request)
        if not isinstance(body, dict):
            raise BadPayload("the Vonage webhook is not a JSON object")
        if "message_type" not in body:
            return []  # a message status (submitted, delivered, read, rejected): acknowledged, not relayed
        channel, kind = body.get("channel"), body.get("message_type")
        message_id, user, ours = (identifier(body.get(key)) for key in ("message_uuid", "from", "to"))
        if not message_id or not user or not ours:
            raise BadPayload("the Vonage message lacks message_uuid, from or to")
        if channel not in CHANNELS:  # MMS, RCS...: Vonage would retry a refusal, so it is acknowledged and logged
            log.warning("Vonage message %s came on channel %r, which the relay does not answer on: acknowledged, "
                        "not relayed", message_id, str(channel)[:20])
            return []
        content = self._content(body, kind)
        if content is None:
            return []  # reactions, stickers, unsupported types: nothing for the bot
        text, media, reply_id = content
        profile = body.get("profile")
        name = profile.get("name") if isinstance(profile, dict) else None
        return [InboundMessage(
            message_id=message_id,
            user_id=channel_user(channel, user),
            text=text,
            user_name=name or None,
            media=media,
            reply_id=reply_id,
            reply_context={"channel": channel, "to": user, "from": ours},
            raw=body,
        )]

    @staticmethod
    def _content(body: dict[str, Any], kind: Any) -> tuple[str, tuple[Media, ...], str | None] | None:
        if kind == "text":
            return _text(body.get("text")), (), None
        if kind in ("image", "video", "audio", "file"):
            item = body.get(kind)
            item = item if isinstance(item, dict) else {}
            url = item.get("url")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise BadPayload(f"the Vonage {kind} message has no media url")
            name = _text(item.get("name")) if kind == "file" else ""
            return _text(item.get("caption")), (Media(url=url, name=name or None, protected=True),), None
        if kind == "reply":
            reply = body.get("reply")
            reply = reply if isinstance(reply, dict) else {}
            chosen = reply.get("button_reply") or reply.get("list_reply") or reply
            chosen = chosen if isinstance(chosen, dict) else {}
            reply_id = identifier(chosen.get("id"))
            return _text(chosen.get("title")) or reply_id or "", (), reply_id
        if kind == "button":  # a template's quick-reply button
            button = body.get("button")
            button = button if isinstance(button, dict) else {}
            return _text(button.get("text")) or _text(button.get("payload")), (), None
        if kind == "location":
            place = body.get("location")
            place = place if isinstance(place, dict) else {}
            label = ", ".join(str(place[k]) for k in ("name", "address") if place.get(k))
            coordinates = f"{place.get('lat')},{place.get('long')}"
            return (f"{label} ({coordinates})" if label else coordinates), (), None
        return None

    def fetch_media(self, media: Media, *, max_bytes: int) -> MediaContent:
        """A user's file from Vonage's media store, with the application's JWT (needed with secure inbound media);
        ProviderRejected for a URL that is not Vonage's (it would get our JWT)."""
        if not self._is_media_url(media.url):
            raise ProviderRejected("the Vonage media url is not on a Vonage host (over https)",
                                   reason="MediaNotFetched")
        content, content_type = download(self.session, self.name, media.url, max_bytes=max_bytes,
                                         headers=self._auth(), clock=self.clock)
        content_type = content_type or media.content_type or "application/octet-stream"
        name = media.name or media_file_name(urlsplit(media.url).path.rstrip("/").rsplit("/", 1)[-1] or "media",
                                             content_type)
        return MediaContent(content, content_type, name)

    def _is_media_url(self, url: str) -> bool:
        """True for a URL on a Vonage media host over https, or on the API base itself (same scheme, host and
        port). The URL is read both as the check's urlsplit and as requests' urllib3 reads it, and its authority
        may hold nothing _UNSAFE_AUTHORITY names: no spelling may name a Vonage host
        to one parser and send the JWT to another host through the other."""
        _, separator, rest = url.partition("://")
        if not separator or _UNSAFE_AUTHORITY.search(re.split(r"[/?#]", rest, maxsplit=1)[0]):
            return False
        try:
            split, parsed = urlsplit(url), parse_url(url)
            read = {((split.scheme or "").lower(), (split.hostname or "").lower(), split.port),
                    ((parsed.scheme or "").lower(), (parsed.host or "").lower(), parsed.port)}
            api = urlsplit(self.api_base)
        except ValueError:  # an invalid port or IPv6 address, or a host that NFKC normalization changes
            return False
        if len(read) != 1:
            return False
        [(scheme, host, _)] = read
        if (split.scheme, split.netloc.lower()) == (api.scheme, api.netloc.lower()):
            return True
        return scheme == "https" and host.endswith(VONAGE_MEDIA_HOSTS)

    # -- outbound -----------------------------------------------------------------------------
    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        channel, to, sender = (reply_context.get(key) for key in ("channel", "to", "from"))
        if channel not in CHANNELS or not to or not sender:
            raise ProviderRejected("the Vonage reply context needs a known 'channel', 'to' and 'from'")
        kind = ChannelKind.WHATSAPP if channel == "whatsapp" else ChannelKind.PLAIN
        message = replace(message, text=format_for(kind, message.text))
        address = {"channel": channel, "to": to, "from": sender}
        return send_parts(self._bodies(channel, message), lambda body: self._post({**address, **body}),
                          first_part=first_part)

    def _bodies(self, channel: str, message: OutboundMessage) -> list[dict[str, Any]]:
        """Media the channel can send first, then the text (links to other media in it), then WhatsApp's
        buttons or list when the choices fit them; otherwise the choices are numbered in the text."""
        sendable = MEDIA_TYPES[channel]
        bodies, links = [], []
        for item in message.media:
            kind = _media_kind(item.content_type)
            if kind in sendable:
                bodies.append({"message_type": kind, kind: {"url": item.url}})
            else:
                links.append(item.url)
        offer = interactive_object(message.choices) if channel == "whatsapp" and message.choices \
            and not message.multiple else None
        if offer is None:
            text = message_text(message)
        else:
            text, prompt = (message.text, "") if len(message.text) > INTERACTIVE_BODY_LIMIT else ("", message.text)
            offer["body"] = {"text": prompt or CHOOSE_PROMPT}
        text = "\n".join(filter(None, [text, *links]))
        if text:
            bodies.extend({"message_type": "text", "text": piece} for piece in split_text(text, TEXT_LIMITS[channel]))
        if offer is not None:
            bodies.append({"message_type": "custom", "custom": {"type": "interactive", "interactive": offer}})
        return bodies

    def _auth(self) -> dict[str, str]:
        token = application_jwt(self.application_id, self._private_key, now=self.clock.now().timestamp())
        return {"Authorization": f"Bearer {token}"}

    def _post(self, body: dict[str, Any]) -> str:
        response = call_provider(self.session, self.name, "POST", f"{self.api_base}/v1/messages", json=body,
                                 headers=self._auth(), clock=self.clock)
        return str(response_json(response).get("message_uuid", ""))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _media_kind(content_type: str | None) -> str:
    major = (content_type or "").split("/")[0]
    return major if major in ("image", "video", "audio") else "file"
