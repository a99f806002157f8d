"""`POST /api/channels/{channel}`: a provider's signed webhook to the bot, durably and exactly once.

Each message is stored first (dedupe row and outbox row in one transaction), then posted: the
provider hears 200 once its message is safe in Table Storage, whether or not Direct Line could take
it now (the poller posts what waits in the outbox, in order). Only a message that could not even be
stored gets an error (503, so the provider retries). A retried webhook whose message is already
stored is answered 200 and changes nothing. Then, for a short burst, the bot's quick replies are
delivered before the provider is answered, so a prompt bot does not wait for the timer.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

from relay.activities import build_inbound_activity, directline_user_id
from relay.channels.base import ChannelAdapter, InboundMessage, WebhookAnswer, WebhookRequest
from relay.conversations import RelayContext, new_owner, work_conversation
from relay.errors import BadPayload, MethodNotAllowed, RelayError
from relay.store.conversations import ConversationKey, ConversationRecord, ConversationState
from relay.store.outbox import InboundState

__all__ = ["accept_message", "handle_webhook", "parse_messages"]

log = logging.getLogger(__name__)

LEASE_WAIT_STEP = 0.2


def handle_webhook(ctx: RelayContext, channel: str, request: WebhookRequest) -> WebhookAnswer:
    """Verify, store and relay a provider's webhook; the answer the provider gets back."""
    adapter = ctx.adapter(channel)
    handshake = adapter.handshake(request)
    if handshake is not None:
        return handshake
    if request.method != "POST":
        raise MethodNotAllowed(f"{request.method} is not accepted here: providers POST their webhooks")
    adapter.verify(request)
    messages = parse_messages(adapter, channel, request)
    to_work: dict[ConversationKey, None] = {}
    for message in messages:
        key = ConversationKey(channel, message.user_id)
        if accept_message(ctx, key, message):
            to_work[key] = None
    burst = ctx.settings.relay.burst_poll_seconds
    started = ctx.clock.monotonic()
    for key in to_work:
        _relay_now(ctx, key, burst_seconds=burst)
    log.info("webhook %s: %d message(s), %d new, relayed in %.0f ms", channel, len(messages), len(to_work),
             (ctx.clock.monotonic() - started) * 1000)
    return adapter.acknowledgement()


def parse_messages(adapter: ChannelAdapter, channel: str, request: WebhookRequest) -> list[InboundMessage]:
    """The adapter's messages; a payload of the wrong shape is the sender's mistake (400), never a crash.

    Signed payloads are trusted to be the provider's, not to be well formed: a list where an object
    belongs, a number for an id. Adapters check what they rely on; this catches what slips through."""
    try:
        messages = adapter.parse(request)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as error:
        log.warning("webhook %s: the payload has an unexpected shape (%s)", channel, type(error).__name__)
        raise BadPayload(f"the {channel} payload does not have the expected shape") from None
    for message in messages:
        if not all(isinstance(v, str) and v for v in (message.message_id, message.user_id)) \
                or not isinstance(message.text, str):
            raise BadPayload(f"a {channel} message needs a string id, sender and text")
    return messages


def accept_message(ctx: RelayContext, key: ConversationKey, message: InboundMessage) -> bool:
    """Store one message (StoreError when storage is down: nothing is acknowledged then).

    True when it waits to be posted; False for a duplicate that was already handled."""
    now = ctx.clock.now()
    # The record first: an outbox entry must never exist without a record the poller will find.
    ctx.store.conversations.update_record(key, lambda record: _touched(record, key, message, now))
    activity = build_inbound_activity(message, channel=key.channel,
                                      omnichannel=ctx.settings.relay.omnichannel.get(key.channel))
    result = ctx.store.outbox.add_message(key, message.message_id, activity, now=now)
    if not result.is_new:
        log.info("webhook %s: message already %s, not relayed again", key.channel, result.state)
    return result.is_new or result.state == InboundState.PENDING


def _touched(record: ConversationRecord | None, key: ConversationKey, message: InboundMessage,
             now) -> ConversationRecord:
    """The user's record after a new message: due for polling now, answering where the user wrote from."""
    if record is None:
        return ConversationRecord(key, conversation_id="", user_id=directline_user_id(key.channel, key.user),
                                  reply_context=dict(message.reply_context), last_user_activity_at=now,
                                  next_poll_at=now, poll_interval=0.0)
    if not record.active:
        # The bot or the idle timer ended the last conversation: this message starts a new one.
        record = replace(record, state=ConversationState.ACTIVE, conversation_id="", token="", token_expires_at=None,
                         watermark=None)
    return replace(record, reply_context=dict(message.reply_context) or record.reply_context,
                   last_user_activity_at=now, next_poll_at=now, poll_interval=0.0, peekable=False)


def _relay_now(ctx: RelayContext, key: ConversationKey, *, burst_seconds: float) -> None:
    """Post what waits and deliver quick replies under the lease; the poller does it if we cannot.

    Failures here are logged, never raised: the messages are stored, and the provider must hear 200."""
    owner = new_owner("webhook")
    deadline = ctx.clock.now() + timedelta(seconds=burst_seconds)
    try:
        lease = ctx.settings.relay.lease_seconds
        record = ctx.store.conversations.acquire_lease(key, owner=owner, lease_seconds=lease)
        while record is None and ctx.clock.now() + timedelta(seconds=LEASE_WAIT_STEP) < deadline:
            ctx.clock.sleep(LEASE_WAIT_STEP)  # the poller is working this conversation right now
            record = ctx.store.conversations.acquire_lease(key, owner=owner, lease_seconds=lease)
        if record is None:
            # Written again AFTER the message was queued: the busy worker then cannot leave the
            # conversation peekable (its finish sees a record changed by someone else).
            ctx.store.conversations.update_record(
                key, lambda r: r and replace(r, last_user_activity_at=ctx.clock.now(), next_poll_at=ctx.clock.now(),
                                             peekable=False))
            log.info("a %s conversation is busy; the poller will post its message", key.channel)
            return
        work_conversation(ctx, record, owner=owner, poll=burst_seconds > 0, burst_until=deadline, idle_check=False)
    except RelayError as error:
        log.warning("could not relay a %s message now (%s: %s); it waits in the outbox", key.channel,
                    type(error).__name__, error)
    except Exception:
        log.exception("could not relay a %s message now; it waits in the outbox", key.channel)
