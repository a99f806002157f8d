"""What an operator does to a running relay (`python -m relay.admin`): counts, one conversation's record,
ending a conversation, dead letters replayed or discarded, Web Chat sessions revoked.

Every change goes through the relay's own machinery and keeps its promises. A replayed user message
goes back into its conversation's outbox, in doubt, with its original clientActivityID: the relay's
next poll posts it, after looking for that id at Direct Line, so it reaches the bot once however often
the replay is run. A replayed reply (or event) is sent under the conversation's lease, so no worker
delivers in that conversation meanwhile, and the letter is marked under its ETag before anything is
sent and deleted only after the provider took it: a second replay finds nothing to send, and one that
died half-way is refused rather than repeated blindly (`force=True` sends anyway). Ending a conversation
is what the idle timer does (ConversationWorker.end). Nothing here reads or prints a token.

The counts are scans of whole tables (one request per 1000 rows read): an operator's command, never
the relay's path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from relay import telemetry
from relay.cards import PendingQuestion, next_prompt, render_activity
from relay.errors import ConcurrencyConflict, DirectLineError, ProviderRejected, ProviderUnavailable, RelayError
from relay.events import event_payload
from relay.store.conversations import ConversationKey, ConversationRecord
from relay.store.dead_letters import DeadLetter, DeadLetterKind
from relay.store.outbox import InboundState

if TYPE_CHECKING:
    from relay.channels.base import OutboundMessage
    from relay.conversations import RelayContext
    from relay.store import RelayStore

__all__ = [
    "NotFound",
    "Refused",
    "RelayStats",
    "ReplayOutcome",
    "conversation_view",
    "discard_letter",
    "end_conversation",
    "get_stats",
    "replay_letter",
    "revoke_session",
]

DUE_COUNT_LIMIT = 10_000
"""Due conversations counted at most (the due index read as the timer reads it)."""
LEASE_WAIT = timedelta(seconds=15)
"""How long an operator's change waits for a conversation the relay is working right now."""


# Raised to the operator's command line only, never an HTTP answer: so not in relay/errors.py, whose every
# class has a row in relay/http.py's table.
class NotFound(RelayError):
    """No such conversation, dead letter or Web Chat session."""


class Refused(RelayError):
    """The change cannot be made (now): the message says why, and what the operator may do."""


class ReplayOutcome(StrEnum):
    QUEUED = "queued"  # a user's message is back in its outbox: the relay's next poll posts it
    ALREADY_QUEUED = "already_queued"  # a replay queued it before: it waits in the outbox
    ALREADY_POSTED = "already_posted"  # a replay queued it before and Direct Line took it
    DELIVERED = "delivered"  # the provider (or the event webhook) took it now


@dataclass(frozen=True)
class RelayStats:
    open_conversations: int
    due_now: int
    outbox_depth: int
    oldest_waiting_seconds: float | None
    dead_letters: dict[str, int]
    live_sessions: int


def get_stats(store: RelayStore, *, now: datetime | None = None) -> RelayStats:
    """The relay's counts at `now`: scans of the conversations, inbound, dead letters and sessions tables, and the
    due index read as the timer reads it (at most DUE_COUNT_LIMIT conversations)."""
    now = now or store.clock.now()
    depth, oldest = store.outbox.get_backlog()
    return RelayStats(
        open_conversations=store.conversations.get_open_count(),
        due_now=len(store.due_polls.list_due(now=now, limit=DUE_COUNT_LIMIT)),
        outbox_depth=depth,
        oldest_waiting_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else None,  # clocks differ a bit
        dead_letters={kind.value: count for kind, count in store.dead_letters.get_counts().items()},
        live_sessions=store.sessions.get_live_count(now=now),
    )


def conversation_view(store: RelayStore, key: ConversationKey) -> dict[str, Any]:
    """One conversation's record as an operator sees it (never its token: only until when it is good), with the
    messages waiting in its outbox and its dead letters' ids. NotFound when the user has no record."""
    record = store.conversations.get_record(key, newest_token=True)  # what the relay works with
    if record is None:
        raise NotFound(f"no {key.channel} conversation with user {key.user}")
    return {
        "channel": key.channel, "user": key.user, "telemetry_tag": telemetry.conversation_tag(store, key),
        "state": record.state.value,
        "conversation_id": record.conversation_id, "directline_user_id": record.user_id,
        "token_expires_at": record.token_expires_at if record.token else None,
        "token_refresh_at": record.token_refresh_at if record.token else None,
        "watermark": record.watermark, "delivered_activities": len(record.delivered_ids),
        "last_user_activity_at": record.last_user_activity_at, "last_bot_activity_at": record.last_bot_activity_at,
        "next_poll_at": record.next_poll_at, "poll_interval_seconds": record.poll_interval,
        "peekable": record.peekable, "pending_question": record.pending_question is not None,
        "lease_owner": record.lease_owner, "lease_expires_at": record.lease_expires_at,
        "created_at": record.created_at, "updated_at": record.updated_at,
        "waiting_messages": len(store.outbox.list_messages(key)),
        "dead_letters": [letter.letter_id for letter in store.dead_letters.list_letters(key)],
    }


