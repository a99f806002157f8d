"""Bot Framework activities: built from a channel message, rendered back into a channel message.

Inbound activities carry what Dynamics 365 Omnichannel and Copilot Studio expect in channelData
(channeltype, conversationcontext, customercontext), a stable clientActivityID derived from the
provider's message id (so an ambiguous post can be recognised instead of repeated), and the raw
provider payload under "relay". They are kept under Omnichannel's 28 KB limit by trimming the
optional parts, never the text.

Only a bot's final text is for a phone: `is_interim` names what a channel user must never get, a
`typing` activity and every step of a streamed answer (Copilot Studio's generative answers stream as
activities carrying a `streaminfo` entity with streamType `streaming` or `informative`, or that
streamType in channelData); the final message (`final`, or none) carries the whole text.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from typing import Any

from relay.cards import REPLY_ID_KEY, render_activity
from relay.channels.base import InboundMessage, Media, OutboundMessage

__all__ = [
    "ACTIVITY_LIMIT_BYTES",
    "build_inbound_activity",
    "directline_user_id",
    "is_interim",
    "render_outbound",
    "take_pending_media",
    "with_unavailable_media",
]

ACTIVITY_LIMIT_BYTES = 28 * 1024
RAW_PAYLOAD_KEY = "relay"
PENDING_MEDIA_KEY = "relayPendingMedia"
"""Top-level key of a stored activity listing the protected media still to fetch; never posted."""

# What Omnichannel calls each channel when no context is configured for it.
DEFAULT_CHANNEL_TYPES = {
    "twilio": "sms",
    "whatsapp": "whatsapp",
    "messagebird": "messagebird",
    "bird": "bird",
    "generic": "generic",
}


def directline_user_id(channel: str, channel_user_id: str, *, key_for: Callable[..., str]) -> str:
    """A stable Direct Line user id for a channel user: `dl_<channel>_<keyed hash>` (`key_for` is
    Tables.key_for, keyed with the relay's own secret).

    Keyed, so nobody who knows a phone number can work out its user id: without enhanced
    authentication Direct Line takes `from.id` as a client sends it, and a Web Chat page of the same
    bot could otherwise post as that channel user. (A conversation keeps the id it was created with.)"""
    return f"dl_{channel}_{key_for('directline user', channel, channel_user_id)}"


def _client_activity_id(channel: str, provider_message_id: str) -> str:
    return f"{channel}:{provider_message_id}"


def _expand(template: Any, values: Mapping[str, str]) -> Any:
    """Fill "{user_id}"-style placeholders in configured Omnichannel context values."""
    if isinstance(template, str):
        try:
            return template.format_map(values)
        except (KeyError, ValueError, IndexError):
            return template
    if isinstance(template, dict):
        return {k: _expand(v, values) for k, v in template.items()}
    return template


def _size(activity: dict) -> int:
    return len(json.dumps(activity, ensure_ascii=False, separators=(",", ":")).encode())


def build_inbound_activity(
    message: InboundMessage,
    *,
    channel: str,
    user_id: str,
    omnichannel: Mapping[str, Any] | None = None,
    limit_bytes: int = ACTIVITY_LIMIT_BYTES,
) -> dict:
    """The message activity to post to Direct Line for one channel message, from `user_id` (directline_user_id)."""
    context = omnichannel or {}
    values = {"user_id": message.user_id, "user_name": message.user_name or "", "channel": channel}
    channel_data: dict[str, Any] = {
        "clientActivityID": _client_activity_id(channel, message.message_id),
        "channeltype": context.get("channeltype", DEFAULT_CHANNEL_TYPES.get(channel, channel)),
        "conversationcontext": _expand(context.get("conversationcontext", {}), values),
        "customercontext": _expand(context.get("customercontext", {"phonenumber": "{user_id}"}), values),
        RAW_PAYLOAD_KEY: {"channel": channel, "messageId": message.message_id, "payload": dict(message.raw),
                          **({REPLY_ID_KEY: message.reply_id} if message.reply_id else {})},
    }
    activity: dict[str, Any] = {
        "type": "message",
        "from": {"id": user_id, "name": message.user_name or message.user_id,
                 "role": "user"},
        "text": message.text,
        "textFormat": "plain",
        "channelData": channel_data,
    }
    if message.locale:
        activity["locale"] = message.locale
    public = [m for m in message.media if not m.protected]
    if public:
        activity["attachments"] = [
            {"contentType": m.content_type or "application/octet-stream", "contentUrl": m.url,
             **({"name": m.name} if m.name else {})}
            for m in public
        ]
    # A protected URL would be useless to the bot: the relay fetches those files when it posts the message.
    pending = [{"url": m.url, "contentType": m.content_type, "name": m.name} for m in message.media if m.protected]
    if pending:
        activity[PENDING_MEDIA_KEY] = pending
    return _fit_activity(activity, limit_bytes)


def take_pending_media(activity: Mapping[str, Any]) -> tuple[dict, tuple[Media, ...]]:
    """The activity as Direct Line gets it (without the pending-media marker) and the media to fetch for it."""
    ready = {k: v for k, v in activity.items() if k != PENDING_MEDIA_KEY}
    media = tuple(Media(url=str(item["url"]), content_type=item.get("contentType"), name=item.get("name"),
                        protected=True)
                  for item in activity.get(PENDING_MEDIA_KEY) or [] if isinstance(item, Mapping) and item.get("url"))
    return ready, media


def with_unavailable_media(activity: Mapping[str, Any], missing: list[tuple[Media, str]]) -> dict:
    """The activity telling the bot, under channelData.relay.unavailableMedia, which files could not be fetched."""
    channel_data = dict(activity.get("channelData") or {})
    channel_data[RAW_PAYLOAD_KEY] = {**(channel_data.get(RAW_PAYLOAD_KEY) or {}), "unavailableMedia": [
        {"contentType": m.content_type or "application/octet-stream", "reason": reason,
         **({"name": m.name} if m.name else {})}
        for m, reason in missing]}
    return {**activity, "channelData": channel_data}


def _drop_raw_payload(activity: dict) -> None:
    raw = activity["channelData"][RAW_PAYLOAD_KEY]
    raw.pop("payload", None)
    raw["trimmed"] = True


def _drop_contexts(activity: dict) -> None:
    activity["channelData"].update(conversationcontext={}, customercontext={})


def _drop_attachment_names(activity: dict) -> None:
    for attachment in activity.get("attachments", []):
        attachment.pop("name", None)


def _fit_activity(activity: dict, limit_bytes: int = ACTIVITY_LIMIT_BYTES) -> dict:
    """Trim optional parts (raw payload, then contexts, then attachment names) until the activity fits.

    The text, the sender and the clientActivityID are never trimmed."""
    if _size(activity) <= limit_bytes:
        return activity
    trimmed = copy.deepcopy(activity)
    for trim in (_drop_raw_payload, _drop_contexts, _drop_attachment_names):
        trim(trimmed)
        if _size(trimmed) <= limit_bytes:
            break
    return trimmed


INTERIM_STREAM_TYPES = frozenset({"streaming", "informative"})
"""The streamType of a streamed answer's steps; the final message says `final` (or nothing)."""


def _stream_types(activity: Mapping[str, Any]) -> set[str]:
    types = {str(entity.get("streamType", "")).lower() for entity in activity.get("entities") or []
             if isinstance(entity, Mapping) and str(entity.get("type", "")).lower() == "streaminfo"}
    channel_data = activity.get("channelData")
    if isinstance(channel_data, Mapping) and channel_data.get("streamType"):
        types.add(str(channel_data["streamType"]).lower())
    return types


def is_interim(activity: Mapping[str, Any]) -> bool:
    """True for what only shows a bot at work: `typing`, and each step of a streamed answer (a `streaminfo`
    entity or channelData streamType of `streaming` or `informative`). A channel user gets neither: the
    final message, sent after them, carries the whole text."""
    return activity.get("type") == "typing" or bool(_stream_types(activity) & INTERIM_STREAM_TYPES)


def render_outbound(activity: Mapping[str, Any]) -> OutboundMessage | None:
    """The channel message for one bot activity, or None when there is nothing to deliver (relay/cards.py
    renders it; the question it may ask is `relay.cards.render_activity`'s to remember)."""
    rendering = render_activity(activity)
    return None if rendering is None else rendering.message
