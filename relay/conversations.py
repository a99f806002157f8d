"""Working one conversation: the shared core of the webhook (burst) and the timer (poller).

The worker holds the lease, saves the record and keeps the Direct Line token usable; `posting.py`
takes the outbox to Direct Line and `delivery.py` the bot's replies to the provider, both through it.
Everything here runs under the conversation's lease, so exactly one worker talks to Direct Line and
the provider for a conversation at a time. Only the worker writes the record: what arrived since
(the outbox) is applied to it first, under the lease, and the newer token a quiet refresh left in
its due row is brought in as the lease is taken.
Progress is saved as it is made (each delivered activity id right after the provider accepted it,
the watermark once its whole page is handled), so an instance that dies between any two lines
loses nothing and repeats at most the one provider call that was in flight.

The conversation's token is kept alive for as long as the conversation is open: it is refreshed
once about half its lifetime has passed (`expires_in` as Direct Line gave it, the share drawn per
token so refreshes spread out), at the timer's last look before that time (so at most the idle
ceiling early, and never a look of its own; a quiet conversation's new token is kept in its due
row until the next lease), and the record's next poll is never later than that, so the timer comes
back for an idle conversation too (see poller.py). That costs one refresh per half-life per
open conversation (with 30-minute tokens, four an hour). Reconnecting with the secret is never
relied on: it fails under enhanced authentication. A token that lapsed anyway (an outage longer than
its life, or Direct Line refusing it) is let go: the bot's replies are then read with the secret
(which reading allows in every mode), and the user's next message goes to a new Direct Line
conversation for the same user, after what the bot still had to say in the old one was delivered.

In token endpoint mode (DIRECTLINE_TOKEN_ENDPOINT: a Copilot Studio agent, no secret anywhere) a
conversation starts with a token from the agent's endpoint and lives exactly as long as its token is
kept fresh. A token that lapsed anyway cannot be replaced by anything: the conversation is left
at once (what the bot still had to say there is lost with it), and the user's next message starts
a new one; a read that finds no token raises ConversationLapsed, a ConversationNotFound.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from relay import telemetry
from relay.channels import get_adapter
from relay.channels.base import ChannelAdapter
from relay.clock import SYSTEM_CLOCK, Clock
from relay.delivery import MIN_POLL_GAP, ReplyDelivery
from relay.directline import ActivitySet, ConversationToken, DirectLineClient, get_directline_client
from relay.errors import (
    AuthenticationFailed,
    BadRequest,
    ConcurrencyConflict,
    ConversationLapsed,
    ConversationNotFound,
    DirectLineError,
    LeaseLost,
    Throttled,
    TokenExpired,
)
from relay.events import EventWebhook
from relay.fanout import PollQueue
from relay.posting import OutboxPoster
from relay.settings import Settings, get_settings
from relay.store import RelayStore, get_store
from relay.store.conversations import ConversationKey, ConversationRecord, ConversationState

__all__ = [
    "CLOCK_SKEW",
    "ConversationWorker",
    "Peek",
    "RelayContext",
    "WorkResult",
    "get_context",
    "new_owner",
    "next_idle_poll",
    "token_change",
    "work_conversation",
]
from relay.store.due_polls import InboundMark

log = logging.getLogger(__name__)
T = TypeVar("T")

REPLY_IMMINENT_FOR = timedelta(seconds=10)
"""After the user's message, poll every second this long: most bots (Copilot Studio agents too) answer within it."""
REPLY_LIKELY_FOR = timedelta(minutes=2)
"""After a user or bot message, poll every REPLY_LIKELY_GAP this long, then back off."""
REPLY_LIKELY_GAP = timedelta(seconds=5)
FIRST_IDLE_INTERVAL = 5.0
CLOCK_SKEW = timedelta(seconds=5)
"""How far apart two instances' clocks may be (what one wrote for another to act on)."""
RETRY_WAITING_AFTER = 5.0  # seconds: messages still waiting after a failure nobody put a time on


def next_idle_poll(now: datetime, *, last_activity: datetime | None, last_user_activity: datetime | None,
                   interval: float, ceiling: float) -> tuple[float, datetime]:
    """(interval, next poll) with nothing new: every second while a reply is imminent (the user wrote less than
    REPLY_IMMINENT_FOR ago), every 5 s while one is likely, then backing off to `ceiling`.

    A conversation's Direct Line requests follow its own schedule, not the timer's: with the default timer
    (every 5 s) the first two phases are every tick; a faster RELAY_POLL_SCHEDULE polls faster only in the
    seconds after the user wrote (docs/benchmarks.md compares the schedules)."""
    if last_user_activity and now - last_user_activity < REPLY_IMMINENT_FOR:
        return 0.0, now + MIN_POLL_GAP
    if last_activity and now - last_activity < REPLY_LIKELY_FOR:
        return 0.0, now + REPLY_LIKELY_GAP
    interval = min(ceiling, max(FIRST_IDLE_INTERVAL, interval * 2))
    return interval, now + timedelta(seconds=interval)