def end_conversation(ctx: RelayContext, key: ConversationKey) -> bool:
    """End the user's conversation as the idle timer does (the bot gets endOfConversation), under its lease; False
    when it had ended already. NotFound when the user has no record; Refused while the relay holds it longer
    than LEASE_WAIT."""
    from relay.conversations import ConversationWorker

    with _leased(ctx, key) as (record, owner):
        if not record.active:
            return False
        worker = ConversationWorker(ctx, record, owner=owner, peek=None, patient=False)
        try:
            worker.end(why="An operator ended the conversation.")
        finally:
            worker.finish()  # unscheduled (it ended) and the lease given back
    return True


def discard_letter(store: RelayStore, letter_id: str) -> DeadLetter:
    """Delete a dead letter without replaying it; the letter that went. NotFound when there is none."""
    letter = _letter(store, letter_id)
    store.dead_letters.delete_letter(replace(letter, etag=None))  # whatever a replay did to it meanwhile
    return letter


def replay_letter(store: RelayStore, letter_id: str, *, context: Callable[[], RelayContext],
                  force: bool = False) -> ReplayOutcome:
    """Send a dead letter again, once (see the module docstring), and delete it once that succeeded.

    `context` gives the relay's settings and clients; it is called only for a reply or an event (a user's message
    is replayed with the storage settings alone). NotFound when there is no such letter (or it went meanwhile: a
    concurrent replay delivered it, or it was discarded); Refused for a media
    letter (its files cannot be fetched again), when the provider or the event webhook refuses it or cannot take
    it now (the letter stays), or when an earlier replay began sending it and did not finish (`force`: send it
    anyway)."""
    letter = _letter(store, letter_id)
    if letter.kind == DeadLetterKind.INBOUND:
        return _requeue(store, letter)
    if letter.kind == DeadLetterKind.MEDIA:
        raise Refused("a media dead letter records files the provider could not give: the message itself reached "
                      "the bot, and the files cannot be fetched again. Ask the user to send them again, then "
                      "discard the letter")
    return _resend(context(), letter, force=force)


def revoke_session(store: RelayStore, conversation_id: str) -> None:
    """Revoke the Web Chat session of Direct Line conversation `conversation_id` (Web Chat sessions are keyed by
    it): its page can neither resume nor refresh any more, and the relay stops refreshing the token it holds.
    NotFound when the conversation has no session."""
    if store.sessions.get_session(conversation_id) is None:
        raise NotFound(f"no Web Chat session for Direct Line conversation {conversation_id}")
    store.sessions.revoke_session(conversation_id)


# ------------------------------------------------------------------------------------------ helpers

def _letter(store: RelayStore, letter_id: str) -> DeadLetter:
    letter = store.dead_letters.get_letter(letter_id)
    if letter is None:
        raise NotFound(f"no dead letter {letter_id}")
    return letter


def _requeue(store: RelayStore, letter: DeadLetter) -> ReplayOutcome:
    """A user's message back in its outbox, its conversation due now (as a webhook leaves it), the letter gone."""
    message_id, activity = letter.payload.get("message_id"), letter.payload.get("activity")
    if not isinstance(message_id, str) or not isinstance(activity, Mapping):
        raise Refused(f"dead letter {letter.letter_id} holds no message to post")
    store.due_polls.mark_inbound(letter.key, message_id)
    state = store.outbox.requeue_message(letter.key, message_id, activity)
    with contextlib.suppress(ConcurrencyConflict):  # a concurrent replay deleted it
        store.dead_letters.delete_letter(letter)
    return {InboundState.DEAD: ReplayOutcome.QUEUED, InboundState.PENDING: ReplayOutcome.ALREADY_QUEUED,
            InboundState.POSTED: ReplayOutcome.ALREADY_POSTED}[state]


def _resend(ctx: RelayContext, letter: DeadLetter, *, force: bool) -> ReplayOutcome:
    """A reply to the provider, or an event to the event webhook, under the conversation's lease. Everything that
    can be refused before sending is checked before the letter is marked."""
    with _leased(ctx, letter.key) as (record, owner):
        fresh = ctx.store.dead_letters.get_letter(letter.letter_id)  # under the lease: no other replay sends now
        if fresh is None:
            raise NotFound(f"dead letter {letter.letter_id} went meanwhile: another replay delivered it, or it was "
                           "discarded")
        if fresh.replay_started_at is not None and not force:
            began = f"{fresh.replay_started_at:%Y-%m-%d %H:%M:%S}"
            raise Refused(f"a replay of dead letter {letter.letter_id} began at {began} UTC and did not finish: it "
                          "may have reached its recipient. Discard the letter, or replay it with --force to send it "
                          "anyway")
        send = _event_post(ctx, record, owner, fresh) if fresh.kind == DeadLetterKind.EVENT else \
            _reply_send(ctx, record, owner, fresh)
        try:
            started = ctx.store.dead_letters.start_replay(fresh)
        except ConcurrencyConflict:
            raise Refused(f"dead letter {letter.letter_id} changed meanwhile: look at it again") from None
        try:
            send()
        except (ProviderRejected, ProviderUnavailable) as error:
            ctx.store.dead_letters.end_replay(started, parts_sent=max(error.parts_sent, fresh.parts_sent))
            how = "for good" if isinstance(error, ProviderRejected) else "now; try again later"
            raise Refused(f"the {_recipient(fresh)} did not take it {how}: {error}") from None
        ctx.store.dead_letters.delete_letter(started)
    return ReplayOutcome.DELIVERED


