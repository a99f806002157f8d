"""The timer functions: poll every due conversation, and sweep what is no longer needed.

A tick reads only the conversations whose next poll time has come (one range query on the due
index), works them concurrently with a bounded pool, and logs one line. A settled conversation is
first peeked: its activities are read from the due index's copy of its watermark without touching
its record or lease. Only when something is there (or it is time for its hourly full poll) is it
claimed and worked under its lease; otherwise its next peek is moved on, in batches of 100 rows per
transaction. So an idle conversation costs one Direct Line request and about 0.01 transaction per poll.

A peek reads with the conversation's token, which the due row carries (relay/store/due_polls.py),
else with the secret. In token endpoint mode there is no secret: a row without a token (its token
lapsed and the conversation was left) is not peeked but worked under its lease, which finds nothing
to read. So peeking costs the same in both modes; the price is a copy of each open conversation's
token in its due row.

A peek is never postponed past the time the conversation's token wants refreshing (about half its
lifetime, carried by the due row). The last peek before that time reads with the token, still good
until it expires; when it finds nothing new the token is refreshed there, early by at most the
conversation's idle interval, without the lease and without the record: the row takes the new token
in the postponing batch, and the record takes it from the row with its next lease
(Conversations.acquire_lease). That costs no storage transaction but a share of a batch the row is
in anyway, where a leased run costs about ten, and no Direct Line request but the refresh. So an
open conversation's token stays alive however long it idles, for one refresh per half-life of its
token; a refresh that fails there goes down the full path, whose worker lets a refused token go or
backs off.

When more conversations are due than RELAY_FANOUT_THRESHOLD, the tick works none of them: it hands
them to the poll queue in batches, which the queue-triggered `poll_batch` function works on as many
instances as the platform gives it (`work_batch`, the same work; relay/fanout.py says how it stays
exactly once).

The chase function works the chases webhooks leave (`work_chase`): a late reply is looked for every
second for a few seconds after the user's message, one look per execution, so it does not wait for
the next tick.

Each conversation is polled on its own schedule (conversations.next_idle_poll), whatever the timer's
(RELAY_POLL_SCHEDULE): a tick with nothing due costs one query and logs nothing. Each tick also
refreshes the Web Chat sessions' tokens that are due (relay/tokens.py), found with one more range
query, for a few seconds at most (SESSION_REFRESH_BUDGET_SECONDS, whatever Direct Line does).
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from relay import telemetry
from relay.activities import directline_user_id
from relay.conversations import (
    CLOCK_SKEW,
    Peek,
    RelayContext,
    WorkResult,
    new_owner,
    next_idle_poll,
    work_conversation,
)
from relay.delivery import MIN_POLL_GAP
from relay.errors import DirectLineError, StoreError
from relay.fanout import BATCH_ROWS, MAX_FANOUT_ROWS, Chase, batches_of, parse_message
from relay.settings import MAX_CHASE_SECONDS
from relay.store.conversations import ConversationRecord
from relay.store.due_polls import DueConversation, Postponement
from relay.store.sweep import sweep_tables
from relay.store.tables import BATCH_LIMIT
from relay.tokens import refresh_session_tokens

__all__ = ["TickResult", "poll_tick", "sweep", "work_chase", "work_poll_message"]

log = logging.getLogger(__name__)

MAX_CONVERSATIONS_PER_TICK = 1000
WORKERS = 64  # mostly waiting on Direct Line: 64 measured fastest for 1,000 due conversations (docs/benchmarks.md)
BATCH_WORKERS = 60
"""Conversations of poll queue batches worked at once in one process, however many batches the host runs side by
side (up to 6, host.json batchSize + newBatchThreshold), within the clients' pools of 64 connections: a batch
alone on an instance gets them all, 6 share them. (A larger host.json concurrency would let one instance take
most of a round's batches, and the scale controller add fewer instances: the fan-out would not spread.)"""
CHASE_QUIET = timedelta(seconds=5)
"""A chase ends once the bot answered the user's message and was quiet this long: long enough for the answer
that follows an acknowledgement ("let me look that up"), far shorter than the chase for a bot done at once."""
FULL_POLL_EVERY = timedelta(hours=1)
"""A peeked conversation is still worked under its lease this often (idle expiry, a lost nudge)."""


@dataclass(frozen=True)
class TickResult:
    due: int
    worked: int = 0
    posted: int = 0
    delivered: int = 0
    dead_letters: int = 0
    ended: int = 0
    failed: int = 0
    seconds: float = 0.0
    quiet: int = 0  # peeked without the lease and found nothing new
    batches: int = 0  # handed to the poll queue (relay/fanout.py) instead of worked here


def poll_tick(ctx: RelayContext, *, limit: int = MAX_CONVERSATIONS_PER_TICK, workers: int = WORKERS) -> TickResult:
    """Work every due conversation (up to `limit`, `workers` at a time), or hand them to the poll queue when
    more than RELAY_FANOUT_THRESHOLD are due, and refresh the due session tokens; one conversation's trouble
    never stops the others. Counted in telemetry, a tick that raised as failed."""
    started, outcome = ctx.clock.monotonic(), "failed"
    try:
        result = _tick(ctx, started, limit=limit, workers=workers)
        _count_conversations(result)
        outcome = "ok"
        return result
    finally:
        telemetry.record(telemetry.POLL_DURATION, ctx.clock.monotonic() - started, outcome=outcome)
        telemetry.count(telemetry.POLL_TICKS, outcome=outcome)


def work_poll_message(ctx: RelayContext, body: bytes) -> TickResult | int | None:
    """Work one message of the poll queue (relay/fanout.py): a batch of due rows (its TickResult) or a chase (the
    replies it delivered). None for a message this relay did not write (logged and dropped: no retry can mend
    it). Raises StoreError when storage cannot be read: the host retries the message, then moves it to the
    poison queue; a batch's conversations are due again at the next tick either way."""
    message = parse_message(body)
    if message is None or (isinstance(message, Chase) and not _chase_in_bounds(ctx, message)):
        log.error("poll queue: the message is not one this relay wrote; dropped")
        telemetry.count(telemetry.POLL_BATCHES, kind="unknown", outcome="malformed")
        return None
    kind, outcome = "chase" if isinstance(message, Chase) else "rows", "failed"
    try:
        result = work_chase(ctx, message) if isinstance(message, Chase) else _work_rows(ctx, message)
        outcome = "ok"
        return result
    finally:
        telemetry.count(telemetry.POLL_BATCHES, kind=kind, outcome=outcome)


@functools.lru_cache(maxsize=1)
def _batch_pool() -> ThreadPoolExecutor:
    """The process's BATCH_WORKERS threads, shared by every poll batch it runs."""
    return ThreadPoolExecutor(max_workers=BATCH_WORKERS, thread_name_prefix="batch")


def _work_rows(ctx: RelayContext, rows: tuple[str, str]) -> TickResult:
    """The due rows of a batch's RowKey range, worked as a tick would, on the threads all batches share."""
    started = ctx.clock.monotonic()
    with telemetry.span("relay.poll.batch") as span:
        due = ctx.store.due_polls.list_due(now=ctx.clock.now(), limit=2 * BATCH_ROWS, rows=rows)
        result = _work_due(ctx, due, started, pool=_batch_pool(), tick=new_owner("batch"))
        span.set(due=result.due, worked=result.worked, quiet=result.quiet, failed=result.failed)
    _count_conversations(result)
    _log("poll batch", result)
    return result


def work_chase(ctx: RelayContext, chase: Chase) -> int:
    """One look for the bot's reply in the chased conversation, without its lease; what arrived is delivered
    under the lease (as the timer would). Unless the chase is over, its next look goes on the chase queue, a
    second later (relay/fanout.py): no execution waits between looks. Returns the replies delivered.

    News found while someone else holds the lease is theirs; the chase looks again a second later, as the holder
    (the timer, mostly) may have read the conversation just before the reply came and leave it to the next tick.
    Over when its time is up, when the bot answered and then stayed quiet for CHASE_QUIET, when the user wrote
    again (that message's webhook chases on), or when Direct Line fails (the timer deals with it): the schedule
    still polls the conversation either way."""
    started = ctx.clock.now()
    record = ctx.store.conversations.get_record_at(chase.partition_key, newest_token=True,
                                                   token_lookahead=ctx.token_lookahead)
    delivered, ended, looked = 0, _chase_over(ctx, chase, record), False
    if ended is None and record is not None:
        (delivered, ended), looked = _look(ctx, record), True
    done, now = chase.after_look(started=started, looked=looked, delivered=delivered), ctx.clock.now()
    if ended is None and now + MIN_POLL_GAP >= chase.until:
        ended = "its time was up"
    if ended is None:
        try:
            ctx.chase_queue.send_chases([done.next_look(now)])
        except StoreError as error:
            log.warning("chase: its next look could not be queued (%s); the timer polls the conversation", error)
            ended = "its next look could not be queued"
    if ended is not None:
        # How long looks waited in the queue past their time: long waits mean more chases than instances run.
        log.info("chase: %s after %d looks, %d replies delivered; a look waited at most %.1f s in the queue", ended,
                 done.looks, done.delivered, done.longest_wait_ms / 1000)
    return delivered


def _chase_over(ctx: RelayContext, chase: Chase, record: ConversationRecord | None) -> str | None:
    """Why the chase ends before this look, if it does."""
    if record is None or not record.active or not record.conversation_id:
        return "the conversation is gone or ended"
    if record.last_user_activity_at and record.last_user_activity_at > chase.polled_at:
        return "the user wrote again"
    if not record.token and ctx.directline.uses_token_endpoint:
        return "the conversation has no token"
    return None


def _look(ctx: RelayContext, record: ConversationRecord) -> tuple[int, str | None]:
    """The replies one look delivered, and why the chase ends after it (None: it goes on)."""
    try:
        page = ctx.directline.get_activities(record.conversation_id, watermark=record.watermark,
                                             token=record.token or None)
    except DirectLineError as error:
        return 0, f"Direct Line failed ({type(error).__name__})"
    if not page.activities:
        answered_at = record.last_bot_activity_at
        if (answered_at and record.last_user_activity_at and answered_at >= record.last_user_activity_at
                and ctx.clock.now() - answered_at >= CHASE_QUIET):
            return 0, "the bot answered and went quiet"
        return 0, None
    owner = new_owner("chase")
    claimed = ctx.store.conversations.acquire_lease(record.key, owner=owner,
                                                    lease_seconds=ctx.settings.relay.lease_seconds,
                                                    token_lookahead=ctx.token_lookahead)
    if claimed is None:  # the holder delivers it, unless it read just before the reply came: the next look sees
        return 0, None
    peek = Peek(record.conversation_id, record.watermark, page, ctx.clock.monotonic())
    with telemetry.span("relay.conversation", channel=record.key.channel,
                        conversation=telemetry.conversation_tag(ctx.store, record.key)):
        return work_conversation(ctx, claimed, owner=owner, peek=peek, idle_check=False).delivered, None


def _chase_in_bounds(ctx: RelayContext, chase: Chase) -> bool:
    """A webhook writes a chase as it answers, ending at most MAX_CHASE_SECONDS later, and each look leaves the
    next a second on: a chase whose look is not yet due, or that ends long after it started (it would look every
    second until then), is not one the relay wrote."""
    return (chase.polled_at - CLOCK_SKEW <= chase.due_at <= ctx.clock.now() + CLOCK_SKEW
            and chase.until <= chase.polled_at + timedelta(seconds=MAX_CHASE_SECONDS))


def _count_conversations(result: TickResult) -> None:
    telemetry.count(telemetry.POLL_CONVERSATIONS, result.worked - result.failed, outcome="worked")
    telemetry.count(telemetry.POLL_CONVERSATIONS, result.quiet, outcome="quiet")
    telemetry.count(telemetry.POLL_CONVERSATIONS, result.failed, outcome="failed")


def _tick(ctx: RelayContext, started: float, *, limit: int, workers: int) -> TickResult:
    threshold = ctx.settings.relay.fanout_threshold
    try:
        due = ctx.store.due_polls.list_due(now=ctx.clock.now(), limit=threshold + 1 if threshold else limit)
    except Exception:
        with telemetry.span("relay.poll"):  # a tick that fails is traced, with its error
            raise
    if not due:  # most ticks at low traffic: no span (exported, 17,280 a day would be billed)
        result = TickResult(due=0)
    else:
        with telemetry.span("relay.poll") as span:
            too_many = bool(threshold) and len(due) > threshold
            batches = _fan_out(ctx) if too_many else None
            if batches is None:
                if too_many:  # the queue failed us: as many as one execution works
                    due = ctx.store.due_polls.list_due(now=ctx.clock.now(), limit=max(limit, threshold))
                with ThreadPoolExecutor(max_workers=max(1, min(workers, len(due))), thread_name_prefix="poll") as pool:
                    result = _work_due(ctx, due, started, pool=pool, tick=new_owner("poller"))
            else:
                result = TickResult(due=len(due), batches=batches)
            span.set(due=result.due, worked=result.worked, quiet=result.quiet, failed=result.failed,
                     batches=result.batches)
    _refresh_session_tokens(ctx)
    result = replace(result, seconds=ctx.clock.monotonic() - started)
    _log("poll tick", result)
    return result


def _fan_out(ctx: RelayContext) -> int | None:
    """Hand every due row to the poll queue in batches, unless the last round is still there: the batches sent.
    None when the queue cannot be used: the tick then works what it read itself, as without fan-out."""
    queue = ctx.poll_queue
    try:
        waiting = queue.pending()
        if waiting:
            log.info("poll tick: %d batches of an earlier round still in %s; the due conversations wait for them",
                     waiting, queue.name)
            return 0
        return queue.send(batches_of(ctx.store.due_polls.list_due_rows(now=ctx.clock.now(), limit=MAX_FANOUT_ROWS)))
    except StoreError as error:
        log.error("poll tick: could not hand the due conversations to %s (%s); working them here", queue.name, error)
        return None


def _work_due(ctx: RelayContext, due: list[DueConversation], started: float, *, pool: ThreadPoolExecutor,
              tick: str) -> TickResult:
    """Peek or work each due conversation on `pool`'s threads, and move the quiet ones' next peek on: a worker
    that completes a transaction's worth (BATCH_LIMIT rows) postpones them while the others still peek.

    A quiet row's next peek counts from the tick's start, so that "every 5 s" at a 5 s timer is every tick, not
    every other one; a row already due at the next tick as it stands (reply likely, at the default timer) is
    left as it is."""
    now = ctx.clock.now()
    period = ctx.settings.relay.poll_period_seconds
    next_tick = now + timedelta(seconds=period) if period else None
    quiet: list[Postponement] = []
    quiet_count = 0
    lock = threading.Lock()

    def settle_quiet(postponement: Postponement, *, move: bool) -> None:
        nonlocal quiet_count
        with lock:
            quiet_count += 1
            if not move:
                return
            quiet.append(postponement)
            full = quiet[:] if len(quiet) >= BATCH_LIMIT else []
            if full:
                quiet.clear()
        if full:
            ctx.store.due_polls.postpone_rows(full)

    def work(item: DueConversation) -> WorkResult | None:
        owner = f"{tick}:{item.index_key[-8:]}"
        try:
            peek = None
            if _may_peek(ctx, item, now):
                peek = _peek(ctx, item)
                if peek is not None and not peek.page.activities:
                    interval, after = next_idle_poll(now, last_activity=item.last_activity_at,
                                                     last_user_activity=item.last_user_activity_at,
                                                     interval=item.poll_interval,
                                                     ceiling=ctx.settings.relay.poll_ceiling_seconds)
                    postponement = Postponement(item, after, interval)
                    if not _wants_token_refresh(item, before=after):
                        # due again at the next tick as it stands: moving it would only cost a transaction
                        stays = next_tick is not None and after <= next_tick and interval == item.poll_interval
                        settle_quiet(postponement, move=not stays)
                        return None
                    refreshed = _refresh_quiet_token(ctx, postponement)
                    if refreshed is not None:
                        settle_quiet(refreshed, move=True)
                        return None
                    # Direct Line did not refresh the token: the full path deals with it
            record = ctx.store.conversations.claim_due(item, owner=owner,
                                                       lease_seconds=ctx.settings.relay.lease_seconds,
                                                       user_id=directline_user_id(item.key.channel, item.key.user,
                                                                                  key_for=ctx.store.tables.key_for),
                                                       token_lookahead=ctx.token_lookahead, now=ctx.clock.now())
            if record is None:
                return None  # not due after all, or another poller holds it
            with telemetry.span("relay.conversation", channel=item.key.channel,
                                conversation=telemetry.conversation_tag(ctx.store, item.key)):
                return work_conversation(ctx, record, owner=owner, peek=peek, inbound=item.inbound)
        except Exception as error:  # one conversation's trouble never stops the others
            log.exception("poller: a %s conversation failed", item.key.channel)
            return WorkResult(error=type(error).__name__)

    results = [r for r in pool.map(telemetry.carry_context(work), due) if r is not None]
    if quiet:
        ctx.store.due_polls.postpone_rows(quiet)
    return TickResult(
        due=len(due),
        worked=len(results),
        posted=sum(r.posted for r in results),
        delivered=sum(r.delivered for r in results),
        dead_letters=sum(r.dead_letters for r in results),
        ended=sum(r.ended for r in results),
        failed=sum(bool(r.error) for r in results),
        seconds=ctx.clock.monotonic() - started,
        quiet=quiet_count,
    )


def _log(what: str, result: TickResult) -> None:
    """One line per tick or batch that found something due (a tick finding nothing says nothing: most of them)."""
    log.log(logging.INFO if result.due or result.batches else logging.DEBUG,
            "%s: due=%d quiet=%d worked=%d posted=%d delivered=%d dead_letters=%d ended=%d failed=%d batches=%d "
            "in %.0f ms", what, result.due, result.quiet, result.worked, result.posted, result.delivered,
            result.dead_letters, result.ended, result.failed, result.batches, result.seconds * 1000)


def _refresh_session_tokens(ctx: RelayContext) -> None:
    """Keep the Web Chat sessions' tokens fresh (relay/tokens.py); its trouble never stops the polling."""
    try:
        refresh_session_tokens(ctx.store, ctx.directline, clock=ctx.clock)
    except Exception:
        log.exception("poller: the Web Chat session tokens could not be refreshed")


def _may_peek(ctx: RelayContext, item: DueConversation, now: datetime) -> bool:
    """A settled row, not yet due for its hourly full poll nor for ending as idle (a row whose token wants
    refreshing is peeked too: its token is good until it expires, past its refresh time)."""
    if not item.peekable or now - item.due_at >= FULL_POLL_EVERY:
        return False
    idle_limit = timedelta(minutes=ctx.settings.relay.idle_timeout_minutes)
    return item.last_activity_at is None or now - item.last_activity_at < idle_limit


def _wants_token_refresh(item: DueConversation, *, before: datetime) -> bool:
    """The row's token wants refreshing before its next peek at `before`: it is refreshed at this one."""
    return item.token_refresh_at is not None and item.token_refresh_at <= before


def _refresh_quiet_token(ctx: RelayContext, postponement: Postponement) -> Postponement | None:
    """Refresh the token of a conversation its peek found quiet, at the last peek before the token wants it: the row's
    token, without the lease and without touching the record. The postponing batch brings the new token into the
    row, and whoever next takes the lease brings it into the record (Conversations.acquire_lease). So a refresh costs
    no transaction but a share of a batch the row is in anyway, where a leased run costs about ten, and no Direct
    Line request but the refresh. The postponement to make, with the new token; None for the full path to deal with
    a token that expired or that Direct Line did not refresh (the worker tries once more, then lets a refused token
    go or backs off).

    A row whose conversation is worked meanwhile (its worker writes it a new row, deleting this one) loses the token
    refreshed here, and keeps its own: still good until it expires, the worker refreshes it in time."""
    item = postponement.row
    if not item.token or (item.token_expires_at is not None and ctx.clock.now() >= item.token_expires_at):
        return None
    try:
        granted = ctx.directline.refresh_token(token=item.token)
    except DirectLineError:
        return None
    telemetry.count(telemetry.TOKENS_REFRESHED, kind="conversation", outcome="refreshed")
    expires_at, refresh_at = granted.schedule(now=ctx.clock.now(), clock=ctx.clock)
    return replace(postponement, token=granted.token, token_refresh_at=refresh_at, token_expires_at=expires_at)


def _peek(ctx: RelayContext, item: DueConversation) -> Peek | None:
    """The conversation's activities after the row's watermark, read with the row's token (else the secret);
    None without either (token endpoint mode) or on any failure (the full path then deals with it: a forgotten
    conversation, a refused token, throttling, an outage)."""
    if not item.token and ctx.directline.uses_token_endpoint:
        return None
    try:
        page = ctx.directline.get_activities(item.conversation_id, watermark=item.watermark, token=item.token or None)
    except DirectLineError:
        return None
    return Peek(item.conversation_id, item.watermark, page, ctx.clock.monotonic())


def sweep(ctx: RelayContext) -> None:
    """Remove ended and long-idle conversations, old dedupe rows, expired sessions and counters."""
    idle = timedelta(minutes=ctx.settings.relay.idle_timeout_minutes) * 2
    result = sweep_tables(ctx.store, now=ctx.clock.now(), idle_after=max(idle, timedelta(days=1)))
    log.info("sweep: %s", result)
