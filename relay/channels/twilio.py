"""Twilio SMS and WhatsApp: X-Twilio-Signature webhooks in, the Messages API out.

Twilio signs the URL it called plus every POST parameter sorted by name (HMAC-SHA1 with the Auth
Token, base64). JSON webhooks carry `bodySHA256` in the URL instead and sign the URL alone. There
is no timestamp, so no replay window: the relay dedupes on MessageSid.

The signed string marks no end of a value, so a captured webhook can be re-sent under its signature
with the next parameter folded into one value (`MessageSid=SM…NumMedia0`, no `NumMedia`). The dedupe
key is therefore accepted only in its documented form, SM or MM and 32 hex digits (what Twilio's
API itself checks, errors 90001/90011), and MessageSid, SmsMessageSid and SmsSid must agree. The URL
is tried as called and with its scheme's default port (443, 80) added or dropped, as Twilio signs
either; never with another port dropped.

Inbound media (`MediaUrl{N}`) live under the API (`/2010-04-01/Accounts/{sid}/Messages/{sid}/Media/{sid}`),
readable with the account's Basic auth unless the account turned HTTP auth off: they are marked
protected and `fetch_media` downloads them with the credentials (Twilio then redirects to its CDN;
`requests` drops the credentials on that other host).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

from relay.channels.base import InboundMessage, Media, MediaContent, OutboundMessage, WebhookAnswer, WebhookRequest
from relay.channels.common import (
    AdapterBase,
    call_provider,
    download,
    form_fields,
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

__all__ = ["MEDIA_PER_MESSAGE", "MESSAGE_SID", "TwilioAdapter", "compute_signature"]

TEXT_LIMIT = 1600
MEDIA_PER_MESSAGE = 10
"""Twilio's limit both ways: at most ten MediaUrl per message sent, at most MediaUrl0..9 per message received."""
MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-fA-F]{32}")
"""A Message SID as Twilio documents it (SMS, MMS and WhatsApp alike)."""
_SID_FIELDS = ("MessageSid", "SmsMessageSid", "SmsSid")
_FOLDED_FIELD = re.compile(r"[A-Z][a-z]")
"""In From or To, the start of a field name (every Twilio field is named FromCity, MediaUrl0, ...): an
address ("+14155550123", "whatsapp:+14155550123", "messenger:1234") never holds one. The signature runs
names and values together, so a replay may fold the next field into From ("+1415…FromCityBOSTON") and
pass as a new user with a dedupe key of its own; its dedupe row is in that user's partition."""
_HASHES = {"HMAC_SHA1": hashlib.sha1, "HMAC_SHA256": hashlib.sha256}
_DEFAULT_PORTS = {"https": 443, "http": 80}


def compute_signature(auth_token: str, url: str, params: Mapping[str, str | list[str]] | None = None,
                      *, algorithm: str = "HMAC_SHA1") -> str:
    """Twilio's signature of `url` and form `params` (values may be lists for repeated names)."""
    signed = url
    fields = params or {}
    for name in sorted(fields):
        values = fields[name]
        for value in sorted(set([values] if isinstance(values, str) else values)):
            signed += name + value
    digest = hmac.new(auth_token.encode(), signed.encode(), _HASHES[algorithm]).digest()
    return base64.b64encode(digest).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as called, and with its scheme's default port dropped or added: Twilio signs either.

    Any other explicit port is part of the signed URL: a signature for `http://host` is not one for
    `http://host:50891`."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    try:
        port = parts.port
    except ValueError:  # not a port number: nothing can have been signed for another form of it
        return [url]
    if default is None or port not in (None, default):
        return [url]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = userinfo + "@" if userinfo else ""
    without = urlunsplit(parts._replace(netloc=prefix + host))
    with_port = urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}"))
    return [without, with_port]


def _text_kind(address: str) -> ChannelKind:
    """How the user's phone shows a reply: WhatsApp formatting for a `whatsapp:` address, else plain SMS text."""
    return ChannelKind.WHATSAPP if address.startswith("whatsapp:") else ChannelKind.PLAIN


