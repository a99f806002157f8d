"""The Telegram Bot API as the provider simulator answers it: no kinder than api.telegram.org.

Every call is `/bot<token>/<method>` (GET or POST; parameters in the query string, a JSON body or a
form, method names case-insensitive) and answers `{"ok": true, "result": ...}`, or
`{"ok": false, "error_code": N, "description": "..."}` with N as the HTTP status: 401 "Unauthorized"
for any other token, 404 "Not Found" for an unknown method, 400 "Bad Request: ..." for a bad
parameter, and for flood control 429 "Too Many Requests: retry after N" with
`parameters.retry_after` in the body and no Retry-After header.
Source: https://core.telegram.org/bots/api ("Making requests", ResponseParameters).

What each method checks, as the Bot API documents it:
- sendMessage (https://core.telegram.org/bots/api#sendmessage): a chat id that is a number (400
  "chat not found" otherwise; every user is taken to have started the bot, so a webhook delivered
  straight to the relay can be answered); text of 1-4096 characters after entities
  are parsed; parse_mode HTML (https://core.telegram.org/bots/api#html-style) with only the
  documented tags, properly nested, and `<`, `>`, `&` escaped elsewhere (400 "can't parse
  entities"), or no parse_mode (MarkdownV2 is not simulated: 400); an inline keyboard
  (https://core.telegram.org/bots/api#inlinekeyboardbutton) of buttons with text and callback_data
  of 1-64 bytes (400 "BUTTON_DATA_INVALID").
- sendPhoto / sendDocument: a photo or document as an http(s) URL or a known file_id; a caption of
  at most 1024 characters. The URL is not fetched here (Telegram fetches it and answers 400
  "failed to get HTTP URL content" when it cannot).
- getFile (https://core.telegram.org/bots/api#getfile): a file_id a user sent; files over 20 MB
  are refused ("file is too big"); the file is then at `/file/bot<token>/<file_path>`, served as
  application/octet-stream.
- answerCallbackQuery (https://core.telegram.org/bots/api#answercallbackquery): a callback query
  id a user's tap carried, answered once; again, or unknown: 400 "query is too old and response
  timeout expired or query ID is invalid".
- setWebhook (https://core.telegram.org/bots/api#setwebhook): an https URL on port 443, 80, 88 or
  8443 (or "" to remove it), secret_token of 1-256 characters of A-Z, a-z, 0-9, _ and -.

Failures given to fail_next("telegram", ...) meet sendMessage, sendPhoto, sendDocument and getFile,
in Telegram's error shape.
"""

from __future__ import annotations

import html.parser
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from devstack.channels import webhooks
from devstack.inprocess import Headers
from relay.channels import telegram

__all__ = ["TelegramBot", "handles", "respond", "without_token"]

API_PATH = re.compile(r"^/bot([^/]+)/([^/]*)$")
FILE_PATH = re.compile(r"^/file/bot([^/]+)/(.*)$")
_TOKEN_IN_PATH = re.compile(r"/(file/)?bot[^/\s]+/")
CAPTION_LIMIT = 1024
DOWNLOAD_LIMIT = 20 * 1024 * 1024
WEBHOOK_PORTS = (443, 80, 88, 8443)
UPDATE_TYPES = ("message", "edited_message", "channel_post", "edited_channel_post", "callback_query",
                "inline_query", "chosen_inline_result", "my_chat_member", "chat_member", "chat_join_request")
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a", "code", "pre",
         "blockquote", "tg-emoji"}
_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


class TelegramBot:
    """What the simulated bot knows: its webhook, the taps to answer, its message ids."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.webhook: dict[str, Any] | None = None
        self.queries: dict[str, bool] = {}  # callback query id -> answered
        self.answered: list[str] = []
        self.next_message_id = 1

    def tapped(self, callback_query_id: str) -> None:
        """A user's tap went to the relay: it is to be answered (once)."""
        with self.lock:
            self.queries[callback_query_id] = False

    def admin_view(self) -> dict[str, Any]:
        with self.lock:
            return {"webhook": self.webhook, "answered": list(self.answered)}

    def message_id(self) -> int:
        with self.lock:
            self.next_message_id += 1
            return self.next_message_id