def _reply_send(ctx: RelayContext, record: ConversationRecord, owner: str,
                letter: DeadLetter) -> Callable[[], None]:
    """Sends the reply from its first part not yet taken, with the reply context spent as the relay spends it (a
    LINE reply token is used once, by the replay or by the relay's next reply, never both); the question it asks is
    then the one the user answers."""
    from relay.conversations import ConversationWorker

    message, question = _reply_of(letter)
    adapter = ctx.adapter(letter.key.channel)  # ChannelDisabled now, when the provider's settings are missing

    def send() -> None:
        worker = ConversationWorker(ctx, record, owner=owner, peek=None, patient=False)
        adapter.send(worker.delivery.spend_reply_context(adapter), message, first_part=letter.parts_sent)
        if question is not None:
            asked = question.to_json()
            ctx.store.conversations.update_record(letter.key, lambda r: r and replace(r, pending_question=asked),
                                                  lease_owner=owner)

    return send


def _reply_of(letter: DeadLetter) -> tuple[OutboundMessage, PendingQuestion | None]:
    """The message a reply letter holds (a bot's activity, or a question's prompt), and the question it asks."""
    if isinstance(letter.payload.get("activity"), Mapping):
        activity = letter.payload["activity"]
        rendering = render_activity(activity)
        if rendering is not None:
            return replace(rendering.message, idempotency_key=activity.get("id") or ""), rendering.question
    question = PendingQuestion.from_json(letter.payload.get("question"))
    if question is not None:
        return next_prompt(question), None
    raise Refused(f"dead letter {letter.letter_id} holds nothing the user can be sent")


def _event_post(ctx: RelayContext, record: ConversationRecord, owner: str,
                letter: DeadLetter) -> Callable[[], None]:
    """POSTs the bot's event to RELAY_EVENT_WEBHOOK_URL again, with the transcript Direct Line still has (none when
    it cannot be read), under the webhook-id of the first attempt: the receiver can tell it is the same event."""
    from relay.conversations import ConversationWorker

    if not ctx.events.configured:
        raise Refused("RELAY_EVENT_WEBHOOK_URL is not set: there is nowhere to send the event")
    activity = letter.payload.get("activity")
    if not isinstance(activity, Mapping):
        raise Refused(f"dead letter {letter.letter_id} holds no event")
    activity_id = str(activity.get("id") or "")

    def post() -> None:
        transcript: list[dict] = []
        if record.conversation_id:
            worker = ConversationWorker(ctx, record, owner=owner, peek=None, patient=False)
            with contextlib.suppress(DirectLineError):  # forgotten, or out of reach: the event goes without one
                transcript = worker.delivery.transcript(activity_id)
        ctx.events.send(event_payload(activity, conversation_id=record.conversation_id, channel=letter.key.channel,
                                      user=letter.key.user, directline_user=record.user_id, transcript=transcript,
                                      now=ctx.clock.now().isoformat()), activity_id=activity_id)

    return post


def _recipient(letter: DeadLetter) -> str:
    return "event webhook" if letter.kind == DeadLetterKind.EVENT else f"{letter.key.channel} provider"


@contextlib.contextmanager
def _leased(ctx: RelayContext, key: ConversationKey) -> Iterator[tuple[ConversationRecord, str]]:
    """The conversation's record under a lease of the operator's own (waiting up to LEASE_WAIT for the relay to give
    it back), released at the end. NotFound when the user has no record."""
    from relay.conversations import new_owner

    owner, deadline = new_owner("admin"), ctx.clock.monotonic() + LEASE_WAIT.total_seconds()
    while True:
        if ctx.store.conversations.get_record(key) is None:
            raise NotFound(f"no {key.channel} conversation with user {key.user}")
        record = ctx.store.conversations.acquire_lease(key, owner=owner, lease_seconds=ctx.settings.relay.lease_seconds,
                                                       token_lookahead=ctx.token_lookahead)
        if record is not None:
            break
        if ctx.clock.monotonic() >= deadline:
            raise Refused(f"the relay has been working this {key.channel} conversation for over "
                          f"{LEASE_WAIT.total_seconds():.0f} s: try again in a minute")
        ctx.clock.sleep(0.5)
    try:
        yield record, owner
    finally:
        with contextlib.suppress(ConcurrencyConflict):  # it keeps changing: the lease then expires on its own
            ctx.store.conversations.release_lease(record, owner=owner)
