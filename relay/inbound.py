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

import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TypeVar

from relay import telemetry
from relay.activities import build_inbound_activity, directline_user_id
from relay.channels import ADAPTERS
from relay.channels.base import ChannelAdapter, InboundMessage, WebhookAnswer, WebhookRequest
from relay.conversations import RelayContext, new_owner, work_conversation
from relay.errors import BadPayload, MethodNotAllowed, RelayError, StoreError
from relay.fanout import Chase
from relay.http import error_answer
from relay.store.conversations import ConversationKey, partition_of
from relay.store.due_polls import InboundMark
from relay.store.outbox import InboundState

__all__ = ["accept_all", "accept_message", "handle_webhook", "leave_chases", "parse_messages", "relay_all",
           "relay_now"]

log = logging.getLogger(__name__)

LEASE_WAIT_STEP = 0.2
BURST_WORKERS = 8
"""Users of one webhook stored and worked side by side (a WhatsApp or Bird webhook may carry several)."""
RELAY_START_SECONDS = 2.0
"""After this long (or the burst, if longer) a webhook starts relaying no further user: the poller does."""
T = TypeVar("T")


def handle_webhook(ctx: RelayContext, channel: str, request: WebhookRequest) -> WebhookAnswer:
    """Verify, store and relay a provider's webhook; the answer the provider gets back (counted in telemetry:
    accepted, duplicate, handshake; refused for a 4xx, failed for a 5xx)."""
    channel_name = channel if channel in ADAPTERS else "other"  # the route is anyone's to call: no free text
    with telemetry.span("relay.webhook", channel=channel_name) as span:
        try:
            answer, outcome = _handle_webhook(ctx, channel, request)
        except Exception as error:
            status = error_answer(error)[0] if isinstance(error, RelayError) else 500
            _answered(span, channel_name, "refused" if status < 500 else "failed", status)
            raise
        _answered(span, channel_name, outcome, answer.status)
        return answer


def _answered(span: telemetry.Span, channel: str, outcome: str, status: int) -> None:
    span.set(outcome=outcome, status=status)
    telemetry.count(telemetry.WEBHOOKS, channel=channel, outcome=outcome, status=str(status))


def _handle_webhook(ctx: RelayContext, channel: str, request: WebhookRequest) -> tuple[WebhookAnswer, str]:
    adapter = ctx.adapter(channel)
    handshake = adapter.handshake(request)
    if handshake is not None:
        return handshake, "handshake"
    if request.method != "POST":
        raise MethodNotAllowed(f"{request.method} is not accepted here: providers POST their webhooks")
    adapter.verify(request)
    messages = parse_messages(adapter, channel, request)
    started = ctx.clock.monotonic()
    to_work = accept_all(ctx, channel, messages)
    stored = ctx.clock.monotonic()
    burst = ctx.settings.relay.burst_poll_seconds
    accepted_at = ctx.clock.now()
    relay_all(ctx, to_work, burst_until=accepted_at + timedelta(seconds=burst), poll=burst > 0)
    if to_work and ctx.settings.relay.chase_seconds > burst:
        leave_chases(ctx, list(to_work), until=accepted_at + timedelta(seconds=ctx.settings.relay.chase_seconds))
    log.info("webhook %s: %d message(s) of %d user(s) new, stored in %.0f ms, relayed in %.0f ms", channel,
             len(messages), len(to_work), (stored - started) * 1000, (ctx.clock.monotonic() - stored) * 1000)
    return adapter.acknowledgement(), "duplicate" if messages and not to_work else "accepted"


def leave_chases(ctx: RelayContext, keys: list[ConversationKey], *, until: datetime) -> None:
    """A chase per user on the chase queue (relay/fanout.py): the bot's later replies are looked for every second
    until `until`. Best effort: a queue that cannot take them is logged (the timer polls them anyway), never
    the provider's problem."""
    polled_at = ctx.clock.now()
    try:
        ctx.chase_queue.send_chases([Chase(partition_of(ctx.store.tables, key), until, polled_at) for key in keys])
    except StoreError as error:
        log.warning("could not leave chases for %d user(s): %s; the timer polls them", len(keys), error)


def parse_messages(adapter: ChannelAdapter, channel: str, request: WebhookRequest) -> list[InboundMessage]:
    """The adapter's messages; a payload of the wrong shape is the sender's mistake (400), never a crash.

    Signed payloads are trusted to be the provider's, not to be well formed: a list where an object
    belongs, a number for an id. Adapters check what they rely on, InboundMessage refuses values of the
    wrong kind (a string id, sender and text); this catches what slips through."""
    try:
        return adapter.parse(request)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as error:
        log.warning("webhook %s: the payload has an unexpected shape (%s)", channel, type(error).__name__)
        raise BadPayload(f"the {channel} payload does not have the expected shape") from None