class _Refused(Exception):
    def __init__(self, status: int, description: str, retry_after: int | None = None):
        super().__init__(description)
        self.status, self.description, self.retry_after = status, description, retry_after

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": False, "error_code": self.status, "description": self.description}
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


def _bad(description: str) -> _Refused:
    return _Refused(400, f"Bad Request: {description}")


def handles(path: str) -> bool:
    return bool(API_PATH.match(path) or FILE_PATH.match(path))


def without_token(line: str) -> str:
    """A request line with the bot token in its path masked: the simulator's log never holds it."""
    return _TOKEN_IN_PATH.sub(lambda m: f"/{m.group(1) or ''}bot[token]/", line)


def respond(state: Any, headers: Headers, path: str, query: Mapping[str, list[str]], raw: bytes, *,
            file_bytes: Callable[[Any], bytes | None]) -> tuple[int, Any, dict[str, str]]:
    """One Bot API call or file download against the simulator's `state` (server.State)."""
    try:
        file_match = FILE_PATH.match(path)
        if file_match:
            return _download(state, file_match, file_bytes)
        match = API_PATH.match(path)
        assert match is not None
        if not state.values.get("TELEGRAM_BOT_TOKEN") or match.group(1) != state.values["TELEGRAM_BOT_TOKEN"]:
            raise _Refused(401, "Unauthorized")
        method = match.group(2).lower()
        handler = _METHODS.get(method)
        if handler is None:
            raise _Refused(404, "Not Found")
        params = _params(headers, query, raw)
        if method in ("sendmessage", "sendphoto", "senddocument", "getfile"):
            _injected_failure(state)
        result = handler(state, params, file_bytes)
    except _Refused as refused:
        return refused.status, refused.body(), {}
    return 200, {"ok": True, "result": result}, {}


