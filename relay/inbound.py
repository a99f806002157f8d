"""`POST /api/channels/{channel}`: a provider's signed webhook to the bot, durably and exactly once.

Each message is stored first, then posted: the provider hears 200 once its message is safe in
Table Storage, whether or not Direct Line could take it now (the poller posts what waits in the
outbox, in order). Storing only appends rows of the message's own: its inbound row in the due
index (so the poller will find the conversation), then its dedupe and outbox rows in one
transaction. Nothing a webhook writes is shared with another message, so any number of messages
of one user arriving at once are all stored; the conversation record is brought up to date by the
worker that holds the lease. Only a message that could not even be stored gets an error (503, so
the provider retries). A retried webhook whose message is already stored is answered 200 and
changes nothing. Then, within one burst for the whole webhook (its users worked side by side), the
messages are posted and the bot's quick replies delivered before the provider is answered, so a
prompt bot does not wait for the timer.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from relay.activities import build_inbound_activity, directline_user_id
from relay.channels.base import ChannelAdapter, InboundMessage, WebhookAnswer, WebhookRequest
from relay.conversations import RelayContext, new_owner, work_conversation
from relay.errors import BadPayload, MethodNotAllowed, RelayError
from relay.store.conversations import ConversationKey
from relay.store.due_polls import InboundMark
from relay.store.outbox import InboundState

__all__ = ["accept_message", "handle_webhook", "parse_messages", "relay_all", "relay_now"]

log = logging.getLogger(__name__)

LEASE_WAIT_STEP = 0.2
BURST_WORKERS = 8
"""Users of one webhook worked side by side (a WhatsApp or Bird webhook may carry several)."""


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
    to_work: dict[ConversationKey, list[InboundMark]] = {}
    for message in messages:
        key = ConversationKey(channel, message.user_id)
        mark = accept_message(ctx, key, message)
        if mark is not None:
            to_work.setdefault(key, []).append(mark)
    burst = ctx.settings.relay.burst_poll_seconds
    started = ctx.clock.monotonic()
    relay_all(ctx, to_work, burst_until=ctx.clock.now() + timedelta(seconds=burst), poll=burst > 0)
    log.info("webhook %s: %d message(s) of %d user(s) new, relayed in %.0f ms", channel, len(messages),
             len(to_work), (ctx.clock.monotonic() - started) * 1000)
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


def accept_message(ctx: RelayContext, key: ConversationKey, message: InboundMessage) -> InboundMark | None:
    """Store one message (StoreError when storage is down: nothing is acknowledged then).

    Its inbound row when it waits to be posted; None for a duplicate that was already handled.
    Every write appends or upserts a row of this message's own, so none can conflict with another
    message's."""
    now = ctx.clock.now()
    # The inbound row first: an outbox entry must never exist without a row the poller will find.
    mark = ctx.store.due_polls.mark_inbound(key, message.message_id, now=now)
    activity = build_inbound_activity(message, channel=key.channel,
                                      omnichannel=ctx.settings.relay.omnichannel.get(key.channel))
    result = ctx.store.outbox.add_message(key, message.message_id, activity, reply_context=message.reply_context,
                                          now=now)
    if result.is_new or result.state == InboundState.PENDING:
        return mark
    log.info("webhook %s: message already %s, not relayed again", key.channel, result.state)
    ctx.store.due_polls.clear_inbound([mark])  # nothing waits: no reason for the poller to come
    return None


def relay_all(ctx: RelayContext, to_work: dict[ConversationKey, list[InboundMark]], *, burst_until: datetime,
              poll: bool) -> None:
    """relay_now for every user of one webhook, side by side, all within the one burst that ends at `burst_until`."""
    if len(to_work) <= 1:
        for key, marks in to_work.items():
            relay_now(ctx, key, marks, burst_until=burst_until, poll=poll)
        return
    with ThreadPoolExecutor(max_workers=min(len(to_work), BURST_WORKERS), thread_name_prefix="burst") as pool:
        for _ in pool.map(lambda item: relay_now(ctx, item[0], item[1], burst_until=burst_until, poll=poll),
                          to_work.items()):
            pass


def relay_now(ctx: RelayContext, key: ConversationKey, marks: list[InboundMark], *, burst_until: datetime,
              poll: bool) -> None:
    """Post what waits and deliver quick replies (`poll`) under the lease, until `burst_until`; the poller
    does it if we cannot (the messages' inbound rows keep the conversation due).

    Failures here are logged, never raised: the messages are stored, and the provider must hear 200."""
    owner = new_owner("webhook")
    try:
        lease = ctx.settings.relay.lease_seconds
        user_id = directline_user_id(key.channel, key.user)
        record = ctx.store.conversations.acquire_lease(key, owner=owner, lease_seconds=lease,
                                                       create_with_user_id=user_id)
        while record is None and ctx.clock.now() + timedelta(seconds=LEASE_WAIT_STEP) < burst_until:
            ctx.clock.sleep(LEASE_WAIT_STEP)  # another worker has this conversation right now
            record = ctx.store.conversations.acquire_lease(key, owner=owner, lease_seconds=lease,
                                                           create_with_user_id=user_id)
        if record is None:
            log.info("a %s conversation is busy; the poller will post its message", key.channel)
            return
        work_conversation(ctx, record, owner=owner, poll=poll, burst_until=burst_until, idle_check=False,
                          inbound=marks)
    except RelayError as error:
        log.warning("could not relay a %s message now (%s: %s); it waits in the outbox", key.channel,
                    type(error).__name__, error)
    except Exception:
        log.exception("could not relay a %s message now; it waits in the outbox", key.channel)
