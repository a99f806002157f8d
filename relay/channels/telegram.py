"""Telegram Bot API: updates pushed to the webhook, replies and files through the bot token.

Telegram signs nothing. The webhook is registered (setWebhook, `python -m relay.channels.telegram_webhook
set-webhook`) with a `secret_token`, and every update carries it back in
X-Telegram-Bot-Api-Secret-Token: that header, compared in constant time, is the only proof an update
is Telegram's. The dedupe key is the body's `update_id`, which Telegram keeps the same when it
retries a webhook that did not answer 2xx; only a body that came with the secret is read at all.
A message older than the relay's dedupe memory (`message.date` before DEDUPE_RETENTION) is
acknowledged and logged, not relayed, as WhatsApp's are (Telegram itself gives up after 24 hours).

Only private chats are relayed (as LINE relays only one-on-one chats): the bot talks to each user as to
one person, and in a group every reply would be shown to all its members, a user's private answers
too, while anyone can add the bot to a group. A group's messages and taps are acknowledged, not
relayed. The chat (`message.chat.id`) is where replies go and the conversation's user: in a private
chat it is the user's own id (`from.id`).

A question's choices go out as an inline keyboard whose `callback_data` is the choice's id
(relay/cards.py: a few ASCII characters, well inside Telegram's 1-64 bytes; the pending question maps
it back to the value the bot expects). A tap arrives as a `callback_query`: relayed with the tapped
button's text and its data as `InboundMessage.reply_id`, and answered (answerCallbackQuery, which
stops the spinner on the user's button) before the first reply to it is sent, once: `spend` drops the
query's id from the reply context, and the relay stores that before it sends.

Photos arrive as sizes of one picture: the largest is relayed, `protected`, as a getFile URL without
the token; `fetch_media` asks getFile for the file's path and downloads it from
`{api}/file/bot<token>/<path>`. That URL holds the token: it is built where it is fetched, and never
logged, stored or put in an error. Every API URL holds it too (`/bot<token>/<method>`): urllib3 logs
request lines at DEBUG, so its logger masks the token (`/bot[token]/`) in every record.
"""

from __future__ import annotations

import logging
import mimetypes
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import requests

from relay.channels.base import (
    Choice,
    InboundMessage,
    Media,
    MediaContent,
    OutboundMessage,
    WebhookRequest,
)
from relay.channels.common import (
    AdapterBase,
    call_provider,
    download,
    finite_number,
    identifier,
    json_body,
    message_text,
    require_header,
    response_json,
    same,
    send_parts,
    split_text,
)
from relay.errors import BadPayload, ProviderError, ProviderRejected, SettingsError, SignatureInvalid
from relay.formatting import ChannelKind, format_for

__all__ = [
    "ALLOWED_UPDATES",
    "CALLBACK_DATA_LIMIT",
    "KEYBOARD_LIMIT",
    "TEXT_LIMIT",
    "WEBHOOK_HEADER",
    "TelegramAdapter",
    "webhook_url",
]

WEBHOOK_HEADER = "X-Telegram-Bot-Api-Secret-Token"
TEXT_LIMIT = 4096
"""Characters of one sendMessage text (after entities are parsed)."""
CALLBACK_DATA_LIMIT = 64
"""Bytes of an inline keyboard button's callback_data (1-64)."""
KEYBOARD_LIMIT = 100
"""Buttons offered in one inline keyboard; a longer question is asked as numbered lines."""
CHOOSE_PROMPT = "Choose one:"
ALLOWED_UPDATES = ("message", "callback_query")
"""The updates the webhook is registered for: what the adapter relays."""
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
_TOKEN_IN_PATH = re.compile(r"/(file/)?bot[^/\s]+/")

log = logging.getLogger(__name__)


class _TokenMask(logging.Filter):
    """Masks a bot token in the URL path of a log record's arguments (urllib3's DEBUG request lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_PATH.sub(lambda m: f"/{m.group(1) or ''}bot[token]/", arg)
                                if isinstance(arg, str) else arg for arg in record.args)
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_TokenMask())


def _retry_after(response: requests.Response) -> float | None:
    """Telegram's flood control says how long to wait in the error body (parameters.retry_after)."""
    wait = (response_json(response).get("parameters") or {}).get("retry_after")
    return float(wait) if finite_number(wait) and wait >= 0 else None


