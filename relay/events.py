"""The bot's events for the operator: `handoff.initiate` and every other event activity, POSTed to
RELAY_EVENT_WEBHOOK_URL as Standard Webhooks-signed JSON.

No phone shows an event, but some ask for somebody to act: a Copilot Studio agent hands a user over
to a human with `handoff.initiate`. The relay sends each event activity of a channel conversation,
once, to the operator's own endpoint (an agent desk, or a function that opens a ticket in one):

    POST RELAY_EVENT_WEBHOOK_URL
    webhook-id: evt_<32 hex>   webhook-timestamp: <Unix seconds>   webhook-signature: v1,<base64>
    {"type": "bot.event", "timestamp": "...",
     "data": {"conversation": {"id": "<Direct Line conversation id>"},
              "channel": "twilio",
              "user": {"id": "<the user's address on the channel>", "directLineId": "dl_..."},
              "event": {"id": "<activity id>", "name": "handoff.initiate", "value": ..., "attachments": [...]},
              "transcript": [{"id": ..., "from": "user" | "bot", "text": ..., "timestamp": ...}, ...]}}

The signature is Standard Webhooks' (HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>",
keyed by the base64-decoded RELAY_EVENT_WEBHOOK_SECRET): `standardwebhooks.Webhook(secret).verify`
checks it. The webhook-id is derived from the activity id, so a resend (after a crash between the
POST and recording it) carries the same id and a receiver that deduplicates on it sees one event.

Failures map as a provider's do (relay.channels.common.call_provider): 429, 5xx, timeouts and
connection errors are ProviderUnavailable (the delivery retries later, the event not yet recorded),
any other 4xx is ProviderRejected (a dead letter). The transcript is the last
RELAY_EVENT_TRANSCRIPT_MESSAGES messages of the conversation up to the event, as Direct Line's
activity set holds them (about 24 hours); the user's address and messages go to the operator's own
endpoint only, over https (SECURITY.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import requests

from relay.channels.common import call_provider, new_session
from relay.channels.generic import secret_key, standard_headers
from relay.clock import SYSTEM_CLOCK, Clock
from relay.settings import RelaySettings

__all__ = ["EVENT_TYPE", "EventWebhook", "event_payload", "transcript_of", "webhook_id"]

EVENT_TYPE = "bot.event"
"""The payload's `type` (Standard Webhooks' event type)."""
TRANSCRIPT_TEXT_LIMIT = 2000
"""Characters kept of one transcript message: a transcript of long answers still fits any receiver."""


def transcript_of(activities: Iterable[Mapping[str, Any]], *, until: str, limit: int,
                  is_bot: Any) -> list[dict[str, Any]]:
    """The last `limit` messages with text before the activity `until` (or all, when it is not among them),
    oldest first; `is_bot(activity)` tells the bot's from the user's."""
    messages: list[dict[str, Any]] = []
    for activity in activities:
        if activity.get("id") == until:
            break
        if activity.get("type") != "message" or not activity.get("text"):
            continue
        messages.append({"id": activity.get("id"), "from": "bot" if is_bot(activity) else "user",
                         "text": str(activity["text"])[:TRANSCRIPT_TEXT_LIMIT],
                         "timestamp": activity.get("timestamp")})
    return messages[-limit:] if limit else []


def event_payload(activity: Mapping[str, Any], *, conversation_id: str, channel: str, user: str,
                  directline_user: str, transcript: list[dict[str, Any]], now: str) -> dict[str, Any]:
    """The JSON POSTed for one event activity (see the module docstring)."""
    event: dict[str, Any] = {"id": activity.get("id"), "name": activity.get("name") or "",
                             "value": activity.get("value")}
    if activity.get("attachments"):
        event["attachments"] = activity["attachments"]
    return {"type": EVENT_TYPE, "timestamp": now, "data": {
        "conversation": {"id": conversation_id},
        "channel": channel,
        "user": {"id": user, "directLineId": directline_user},
        "event": event,
        "transcript": transcript,
    }}


def webhook_id(activity_id: str) -> str:
    """The webhook-id of an event activity's POST: the same for every attempt."""
    return "evt_" + hashlib.sha256(activity_id.encode()).hexdigest()[:32]


class EventWebhook:
    """The operator's event endpoint; `configured` is False when RELAY_EVENT_WEBHOOK_URL is not set."""

    def __init__(self, settings: RelaySettings, *, session: requests.Session | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        self.url = settings.event_webhook_url
        self.transcript_messages = settings.event_transcript_messages
        self._key = secret_key(settings.event_webhook_secret) if self.url else b""
        self._session = session or new_session()
        self.clock = clock

    def __repr__(self) -> str:  # never the key
        return f"<EventWebhook url={self.url!r}>"

    @property
    def configured(self) -> bool:
        return bool(self.url)

    def send(self, payload: Mapping[str, Any], *, activity_id: str) -> None:
        """POST `payload`, signed; ProviderRejected (4xx but 429: for good) or ProviderUnavailable (try later)."""
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        signed = standard_headers(self._key, webhook_id(activity_id), body,
                                  timestamp=int(self.clock.now().timestamp()))
        call_provider(self._session, "event webhook", "POST", self.url, data=body,
                      headers={"Content-Type": "application/json", **signed}, clock=self.clock)