@dataclass(frozen=True)
class Peek:
    """A page the poller read without the lease, from the due index's copy of the watermark."""

    conversation_id: str
    watermark: str | None
    page: ActivitySet
    at: float  # the clock's monotonic() at the request


@dataclass
class RelayContext:
    """What a function invocation needs: settings, storage, Direct Line, the channel adapters and the clock
    (the one source of time, waiting and jitter; the store and the clients hold the same one)."""

    settings: Settings
    store: RelayStore
    directline: DirectLineClient
    adapter: Callable[[str], ChannelAdapter]
    clock: Clock = SYSTEM_CLOCK

    @property
    def token_lookahead(self) -> timedelta:
        """How long before a conversation's token wants refreshing a quiet peek may have refreshed it in its due row
        alone (Conversations.acquire_lease): one idle interval at most, the idle ceiling, and the skew between two
        instances' clocks."""
        return timedelta(seconds=self.settings.relay.poll_ceiling_seconds) + CLOCK_SKEW

    @functools.cached_property
    def poll_queue(self) -> PollQueue:
        """Where a tick hands its due conversations when there are too many for one execution (RELAY_POLL_QUEUE)."""
        return PollQueue.for_batches(self.settings)

    @functools.cached_property
    def chase_queue(self) -> PollQueue:
        """Where a webhook leaves its chases (RELAY_POLL_QUEUE + "-chase")."""
        return PollQueue.for_chases(self.settings)

    @functools.cached_property
    def events(self) -> EventWebhook:
        """Where the bot's event activities go (RELAY_EVENT_WEBHOOK_URL), on the context's clock."""
        return EventWebhook(self.settings.relay, clock=self.clock)


@functools.lru_cache(maxsize=1)
def get_context() -> RelayContext:
    """The process's context: one store, one Direct Line pool and one provider pool for every invocation,
    all on the system clock."""
    settings = get_settings()
    return RelayContext(settings=settings, store=get_store(), directline=get_directline_client(),
                        adapter=functools.cache(lambda name: get_adapter(name, settings, clock=SYSTEM_CLOCK)),
                        clock=SYSTEM_CLOCK)


