"""Channel adapters, one module per provider, and the registry the relay finds them through.

    adapter = get_adapter("twilio", settings)          # ChannelDisabled (404) when not configured
    request = WebhookRequest(method, public_url(settings.relay.public_base_url, url), headers, body, query)
    answer = adapter.handshake(request)                 # WhatsApp's GET; None otherwise
    adapter.verify(request)                             # PayloadTooLarge / SignatureInvalid / StaleTimestamp
    messages = adapter.parse(request)                   # BadPayload; [] for status callbacks
    ...                                                 # relay them, then answer adapter.acknowledgement()
    adapter.send(message.reply_context, OutboundMessage(text="hi"))   # ProviderRejected / ProviderUnavailable
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

import requests

from relay.channels.base import ChannelAdapter
from relay.channels.bird import BirdAdapter
from relay.channels.common import new_session
from relay.channels.generic import GenericAdapter
from relay.channels.line import LineAdapter
from relay.channels.messagebird import MessageBirdAdapter
from relay.channels.telegram import TelegramAdapter
from relay.channels.twilio import TwilioAdapter
from relay.channels.vonage import VonageAdapter
from relay.channels.whatsapp import WhatsAppAdapter
from relay.clock import SYSTEM_CLOCK, Clock
from relay.errors import ChannelDisabled
from relay.settings import Settings

__all__ = ["ADAPTERS", "get_adapter", "list_enabled", "public_url"]

ADAPTERS: dict[str, type[ChannelAdapter]] = {
    adapter.name: adapter
    for adapter in (TwilioAdapter, WhatsAppAdapter, MessageBirdAdapter, BirdAdapter, GenericAdapter, VonageAdapter,
                    LineAdapter, TelegramAdapter)
}

_session: requests.Session | None = None
_session_lock = threading.Lock()


def _shared_session() -> requests.Session:
    """One pooled session for the process, so warm instances reuse provider connections."""
    global _session
    with _session_lock:
        if _session is None:
            _session = new_session()
        return _session


def get_adapter(name: str, settings: Settings, *, session: requests.Session | None = None,
                clock: Clock = SYSTEM_CLOCK) -> ChannelAdapter:
    """The adapter of an enabled provider, on `clock`; ChannelDisabled for an unknown or unconfigured one,
    SettingsError when its settings are incomplete."""
    if name not in ADAPTERS:
        raise ChannelDisabled(f"there is no channel named {name!r}")
    config = settings.channels.get(name)
    if config is None:
        raise ChannelDisabled(f"the {name} channel is not configured")
    return ADAPTERS[name](
        config,
        session=session or _shared_session(),
        window_seconds=settings.relay.signature_window_seconds,
        max_body_bytes=settings.relay.max_body_bytes,
        clock=clock,
    )


def list_enabled(settings: Settings) -> list[str]:
    """Names of the providers whose settings are present, in a stable order."""
    return [name for name in ADAPTERS if name in settings.channels]


def public_url(base: str, request_url: str) -> str:
    """The URL the provider called: the configured public base plus the request's path and query.

    Azure's front end hands the worker an internal URL; signatures cover the public one."""
    if not base:
        return request_url
    parts = urlsplit(request_url)
    return base.rstrip("/") + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
