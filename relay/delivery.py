"""Outbound: the bot's activities of one leased conversation delivered to the provider, part by part.

Only the bot's final messages reach the user (`relay.activities.is_interim`: never typing or a
streamed answer's steps).

Each activity is delivered once: its id is saved among the delivered ones right after the provider
took it (a reply sent part-way is remembered as "<id>#<parts taken>" and resumes at the first part
the provider did not take), and the watermark moves on only once its whole page is handled.

The delivered ids, not the watermark, are what keeps a reply from going out twice: a watermark
Direct Line refuses (400 on GET activities) is dropped and the conversation read again from its
start, once, and every activity already delivered is recognised by its id and skipped. (The record
remembers the last DELIVERED_IDS_LIMIT ids, more bot activities than a conversation usually holds
in Direct Line's 24 hours of retention: only one with more could see its oldest again after such a
restart.)

Each activity is rendered by relay/cards.py; the question a reply asks is saved on the record (as
`pending_question`) in the same write that marks the reply delivered, so it is remembered exactly
when the user has seen it. A prompt the question still owes the user (a card's next input, or a bad
answer asked again) is sent before the bot's new activities, and marked sent the same way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from enum import Enum, auto
from typing import TYPE_CHECKING

from relay import telemetry
from relay.activities import is_interim
from relay.cards import PendingQuestion, next_prompt, render_activity
from relay.channels.base import ChannelAdapter, OutboundMessage
from relay.errors import (
    BadRequest,
    ConcurrencyConflict,
    ConversationNotFound,
    ProviderRejected,
    ProviderUnavailable,
    StoreError,
)
from relay.events import event_payload, transcript_of
from relay.store.conversations import ConversationRecord, ConversationState
from relay.store.dead_letters import DeadLetterKind

if TYPE_CHECKING:
    from relay.conversations import ConversationWorker, Peek
    from relay.directline import ActivitySet

__all__ = ["MIN_POLL_GAP", "ReplyDelivery"]

log = logging.getLogger(__name__)

MIN_POLL_GAP = timedelta(seconds=1)  # never poll one conversation more than once a second
MAX_PAGES = 20
"""Pages read in one delivery run; the rest comes next time."""
TRANSCRIPT_PAGES = 10
"""Pages of the activity set read for an event's transcript, at most."""


PARTS_MARK = "#"
"""A reply sent part-way is remembered among the delivered ids as "<activity id>#<parts the provider took>"."""


def _marked_parts(marker: str, activity_id: str) -> int | None:
    prefix = activity_id + PARTS_MARK
    count = marker[len(prefix):]
    return int(count) if marker.startswith(prefix) and count.isdigit() else None


def _parts_done(record: ConversationRecord, activity_id: str) -> int:
    """How many parts of the activity's reply the provider already accepted (0 unless it failed part-way)."""
    counts = [n for n in (_marked_parts(m, activity_id) for m in record.delivered_ids) if n is not None]
    return max(counts, default=0)


def _with_parts_done(record: ConversationRecord, activity_id: str, parts: int) -> ConversationRecord:
    """`record` remembering that `parts` of the activity's reply were accepted; 0 forgets it."""
    kept = replace(record, delivered_ids=tuple(m for m in record.delivered_ids
                                               if _marked_parts(m, activity_id) is None))
    return kept.with_delivered(f"{activity_id}{PARTS_MARK}{parts}") if parts else kept


class _Reach(Enum):
    """How far a delivery run got."""

    END = auto()  # every activity the conversation held was handled
    PART = auto()  # pages may be left for the next run (the page bound, or the pace between polls)
    WAIT = auto()  # the provider asked to wait: the watermark stays where it was