def _params(headers: Headers, query: Mapping[str, list[str]], raw: bytes) -> dict[str, Any]:
    params: dict[str, Any] = {k: v[0] for k, v in query.items()}
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if raw and content_type == "application/json":
        try:
            body = json.loads(raw)
        except ValueError:
            raise _bad("can't parse JSON object") from None
        if not isinstance(body, dict):
            raise _bad("can't parse JSON object")
        params |= body
    elif raw:
        params |= {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
    return params


def _injected_failure(state: Any) -> None:
    failure = state.take_failure("telegram")
    if failure is None:
        return
    status, retry_after = failure
    if status == 429:
        wait = max(1, round(retry_after if retry_after is not None else 1))
        raise _Refused(429, f"Too Many Requests: retry after {wait}", retry_after=wait)
    descriptions = {400: "Bad Request: simulated", 403: "Forbidden: bot was blocked by the user",
                    404: "Not Found"}
    raise _Refused(status, descriptions.get(status, "Internal Server Error" if status >= 500 else "simulated"))


def _chat(state: Any, params: Mapping[str, Any]) -> str:
    chat_id = str(params.get("chat_id") or "")
    if not chat_id:
        raise _bad("chat_id is empty")
    if not re.fullmatch(r"-?[1-9][0-9]{0,15}", chat_id):
        raise _bad("chat not found")
    return chat_id


def _json_field(params: Mapping[str, Any], name: str) -> Any:
    value = params.get(name)
    if isinstance(value, str):  # a form or query string carries objects as JSON
        try:
            return json.loads(value)
        except ValueError:
            raise _bad(f"can't parse {name} JSON object") from None
    return value


class _HTMLText(html.parser.HTMLParser):
    """The text Telegram shows for a parse_mode HTML message; ValueError as its "can't parse entities"."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.shown: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _TAGS:
            raise ValueError(f'Unsupported start tag "{tag}"')
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            raise ValueError(f'Unexpected end tag "{tag}"')
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if re.search(r"[<>&]", data):
            raise ValueError("Can't find end of the entity")
        self.shown.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in _ENTITIES:
            raise ValueError(f'Unsupported HTML entity "&{name};"')
        self.shown.append(_ENTITIES[name])

    def handle_charref(self, name: str) -> None:
        try:
            self.shown.append(chr(int(name[1:], 16) if name[:1] in "xX" else int(name)))
        except ValueError:
            raise ValueError(f'Unsupported HTML entity "&#{name};"') from None

    def handle_comment(self, data: str) -> None:
        raise ValueError("Unsupported start tag")

    def unknown_decl(self, data: str) -> None:
        raise ValueError("Unsupported start tag")


def _shown(text: str, parse_mode: Any) -> str:
    if not parse_mode:
        return text
    if str(parse_mode).lower() != "html":
        raise _bad(f"unsupported parse_mode {parse_mode!r} (the simulator checks HTML only)")
    parser = _HTMLText()
    try:
        parser.feed(text)
        parser.close()
        if parser.open:
            raise ValueError(f'Can\'t find end tag corresponding to start tag "{parser.open[-1]}"')
        if parser.rawdata:  # an unfinished tag or entity left over
            raise ValueError("Can't find end of the entity")
    except ValueError as error:
        raise _bad(f"can't parse entities: {error}") from None
    return "".join(parser.shown)


def _keyboard(params: Mapping[str, Any]) -> list[dict[str, str]]:
    """The inline keyboard's buttons as the page offers them ({id: callback_data, title, kind})."""
    markup = _json_field(params, "reply_markup")
    if markup is None:
        return []
    rows = markup.get("inline_keyboard") if isinstance(markup, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise _bad("can't parse inline keyboard button: field \"inline_keyboard\" must be an Array of Arrays")
    choices = []
    for button in (b for row in rows for b in row):
        if not isinstance(button, dict) or not isinstance(button.get("text"), str) or not button["text"]:
            raise _bad("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
        data = button.get("callback_data")
        if not isinstance(data, str) or not 1 <= len(data.encode()) <= telegram.CALLBACK_DATA_LIMIT:
            raise _bad("BUTTON_DATA_INVALID")
        choices.append({"id": data, "title": button["text"], "kind": "callback_query"})
    return choices


def _sent(state: Any, chat_id: str, shown: str, params: Mapping[str, Any], *, media=(), choices=()) -> dict:
    message_id = state.telegram.message_id()
    state.record("telegram", "bot", chat_id, shown, media=media, actions=[c["title"] for c in choices],
                 choices=choices, message_id=str(message_id), request=dict(params))
    message: dict[str, Any] = {"message_id": message_id, "from": webhooks.TELEGRAM_BOT,
                               "chat": {"id": int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id,
                                        "type": "private"}, "date": int(time.time())}
    if choices:
        message["reply_markup"] = {"inline_keyboard": [[{"text": c["title"], "callback_data": c["id"]}]
                                                       for c in choices]}
    return message


def _send_message(state: Any, params: Mapping[str, Any], _files: Any) -> dict:
    chat_id = _chat(state, params)
    text = params.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _bad("message text is empty")
    shown = _shown(text, params.get("parse_mode"))
    if not shown.strip():
        raise _bad("message text is empty")
    if len(shown) > telegram.TEXT_LIMIT:
        raise _bad("message is too long")
    choices = _keyboard(params)
    return {**_sent(state, chat_id, shown, params, choices=choices), "text": shown}


def _send_file(kind: str) -> Callable[[Any, Mapping[str, Any], Any], dict]:
    def send(state: Any, params: Mapping[str, Any], _files: Any) -> dict:
        chat_id = _chat(state, params)
        item = params.get(kind)
        if not isinstance(item, str) or not item:
            raise _bad(f"there is no {kind} in the request")
        if not item.startswith(("https://", "http://")) and item not in state.media:
            raise _bad("wrong file identifier/HTTP URL specified")
        caption = _shown(str(params.get("caption") or ""), params.get("parse_mode"))
        if len(caption) > CAPTION_LIMIT:
            raise _bad("message caption is too long")
        media = [{"url": item, "kind": "image" if kind == "photo" else "document"}]
        return _sent(state, chat_id, caption, params, media=media, choices=_keyboard(params))

    return send


def _file_path(file_id: str, content_type: str) -> str:
    folder = "photos" if content_type.startswith("image/") else "documents"
    extension = {"image/jpeg": ".jpg", "image/png": ".png", "application/pdf": ".pdf"}.get(content_type, "")
    return f"{folder}/{file_id}{extension}"


def _get_file(state: Any, params: Mapping[str, Any], file_bytes: Callable[[Any], bytes | None]) -> dict:
    file_id = str(params.get("file_id") or "")
    item = state.media.get(file_id)
    data = file_bytes(item) if item is not None else None
    if data is None:
        raise _bad("invalid file_id")
    if len(data) > DOWNLOAD_LIMIT:
        raise _bad("file is too big")
    return {"file_id": file_id, "file_unique_id": file_id[:16], "file_size": len(data),
            "file_path": _file_path(file_id, item.content_type)}


def _download(state: Any, match: re.Match, file_bytes: Callable[[Any], bytes | None]):
    if not state.values.get("TELEGRAM_BOT_TOKEN") or match.group(1) != state.values["TELEGRAM_BOT_TOKEN"]:
        raise _Refused(401, "Unauthorized")
    path = match.group(2)
    file_id = path.rsplit("/", 1)[-1].split(".", 1)[0]
    item = state.media.get(file_id)
    data = file_bytes(item) if item is not None and _file_path(file_id, item.content_type) == path else None
    if data is None:
        raise _Refused(404, "Not Found")
    return 200, (data, "application/octet-stream"), {}


def _answer_callback_query(state: Any, params: Mapping[str, Any], _files: Any) -> bool:
    query_id = str(params.get("callback_query_id") or "")
    if len(str(params.get("text") or "")) > 200:
        raise _bad("MESSAGE_TOO_LONG")
    with state.telegram.lock:
        if state.telegram.queries.get(query_id, True):
            raise _bad("query is too old and response timeout expired or query ID is invalid")
        state.telegram.queries[query_id] = True
        state.telegram.answered.append(query_id)
    return True


def _set_webhook(state: Any, params: Mapping[str, Any], _files: Any) -> bool:
    url = params.get("url")
    if not isinstance(url, str):
        raise _bad("bad webhook: Failed to resolve host: Name or service not known")
    if url:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise _bad("bad webhook: An HTTPS URL must be provided for webhook")
        if (parts.port or 443) not in WEBHOOK_PORTS:
            raise _bad("bad webhook: Webhook can be set up only on ports 80, 88, 443 or 8443")
    secret = params.get("secret_token")
    if secret is not None and not (isinstance(secret, str) and _SECRET.fullmatch(secret)):
        raise _bad("secret token contains unallowed characters")
    allowed = _json_field(params, "allowed_updates")
    if allowed is not None and (not isinstance(allowed, list) or any(u not in UPDATE_TYPES for u in allowed)):
        raise _bad("can't parse allowed updates")
    with state.telegram.lock:
        state.telegram.webhook = {"url": url, "secret_token": secret, "allowed_updates": allowed} if url else None
    return True


_METHODS: dict[str, Callable[[Any, Mapping[str, Any], Any], Any]] = {
    "sendmessage": _send_message,
    "sendphoto": _send_file("photo"),
    "senddocument": _send_file("document"),
    "getfile": _get_file,
    "answercallbackquery": _answer_callback_query,
    "setwebhook": _set_webhook,
}
