"""The one small interface every channel adapter implements, and the plain data it speaks.

An adapter knows one provider: how it signs webhooks, what its payloads look like, how to answer
its handshakes and how to send through its API. It knows nothing of Direct Line or storage.

A signed payload is the provider's, not necessarily well formed: an `InboundMessage` refuses
(BadPayload, 400) a value of the wrong kind in itself or its media, such as a list for an id or a
number for a name, so whatever an adapter reads from JSON arrives typed as declared, or not at all.
Its ids are at most MAX_ID_CHARS characters: storage keeps each in one property, and would refuse a
70 000-character one for good (the provider would send it again forever).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from relay.errors import BadPayload

if TYPE_CHECKING:
    import requests

    from relay.clock import Clock

__all__ = [
    "MAX_ID_CHARS",
    "ChannelAdapter",
    "Choice",
    "InboundMessage",
    "Media",
    "MediaContent",
    "OutboundMessage",
    "WebhookAnswer",
    "WebhookRequest",
]


MAX_ID_CHARS = 4096
"""Longest message or user id a webhook may carry: the providers' are under 100 characters, and a user id of
2,000 is relayed (SECURITY.md), while Table Storage keeps at most 32,768 UTF-16 units in a property."""


def _check_types(item: object, what: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    for name in required:
        if not isinstance(getattr(item, name), str) or not getattr(item, name):
            raise BadPayload(f"{what}: {name} must be a non-empty string")
    for name in optional:
        if getattr(item, name) is not None and not isinstance(getattr(item, name), str):
            raise BadPayload(f"{what}: {name} must be a string")


@dataclass(frozen=True)
class WebhookRequest:
    """A provider's call, free of any HTTP framework.

    `url` is the public URL the provider called (RELAY_PUBLIC_BASE_URL + path + query), which is
    what signatures cover; `headers` are looked up case-insensitively through `header()`."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str, default: str | None = None) -> str | None:
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return default


@dataclass(frozen=True)
class Media:
    url: str
    content_type: str | None = None
    name: str | None = None
    protected: bool = False
    """The URL needs our provider credentials (WhatsApp's Graph media object, Twilio's MediaUrl): a bot
    cannot open it, so the relay fetches the bytes with the adapter's `fetch_media` and uploads them."""


@dataclass(frozen=True)
class MediaContent:
    """A user's media file, downloaded from the provider."""

    content: bytes = field(repr=False)
    content_type: str
    name: str


@dataclass(frozen=True)
class InboundMessage:
    """One user message out of a webhook."""

    message_id: str
    """The provider's id, the dedupe key (Twilio MessageSid, wamid, Bird payload.id, ...)."""
    user_id: str
    """The channel user (phone number, wa_id, contact id): with the channel, it keys the conversation."""
    text: str
    user_name: str | None = None
    media: tuple[Media, ...] = ()
    locale: str | None = None
    reply_id: str | None = None
    """The id of the button or list row the user chose (a WhatsApp interactive reply), else None."""
    reply_context: Mapping[str, str] = field(default_factory=dict)
    """What `send` needs to answer this user (e.g. Twilio's To/From pair, a MessageBird conversation id)."""
    raw: Mapping[str, Any] = field(default_factory=dict)
    """The provider's payload for this message, kept for the activity's channelData."""

    def __post_init__(self) -> None:
        _check_types(self, "a message", ("message_id", "user_id"), ("user_name", "locale", "reply_id"))
        for name in ("message_id", "user_id"):
            if len(getattr(self, name)) > MAX_ID_CHARS:
                raise BadPayload(f"a message: {name} has {len(getattr(self, name))} characters, over the "
                                 f"{MAX_ID_CHARS} allowed")
        if not isinstance(self.text, str):
            raise BadPayload("a message: text must be a string")
        for item in self.media:
            _check_types(item, "a message's media item", ("url",), ("content_type", "name"))


@dataclass(frozen=True)
class Choice:
    """One option of a question to the user: `id` comes back in a WhatsApp button or list reply."""

    id: str
    title: str


@dataclass(frozen=True)
class OutboundMessage:
    """One message to a user, already rendered from the bot's activity (relay/cards.py).

    `text` holds everything to read, links as URLs; `choices` are the question's options, to offer as
    buttons, a list, or numbered lines (`relay.channels.common.message_text`); `multiple`: several may
    be chosen at once."""

    text: str = ""
    media: tuple[Media, ...] = ()
    choices: tuple[Choice, ...] = ()
    multiple: bool = False
    idempotency_key: str = ""  # the same for every attempt to send this message (the bot activity's id)


@dataclass(frozen=True)
class WebhookAnswer:
    """A complete HTTP answer an adapter gives itself (handshakes, acknowledgements)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"


class ChannelAdapter(Protocol):
    """One provider's webhooks and API, as the relay uses them; `relay.channels.ADAPTERS` lists them.

    Built once per process with the provider's settings, then shared by every invocation and thread:
    an adapter keeps no state between calls but its settings and the HTTP session."""

    name: str
    """The channel's name: its webhook route (/api/channels/<name>) and its part of every conversation key."""

    def __init__(self, config: Mapping[str, str], *, session: requests.Session, window_seconds: float = ...,
                 max_body_bytes: int = ..., clock: Clock = ...) -> None:
        """Read `config` (the provider's settings); SettingsError when one it needs is missing or invalid.
        Signatures older than `window_seconds` by `clock` are stale; bodies over `max_body_bytes` are refused."""

    def handshake(self, request: WebhookRequest) -> WebhookAnswer | None:
        """Answer a provider's verification call (WhatsApp's GET hub.challenge), else None."""

    def verify(self, request: WebhookRequest) -> None:
        """Raise PayloadTooLarge / SignatureInvalid / StaleTimestamp unless the request is signed by the provider."""

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        """The user messages in a verified request (zero for status callbacks); BadPayload if malformed."""

    def acknowledgement(self) -> WebhookAnswer:
        """What the provider expects back once its webhook was taken (e.g. empty TwiML for Twilio)."""

    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        """Send to the user; returns the provider's message ids. ProviderRejected (permanent) or
        ProviderUnavailable (transient, retry later) on failure.

        A message may take several provider calls (parts), planned the same way for the same message;
        the error's `parts_sent` says how many the provider accepted, and a retry passes that as
        `first_part` so no part reaches the user twice."""

    def spend(self, reply_context: Mapping[str, str]) -> Mapping[str, str]:
        """`reply_context` as it stands once a send has used it: without what a send may use only once (LINE's
        reply token), else unchanged. The relay stores this before it sends, so nothing is used twice."""

    def fetch_media(self, media: Media, *, max_bytes: int) -> MediaContent:
        """The bytes of a user's `protected` media, at most `max_bytes`; ProviderRejected when the provider
        refuses it for good (gone, too large, not its URL), ProviderUnavailable when it cannot give it now."""