def token_change(granted: ConversationToken, *, clock: Clock) -> Callable[[ConversationRecord], ConversationRecord]:
    """The change that stores `granted` (granted now), with when it expires and when it wants refreshing."""
    expires_at, refresh_at = granted.schedule(now=clock.now(), clock=clock)
    return lambda r: replace(r, token=granted.token, token_expires_at=expires_at, token_refresh_at=refresh_at)


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
    """One leased conversation for one invocation: the lease, the saves and the Direct Line token, shared
    by its two collaborators, `posting` (the outbox to Direct Line) and `delivery` (the bot's replies to
    the provider)."""

    def __init__(self, ctx: RelayContext, record: ConversationRecord, *, owner: str, peek: Peek | None,
                 patient: bool):
        self.ctx = ctx
        self.record = record
        self.claimed = record
        self.owner = owner
        self.started_at = ctx.clock.now()
        self.result = WorkResult()
        self.settled = False  # the outbox was drained and the bot's activities delivered, with no error
        self._retry_at: datetime | None = None
        self._refresh_deferred = False  # a refresh failed in this run: the next run tries again, not every call
        self.posting = OutboxPoster(self)
        self.delivery = ReplyDelivery(self, peek=peek, patient=patient)

    @property
    def key(self) -> ConversationKey:
        return self.record.key

    @functools.cached_property
    def tag(self) -> str:
        """The conversation's name in telemetry (telemetry.conversation_tag)."""
        return telemetry.conversation_tag(self.ctx.store, self.key)

    # ------------------------------------------------------------------------------------ storage
    def save(self, change: Callable[[ConversationRecord], ConversationRecord]) -> None:
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
            return replace(wanted, lease_expires_at=self.ctx.clock.now() + lease)

        self.record = self.ctx.store.conversations.update_record(self.key, apply, current=self.record,
                                                                 lease_owner=self.owner) or self.record

    def hold_lease(self) -> None:
        """Renew the lease when less than half of it is left, before a step that cannot be taken back (a reply
        sent): a worker slowed past its lease (a Direct Line call riding out its retries, a storage outage)
        would otherwise send what the worker that took the conversation over sends too. LeaseLost when
        that already happened: the reply is left to the new holder."""
        expires = self.record.lease_expires_at
        half = timedelta(seconds=self.ctx.settings.relay.lease_seconds / 2)
        if expires is not None and expires - self.ctx.clock.now() >= half:
            return
        self.save(lambda r: replace(r))  # a copy is a change to save: the save renews the lease

    # --------------------------------------------------------------------------------- Direct Line
    def start_directline(self, *, locale: str | None = None) -> None:
        """A new Direct Line conversation for this user (the first, or after one was forgotten, ended or
        its tokens lapsed), started with the secret and the user's id (in token endpoint mode with a token
        from the agent's endpoint: DirectLineClient.start_conversation), and greeted (`_greet`, in the user's
        `locale`, else RELAY_DEFAULT_LOCALE) before anything of the user's is posted there; the watermark
        starts anew, the delivered ids stay (activity ids are unique across conversations); a question the
        old one asked is forgotten (the new one's bot never asked it)."""
        started = self.ctx.directline.start_conversation(user_id=self.record.user_id)
        self._greet(started, locale or self.ctx.settings.relay.default_locale)
        with_token = token_change(started, clock=self.ctx.clock)
        log.info("started Direct Line conversation %s for a %s user", started.conversation_id, self.key.channel)
        self.save(lambda r: replace(with_token(r), conversation_id=started.conversation_id, watermark=None,
                                     state=ConversationState.ACTIVE, pending_question=None))

    def _greet(self, started: ConversationToken, locale: str) -> None:
        """Post the RELAY_START_EVENT event (a Copilot Studio agent's greeting fires on it) to the conversation
        just started, once.

        It is posted before the record names the conversation: a run that fails here leaves the
        conversation unused, and the next one starts (and greets) another, so the user sees one greeting.
        After an ambiguous failure the event is looked up by its clientActivityID and posted again
        (under the same id) only when Direct Line does not have it; a bot that refuses it, or a second
        failure, leaves the conversation without a greeting rather than hold the user's message up.
        Any other failure (throttled, Direct Line down) is raised: the user's message waits."""
        name = self.ctx.settings.relay.start_event
        if not name:
            return
        client_id = f"{self.key.channel}:start:{started.conversation_id}"
        event = {"type": "event", "name": name, "locale": locale,
                 "from": {"id": self.record.user_id, "role": "user"}, "channelData": {"clientActivityID": client_id}}
        post = functools.partial(self.ctx.directline.post_activity, started.conversation_id, event,
                                 token=started.token)
        try:
            post()
            return
        except BadRequest as error:
            self._greeting_skipped(started, f"Direct Line refused it ({error.upstream_code})")
            return
        except DirectLineError as error:
            if not error.ambiguous:
                raise
        try:
            if self.ctx.directline.find_activity_by_client_id(started.conversation_id, client_id,
                                                              token=started.token) is None:
                post()
        except DirectLineError as error:
            self._greeting_skipped(started, str(error))

    def _greeting_skipped(self, started: ConversationToken, why: str) -> None:
        log.warning("the %s event of Direct Line conversation %s was not posted (%s): the %s user is not greeted",
                    self.ctx.settings.relay.start_event[:100], started.conversation_id, why, self.key.channel)

    def keep_token_fresh(self) -> None:
        """Refresh the conversation's token when it wants it before the timer's next look as its idle schedule has
        it (as the poller's quiet peek does, so the refresh never costs a look of its own; a conversation in an
        exchange is looked at again within seconds, so its token is refreshed hardly early); let it go once it
        lapsed."""
        record = self.record
        recent = max((t for t in (record.last_user_activity_at, record.last_bot_activity_at) if t), default=None)
        _, next_look = next_idle_poll(self.ctx.clock.now(), last_activity=recent,
                                      last_user_activity=record.last_user_activity_at,
                                      interval=record.poll_interval,
                                      ceiling=self.ctx.settings.relay.poll_ceiling_seconds)
        self._token(refresh_by=next_look)

    def _token(self, *, refresh_by: datetime | None = None) -> str | None:
        """The conversation's live token, refreshed first once its refresh time has come (or comes by `refresh_by`);
        None when it has none.

        A token past its expiry, or one whose refresh Direct Line refuses, is let go: nothing brings it
        back. A refresh Direct Line cannot do now (throttled, down) keeps the token, still good for a
        while, and brings the worker back after a backoff to try again."""
        record, now = self.record, self.ctx.clock.now()
        if not record.token:
            return None
        if record.token_expires_at is not None and now >= record.token_expires_at:
            self._let_token_go("expired")
            return None
        if self._refresh_deferred or (record.token_refresh_at is not None
                                      and (refresh_by or now) < record.token_refresh_at):
            return record.token
        try:
            refreshed = self.ctx.directline.refresh_token(token=record.token)
        except (TokenExpired, AuthenticationFailed) as error:
            telemetry.count(telemetry.TOKENS_REFRESHED, kind="conversation", outcome="failed")
            self._let_token_go(f"could not be refreshed ({error.upstream_code})")
            return None
        except DirectLineError as error:
            telemetry.count(telemetry.TOKENS_REFRESHED, kind="conversation", outcome="failed")
            log.info("could not refresh the token of Direct Line conversation %s now (%s); trying again later",
                     record.conversation_id, error)
            self.wait(getattr(error, "retry_after", None), attempts=2)
            self._refresh_deferred = True
            return record.token
        telemetry.count(telemetry.TOKENS_REFRESHED, kind="conversation", outcome="refreshed")
        self.save(token_change(refreshed, clock=self.ctx.clock))
        return self.record.token

    def _let_token_go(self, why: str) -> None:
        if self.ctx.directline.uses_token_endpoint:
            log.info("the token of Direct Line conversation %s %s: with no secret nothing can read it any more, so "
                     "it is left, and the %s user's next message starts a new one", self.record.conversation_id, why,
                     self.key.channel)
            self.save(lambda r: replace(r.without_token(), conversation_id="", watermark=None))
            return
        log.info("the token of Direct Line conversation %s %s: its replies are read with the secret, and the %s "
                 "user's next message goes to a new conversation", self.record.conversation_id, why,
                 self.key.channel)
        self.save(lambda r: r.without_token())

    def call(self, operation: Callable[[str | None], T]) -> T:
        """Run a Direct Line read (or the end notice) with the conversation's live token, else the secret.

        Reading with the secret works whatever the site's settings. A token Direct Line refuses
        (expired early, or unknown to it) is let go and the call made once more with the secret. In token
        endpoint mode there is no secret: without a live token (the conversation was left) ConversationLapsed."""
        conversation_id = self.record.conversation_id
        token = self._token()
        if token is None and self.ctx.directline.uses_token_endpoint:
            raise ConversationLapsed(f"Direct Line conversation {conversation_id} has no live token, and there is "
                                     "no secret to read it with")
        try:
            return operation(token)
        except (TokenExpired, AuthenticationFailed) as error:
            if not token:
                raise  # the secret itself was refused
            self._let_token_go("was refused")
            if self.ctx.directline.uses_token_endpoint:
                raise ConversationLapsed(f"the token of Direct Line conversation {conversation_id} was refused "
                                         f"({error.upstream_code}), and there is no secret to read it with") from None
            return operation(None)

    def call_as_user(self, operation: Callable[[str], T]) -> T:
        """Run a Direct Line call that speaks for the user (their message) with the conversation's live token.

        TokenExpired when it has none, AuthenticationFailed or TokenExpired when Direct Line refuses
        it (the token is let go): the caller starts a new conversation (`start_directline`) and
        calls again. The user's messages never go with the secret."""
        token = self._token()
        if not token:
            raise TokenExpired(f"the token of Direct Line conversation {self.record.conversation_id} lapsed")
        try:
            return operation(token)
        except (TokenExpired, AuthenticationFailed):
            self._let_token_go("was refused")
            raise

    # ------------------------------------------------------------------------------------- lifecycle
    def end_if_idle(self) -> bool:
        """End a conversation idle past RELAY_IDLE_TIMEOUT_MINUTES: the bot gets endOfConversation."""
        idle_limit = timedelta(minutes=self.ctx.settings.relay.idle_timeout_minutes)
        last = self.record.last_activity_at
        if last is None or self.ctx.clock.now() - last < idle_limit:
            return False
        self.end(why="The conversation was idle.")
        return True

    def end(self, *, why: str) -> None:
        """End the conversation: the bot gets endOfConversation saying `why` (unless Direct Line forgot the
        conversation), and the record is ENDED; the user's next message starts a new one."""
        if self.record.conversation_id:
            end = {"type": "endOfConversation", "from": {"id": self.record.user_id, "role": "user"},
                   "code": "completedSuccessfully", "text": why}
            with contextlib.suppress(ConversationNotFound):
                self.call(lambda token: self.ctx.directline.post_activity(
                    self.record.conversation_id, end, token=token))
        log.info("ended %s conversation %s (%s)", self.key.channel, self.record.conversation_id, why)
        self.save(lambda r: replace(r, state=ConversationState.ENDED))
        self.result.ended = True

    def wait(self, retry_after: float | None, attempts: int = 1) -> None:
        """Come back after the provider's or Direct Line's Retry-After, else after a growing backoff."""
        delay = retry_after if retry_after else min(300.0, 5.0 * 2 ** max(0, attempts - 1))
        at = self.ctx.clock.now() + timedelta(seconds=max(1.0, delay))
        self._retry_at = at if self._retry_at is None else max(self._retry_at, at)

    def finish(self) -> bool:
        """Schedule the next poll and give the lease back, in one write; False when that write failed.

        The conversation is left peekable (polled without the lease until something happens) only when
        this worker settled it and nobody else wrote the record since this worker's last write. Messages
        it read from the outbox and could not post keep it due (at the latest after RETRY_WAITING_AFTER);
        a message stored after the worker read the outbox keeps its own inbound row in the due index.
        The next poll is never later than the time the conversation's token wants refreshing."""
        now = self.ctx.clock.now()
        ceiling = self.ctx.settings.relay.poll_ceiling_seconds
        if self.posting.waiting and self._retry_at is None:
            self.wait(RETRY_WAITING_AFTER)
        oldest = self.posting.oldest_waiting
        if self.posting.waiting and oldest is not None:
            telemetry.record(telemetry.OUTBOX_AGE, (now - oldest).total_seconds(), channel=self.key.channel)
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
                interval, next_poll = next_idle_poll(now, last_activity=recent,
                                                     last_user_activity=record.last_user_activity_at,
                                                     interval=record.poll_interval,
                                                     ceiling=ceiling)
            if record.token_refresh_at is not None and next_poll is not None and now < record.token_refresh_at:
                next_poll = min(next_poll, record.token_refresh_at)  # the token is refreshed however idle it is
            if next_poll is not None and retry_at is None and not user_wrote_meanwhile:
                peekable = (settled and bool(record.conversation_id) and record.etag == ours
                            and record.last_user_activity_at == claimed.last_user_activity_at)
            return replace(record.without_lease(), poll_interval=interval, next_poll_at=next_poll, peekable=peekable)

        try:
            self.save(schedule)
        except ConcurrencyConflict as error:
            log.warning("could not schedule a %s conversation: %s (its lease expires on its own)",
                        self.key.channel, error)
            return False
        return True


