"""Working one conversation: the shared core of the webhook (burst) and the timer (poller).

Everything here runs under the conversation's lease, so exactly one worker talks to Direct Line and
the provider for a conversation at a time. Progress is saved as it is made (each delivered
activity id right after the provider accepted it, the watermark once its whole page is handled),
so an instance that dies between any two lines loses nothing and repeats at most the one
provider call that was in flight.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from relay.activities import render_outbound, take_pending_media, with_unavailable_media
from relay.channels import get_adapter
from relay.channels.base import ChannelAdapter, Media
from relay.directline import ActivitySet, DirectLineClient, UploadFile, get_directline_client
from relay.errors import (
    AuthenticationFailed,
    BadRequest,
    ConcurrencyConflict,
    ConversationNotFound,
    DirectLineError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    StoreError,
    Throttled,
    TokenExpired,
)
from relay.settings import Settings, get_settings
from relay.store import RelayStore, get_store
from relay.store.conversations import ACTIVE, ENDED, ConversationKey, ConversationRecord
from relay.store.outbox import OutboxMessage
from relay.store.tables import utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_POLL_GAP = timedelta(seconds=1)  # never poll one conversation more than once a second
REPLY_LIKELY_FOR = timedelta(minutes=2)  # after a user or bot message, poll at every tick this long
FIRST_IDLE_INTERVAL = 5.0
TOKEN_RENEW_MARGIN = timedelta(seconds=60)
TOKEN_REFRESH_REMAINING = timedelta(minutes=15)  # refresh at about half of the usual 30-minute lifetime
UPLOAD_LIMIT_BYTES = 4_000_000
"""All of one message's fetched media together: under Direct Line's upload limit (4 MiB in the emulator; the
service publishes none), leaving room for the activity part."""
MEDIA_ATTEMPTS = 8
"""Attempts of a message (about 10 minutes with the outbox's backoff) before a media file the provider
cannot give is left out, so the text reaches the bot and the user's later messages are not held up."""


def next_idle_poll(now: datetime, *, last_activity: datetime | None, interval: float,
                   ceiling: float) -> tuple[float, datetime]:
    """(interval, next poll) with nothing new: every tick while a reply is likely, then backing off to `ceiling`."""
    if last_activity and now - last_activity < REPLY_LIKELY_FOR:
        return 0.0, now + MIN_POLL_GAP
    interval = min(ceiling, max(FIRST_IDLE_INTERVAL, interval * 2))
    return interval, now + timedelta(seconds=interval)


PARTS_MARK = "#"
"""A reply sent part-way is remembered among the delivered ids as "<activity id>#<parts the provider took>"."""


def _marked_parts(marker: str, activity_id: str) -> int | None:
    prefix = activity_id + PARTS_MARK
    count = marker[len(prefix):]
    return int(count) if marker.startswith(prefix) and count.isdigit() else None


def parts_done(record: ConversationRecord, activity_id: str) -> int:
    """How many parts of the activity's reply the provider already accepted (0 unless it failed part-way)."""
    counts = [n for n in (_marked_parts(m, activity_id) for m in record.delivered_ids) if n is not None]
    return max(counts, default=0)


def with_parts_done(record: ConversationRecord, activity_id: str, parts: int) -> ConversationRecord:
    """`record` remembering that `parts` of the activity's reply were accepted; 0 forgets it."""
    kept = replace(record, delivered_ids=tuple(m for m in record.delivered_ids
                                               if _marked_parts(m, activity_id) is None))
    return kept.with_delivered(f"{activity_id}{PARTS_MARK}{parts}") if parts else kept


@dataclass(frozen=True)
class Peek:
    """A page the poller read without the lease, from the due index's copy of the watermark."""

    conversation_id: str
    watermark: str | None
    page: ActivitySet
    at: float  # time.monotonic() of the request


@dataclass
class RelayContext:
    """What a function invocation needs: settings, storage, Direct Line and the channel adapters."""

    settings: Settings
    store: RelayStore
    directline: DirectLineClient
    adapter: Callable[[str], ChannelAdapter]
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep


@functools.lru_cache(maxsize=1)
def get_context() -> RelayContext:
    """The process's context: one store, one Direct Line pool and one provider pool for every invocation."""
    settings = get_settings()
    return RelayContext(settings=settings, store=get_store(), directline=get_directline_client(),
                        adapter=functools.cache(lambda name: get_adapter(name, settings)))


def new_owner(kind: str) -> str:
    return f"{kind}:{uuid.uuid4().hex[:16]}"


@dataclass
class WorkResult:
    posted: int = 0
    delivered: int = 0
    dead_letters: int = 0
    ended: bool = False
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class ConversationWorker:
    """One leased conversation for one invocation: start it, post its outbox, deliver the bot's replies."""

    def __init__(self, ctx: RelayContext, record: ConversationRecord, *, owner: str, peek: Peek | None = None):
        self.ctx = ctx
        self.record = record
        self.claimed = record
        self.owner = owner
        self.started_at = ctx.clock()
        self.result = WorkResult()
        self.settled = False  # the outbox was drained and the bot's activities delivered, with no error
        self._retry_at: datetime | None = None
        self._last_poll: float | None = None
        self._peek = peek
        self.patient = True  # wait out MIN_POLL_GAP for the next page (a burst); else leave it to the next tick

    @property
    def key(self) -> ConversationKey:
        return self.record.key

    # ------------------------------------------------------------------------------------ storage
    def _save(self, change: Callable[[ConversationRecord], ConversationRecord]) -> None:
        """Apply `change` to the freshest record under our lease (re-applied after an ETag conflict).

        Every save also renews the lease: a slow but live worker keeps its conversation, so only a
        dead one's conversation is taken over (two workers would deliver the same reply twice)."""
        lease = timedelta(seconds=self.ctx.settings.relay.lease_seconds)

        def apply(stored: ConversationRecord | None) -> ConversationRecord | None:
            if stored is None:
                return None
            wanted = change(stored)
            if wanted is stored or wanted.lease_owner != self.owner:
                return wanted
            return replace(wanted, lease_expires_at=self.ctx.clock() + lease)

        self.record = self.ctx.store.conversations.update_record(self.key, apply, current=self.record,
                                                                 lease_owner=self.owner) or self.record

    # --------------------------------------------------------------------------------- Direct Line
    def _start_directline(self) -> None:
        """A new Direct Line conversation for this user (the first, or after one was forgotten or ended)."""
        started = self.ctx.directline.start_conversation(user_id=self.record.user_id)
        now = self.ctx.clock()
        expires = now + timedelta(seconds=started.expires_in or 1800)
        log.info("started Direct Line conversation %s for a %s user", started.conversation_id, self.key.channel)
        self._save(lambda r: replace(r, conversation_id=started.conversation_id, token=started.token,
                                     token_expires_at=expires, watermark=None, state=ACTIVE))

    def _reconnect(self) -> None:
        """Recover an expired token with the secret; the stored watermark stays as it is."""
        renewed = self.ctx.directline.reconnect(self.record.conversation_id)
        expires = self.ctx.clock() + timedelta(seconds=renewed.expires_in or 1800)
        self._save(lambda r: replace(r, token=renewed.token, token_expires_at=expires))

    def _token(self) -> str | None:
        """A usable token: refreshed at about half its lifetime (with jitter), renewed when it has lapsed."""
        record, now = self.record, self.ctx.clock()
        if not record.token or record.token_expires_at is None:
            return None  # the secret is used instead
        remaining = record.token_expires_at - now
        if remaining <= TOKEN_RENEW_MARGIN:
            self._reconnect()
        elif remaining <= TOKEN_REFRESH_REMAINING * random.uniform(0.9, 1.1):
            try:
                refreshed = self.ctx.directline.refresh_token(token=record.token)
            except TokenExpired:
                self._reconnect()
            else:
                expires = now + timedelta(seconds=refreshed.expires_in or 1800)
                self._save(lambda r: replace(r, token=refreshed.token, token_expires_at=expires))
        return self.record.token

    def _call(self, operation: Callable[[str | None], T]) -> T:
        """Run a Direct Line call with the conversation's token; an expired or refused token is renewed once.

        A token Direct Line no longer accepts (403 other than expiry: the service restarted, the
        secret was rotated) is replaced through reconnect with the secret, as an expired one is."""
        token = self._token()
        try:
            return operation(token)
        except (TokenExpired, AuthenticationFailed) as error:
            if isinstance(error, AuthenticationFailed) and not token:
                raise  # the secret itself was refused: nothing to renew
            self._reconnect()
            return operation(self.record.token)

    # -------------------------------------------------------------------------------------- inbound
    def drain_outbox(self) -> bool:
        """Post the waiting user messages in order; False when one must wait (Direct Line unavailable)."""
        for message in self.ctx.store.outbox.list_messages(self.key):
            if not self.record.conversation_id:
                self._start_directline()
            client_id = (message.activity.get("channelData") or {}).get("clientActivityID", "")
            if message.in_doubt:
                # An earlier post may have arrived although it failed: look before posting again.
                found = self._call(lambda token, cid=client_id: self.ctx.directline.find_activity_by_client_id(
                    self.record.conversation_id, cid, token=token))
                if found is not None:
                    self.ctx.store.outbox.complete_message(message, activity_id=found.get("id", ""))
                    self.result.posted += 1
                    continue
            try:
                message = self.ctx.store.outbox.mark_post_attempt(message)
            except ConcurrencyConflict:
                return False  # someone else is posting it; they keep the order
            try:
                activity, files, missing = self._with_media(message)
            except ProviderUnavailable as error:
                # Nothing was posted: the download is tried again later, as a post is after a Direct Line outage.
                self.ctx.store.outbox.release_message(message, error=f"media {error.status} {error.code}",
                                                      in_doubt=False)
                self._wait(error.retry_after, attempts=message.attempts)
                log.info("a %s message waits in the outbox for its media (%s %s, attempt %d)", self.key.channel,
                         error.status, error.code, message.attempts)
                return False
            try:
                activity_id = self._post(activity, files)
            except BadRequest as error:
                self.ctx.store.outbox.dead_letter_message(message, reason=f"Direct Line refused the message: {error}")
                self.result.dead_letters += 1
                continue
            except DirectLineError as error:
                self.ctx.store.outbox.release_message(message, error=f"{error.status} {error.code}",
                                                      in_doubt=error.ambiguous)
                self._wait(getattr(error, "retry_after", None), attempts=message.attempts)
                log.info("a %s message waits in the outbox (%s %s, attempt %d)", self.key.channel, error.status,
                         error.code, message.attempts)
                return False
            self.ctx.store.outbox.complete_message(message, activity_id=activity_id)
            self.result.posted += 1
            if missing:
                self._dead_letter_media(message, missing)
        return True

    def _with_media(self, message: OutboxMessage) -> tuple[dict, list[UploadFile], list[tuple[Media, ProviderError]]]:
        """The activity to post, the user's protected media fetched to upload with it, and those that could not be.

        A file the provider refuses for good (gone, too large) is left out and named in channelData, so
        the text still reaches the bot; one it cannot give now (ProviderUnavailable) holds the message
        back to be tried again, for MEDIA_ATTEMPTS attempts."""
        activity, pending = take_pending_media(message.activity)
        files: list[UploadFile] = []
        missing: list[tuple[Media, ProviderError]] = []
        room = UPLOAD_LIMIT_BYTES
        for media in pending:
            try:
                fetched = self.ctx.adapter(self.key.channel).fetch_media(media, max_bytes=room)
            except ProviderRejected as error:
                missing.append((media, error))
                continue
            except ProviderUnavailable as error:
                if message.attempts < MEDIA_ATTEMPTS:
                    raise
                missing.append((media, error))
                continue
            room -= len(fetched.content)
            files.append(UploadFile(fetched.name, fetched.content, fetched.content_type))
        if missing:
            activity = with_unavailable_media(activity, [(media, error.code) for media, error in missing])
        return activity, files, missing

    def _dead_letter_media(self, message: OutboxMessage, missing: list[tuple[Media, ProviderError]]) -> None:
        """Keep a record of the files the bot did not get; the message itself was posted."""
        reason = "; ".join(f"{error.status} {error.code}: {error}" for _, error in missing)
        try:
            self.ctx.store.dead_letters.add_letter(self.key, kind="media", reason=reason, payload={
                "message_id": message.message_id, "media": [{"url": m.url, "contentType": m.content_type}
                                                            for m, _ in missing]})
        except StoreError as error:
            log.warning("could not record a %s media dead letter (%s)", self.key.channel, error.code)
        self.result.dead_letters += 1

    def _post(self, activity: dict, files: list[UploadFile]) -> str:
        """Post the activity, or upload it with its files as one message: the same clientActivityID either way."""
        def send(token: str | None) -> str:
            if files:
                return self.ctx.directline.upload(self.record.conversation_id, files, user_id=self.record.user_id,
                                                  activity=activity, token=token)
            return self.ctx.directline.post_activity(self.record.conversation_id, activity, token=token)

        try:
            return self._call(send)
        except ConversationNotFound:
            # Direct Line forgot the conversation: this user gets a new one, the message goes there.
            log.info("Direct Line forgot conversation %s; starting a new one", self.record.conversation_id)
            self._start_directline()
            return self._call(send)

    # ------------------------------------------------------------------------------------- outbound
    def deliver(self) -> bool:
        """Page the bot's activities from the stored watermark and deliver each one not yet delivered.

        False when the provider asked us to wait (the watermark then stays where it was)."""
        if not self.record.conversation_id or not self.record.active:
            return True
        for _ in range(20):  # a bounded number of pages per invocation; the rest comes next time
            watermark = self.record.watermark
            peek, self._peek = self._peek, None
            try:
                if peek and (peek.conversation_id, peek.watermark) == (self.record.conversation_id, watermark):
                    page, self._last_poll = peek.page, peek.at  # what the poller just read: not asked twice
                elif not self.patient and self._pace_gap() > 0:
                    break  # the timer pages on at its next tick (scheduled a second on): no worker sleeps
                else:
                    self._pace()
                    page = self._call(lambda token, w=watermark: self.ctx.directline.get_activities(
                        self.record.conversation_id, watermark=w, token=token))
            except ConversationNotFound:
                log.info("Direct Line forgot conversation %s; the next user message starts a new one",
                         self.record.conversation_id)
                self._save(lambda r: replace(r, conversation_id="", token="", token_expires_at=None, watermark=None))
                return True
            for activity in page.activities:
                if not self._deliver_one(activity):
                    return False  # the provider cannot take it now: keep the watermark, retry later
            if page.watermark != watermark:
                self._save(lambda r, w=page.watermark: replace(r, watermark=w))
            if not page.activities or page.watermark == watermark or not self.record.active:
                break
        return True

    def _deliver_one(self, activity: dict) -> bool:
        """Deliver one activity if it is the bot's and new; False when the provider asks us to wait."""
        activity_id = activity.get("id") or ""
        sender = activity.get("from") or {}
        if sender.get("id") == self.record.user_id or not self.ctx.directline.is_from_bot(activity):
            return True
        if activity_id and self.record.is_delivered(activity_id):
            return True  # a replay or a watermark reset: never sent twice
        now = self.ctx.clock()
        if activity.get("type") == "endOfConversation":
            log.info("the bot ended conversation %s", self.record.conversation_id)
            self._save(lambda r: replace(r.with_delivered(activity_id), state=ENDED, last_bot_activity_at=now))
            self.result.ended = True
            return True
        message = render_outbound(activity)
        if message is None:
            return True  # typing, events and empty messages have nothing for the channel
        message = replace(message, idempotency_key=activity_id)
        first_part = parts_done(self.record, activity_id)
        started = time.perf_counter()
        try:
            self.ctx.adapter(self.key.channel).send(self.record.reply_context, message, first_part=first_part)
        except ProviderRejected as error:
            where = f" (part {error.parts_sent + 1} of {error.parts_total})" if error.parts_total > 1 else ""
            self.ctx.store.dead_letters.add_letter(self.key, kind="reply", reason=f"{error.status} {error}{where}",
                                                   payload={"activity": activity})
            self.result.dead_letters += 1
        except ProviderUnavailable as error:
            log.info("the %s provider cannot take a reply now (%s, %d of %d parts sent); retrying later",
                     self.key.channel, error.status, error.parts_sent, error.parts_total)
            if activity_id and error.parts_sent > first_part:
                # The parts the provider took stay sent: the retry resumes at the first one it did not.
                self._save_delivered(lambda r, n=error.parts_sent: with_parts_done(r, activity_id, n))
            self._wait(error.retry_after)
            return False
        else:
            self.result.delivered += 1
            log.info("delivered activity %s to %s in %.0f ms", activity_id, self.key.channel,
                     (time.perf_counter() - started) * 1000)
        self._save_delivered(lambda r: replace(with_parts_done(r, activity_id, 0).with_delivered(activity_id),
                                               last_bot_activity_at=now))
        return True

    def _save_delivered(self, change: Callable[[ConversationRecord], ConversationRecord]) -> None:
        """Record that the provider took a reply, riding out a storage blip of up to 10 s (within the lease).

        Giving up here means the next worker finds the reply undelivered and sends it again (no
        provider takes an idempotency key), so this one write is worth waiting for; we still hold
        the lease meanwhile, so nobody else sends it."""
        deadline = time.monotonic() + min(10.0, self.ctx.settings.relay.lease_seconds / 2)
        while True:
            try:
                self._save(change)
                return
            except ConcurrencyConflict:
                raise  # not a storage outage: the lease or the record moved on
            except StoreError as error:
                if time.monotonic() >= deadline:
                    raise
                log.warning("could not record a %s delivery yet (%s); trying again", self.key.channel, error.code)
                self.ctx.sleep(1.0)

    def _pace_gap(self) -> float:
        if self._last_poll is None:
            return 0.0
        return MIN_POLL_GAP.total_seconds() - (time.monotonic() - self._last_poll)

    def _pace(self) -> None:
        """Keep at least MIN_POLL_GAP between two polls of this conversation (Direct Line asks for it)."""
        gap = self._pace_gap()
        if gap > 0:
            self.ctx.sleep(gap)
        self._last_poll = time.monotonic()

    # ------------------------------------------------------------------------------------- lifecycle
    def end_if_idle(self) -> bool:
        """End a conversation idle past RELAY_IDLE_TIMEOUT_MINUTES: the bot gets endOfConversation."""
        idle_limit = timedelta(minutes=self.ctx.settings.relay.idle_timeout_minutes)
        last = self.record.last_activity_at
        if last is None or self.ctx.clock() - last < idle_limit:
            return False
        if self.record.conversation_id:
            end = {"type": "endOfConversation", "from": {"id": self.record.user_id, "role": "user"},
                   "code": "completedSuccessfully", "text": "The conversation was idle."}
            with contextlib.suppress(ConversationNotFound):
                self._call(lambda token: self.ctx.directline.post_activity(
                    self.record.conversation_id, end, token=token))
        log.info("ended idle %s conversation %s", self.key.channel, self.record.conversation_id)
        self._save(lambda r: replace(r, state=ENDED))
        self.result.ended = True
        return True

    def _wait(self, retry_after: float | None, attempts: int = 1) -> None:
        """Come back after the provider's or Direct Line's Retry-After, else after a growing backoff."""
        delay = retry_after if retry_after else min(300.0, 5.0 * 2 ** max(0, attempts - 1))
        at = self.ctx.clock() + timedelta(seconds=max(1.0, delay))
        self._retry_at = at if self._retry_at is None else max(self._retry_at, at)

    def finish(self) -> None:
        """Schedule the next poll and give the lease back, in one write.

        The conversation is left peekable (polled without the lease until something happens) only when
        this worker settled it and nobody else wrote the record since this worker's last write: a webhook
        writes it before and after queuing a message, so a message can never wait unseen in the outbox."""
        now = self.ctx.clock()
        ceiling = self.ctx.settings.relay.poll_ceiling_seconds
        started_at, retry_at, delivered = self.started_at, self._retry_at, self.result.delivered
        settled, claimed, ours = self.settled, self.claimed, self.record.etag

        def schedule(record: ConversationRecord) -> ConversationRecord:
            if not record.active:
                return replace(record.without_lease(), next_poll_at=None, peekable=False)
            user_wrote_meanwhile = bool(record.last_user_activity_at and record.last_user_activity_at >= started_at)
            recent = max((t for t in (record.last_user_activity_at, record.last_bot_activity_at) if t),
                         default=None)
            peekable = False
            if retry_at is not None and not user_wrote_meanwhile:
                interval, next_poll = record.poll_interval, retry_at
            elif user_wrote_meanwhile or delivered:
                interval, next_poll = 0.0, now + MIN_POLL_GAP
            elif not record.conversation_id and not (recent and now - recent < REPLY_LIKELY_FOR):
                interval, next_poll = 0.0, None  # nothing to poll until the user writes
            else:
                interval, next_poll = next_idle_poll(now, last_activity=recent, interval=record.poll_interval,
                                                     ceiling=ceiling)
            if next_poll is not None and retry_at is None and not user_wrote_meanwhile:
                peekable = (settled and bool(record.conversation_id) and record.etag == ours
                            and record.last_user_activity_at == claimed.last_user_activity_at)
            return replace(record.without_lease(), poll_interval=interval, next_poll_at=next_poll, peekable=peekable)

        try:
            self._save(schedule)
        except ConcurrencyConflict as error:
            log.warning("could not schedule a %s conversation: %s (its lease expires on its own)",
                        self.key.channel, error)


def work_conversation(ctx: RelayContext, record: ConversationRecord, *, owner: str, poll: bool = True,
                      burst_until: datetime | None = None, idle_check: bool = True,
                      peek: Peek | None = None) -> WorkResult:
    """Post the outbox, deliver the bot's replies (`poll`), keep polling until `burst_until` (a webhook's
    burst), end the conversation when idle (`idle_check`, the timer's job). Always schedules and releases.
    `peek`: the page the poller already read for this conversation (used instead of asking again)."""
    worker = ConversationWorker(ctx, record, owner=owner, peek=peek)
    worker.patient = burst_until is not None
    try:
        if idle_check and worker.end_if_idle():
            return worker.result
        if worker.drain_outbox() and poll and worker.deliver():
            worker.settled = True
            while burst_until is not None and worker.record.active:
                remaining = (burst_until - ctx.clock()).total_seconds()
                if remaining < MIN_POLL_GAP.total_seconds():
                    break
                before = worker.result.delivered
                if not worker.deliver():
                    worker.settled = False
                    break  # the provider asked us to wait
                if before and worker.result.delivered == before:
                    break  # the bot answered and went quiet
    except Throttled as error:
        worker.settled = False
        worker._wait(error.retry_after)
        worker.result.error = f"{error.status} {error.code}"
    except DirectLineError as error:
        worker.settled = False
        worker._wait(None, attempts=2)
        worker.result.error = f"{error.status} {error.code}"
        log.warning("Direct Line failed for a %s conversation: %s %s", record.key.channel, error.status, error.code)
    except BaseException:
        worker.settled = False
        raise
    finally:
        worker.finish()
    return worker.result