class ReplyDelivery:
    """Delivers the bot's activities of the worker's conversation from its stored watermark.

    `peek`: the page the poller already read (used instead of asking again); `patient`: wait out
    MIN_POLL_GAP for the next page (a webhook's burst), else leave it to the next tick."""

    def __init__(self, worker: ConversationWorker, *, peek: Peek | None = None, patient: bool = False):
        self.worker = worker
        self.ctx = worker.ctx
        self.peek = peek
        self.patient = patient
        self._last_poll: tuple[str, float] | None = None  # (conversation id, the clock's monotonic())

    def deliver(self) -> bool:
        """Page the bot's activities from the stored watermark and deliver each one not yet delivered.

        False when the provider asked us to wait (the watermark then stays where it was)."""
        return self._deliver(patient=self.patient) is not _Reach.WAIT

    def deliver_rest(self) -> bool:
        """Deliver everything the bot still has in the conversation, waiting out MIN_POLL_GAP between pages:
        True once it was read to its end (so it may be left), False when pages are left or the provider
        asked us to wait."""
        return self._deliver(patient=True) is _Reach.END

    def _deliver(self, *, patient: bool) -> _Reach:
        if not self._ask_pending():
            return _Reach.WAIT
        if not self.worker.record.conversation_id or not self.worker.record.active:
            return _Reach.END
        for _ in range(MAX_PAGES):
            conversation_id, watermark = self.worker.record.conversation_id, self.worker.record.watermark
            peek, self.peek = self.peek, None
            try:
                if peek and (peek.conversation_id, peek.watermark) == (conversation_id, watermark):
                    page, self._last_poll = peek.page, (conversation_id, peek.at)  # the poller's page: not asked twice
                elif not patient and self._pace_gap() > 0:
                    return _Reach.PART  # the timer pages on at its next tick (scheduled a second on): no worker sleeps
                else:
                    self._pace()
                    page = self._read(watermark)
            except ConversationNotFound:
                log.info("Direct Line forgot conversation %s; the next user message starts a new one", conversation_id)
                self.worker.save(lambda r: replace(r.without_token(), conversation_id="", watermark=None))
                return _Reach.END
            except BadRequest as error:
                if watermark is None:
                    raise
                # Not the same refused request forever: read from the start; the delivered ids skip what was sent.
                log.warning("Direct Line refused the watermark of conversation %s (%s); reading it from the start",
                            conversation_id, error.upstream_code)
                self._save_watermark(None)
                continue
            for activity in page.activities:
                if not self._deliver_one(activity):
                    return _Reach.WAIT  # the provider cannot take it now: keep the watermark, retry later
            if page.watermark != watermark:
                self._save_watermark(page.watermark)
            if not page.activities or page.watermark == watermark or not self.worker.record.active:
                return _Reach.END
        return _Reach.PART

    def _read(self, watermark: str | None) -> ActivitySet:
        """The page of activities after `watermark`, read with the conversation's token."""
        return self.worker.call(lambda token: self.ctx.directline.get_activities(
            self.worker.record.conversation_id, watermark=watermark, token=token))

    def _save_watermark(self, watermark: str | None) -> None:
        """Move the stored watermark on, once its whole page is handled."""
        self.worker.save(lambda r: replace(r, watermark=watermark))

    def _deliver_one(self, activity: dict) -> bool:
        """Deliver one activity if it is the bot's and new; False when the provider asks us to wait."""
        activity_id = activity.get("id") or ""
        sender = activity.get("from") or {}
        if sender.get("id") == self.worker.record.user_id or not self.ctx.directline.is_from_bot(activity):
            return True
        if activity_id and self.worker.record.is_delivered(activity_id):
            return True  # a replay or a watermark reset: never sent twice
        now = self.ctx.clock.now()
        if activity.get("type") == "endOfConversation":
            log.info("the bot ended conversation %s", self.worker.record.conversation_id)
            self.worker.save(lambda r: replace(r.with_delivered(activity_id), state=ConversationState.ENDED,
                                               last_bot_activity_at=now))
            self.worker.result.ended = True
            return True
        if activity.get("type") == "event":
            return self._forward_event(activity)
        if is_interim(activity):
            return True  # typing and a streamed answer's steps: the final message carries the text
        rendering = render_activity(activity)
        if rendering is None:
            return True  # typing, events and empty messages have nothing for the channel
        message = replace(rendering.message, idempotency_key=activity_id)
        with telemetry.span("relay.deliver", channel=self.worker.key.channel, conversation=self.worker.tag):
            sent = self._send(message, activity_id, payload={"activity": activity})
        if sent is None:
            return False
        if sent:
            self._record_latency(activity)
        # The question it asked is remembered (a new one replaces the last) once it reached the user.
        asked = rendering.question.to_json() if sent and rendering.question else None
        self._save_delivered(lambda r: replace(_with_parts_done(r, activity_id, 0).with_delivered(activity_id),
                                               last_bot_activity_at=now,
                                               pending_question=asked or r.pending_question))
        return True

    def _send(self, message: OutboundMessage, activity_id: str, *, payload: dict) -> bool | None:
        """Send one message to the user: True once the provider took it, False when it refused it for good (a
        dead letter with `payload`), None when it cannot take it now (the worker comes back later)."""
        self.worker.hold_lease()
        first_part = _parts_done(self.worker.record, activity_id)
        adapter = self.ctx.adapter(self.worker.key.channel)
        reply_context = self.spend_reply_context(adapter)
        started = self.ctx.clock.monotonic()
        try:
            adapter.send(reply_context, message, first_part=first_part)
        except ProviderRejected as error:
            where = f" (part {error.parts_sent + 1} of {error.parts_total})" if error.parts_total > 1 else ""
            self.ctx.store.dead_letters.add_letter(self.worker.key, kind=DeadLetterKind.REPLY,
                                                   reason=f"{error.reason}: {error}{where}", payload=payload,
                                                   parts_sent=error.parts_sent)
            telemetry.count(telemetry.REPLIES_DELIVERED, channel=self.worker.key.channel, outcome="dead_letter")
            self.worker.result.dead_letters += 1
            return False
        except ProviderUnavailable as error:
            log.info("the %s provider cannot take a reply now (%s, %d of %d parts sent); retrying later",
                     self.worker.key.channel, error.reason, error.parts_sent, error.parts_total)
            if activity_id and error.parts_sent > first_part:
                # The parts the provider took stay sent: the retry resumes at the first one it did not.
                parts_sent = error.parts_sent
                self._save_delivered(lambda r: _with_parts_done(r, activity_id, parts_sent))
            telemetry.count(telemetry.REPLIES_DELIVERED, channel=self.worker.key.channel, outcome="retry")
            self.worker.wait(error.retry_after)
            return None
        telemetry.count(telemetry.REPLIES_DELIVERED, channel=self.worker.key.channel, outcome="delivered")
        self.worker.result.delivered += 1
        log.info("delivered %s to %s in %.0f ms", activity_id, self.worker.key.channel,
                 (self.ctx.clock.monotonic() - started) * 1000)
        return True

    def _record_latency(self, activity: dict) -> None:
        """The reply's latency: from the bot activity's timestamp (Direct Line's, when the bot sent it) to now,
        the provider having just taken it (0 when Direct Line's clock is ahead of ours). Nothing for an activity
        without a readable timestamp."""
        try:
            sent_at = datetime.fromisoformat(str(activity.get("timestamp") or ""))
        except ValueError:
            return
        if sent_at.tzinfo is not None:
            telemetry.record(telemetry.REPLY_LATENCY, max(0.0, (self.ctx.clock.now() - sent_at).total_seconds()),
                             channel=self.worker.key.channel)

    def spend_reply_context(self, adapter: ChannelAdapter) -> Mapping[str, str]:
        """The record's reply context for one send (the relay's, or an operator's replay). What a send may use only
        once (LINE's reply token, Telegram's tap to answer) is stored as used before the send, so neither a retry
        nor a later reply can use it again: at worst a send that failed after using it falls back on what the
        context still allows (LINE's push)."""
        context = self.worker.record.reply_context
        spent = dict(adapter.spend(context))
        if spent != dict(context):
            self._save_delivered(lambda r: replace(r, reply_context=spent) if r.reply_context == context else r)
        return context

    def _ask_pending(self) -> bool:
        """Send the pending question's next prompt when one is due (the user answered a card's earlier input, or
        gave a bad answer); False when the provider asks us to wait."""
        question = PendingQuestion.from_json(self.worker.record.pending_question)
        if question is None or not question.prompt_due:
            return True
        prompt = next_prompt(question)
        key = prompt.idempotency_key
        sent = self._send(prompt, key, payload={"question": question.to_json()})
        if sent is None:
            return False

        def asked(record: ConversationRecord) -> ConversationRecord:
            stored = PendingQuestion.from_json(record.pending_question)
            if stored is None or (stored.id, stored.step, stored.retries) != (question.id, question.step,
                                                                                question.retries):
                return _with_parts_done(record, key, 0)
            return replace(_with_parts_done(record, key, 0),
                           pending_question=replace(stored, prompt_due=False).to_json())

        self._save_delivered(asked)
        return True

    def _forward_event(self, activity: dict) -> bool:
        """Send a bot's event to RELAY_EVENT_WEBHOOK_URL with the recent transcript (with none configured, log its
        name), then record it as delivered; False when the endpoint cannot take it now (tried again later)."""
        activity_id, name = activity.get("id") or "", str(activity.get("name") or "")[:100]
        record, events = self.worker.record, self.ctx.events
        if not events.configured:
            log.info("the bot sent event %r in %s conversation %s; RELAY_EVENT_WEBHOOK_URL is not set: not forwarded",
                     name, self.worker.key.channel, record.conversation_id)
        else:
            payload = event_payload(activity, conversation_id=record.conversation_id, channel=self.worker.key.channel,
                                    user=self.worker.key.user, directline_user=record.user_id,
                                    transcript=self.transcript(activity_id), now=self.ctx.clock.now().isoformat())
            self.worker.hold_lease()  # after the transcript's reads: right before what cannot be taken back
            try:
                events.send(payload, activity_id=activity_id)
            except ProviderRejected as error:
                self.ctx.store.dead_letters.add_letter(self.worker.key, kind=DeadLetterKind.EVENT, payload={
                    "activity": activity}, reason=f"{error.reason}: {error}")
                self.worker.result.dead_letters += 1
            except ProviderUnavailable as error:
                log.info("the event webhook cannot take event %r of a %s conversation now (%s); retrying later",
                         name, self.worker.key.channel, error)
                self.worker.wait(error.retry_after)
                return False
            else:
                log.info("forwarded event %r of %s conversation %s to the event webhook", name,
                         self.worker.key.channel, record.conversation_id)
        if activity_id:
            self._save_delivered(lambda r: r.with_delivered(activity_id))
        return True

    def transcript(self, until: str) -> list[dict]:
        """The conversation's last messages before activity `until`, read from Direct Line's activity set."""
        limit = self.ctx.events.transcript_messages
        if not limit:
            return []
        conversation_id, user_id = self.worker.record.conversation_id, self.worker.record.user_id
        activities: list[dict] = []
        watermark: str | None = None
        for _ in range(TRANSCRIPT_PAGES):
            page = self.worker.call(functools.partial(self._page_after, conversation_id, watermark))
            activities.extend(page.activities)
            if not page.activities or page.watermark in (None, watermark) or \
                    any(a.get("id") == until for a in page.activities):
                break
            watermark = page.watermark

        def is_bot(activity: dict) -> bool:
            return (activity.get("from") or {}).get("id") != user_id and self.ctx.directline.is_from_bot(activity)

        return transcript_of(activities, until=until, limit=limit, is_bot=is_bot)

    def _page_after(self, conversation_id: str, watermark: str | None, token: str | None) -> ActivitySet:
        return self.ctx.directline.get_activities(conversation_id, watermark=watermark, token=token)

    def _save_delivered(self, change: Callable[[ConversationRecord], ConversationRecord]) -> None:
        """Record that the provider took a reply, riding out a storage blip of up to 10 s (within the lease).

        Giving up here means the next worker finds the reply undelivered and sends it again (no
        provider takes an idempotency key), so this one write is worth waiting for; we still hold
        the lease meanwhile, so nobody else sends it."""
        deadline = self.ctx.clock.monotonic() + min(10.0, self.ctx.settings.relay.lease_seconds / 2)
        while True:
            try:
                self.worker.save(change)
                return
            except ConcurrencyConflict:
                raise  # not a storage outage: the lease or the record moved on
            except StoreError as error:
                if self.ctx.clock.monotonic() >= deadline:
                    raise
                log.warning("could not record a %s delivery yet (%s); trying again", self.worker.key.channel,
                            error)
                self.ctx.clock.sleep(1.0)

    def _pace_gap(self) -> float:
        """Seconds to wait before the record's conversation may be polled again (0 when it may be now)."""
        if self._last_poll is None or self._last_poll[0] != self.worker.record.conversation_id:
            return 0.0
        return MIN_POLL_GAP.total_seconds() - (self.ctx.clock.monotonic() - self._last_poll[1])

    def _pace(self) -> None:
        """Keep at least MIN_POLL_GAP between two polls of one conversation (Direct Line asks for it)."""
        gap = self._pace_gap()
        if gap > 0:
            self.ctx.clock.sleep(gap)
        self._last_poll = (self.worker.record.conversation_id, self.ctx.clock.monotonic())