def work_conversation(ctx: RelayContext, record: ConversationRecord, *, owner: str, poll: bool = True,
                      burst_until: datetime | None = None, idle_check: bool = True,
                      peek: Peek | None = None, inbound: Sequence[InboundMark] = ()) -> WorkResult:
    """Post the outbox, deliver the bot's replies (`poll`), keep polling until `burst_until` (a webhook's
    burst), end the conversation when idle (`idle_check`, the timer's job). Always schedules and releases.
    `peek`: the page the poller already read for this conversation (used instead of asking again).
    `inbound`: the conversation's inbound rows that brought the worker here, removed once scheduled."""
    worker = ConversationWorker(ctx, record, owner=owner, peek=peek, patient=burst_until is not None)
    lease_lost = False
    try:
        worker.posting.take_arrivals()  # first: what arrived changes the record (and it is not idle then)
        worker.claimed = worker.record
        if idle_check and not worker.posting.waiting and worker.end_if_idle():
            return worker.result
        worker.keep_token_fresh()
        if worker.posting.drain() and poll and worker.delivery.deliver():
            worker.settled = True
            while burst_until is not None and worker.record.active:
                remaining = (burst_until - ctx.clock.now()).total_seconds()
                if remaining < MIN_POLL_GAP.total_seconds():
                    break
                before = worker.result.delivered
                if not worker.delivery.deliver():
                    worker.settled = False
                    break  # the provider asked us to wait
                if before and worker.result.delivered == before:
                    break  # the bot answered and went quiet
    except Throttled as error:
        worker.settled = False
        worker.wait(error.retry_after)
        worker.result.error = str(error)
    except DirectLineError as error:
        worker.settled = False
        worker.wait(None, attempts=2)
        worker.result.error = str(error)
        log.warning("Direct Line failed for a %s conversation: %s", record.key.channel, error)
    except LeaseLost as error:
        # This worker was slower than its lease and another one took the conversation over: it carries on.
        lease_lost = True
        worker.settled = False
        worker.result.error = str(error)
        log.warning("a %s conversation was taken over while this worker held it up; left to the new holder",
                    record.key.channel)
    except BaseException:
        worker.settled = False
        raise
    finally:
        if not lease_lost and worker.finish() and inbound:
            worker.posting.clear_inbound(inbound)
    return worker.result