def _name(user: Mapping[str, Any]) -> str | None:
    full = " ".join(str(user[k]) for k in ("first_name", "last_name") if isinstance(user.get(k), str) and user[k])
    return full or identifier(user.get("username"))


def _largest(sizes: Sequence[Any]) -> Mapping[str, Any]:
    """The biggest of a photo's sizes (Telegram lists them smallest first, but says so nowhere)."""
    found = [s for s in sizes if isinstance(s, dict) and identifier(s.get("file_id"))]
    if not found:
        return {}

    def area(size: Mapping[str, Any]) -> float:
        width, height = size.get("width"), size.get("height")
        return width * height if finite_number(width) and finite_number(height) else 0

    return max(found, key=lambda s: (area(s), s.get("file_size") if finite_number(s.get("file_size")) else 0))


def _tapped_title(message: Any, data: str) -> str | None:
    """The text of the inline keyboard button of `message` whose callback_data is `data`."""
    keyboard = ((message or {}).get("reply_markup") or {}).get("inline_keyboard") if isinstance(message, dict) \
        else None
    for row in keyboard if isinstance(keyboard, list) else []:
        for button in row if isinstance(row, list) else []:
            if isinstance(button, dict) and button.get("callback_data") == data and isinstance(button.get("text"), str):
                return button["text"]
    return None