def accept_message(ctx: RelayContext, key: ConversationKey, message: InboundMessage, *,
                   now: datetime | None = None) -> InboundMark | None:
    """Store one message as received at `now` (the clock's by default; the outbox is in this order), or
    StoreError when storage is down: nothing is acknowledged then.

    Its inbound row when it waits to be posted; None for a duplicate that was already handled.
    Every write appends or upserts a row of this message's own, so none can conflict with another
    message's."""
    now = now or ctx.clock.now()
    # The inbound row first: an outbox entry must never exist without a row the poller will find.
    mark = ctx.store.due_polls.mark_inbound(key, message.message_id, now=now)
    user_id = directline_user_id(key.channel, key.user, key_for=ctx.store.tables.key_for)
    activity = build_inbound_activity(message, channel=key.channel, user_id=user_id,
                                      omnichannel=ctx.settings.relay.omnichannel.get(key.channel))
    result = ctx.store.outbox.add_message(key, message.message_id, activity, reply_context=message.reply_context,
                                          now=now)
    if result.is_new or result.state == InboundState.PENDING:
        return mark
    # Its row stays: the retry may come because the first delivery died before the bot's reply was sent
    # and the conversation scheduled; a worker clears it after scheduling (posting.OutboxPoster.clear_inbound).
    log.info("webhook %s: message already %s, not relayed again", key.channel, result.state)
    return None


def accept_all(ctx: RelayContext, channel: str,
               messages: list[InboundMessage]) -> dict[ConversationKey, list[InboundMark]]:
    """Store every message of one webhook (StoreError if any could not be: the provider retries them all,
    and the stored ones are then duplicates). Users side by side, each user's messages in their order;
    the inbound marks of the new ones by user."""
    by_user: dict[ConversationKey, list[InboundMessage]] = {}
    for message in messages:
        by_user.setdefault(ConversationKey(channel, message.user_id), []).append(message)

    def accept_in_order(key: ConversationKey) -> list[InboundMark]:
        marks, previous = [], None
        for message in by_user[key]:
            # A millisecond apart at least: the outbox orders by the time of receipt, in milliseconds.
            now = ctx.clock.now()
            if previous is not None:
                now = max(now, previous + timedelta(milliseconds=1))
            mark = accept_message(ctx, key, message, now=now)
            if mark is not None:
                marks.append(mark)
            previous = now
        return marks

    marks = _side_by_side(accept_in_order, list(by_user))
    return {key: user_marks for key, user_marks in zip(by_user, marks, strict=True) if user_marks}


def relay_all(ctx: RelayContext, to_work: dict[ConversationKey, list[InboundMark]], *, burst_until: datetime,
              poll: bool) -> None:
    """relay_now for every user of one webhook, side by side, within the one burst that ends at `burst_until`.

    A user whose turn comes after RELAY_START_SECONDS (or the burst, if longer) is left to the poller (its
    inbound rows keep it due): however many users a webhook carries, its answer does not wait for them all."""
    start_by = max(burst_until, ctx.clock.now() + timedelta(seconds=RELAY_START_SECONDS))

    def relay(key: ConversationKey) -> None:
        if ctx.clock.now() < start_by:
            relay_now(ctx, key, to_work[key], burst_until=burst_until, poll=poll)

    _side_by_side(relay, list(to_work))


def _side_by_side(work: Callable[[ConversationKey], T], keys: list[ConversationKey]) -> list[T]:
    """`work` for each key, BURST_WORKERS at a time (in this thread for a single key); results in key order.
    The first exception is raised, after the work already started has finished."""
    if len(keys) <= 1:
        return [work(key) for key in keys]
    with ThreadPoolExecutor(max_workers=min(len(keys), BURST_WORKERS), thread_name_prefix="burst") as pool:
        return list(pool.map(telemetry.carry_context(work), keys))


def relay_now(ctx: RelayContext, key: ConversationKey, marks: list[InboundMark], *, burst_until: datetime,
              poll: bool) -> None:
    """Post what waits and deliver quick replies (`poll`) under the lease, until `burst_until`; the poller
    does it if we cannot (the messages' inbound rows keep the conversation due).

    Failures here are logged, never raised: the messages are stored, and the provider must hear 200."""
    owner = new_owner("webhook")
    try:
        user_id = directline_user_id(key.channel, key.user, key_for=ctx.store.tables.key_for)
        take_lease = functools.partial(ctx.store.conversations.acquire_lease, key, owner=owner,
                                       lease_seconds=ctx.settings.relay.lease_seconds, create_with_user_id=user_id,
                                       token_lookahead=ctx.token_lookahead)
        record = take_lease()
        while record is None and ctx.clock.now() + timedelta(seconds=LEASE_WAIT_STEP) < burst_until:
            ctx.clock.sleep(LEASE_WAIT_STEP)  # another worker has this conversation right now
            record = take_lease()
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
