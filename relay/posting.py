"""Inbound: the outbox of one leased conversation posted to Direct Line, in order, with the user's media.

A message leaves the outbox only once Direct Line took it (or refused it for good: a dead letter);
a post that may have arrived although it failed is looked up by its clientActivityID before it is
posted again, so the bot gets each message once. A post answered without an id (204) was taken.

A message is posted only with a live token of the conversation, never with the secret. When the
conversation has none any more (its tokens lapsed, or Direct Line refused the one it had), the
message goes to a new conversation for the same user, once what the bot still had to say in the old
one was delivered (read with the secret), so no reply is lost and the order holds; so does a message
for a conversation Direct Line forgot. Neither is a dead letter. (In token endpoint mode there is no
secret: a conversation whose token lapsed was already left, see relay/conversations.py, and the
message simply starts a new one.)

Webhooks only append (outbox rows, and inbound rows in the due index); what a message changes in
the conversation record is applied here, under the lease, as each page of the outbox is read: an
ended conversation starts anew, the replies go where the newest message asks, the user's last
activity moves on. A message's inbound row is removed only after the worker saw the message and
scheduled the record after it (`clear_inbound`), so a message is never without something due.

A message that answers the question the bot last asked (the record's `pending_question`, see
relay/cards.py) is posted carrying the `value` the bot expects; one that answers only one of a card's
several inputs is not posted at all (it leaves the outbox as handled, and the next input is asked).
What is left of the question is saved once the message was posted (or taken): a failed post is
answered the same way when it is tried again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from relay import telemetry
from relay.activities import take_pending_media, with_unavailable_media
from relay.cards import PendingQuestion, answer
from relay.channels.base import Media
from relay.directline import UploadFile
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
    TokenExpired,
)
from relay.store.conversations import ConversationRecord, ConversationState
from relay.store.dead_letters import DeadLetterKind
from relay.store.due_polls import InboundMark
from relay.store.outbox import InboundState, OutboxMessage

if TYPE_CHECKING:
    from relay.conversations import ConversationWorker

__all__ = ["OutboxPoster"]

log = logging.getLogger(__name__)

UPLOAD_LIMIT_BYTES = 4_000_000
"""All of one message's fetched media together: under Direct Line's upload limit (4 MiB in the emulator; the
service publishes none), leaving room for the activity part."""
MEDIA_ATTEMPTS = 8
"""Attempts of a message (about 10 minutes with the outbox's backoff) before a media file the provider
cannot give is left out, so the text reaches the bot and the user's later messages are not held up."""
PAGE = 50
"""Outbox messages read at a time; the outbox is read again until it is empty."""
ORPHANED_AFTER = timedelta(minutes=5)
"""An inbound row whose message was never stored is this old before it is removed: longer than any webhook
can run (the platform ends an HTTP invocation after 230 s), so its webhook died between its two writes."""


def _with_arrivals(record: ConversationRecord, messages: Sequence[OutboxMessage]) -> ConversationRecord:
    """`record` after the user's `messages` (oldest first) arrived.

    An ended conversation starts anew (the bot or the idle timer ended it: these messages open the
    next one); replies go where the newest message that says so asks; the user's last activity is
    the newest arrival. Not peekable: messages wait."""
    if not record.active:
        record = replace(record.without_token(), state=ConversationState.ACTIVE, conversation_id="", watermark=None)
    reply_context = next((m.reply_context for m in reversed(messages) if m.reply_context), None)
    arrived = max(m.received_at for m in messages)
    last = max(record.last_user_activity_at, arrived) if record.last_user_activity_at else arrived
    return replace(record, reply_context=dict(reply_context) if reply_context else record.reply_context,
                   last_user_activity_at=last, peekable=False)


class OutboxPoster:
    """Posts the worker's outbox to Direct Line, starting the Direct Line conversation when there is none."""

    def __init__(self, worker: ConversationWorker):
        self.worker = worker
        self.ctx = worker.ctx
        self.seen: set[str] = set()  # provider message ids read from the outbox by this worker
        self.waiting = False  # messages read from the outbox wait to be posted
        self._page: list[OutboxMessage] | None = None
        self._in_hand: OutboxMessage | None = None  # the message being posted (the oldest that waits)

    @property
    def oldest_waiting(self) -> datetime | None:
        """When the oldest message read from the outbox and not yet posted was received (None: none is known)."""
        if self._in_hand is not None:
            return self._in_hand.received_at
        return self._page[0].received_at if self._page else None

    def take_arrivals(self) -> None:
        """Read the first page of the outbox and bring the record up to date with it (before anything else)."""
        self._page = self._next_page()

    def drain(self) -> bool:
        """Post the waiting user messages in order until the outbox is empty; False when one must wait
        (Direct Line unavailable)."""
        while True:
            page = self._page if self._page is not None else self._next_page()
            self._page = None
            if not self._post_page(page):
                return False
            if len(page) < PAGE:
                self.waiting = False
                return True

    def clear_inbound(self, marks: Sequence[InboundMark]) -> None:
        """Remove the inbound rows whose message needs no more nudging; call only once the record is scheduled.

        That is a message this worker saw (posted, or scheduled to be retried), any while messages wait
        (the retry reads the whole outbox), one handled meanwhile, or one never stored whose webhook must
        be dead. Otherwise a message stored after this worker read the outbox keeps its row: the next
        worker will see it."""
        outbox, now = self.ctx.store.outbox, self.ctx.clock.now()
        done = []
        for mark in marks:
            if mark.message_id in self.seen or self.waiting:
                # Seen, or messages wait: then the record is due for a retry, and that worker reads the whole
                # outbox (past its first page too), on the backoff rather than on every tick.
                done.append(mark)
                continue
            try:
                state = outbox.message_state(self.worker.key, mark.message_id)
            except StoreError:
                continue  # kept: the next worker looks again
            handled = state is not None and state != InboundState.PENDING
            if handled or (state is None and now - mark.marked_at > ORPHANED_AFTER):
                done.append(mark)
        if done:
            self.ctx.store.due_polls.clear_inbound(done)

    def _next_page(self) -> list[OutboxMessage]:
        page = self.ctx.store.outbox.list_messages(self.worker.key, limit=PAGE)
        arrived = [m for m in page if m.message_id not in self.seen]
        if arrived:
            self.worker.save(lambda r: _with_arrivals(r, arrived))
            self.seen.update(m.message_id for m in arrived)
        self.waiting = bool(page)
        return page

    def _post_page(self, page: list[OutboxMessage]) -> bool:
        for message in page:
            self._in_hand = message
            if not self.worker.record.conversation_id:
                self.worker.start_directline(locale=message.activity.get("locale"))
            asked = self.worker.record.pending_question
            answered = answer(PendingQuestion.from_json(asked), message.activity, message_id=message.message_id)
            if answered.activity is None:
                # It answered one of a card's inputs (or is asked again): remembered, and the next prompt is due.
                self._remember(asked, answered.question)
                self.ctx.store.outbox.complete_message(message, activity_id=None)
                continue
            client_id = (message.activity.get("channelData") or {}).get("clientActivityID", "")
            if message.in_doubt:
                # An earlier post may have arrived although it failed: look before posting again.
                found = self._find_posted(client_id)
                if found is not None:
                    self._remember(asked, answered.question)
                    self.ctx.store.outbox.complete_message(message, activity_id=found.get("id"))
                    self._posted(message)
                    continue
            try:
                message = self.ctx.store.outbox.mark_post_attempt(message)
            except ConcurrencyConflict:
                return False  # someone else is posting it; they keep the order
            try:
                activity, files, missing = self._with_media(message, answered.activity)
            except ProviderUnavailable as error:
                # Nothing was posted: the download is tried again later, as a post is after a Direct Line outage.
                self.ctx.store.outbox.release_message(message, error=f"media: {error}", in_doubt=False)
                telemetry.count(telemetry.MESSAGES_POSTED, channel=self.worker.key.channel, outcome="retry")
                self.worker.wait(error.retry_after, attempts=message.attempts)
                log.info("a %s message waits in the outbox for its media (%s, attempt %d)", self.worker.key.channel,
                         error.reason, message.attempts)
                return False
            try:
                with telemetry.span("relay.post", channel=self.worker.key.channel, conversation=self.worker.tag):
                    activity_id = self._post(activity, files)
            except BadRequest as error:
                self.ctx.store.outbox.dead_letter_message(message, reason=f"Direct Line refused the message: {error}")
                telemetry.count(telemetry.MESSAGES_POSTED, channel=self.worker.key.channel, outcome="dead_letter")
                self.worker.result.dead_letters += 1
                continue
            except DirectLineError as error:
                self.ctx.store.outbox.release_message(message, error=str(error), in_doubt=error.ambiguous)
                telemetry.count(telemetry.MESSAGES_POSTED, channel=self.worker.key.channel, outcome="retry")
                self.worker.wait(getattr(error, "retry_after", None), attempts=message.attempts)
                log.info("a %s message waits in the outbox (%s, attempt %d)", self.worker.key.channel,
                         error, message.attempts)
                return False
            self._remember(asked, answered.question)
            self.ctx.store.outbox.complete_message(message, activity_id=activity_id)
            self._posted(message)
            if missing:
                self._dead_letter_media(message, missing)
        self._in_hand = None
        return True

    def _posted(self, message: OutboxMessage) -> None:
        """Count a message Direct Line took, and how long it waited in the outbox."""
        self.worker.result.posted += 1
        telemetry.count(telemetry.MESSAGES_POSTED, channel=self.worker.key.channel, outcome="posted")
        telemetry.record(telemetry.OUTBOX_AGE, (self.ctx.clock.now() - message.received_at).total_seconds(),
                         channel=self.worker.key.channel)

    def _remember(self, asked: Mapping[str, Any] | None, question: PendingQuestion | None) -> None:
        """Store what is left of the question `asked` once a user message answered it (or went past it)."""
        left = question.to_json() if question else None
        if left != asked:
            self.worker.save(lambda r: replace(r, pending_question=left) if r.pending_question == asked else r)

    def _find_posted(self, client_id: str) -> dict[str, Any] | None:
        """The activity an earlier post with this clientActivityID left at Direct Line, or None.

        None too when Direct Line forgot the conversation (or it cannot be read any more): whatever the
        earlier post left there is gone with it, and the message is posted to a new conversation."""
        try:
            return self.worker.call(lambda token: self.ctx.directline.find_activity_by_client_id(
                self.worker.record.conversation_id, client_id, token=token))
        except ConversationNotFound:
            log.info("Direct Line forgot conversation %s while a %s message was in doubt there; it goes to a new one",
                     self.worker.record.conversation_id, self.worker.key.channel)
            return None

    def _with_media(self, message: OutboxMessage, answered: Mapping[str, Any]) -> tuple[
            dict, list[UploadFile], list[tuple[Media, ProviderError]]]:
        """The activity to post (`answered`: the message's, carrying the answer to a question), the user's
        protected media fetched to upload with it, and those that could not be.

        A file the provider refuses for good (gone, too large) is left out and named in channelData, so
        the text still reaches the bot; one it cannot give now (ProviderUnavailable) holds the message
        back to be tried again, for MEDIA_ATTEMPTS attempts. Any other failure (a URL the adapter cannot
        read) is that medium not fetched: no message may block every later one of its user."""
        activity, pending = take_pending_media(answered)
        files: list[UploadFile] = []
        missing: list[tuple[Media, ProviderError]] = []
        room = UPLOAD_LIMIT_BYTES
        for media in pending:
            try:
                fetched = self.ctx.adapter(self.worker.key.channel).fetch_media(media, max_bytes=room)
            except ProviderRejected as error:
                missing.append((media, error))
                continue
            except ProviderUnavailable as error:
                if message.attempts < MEDIA_ATTEMPTS:
                    raise
                missing.append((media, error))
                continue
            except Exception as error:  # one medium, whatever broke, never holds the outbox back
                log.warning("a %s medium could not be fetched (%s): the message goes without it",
                            self.worker.key.channel, type(error).__name__)
                missing.append((media, ProviderRejected(f"the medium could not be fetched ({type(error).__name__})",
                                                        reason="MediaNotFetched")))
                continue
            room -= len(fetched.content)
            files.append(UploadFile(fetched.name, fetched.content, fetched.content_type))
        if missing:
            activity = with_unavailable_media(activity, [(media, error.reason) for media, error in missing])
        return activity, files, missing

    def _dead_letter_media(self, message: OutboxMessage, missing: list[tuple[Media, ProviderError]]) -> None:
        """Keep a record of the files the bot did not get; the message itself was posted."""
        reason = "; ".join(f"{error.reason}: {error}" for _, error in missing)
        try:
            self.ctx.store.dead_letters.add_letter(self.worker.key, kind=DeadLetterKind.MEDIA, reason=reason, payload={
                "message_id": message.message_id, "media": [{"url": m.url, "contentType": m.content_type}
                                                            for m, _ in missing]})
        except StoreError as error:
            log.warning("could not record a %s media dead letter (%s)", self.worker.key.channel, error)
        self.worker.result.dead_letters += 1

    def _post(self, activity: dict, files: list[UploadFile]) -> str | None:
        """Post the activity, or upload it with its files as one message: the same clientActivityID either way.

        Returns Direct Line's id for it (None when it gave none). A conversation Direct Line forgot, or
        one without a live token, is replaced by a new one and the message posted there."""
        def send(token: str) -> str | None:
            record = self.worker.record
            # The conversation's user, whatever id the webhook computed (a conversation keeps the id it began with).
            as_user = {**activity, "from": {**(activity.get("from") or {}), "id": record.user_id}} if record.user_id \
                else activity
            if files:
                return self.ctx.directline.upload(record.conversation_id, files, user_id=record.user_id,
                                                  activity=as_user, token=token)
            return self.ctx.directline.post_activity(record.conversation_id, as_user, token=token)

        try:
            return self.worker.call_as_user(send)
        except ConversationNotFound:
            # Direct Line forgot the conversation: this user gets a new one, the message goes there.
            log.info("Direct Line forgot conversation %s; starting a new one", self.worker.record.conversation_id)
            self.worker.start_directline(locale=activity.get("locale"))
        except (TokenExpired, AuthenticationFailed):
            if not self._leave_lapsed_conversation(locale=activity.get("locale")):
                raise  # the bot's last replies there must reach the user first: the message waits
        return self.worker.call_as_user(send)

    def _leave_lapsed_conversation(self, *, locale: str | None) -> bool:
        """Move the user to a new Direct Line conversation, theirs having no token that can be used or renewed.

        The bot's replies still unread in the old one are delivered first (read with the secret); False
        when they cannot all be now (the provider asked to wait): the user's message must wait for them."""
        lapsed = self.worker.record.conversation_id
        if not self.worker.delivery.deliver_rest():
            return False
        self.worker.start_directline(locale=locale)
        log.info("the %s user's messages go to Direct Line conversation %s: no token of %s could be used or renewed",
                 self.worker.key.channel, self.worker.record.conversation_id, lapsed)
        return True