class TelegramAdapter(AdapterBase):
    name = "telegram"

    def __init__(self, config: Mapping[str, str], **options):
        super().__init__(config, **options)
        self._secret = self._setting("TELEGRAM_WEBHOOK_SECRET", required=True)
        if not _SECRET.fullmatch(self._secret):
            raise SettingsError("TELEGRAM_WEBHOOK_SECRET must be 1-256 characters of A-Z, a-z, 0-9, _ and -: "
                                "Telegram refuses any other secret_token")
        self._token = self._setting("TELEGRAM_BOT_TOKEN", required=True, why="to send replies")
        self.api_base = (self._setting("TELEGRAM_API_BASE") or "https://api.telegram.org").rstrip("/")

    # -- webhooks -------------------------------------------------------------------------------
    def verify(self, request: WebhookRequest) -> None:
        self.check_size(request)
        if not same(self._secret, require_header(request, WEBHOOK_HEADER)):
            raise SignatureInvalid(f"the {WEBHOOK_HEADER} does not match TELEGRAM_WEBHOOK_SECRET")

    def parse(self, request: WebhookRequest) -> list[InboundMessage]:
        update = json_body(request)
        update_id = identifier(update.get("update_id")) if isinstance(update, dict) else None
        if update_id is None:
            raise BadPayload("the Telegram update has no update_id")
        if isinstance(update.get("message"), dict):
            found = self._message(update_id, update["message"])
        elif isinstance(update.get("callback_query"), dict):
            found = self._tap(update_id, update["callback_query"])
        else:
            return []  # edits, channel posts, member updates: acknowledged, not relayed
        return [found] if found else []

    @staticmethod
    def _private_chat(chat: Any) -> str | None:
        """The id of the private chat an update comes from, None for a group's, a supergroup's or a channel's
        (acknowledged, not relayed: a reply there is shown to every member); BadPayload without a chat."""
        chat_id = identifier(chat.get("id")) if isinstance(chat, dict) else None
        if chat_id is None:
            raise BadPayload("the Telegram update has no chat id")
        if chat.get("type") != "private":
            log.info("a Telegram update from a %s chat was acknowledged, not relayed: only private chats are",
                     str(chat.get("type"))[:20])
            return None
        return chat_id

    def _message(self, update_id: str, message: dict[str, Any]) -> InboundMessage | None:
        chat_id = self._private_chat(message.get("chat"))
        if chat_id is None:
            return None
        user = message["from"] if isinstance(message.get("from"), dict) else {}
        sent = message.get("date")
        if finite_number(sent) and self.outlived_dedupe(int(sent)):
            log.warning("Telegram update %s (sent at %d, Unix time) is older than the relay's dedupe memory: "
                        "acknowledged, not relayed", update_id, sent)
            return None
        media: tuple[Media, ...] = ()
        if isinstance(message.get("photo"), list):
            photo = _largest(message["photo"])
            if not photo:
                raise BadPayload(f"Telegram update {update_id} has a photo without a file_id")
            media = (self._file(str(photo["file_id"]), "image/jpeg", None),)
        elif isinstance(message.get("document"), dict) and identifier(message["document"].get("file_id")):
            document = message["document"]
            media = (self._file(str(document["file_id"]), identifier(document.get("mime_type")),
                                identifier(document.get("file_name"))),)
        text = message.get("text") if isinstance(message.get("text"), str) else message.get("caption")
        if not media and not isinstance(text, str):
            return None  # stickers, locations, service messages: nothing for the bot
        return InboundMessage(
            message_id=update_id,
            user_id=chat_id,
            text=text if isinstance(text, str) else "",
            user_name=_name(user),
            media=media,
            locale=identifier(user.get("language_code")),
            reply_context={"chat_id": chat_id},
            raw={"message": message},
        )

    def _tap(self, update_id: str, query: dict[str, Any]) -> InboundMessage | None:
        query_id, data = identifier(query.get("id")), query.get("data")
        if query_id is None:
            raise BadPayload(f"Telegram update {update_id} has a callback_query without an id")
        if not isinstance(data, str) or not data:
            return None  # a game's button: nothing the relay offered
        message = query.get("message")
        if not isinstance(message, dict):
            return None  # a button on a message sent in inline mode: not one the relay sent
        chat_id = self._private_chat(message.get("chat"))
        if chat_id is None:
            return None
        user: dict[str, Any] = query["from"] if isinstance(query.get("from"), dict) else {}
        return InboundMessage(
            message_id=update_id,
            user_id=chat_id,
            text=_tapped_title(message, data) or data,
            user_name=_name(user),
            locale=identifier(user.get("language_code")),
            reply_id=data,
            reply_context={"chat_id": chat_id, "callback_query_id": query_id},
            raw={"callback_query": query},
        )

    def _file(self, file_id: str, content_type: str | None, name: str | None) -> Media:
        """A user's file as the relay keeps it: the getFile call that finds it, without the token it needs."""
        return Media(url=f"{self.api_base}/getFile?file_id={quote(file_id, safe='')}", content_type=content_type,
                     name=name, protected=True)

    # -- the Bot API ----------------------------------------------------------------------------
    def _call(self, method: str, payload: Mapping[str, Any]) -> Any:
        """One Bot API method's `result`; ProviderRejected / ProviderUnavailable as call_provider raises them."""
        response = call_provider(self.session, self.name, "POST", f"{self.api_base}/bot{self._token}/{method}",
                                 json=dict(payload), clock=self.clock, retry_after_in_body=_retry_after)
        return response_json(response).get("result")

    def fetch_media(self, media: Media, *, max_bytes: int) -> MediaContent:
        """getFile for the file's path and size, then its bytes from the file URL (which holds the token)."""
        parts = urlsplit(media.url)
        file_id = (parse_qs(parts.query).get("file_id") or [""])[0]
        if not media.url.startswith(f"{self.api_base}/getFile?") or not file_id:
            raise ProviderRejected("the media is not a Telegram file of this bot", reason="MediaNotFound")
        found = self._call("getFile", {"file_id": file_id})
        found = found if isinstance(found, dict) else {}
        size, path = found.get("file_size"), found.get("file_path")
        if finite_number(size) and size > max_bytes:
            raise ProviderRejected(f"the Telegram file has {size:g} bytes, over the {max_bytes} the relay forwards",
                                   reason="MediaTooLarge")
        if not isinstance(path, str) or not path or ".." in path.split("/"):
            raise ProviderRejected("Telegram gave no path to download the file", reason="MediaNotFound")
        content, served = download(self.session, self.name, f"{self.api_base}/file/bot{self._token}/{path}",
                                   max_bytes=max_bytes, clock=self.clock)
        guessed = mimetypes.guess_type(path)[0]
        content_type = media.content_type or (served if served not in ("", "application/octet-stream") else guessed) \
            or "application/octet-stream"
        return MediaContent(content, content_type, media.name or path.rsplit("/", 1)[-1])

    def spend(self, reply_context: Mapping[str, str]) -> Mapping[str, str]:
        """A tap is answered once, with the first reply to it: later ones go without its query id."""
        return {k: v for k, v in reply_context.items() if k != "callback_query_id"}

    def send(self, reply_context: Mapping[str, str], message: OutboundMessage, *, first_part: int = 0) -> list[str]:
        chat_id = reply_context.get("chat_id")
        if not chat_id:
            raise ProviderRejected("the Telegram reply context needs 'chat_id'")
        if reply_context.get("callback_query_id") and first_part == 0:
            self._answer_tap(str(reply_context["callback_query_id"]))
        calls = self._calls(message)
        return send_parts(calls, lambda call: self._send_one(chat_id, *call), first_part=first_part)

    def _answer_tap(self, query_id: str) -> None:
        """Stop the spinner on the button the user tapped. A query too old (or answered before) is refused by
        Telegram: the reply goes out all the same."""
        try:
            self._call("answerCallbackQuery", {"callback_query_id": query_id})
        except ProviderError as error:
            log.info("a Telegram button tap was not answered (%s); the reply is sent all the same", error)

    def _calls(self, message: OutboundMessage) -> list[tuple[str, dict[str, Any]]]:
        """The Bot API calls of one reply: its media, then its text, a question's choices as an inline keyboard
        on the last text (numbered in the text when they do not fit one, or several may be chosen). Text as
        parse_mode HTML when it fits one message, else as plain pieces (a cut could split a tag)."""
        calls: list[tuple[str, dict[str, Any]]] = [
            ("sendPhoto", {"photo": m.url}) if (m.content_type or "").startswith("image/")
            else ("sendDocument", {"document": m.url}) for m in message.media]
        keyboard = self._keyboard(message.choices) if message.choices and not message.multiple else None
        text = message.text if keyboard else message_text(message)
        if keyboard and not text.strip():
            text = CHOOSE_PROMPT
        if not text:
            return calls
        shown = format_for(ChannelKind.TELEGRAM_HTML, text)
        texts: list[dict[str, Any]]
        if len(shown) <= TEXT_LIMIT:
            texts = [{"text": shown, "parse_mode": "HTML"}]
        else:
            texts = [{"text": piece} for piece in split_text(format_for(ChannelKind.PLAIN, text), TEXT_LIMIT)]
        if keyboard:
            texts[-1]["reply_markup"] = keyboard
        return calls + [("sendMessage", body) for body in texts]

    @staticmethod
    def _keyboard(choices: tuple[Choice, ...]) -> dict[str, Any] | None:
        """One button a row, each choice's id as its callback_data; None when the choices do not fit."""
        if len(choices) > KEYBOARD_LIMIT or not all(
                c.title.strip() and 0 < len(c.id.encode()) <= CALLBACK_DATA_LIMIT for c in choices):
            return None
        return {"inline_keyboard": [[{"text": c.title.strip(), "callback_data": c.id}] for c in choices]}

    def _send_one(self, chat_id: str, method: str, body: dict[str, Any]) -> str:
        sent = self._call(method, {"chat_id": chat_id, **body})
        return str(sent.get("message_id", "")) if isinstance(sent, dict) else ""

    def set_webhook(self, url: str) -> None:
        """Register `url` for this bot's updates with the secret and ALLOWED_UPDATES; ProviderRejected
        (Telegram's reason: not https, a port it does not call, a bad token) or ProviderUnavailable."""
        self._call("setWebhook", {"url": url, "secret_token": self._secret, "allowed_updates": list(ALLOWED_UPDATES)})


def webhook_url(public_base_url: str) -> str:
    """The relay's Telegram webhook under its public base URL."""
    return f"{public_base_url.rstrip('/')}/api/channels/{TelegramAdapter.name}"
