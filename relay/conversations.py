"""Working one conversation: the shared core of the webhook (burst) and the timer (poller).

The worker holds the lease, saves the record and keeps the Direct Line token usable; `posting.py`
takes the outbox to Direct Line and `delivery.py` the bot's replies to the provider, both through it.
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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from relay.channels import get_adapter
from relay.channels.base import ChannelAdapter
from relay.clock import SYSTEM_CLOCK, Clock
from relay.delivery import MIN_POLL_GAP, ReplyDelivery
from relay.directline import ActivitySet, DirectLineClient, get_directline_client
from relay.errors import (
    AuthenticationFailed,
    ConcurrencyConflict,
    ConversationNotFound,
    DirectLineError,
    Throttled,
    TokenExpired,
)
from relay.posting import OutboxPoster
from relay.settings import Settings, get_settings
from relay.store import RelayStore, get_store
from relay.store.conversations import ConversationKey, ConversationRecord, ConversationState

__all__ = [
    "ConversationWorker",
    "Peek",
    "RelayContext",
    "WorkResult",
    "get_context",
    "new_owner",
    "next_idle_poll",
    "work_conversation",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

REPLY_LIKELY_FOR = timedelta(minutes=2)  # after a user or bot message, poll at every tick this long
FIRST_IDLE_INTERVAL = 5.0
TOKEN_RENEW_MARGIN = timedelta(seconds=60)
TOKEN_REFRESH_REMAINING = timedelta(minutes=15)  # refresh at about half of the usual 30-minute lifetime


def next_idle_poll(now: datetime, *, last_activity: datetime | None, interval: float,
                   ceiling: float) -> tuple[float, datetime]:
    """(interval, next poll) with nothing new: every tick while a reply is likely, then backing off to `ceiling`."""
    if last_activity and now - last_activity < REPLY_LIKELY_FOR:
        return 0.0, now + MIN_POLL_GAP
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


@functools.lru_cache(maxsize=1)
def get_context() -> RelayContext:
    """The process's context: one store, one Direct Line pool and one provider pool for every invocation,
    all on the system clock."""
    settings = get_settings()
    return RelayContext(settings=settings, store=get_store(), directline=get_directline_client(),
                        adapter=functools.cache(lambda name: get_adapter(name, settings, clock=SYSTEM_CLOCK)),
                        clock=SYSTEM_CLOCK)


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
        self.posting = OutboxPoster(self)
        self.delivery = ReplyDelivery(self, peek=peek, patient=patient)

    @property
    def key(self) -> ConversationKey:
        return self.record.key

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

    # --------------------------------------------------------------------------------- Direct Line
    def start_directline(self) -> None:
        """A new Direct Line conversation for this user (the first, or after one was forgotten or ended)."""
        started = self.ctx.directline.start_conversation(user_id=self.record.user_id)
        now = self.ctx.clock.now()
        expires = now + timedelta(seconds=started.expires_in or 1800)
        log.info("started Direct Line conversation %s for a %s user", started.conversation_id, self.key.channel)
        self.save(lambda r: replace(r, conversation_id=started.conversation_id, token=started.token,
                                     token_expires_at=expires, watermark=None, state=ConversationState.ACTIVE))

    def _reconnect(self) -> None:
        """Recover an expired token with the secret; the stored watermark stays as it is."""
        renewed = self.ctx.directline.reconnect(self.record.conversation_id)
        expires = self.ctx.clock.now() + timedelta(seconds=renewed.expires_in or 1800)
        self.save(lambda r: replace(r, token=renewed.token, token_expires_at=expires))

    def _token(self) -> str | None:
        """A usable token: refreshed at about half its lifetime (with jitter), renewed when it has lapsed."""
        record, now = self.record, self.ctx.clock.now()
        if not record.token or record.token_expires_at is None:
            return None  # the secret is used instead
        remaining = record.token_expires_at - now
        if remaining <= TOKEN_RENEW_MARGIN:
            self._reconnect()
        elif remaining <= TOKEN_REFRESH_REMAINING * self.ctx.clock.uniform(0.9, 1.1):
            try:
                refreshed = self.ctx.directline.refresh_token(token=record.token)
            except TokenExpired:
                self._reconnect()
            else:
                expires = now + timedelta(seconds=refreshed.expires_in or 1800)
                self.save(lambda r: replace(r, token=refreshed.token, token_expires_at=expires))
        return self.record.token

    def call(self, operation: Callable[[str | None], T]) -> T:
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

    # ------------------------------------------------------------------------------------- lifecycle
    def end_if_idle(self) -> bool:
        """End a conversation idle past RELAY_IDLE_TIMEOUT_MINUTES: the bot gets endOfConversation."""
        idle_limit = timedelta(minutes=self.ctx.settings.relay.idle_timeout_minutes)
        last = self.record.last_activity_at
        if last is None or self.ctx.clock.now() - last < idle_limit:
            return False
        if self.record.conversation_id:
            end = {"type": "endOfConversation", "from": {"id": self.record.user_id, "role": "user"},
                   "code": "completedSuccessfully", "text": "The conversation was idle."}
            with contextlib.suppress(ConversationNotFound):
                self.call(lambda token: self.ctx.directline.post_activity(
                    self.record.conversation_id, end, token=token))
        log.info("ended idle %s conversation %s", self.key.channel, self.record.conversation_id)
        self.save(lambda r: replace(r, state=ConversationState.ENDED))
        self.result.ended = True
        return True

    def wait(self, retry_after: float | None, attempts: int = 1) -> None:
        """Come back after the provider's or Direct Line's Retry-After, else after a growing backoff."""
        delay = retry_after if retry_after else min(300.0, 5.0 * 2 ** max(0, attempts - 1))
        at = self.ctx.clock.now() + timedelta(seconds=max(1.0, delay))
        self._retry_at = at if self._retry_at is None else max(self._retry_at, at)

    def finish(self) -> None:
        """Schedule the next poll and give the lease back, in one write.

        The conversation is left peekable (polled without the lease until something happens) only when
        this worker settled it and nobody else wrote the record since this worker's last write: a webhook
        writes it before and after queuing a message, so a message can never wait unseen in the outbox."""
        now = self.ctx.clock.now()
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
            self.save(schedule)
        except ConcurrencyConflict as error:
            log.warning("could not schedule a %s conversation: %s (its lease expires on its own)",
                        self.key.channel, error)


def work_conversation(ctx: RelayContext, record: ConversationRecord, *, owner: str, poll: bool = True,
                      burst_until: datetime | None = None, idle_check: bool = True,
                      peek: Peek | None = None) -> WorkResult:
    """Post the outbox, deliver the bot's replies (`poll`), keep polling until `burst_until` (a webhook's
    burst), end the conversation when idle (`idle_check`, the timer's job). Always schedules and releases.
    `peek`: the page the poller already read for this conversation (used instead of asking again)."""
    worker = ConversationWorker(ctx, record, owner=owner, peek=peek, patient=burst_until is not None)
    try:
        if idle_check and worker.end_if_idle():
            return worker.result
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
    except BaseException:
        worker.settled = False
        raise
    finally:
        worker.finish()
    return worker.result