class TwilioAdapter(AdapterBase):
    name = "twilio"

    def __init__(self, config: Mapping[str, str], **options):
        super().__init__(config, **options)
        self._token = self._setting("TWILIO_AUTH_TOKEN", required=True)
        self.account_sid = self._setting("TWILIO_ACCOUNT_SID", required=True, why="to send replies")
        self.api_base = (self._setting("TWILIO_API_BASE") or "https://api.twilio.com").rstrip("/")

    def verify(self, request: WebhookRequest) -> None:
        self.check_size(request)
        signature = require_header(request, "X-Twilio-Signature")
        settings = request.header("X-Twilio-Webhooks-Signature-Settings", "") or ""
        algorithm = "HMAC_SHA1"
        for part in settings.split(","):
            key, _, value = part.partition("=")
            if key.strip() == "algorithm" and value.strip():
                algorithm = value.strip().upper()
        if algorithm not in _HASHES:
            raise SignatureInvalid(f"unsupported Twilio signature algorithm {algorithm!r}")
        body_hash = [v for k, v in form_fields(urlsplit(request.url).query, "the URL's query") if k == "bodySHA256"]
        if body_hash:
            if not same(hashlib.sha256(request.body).hexdigest(), body_hash[0].lower()):
                raise SignatureInvalid("the body does not match the bodySHA256 in the URL")
            params: dict[str, list[str]] = {}
        else:
            params = {}
            for name, value in self._form(request):
                params.setdefault(name, []).append(value)
        for url in _url_variants(request.url):
            if same(compute_signature(self._token, url, params, algorithm=algorithm), signature):
                return
        raise SignatureInvalid("the X-Twilio-Signature does not match the URL and parameters")

    def _form(self, request: WebhookRequest) -> list[tuple[str, str]]:
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadPayload("the form body is not UTF-8") from None
        return form_fields(text, "the form body")

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        fields = self._fields(request)
        message_id = self._message_sid(fields)
        try:
            count = int(fields.get("NumMedia", "0") or 0)
        except ValueError:
            raise BadPayload("NumMedia is not a number") from None
        if "Body" not in fields and not count:
            return []  # a status callback (MessageStatus) or another event: acknowledged, not relayed
        if not fields.get("From") or not fields.get("To"):
            raise BadPayload("the Twilio message has no From or To")
        for name in ("From", "To"):
            if _FOLDED_FIELD.search(fields[name]):
                raise BadPayload(f"the Twilio {name} holds a field name: another field was folded into it")
        # NumMedia is believed only as far as MediaUrl0..9 exist: NumMedia=100000000 costs ten lookups.
        media = tuple(
            Media(url=fields[f"MediaUrl{index}"], content_type=fields.get(f"MediaContentType{index}") or None,
                  protected=self._is_api_url(fields[f"MediaUrl{index}"]))
            for index in range(min(count, MEDIA_PER_MESSAGE)) if fields.get(f"MediaUrl{index}")
        )
        return [InboundMessage(
            message_id=message_id,
            user_id=fields["From"],
            text=fields.get("Body", ""),
            user_name=fields.get("ProfileName") or None,
            media=media,
            reply_context={"to": fields["From"], "from": fields["To"]},
            raw=fields,
        )]

    @staticmethod
    def _message_sid(fields: Mapping[str, str]) -> str:
        """The webhook's Message SID, the dedupe key; BadPayload unless it has the documented form and
        every field that carries it (MessageSid, SmsMessageSid, SmsSid) carries the same one."""
        given = {fields[name] for name in _SID_FIELDS if name in fields}
        if not given:
            raise BadPayload("the Twilio webhook has no MessageSid")
        if len(given) > 1:
            raise BadPayload("the Twilio webhook's MessageSid, SmsMessageSid and SmsSid differ")
        sid = given.pop()
        if not MESSAGE_SID.fullmatch(sid):
            raise BadPayload("the Twilio MessageSid is not SM or MM followed by 32 hexadecimal digits")
        return sid

    def _is_api_url(self, url: str) -> bool:
        """True for media on Twilio's API host: only there do our credentials go."""
        media, api = urlsplit(url), urlsplit(self.api_base)
        return (media.scheme, media.netloc.lower()) == (api.scheme, api.netloc.lower())

    def fetch_media(self, media: Media, *, max_bytes: int) -> MediaContent:
        if not self._is_api_url(media.url):
            raise ProviderRejected("the Twilio media URL is not on the Twilio API host", reason="MediaNotFetched")
        content, served_type = download(self.session, self.name, media.url, max_bytes=max_bytes, clock=self.clock,
                                        auth=(self.account_sid, self._token))
        content_type = served_type or media.content_type or "application/octet-stream"
        name = media.name or media_file_name(urlsplit(media.url).path.rstrip("/").rsplit("/", 1)[-1], content_type)
        return MediaContent(content, content_type, name)

    def _fields(self, request: WebhookRequest) -> dict[str, str]:
        content_type = (request.header("Content-Type", "") or "").lower()
        if "json" in content_type or "bodySHA256" in request.url:
            body = json_body(request)
            if not isinstance(body, dict):
                raise BadPayload("the JSON body is not an object")
            return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
        return dict(self._form(request))

    def acknowledgement(self) -> WebhookAnswer:
        """Empty TwiML: Twilio sends nothing back on its own; replies go through the API."""
        return WebhookAnswer(200, b'<?xml version="1.0" encoding="UTF-8"?><Response/>', "text/xml")

    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        to, sender = reply_context.get("to"), reply_context.get("from")
        if not to or not sender:
            raise ProviderRejected("the Twilio reply context needs 'to' and 'from'")
        message = replace(message, text=format_for(_text_kind(to), message.text))
        text = message_text(message)
        pieces = split_text(text, TEXT_LIMIT) if text else []
        media_urls = [m.url for m in message.media]
        batches = [media_urls[i:i + MEDIA_PER_MESSAGE] for i in range(0, len(media_urls), MEDIA_PER_MESSAGE)]
        # Media ride with the first pieces of text (one message can carry both), extra batches go alone.
        forms: list[dict[str, str | list[str]]] = []
        for index in range(max(len(pieces), len(batches))):
            form: dict[str, str | list[str]] = {"To": to, "From": sender}
            if index < len(pieces):
                form["Body"] = pieces[index]
            if index < len(batches):
                form["MediaUrl"] = batches[index]
            forms.append(form)
        return send_parts(forms, self._post, first_part=first_part)

    def _post(self, form: dict[str, str | list[str]]) -> str:
        response = call_provider(
            self.session, self.name, "POST", f"{self.api_base}/2010-04-01/Accounts/{self.account_sid}/Messages.json",
            data=form, auth=(self.account_sid, self._token), clock=self.clock,
        )
        return str(response_json(response).get("sid", ""))
