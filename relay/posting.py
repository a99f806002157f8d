"""Inbound: the outbox of one leased conversation posted to Direct Line, in order, with the user's media.

A message leaves the outbox only once Direct Line took it (or refused it for good: a dead letter);
a post that may have arrived although it failed is looked up by its clientActivityID before it is
posted again, so the bot gets each message once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from relay.activities import take_pending_media, with_unavailable_media
from relay.channels.base import Media
from relay.directline import UploadFile
from relay.errors import (
    BadRequest,
    ConcurrencyConflict,
    ConversationNotFound,
    DirectLineError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    StoreError,
)
from relay.store.dead_letters import DeadLetterKind
from relay.store.outbox import OutboxMessage

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


class OutboxPoster:
    """Posts the worker's outbox to Direct Line, starting the Direct Line conversation when there is none."""

    def __init__(self, worker: ConversationWorker):
        self.worker = worker
        self.ctx = worker.ctx

    def drain(self) -> bool:
        """Post the waiting user messages in order; False when one must wait (Direct Line unavailable)."""
        for message in self.ctx.store.outbox.list_messages(self.worker.key):
            if not self.worker.record.conversation_id:
                self.worker.start_directline()
            client_id = (message.activity.get("channelData") or {}).get("clientActivityID", "")
            if message.in_doubt:
                # An earlier post may have arrived although it failed: look before posting again.
                found = self._find_posted(client_id)
                if found is not None:
                    self.ctx.store.outbox.complete_message(message, activity_id=found.get("id", ""))
                    self.worker.result.posted += 1
                    continue
            try:
                message = self.ctx.store.outbox.mark_post_attempt(message)
            except ConcurrencyConflict:
                return False  # someone else is posting it; they keep the order
            try:
                activity, files, missing = self._with_media(message)
            except ProviderUnavailable as error:
                # Nothing was posted: the download is tried again later, as a post is after a Direct Line outage.
                self.ctx.store.outbox.release_message(message, error=f"media: {error}", in_doubt=False)
                self.worker.wait(error.retry_after, attempts=message.attempts)
                log.info("a %s message waits in the outbox for its media (%s, attempt %d)", self.worker.key.channel,
                         error.reason, message.attempts)
                return False
            try:
                activity_id = self._post(activity, files)
            except BadRequest as error:
                self.ctx.store.outbox.dead_letter_message(message, reason=f"Direct Line refused the message: {error}")
                self.worker.result.dead_letters += 1
                continue
            except DirectLineError as error:
                self.ctx.store.outbox.release_message(message, error=str(error), in_doubt=error.ambiguous)
                self.worker.wait(getattr(error, "retry_after", None), attempts=message.attempts)
                log.info("a %s message waits in the outbox (%s, attempt %d)", self.worker.key.channel,
                         error, message.attempts)
                return False
            self.ctx.store.outbox.complete_message(message, activity_id=activity_id)
            self.worker.result.posted += 1
            if missing:
                self._dead_letter_media(message, missing)
        return True

    def _find_posted(self, client_id: str) -> dict[str, Any] | None:
        """The activity an earlier post with this clientActivityID left at Direct Line, or None."""
        return self.worker.call(lambda token: self.ctx.directline.find_activity_by_client_id(
            self.worker.record.conversation_id, client_id, token=token))

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
                fetched = self.ctx.adapter(self.worker.key.channel).fetch_media(media, max_bytes=room)
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

    def _post(self, activity: dict, files: list[UploadFile]) -> str:
        """Post the activity, or upload it with its files as one message: the same clientActivityID either way."""
        def send(token: str | None) -> str:
            record = self.worker.record
            if files:
                return self.ctx.directline.upload(record.conversation_id, files, user_id=record.user_id,
                                                  activity=activity, token=token)
            return self.ctx.directline.post_activity(record.conversation_id, activity, token=token)

        try:
            return self.worker.call(send)
        except ConversationNotFound:
            # Direct Line forgot the conversation: this user gets a new one, the message goes there.
            log.info("Direct Line forgot conversation %s; starting a new one", self.worker.record.conversation_id)
            self.worker.start_directline()
            return self.worker.call(send)
