"""The provider simulator's HTTP server: the providers' reply APIs, inbound webhooks, an admin API, a page.

`respond` maps one request to one answer, for the HTTP server here and for the in-process transport
(transport.py) alike.

Reply APIs (on each provider's real paths, auth checked as the provider does, 401 when wrong):
    POST /2010-04-01/Accounts/{sid}/Messages.json      Twilio, Basic auth (Account SID, Auth Token)
    POST /v{N}/{phone-number-id}/messages               WhatsApp Cloud API, Bearer access token
                                                        (text, media, interactive button and list messages:
                                                        a reply's `choices` are its buttons or rows)
    GET  /v{N}/{media-id}                               WhatsApp media object {url, mime_type, sha256, file_size, id}
    GET  /whatsapp_business/attachments/?mid={media-id} WhatsApp media bytes (the object's url), Bearer token
    GET  /2010-04-01/Accounts/{sid}/Messages/{sid}/Media/{sid}   Twilio inbound media bytes, Basic auth
    POST /v1/conversations/{id}/messages                MessageBird, AccessKey
    POST /workspaces/{ws}/channels/{ch}/messages        Bird, AccessKey; answers 202
    POST /generic/callback                              generic callback, Standard Webhooks signature
    POST /v1/messages                                   Vonage Messages API, Bearer application JWT (RS256);
                                                        answers 202 {message_uuid}; see _vonage for its sources
    GET  /v3/media/{uuid}                               Vonage inbound media ("secure inbound media": JWT)

    POST /v2/bot/message/reply                          LINE reply (a webhook's reply token, once, for a minute)
    POST /v2/bot/message/push                           LINE push, X-Line-Retry-Key (409 once taken)
    GET  /v2/bot/message/{id}/content                   LINE content API: a user's file, Bearer access token

    GET|POST /bot{token}/{method}                       Telegram Bot API (telegram_server.py): sendMessage,
                                                        sendPhoto, sendDocument, getFile, answerCallbackQuery,
                                                        setWebhook; 401 for another token
    GET  /file/bot{token}/{file_path}                   Telegram file download (getFile's file_path)
Admin API (JSON), under /_sim:
    GET    /_sim/health
    GET    /_sim/replies?provider=&user=                the replies received, oldest first
    GET    /_sim/messages?provider=&user=               both directions, for the page
    DELETE /_sim/replies                                forget replies, messages and pending failures
    POST   /_sim/failures {provider, status, count=1, retry_after=null, after=0}
                                                        fail the next `count` sends, once `after` went through
    GET    /_sim/failures?provider=                     how many injected failures (and pass-throughs) are pending
    POST   /_sim/inbound {provider, from, text, name?, media?: [{url, contentType?}], reply_id?}
                                                        sign and POST a webhook to the relay; a media url
                                                        may be a data: URL (the file the user sends);
                                                        whatsapp `reply_id`: the user taps that button or
                                                        list row of the newest message offering it (an
                                                        interactive button_reply/list_reply, as Meta sends;
                                                        on vonage a `reply` message, from "whatsapp:<number>")

                                                        line: the postback of that quick reply button)
    POST   /_sim/handshake {verify_token?, challenge?}  Meta's GET verification call to the relay
    GET    /_sim/telegram                               the Telegram bot's webhook as setWebhook left it, and
                                                        the callback queries answered
    GET    /                                            the phone-like page
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes, urlencode, urlsplit

import jwt
import requests
import standardwebhooks
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from devstack.channels import telegram_server, webhooks
from devstack.http_server import LocalHTTPServer
from devstack.inprocess import Answer, Headers
from relay.channels import vonage, whatsapp

log = logging.getLogger("devstack.channels")
PAGE = Path(__file__).with_name("page.html")
TWILIO_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages\.json$")
GRAPH_MESSAGES_PATH = re.compile(r"^/v\d+(?:\.\d+)?/([^/]+)/messages$")
GRAPH_MEDIA_PATH = re.compile(r"^/v\d+(?:\.\d+)?/(\d+)$")
WHATSAPP_DOWNLOAD_PATH = "/whatsapp_business/attachments/"
TWILIO_MEDIA_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages/[^/]+/Media/([^/]+)$")
MESSAGEBIRD_PATH = re.compile(r"^/v1/conversations/([^/]+)/messages$")
BIRD_PATH = re.compile(r"^/workspaces/([^/]+)/channels/([^/]+)/messages$")
GENERIC_PATH = "/generic/callback"
VONAGE_MESSAGES_PATH = "/v1/messages"
VONAGE_MEDIA_PATH = re.compile(r"^/v3/media/([0-9a-f-]+)$")

LINE_REPLY_PATH = "/v2/bot/message/reply"
LINE_PUSH_PATH = "/v2/bot/message/push"
LINE_CONTENT_PATH = re.compile(r"^/v2/bot/message/([^/]+)/content$")


class Reply(Exception):
    """An HTTP answer raised from a handler: status, JSON body, extra headers."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class State:
    """Everything the simulator remembers, behind one lock."""

    def __init__(self, values: dict[str, str], relay_url: str):
        self.values = values
        self.relay_url = relay_url
        self.lock = threading.Lock()
        self.messages: list[dict[str, Any]] = []
        self.failures: dict[str, deque[tuple[int, float | None] | None]] = defaultdict(deque)  # None: let one through
        self.conversations: dict[str, str] = {}  # MessageBird conversation id -> user
        self.media: dict[str, webhooks.Attachment] = {}  # WhatsApp media id or Twilio media sid -> the user's file
        self.base_url = ""  # where this simulator listens, for the media URLs it hands out
        self.clock_offset = 0.0  # seconds its clock is ahead of the real one (InProcessSimulator.advance_clock)

        self.reply_tokens: dict[str, tuple[str, float]] = {}  # LINE reply token -> (user, issued at), until used
        self.retry_keys: dict[str, str] = {}  # LINE X-Line-Retry-Key -> the request id that took it
        self.sequence = 0
        self.telegram = telegram_server.TelegramBot()

    def record(self, provider: str, direction: str, user: str, text: str, *, media=(), actions=(), choices=(),
               message_id: str = "", request: Any = None) -> dict[str, Any]:
        """Remember one message; `choices`: a WhatsApp interactive message's buttons or rows ({id, title, kind})."""
        with self.lock:
            self.sequence += 1
            entry = {"seq": self.sequence, "provider": provider, "direction": direction, "user": user, "text": text,
                     "media": list(media), "actions": list(actions), "choices": list(choices),
                     "id": message_id or uuid.uuid4().hex, "at": time.time(), "request": request}
            self.messages.append(entry)
            return entry

    def select(self, provider: str | None, user: str | None, direction: str | None) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages if (not provider or m["provider"] == provider)
                    and (not user or m["user"] == user) and (not direction or m["direction"] == direction)]

    def interactive_reply(self, user: str, reply_id: str,
                          provider: str = "whatsapp") -> webhooks.InteractiveReply | None:
        """The user's tap on the button or list row `reply_id` of the newest `provider` message that offered it (line:
        the quick reply button whose postback data is `reply_id`)."""
        with self.lock:
            for entry in reversed(self.messages):
                if entry["provider"] != provider or entry["direction"] != "bot" or entry["user"] != user:
                    continue
                for choice in entry.get("choices") or []:
                    if choice["id"] == reply_id:
                        return webhooks.InteractiveReply(choice["kind"], choice["id"], choice["title"],
                                                         choice.get("description", ""), context_id=entry["id"],
                                                         offered=tuple((c["id"], c["title"])
                                                                       for c in entry["choices"]))
        return None

    def now(self) -> float:
        """Unix time as the simulator sees it: the real time, moved on with the relay's in the in-process tests."""
        return time.time() + self.clock_offset

    def issue_reply_token(self, token: str, user: str) -> None:
        """LINE issued `token` to a webhook of `user`'s, now: a reply may use it once, within a minute."""
        with self.lock:
            self.reply_tokens[token] = (user, self.now())

    def take_failure(self, provider: str) -> tuple[int, float | None] | None:
        with self.lock:
            queue = self.failures.get(provider)
            return queue.popleft() if queue else None

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
            self.failures.clear()


def respond(state: State, method: str, target: str, headers: Headers, body: bytes) -> Answer:
    """The simulator's whole answer to one request: the only way in, for the HTTP server and the in-process
    transport alike (devstack/channels/transport.py). `target` is the path and query as on the request line."""
    parts = urlsplit(target)
    try:
        status, content, extra = _Exchange(state, headers).route(method, parts.path, parse_qs(parts.query), body)
    except Reply as reply:
        return _answer(reply.status, reply.body, reply.headers)
    except Exception:  # a bug here must show up as a 500 the caller sees, not a hung socket
        log.exception("simulator failed on %s %s", method, telegram_server.without_token(parts.path))
        return _answer(500, {"error": {"code": "SimulatorError", "message": "see the simulator's log"}})
    if isinstance(content, tuple):  # (bytes, content type)
        return _answer(status, content[0], extra, content[1])
    return _answer(status, content, extra)


def _answer(status: int, body: Any, headers: dict[str, str] | None = None,
            content_type: str = "application/json") -> Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Answer(status, {"Content-Type": content_type, "Cache-Control": "no-store", **(headers or {})}, data)


class _Exchange:
    """One request's routes and checks: the provider APIs, their auth and injected failures, the admin API."""

    def __init__(self, state: State, headers: Headers):
        self.state = state
        self.headers = headers

    def _json(self, raw: bytes) -> Any:
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise Reply(400, {"error": {"code": "BadJson", "message": "the body is not valid JSON"}}) from None

    def route(self, method: str, path: str, query: dict[str, list[str]], raw: bytes):
        one = {k: v[0] for k, v in query.items()}
        if path == "/" and method == "GET":
            return 200, (PAGE.read_bytes(), "text/html; charset=utf-8"), {}
        if path.startswith("/_sim/"):
            return self._admin(method, path.removeprefix("/_sim/"), one, raw)
        if method == "POST":
            for pattern, handler in ((TWILIO_PATH, self._twilio), (GRAPH_MESSAGES_PATH, self._whatsapp),
                                     (MESSAGEBIRD_PATH, self._messagebird), (BIRD_PATH, self._bird)):
                match = pattern.match(path)
                if match:
                    return handler(match, raw)
            if path == GENERIC_PATH:
                return self._generic(raw)
            if path == VONAGE_MESSAGES_PATH:
                return self._vonage(raw)

            if path in (LINE_REPLY_PATH, LINE_PUSH_PATH):
                return self._line(path, raw)
        content = LINE_CONTENT_PATH.match(path) if method == "GET" else None
        if content:
            return self._line_content(content.group(1))
        if method in ("GET", "POST") and telegram_server.handles(path):
            return telegram_server.respond(self.state, self.headers, path, query, raw, file_bytes=_file_bytes)
        media = GRAPH_MEDIA_PATH.match(path) if method == "GET" else None
        if media:
            return self._whatsapp_media(media)
        if method == "GET" and path == WHATSAPP_DOWNLOAD_PATH:
            return self._whatsapp_download(one.get("mid", ""))
        media = TWILIO_MEDIA_PATH.match(path) if method == "GET" else None
        if media:
            return self._twilio_media(media)
        media = VONAGE_MEDIA_PATH.match(path) if method == "GET" else None
        if media:
            return self._vonage_media(media.group(1))
        raise Reply(404, {"error": {"code": "NotFound", "message": f"no {method} {path} here"}})

    # -- failures -----------------------------------------------------------------------------
    def _maybe_fail(self, provider: str) -> None:
        failure = self.state.take_failure(provider)
        if failure:
            status, retry_after = failure
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            raise Reply(status, {"error": {"code": "InjectedFailure", "message": f"simulated {status}"}}, headers)

    def _value(self, name: str) -> str:
        return self.state.values.get(name, "")

    # -- Twilio -------------------------------------------------------------------------------
    def _twilio(self, match: re.Match, raw: bytes):
        sid, token = self._value("TWILIO_ACCOUNT_SID"), self._value("TWILIO_AUTH_TOKEN")
        user, password = _basic_auth(self.headers.get("Authorization"))
        if not sid or match.group(1) != sid or user != sid or password != token:
            raise Reply(401, {"code": 20003, "message": "Authenticate", "more_info":
                              "https://www.twilio.com/docs/errors/20003", "status": 401})
        self._maybe_fail("twilio")
        form = parse_qs(raw.decode(), keep_blank_values=True)
        to, sender = form.get("To", [""])[0], form.get("From", [""])[0]
        body, media = form.get("Body", [""])[0], form.get("MediaUrl", [])
        if not to or not sender:
            raise Reply(400, {"code": 21604, "message": "A 'To' phone number is required.", "status": 400})
        if not body and not media:
            raise Reply(400, {"code": 21602, "message": "Message body is required.", "status": 400})
        if len(body) > 1600:
            raise Reply(400, {"code": 21617, "message": "The concatenated message body exceeds the 1600 character "
                              "limit.", "status": 400})
        message_sid = "SM" + uuid.uuid4().hex
        self.state.record("twilio", "bot", to, body, media=[{"url": u} for u in media], message_id=message_sid,
                          request=form)
        return 201, {"sid": message_sid, "account_sid": sid, "to": to, "from": sender, "body": body,
                     "status": "queued", "num_media": str(len(media)), "num_segments": "1"}, {}

    def _twilio_media(self, match: re.Match):
        """A user's file as Twilio keeps it: under the API, behind the account's Basic auth."""
        sid, token = self._value("TWILIO_ACCOUNT_SID"), self._value("TWILIO_AUTH_TOKEN")
        if match.group(1) != sid or _basic_auth(self.headers.get("Authorization")) != (sid, token):
            raise Reply(401, {"code": 20003, "message": "Authenticate", "status": 401})
        self._maybe_fail("twilio")
        data = _file_bytes(self.state.media.get(match.group(2)))
        if data is None:
            raise Reply(404, {"code": 20404, "message": "The requested resource was not found", "status": 404})
        return 200, (data, self.state.media[match.group(2)].content_type), {}

    # -- WhatsApp -----------------------------------------------------------------------------
    def _whatsapp(self, match: re.Match, raw: bytes):
        if self.headers.get("Authorization") != f"Bearer {self._value('WHATSAPP_ACCESS_TOKEN')}" \
                or not self._value("WHATSAPP_ACCESS_TOKEN"):
            raise Reply(401, {"error": {"message": "Invalid OAuth access token - Cannot parse access token",
                                        "type": "OAuthException", "code": 190, "fbtrace_id": uuid.uuid4().hex}})
        if match.group(1) != self._value("WHATSAPP_PHONE_NUMBER_ID"):
            raise Reply(400, _graph_error(100, f"Unsupported post request. Object with ID '{match.group(1)}' does "
                                          "not exist, cannot be loaded due to missing permissions, or does not "
                                          "support this operation."))
        self._maybe_fail("whatsapp")
        body = self._json(raw)
        if body.get("messaging_product") != "whatsapp" or not body.get("to"):
            raise Reply(400, _graph_error(100, "The parameter messaging_product is required."))
        kind = body.get("type", "text")
        text, media, actions = "", [], []
        choices: list[dict[str, str]] = []
        if kind == "text":
            text = str((body.get("text") or {}).get("body", ""))
            if not text or len(text) > whatsapp.TEXT_LIMIT:
                raise Reply(400, _graph_error(100, "Param text['body'] must be at most 4096 characters long."))
        elif kind == "interactive":
            text, choices = _interactive_choices(body.get("interactive"))
            actions = [c["title"] for c in choices]
        elif kind in ("image", "video", "audio", "document", "sticker"):
            item = body.get(kind) or {}
            if not item.get("link") and not item.get("id"):
                raise Reply(400, _graph_error(100, f"Param {kind}['link'] is required"))
            media = [{"url": item.get("link") or item.get("id"), "kind": kind}]
            text = str(item.get("caption", ""))
        else:
            raise Reply(400, _graph_error(100, f"Unsupported message type {kind!r}"))
        wamid = "wamid." + base64.b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.state.record("whatsapp", "bot", str(body["to"]), text, media=media, actions=actions, choices=choices,
                          message_id=wamid, request=body)
        return 200, {"messaging_product": "whatsapp", "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                     "messages": [{"id": wamid}]}, {}

    def _whatsapp_media(self, match: re.Match):
        if self.headers.get("Authorization") != f"Bearer {self._value('WHATSAPP_ACCESS_TOKEN')}":
            raise Reply(401, {"error": {"message": "Invalid OAuth access token", "type": "OAuthException",
                                        "code": 190}})
        self._maybe_fail("whatsapp")
        media_id = match.group(1)
        data = _file_bytes(self.state.media.get(media_id))
        if data is None:
            raise Reply(404, _graph_error(100, "Media not found"))
        return 200, {"messaging_product": "whatsapp", "id": media_id,
                     "mime_type": self.state.media[media_id].content_type,
                     "sha256": hashlib.sha256(data).hexdigest(), "file_size": len(data),
                     "url": f"{self.state.base_url}{WHATSAPP_DOWNLOAD_PATH}?{urlencode({'mid': media_id})}"}, {}

    def _whatsapp_download(self, media_id: str):
        """The bytes behind a media object's url: like Meta's, readable only with the access token."""
        if self.headers.get("Authorization") != f"Bearer {self._value('WHATSAPP_ACCESS_TOKEN')}":
            raise Reply(401, {"error": {"message": "Invalid OAuth access token", "type": "OAuthException",
                                        "code": 190}})
        data = _file_bytes(self.state.media.get(media_id))
        if data is None:
            raise Reply(404, _graph_error(100, "Media not found"))
        return 200, (data, self.state.media[media_id].content_type), {}

    # -- MessageBird --------------------------------------------------------------------------
    def _messagebird(self, match: re.Match, raw: bytes):
        key = self._value("MESSAGEBIRD_ACCESS_KEY")
        if not key or self.headers.get("Authorization") != f"AccessKey {key}":
            raise Reply(401, {"errors": [{"code": 2, "description": "Request not allowed (incorrect access_key)",
                                          "parameter": "access_key"}]})
        self._maybe_fail("messagebird")
        body = self._json(raw)
        kind, content = body.get("type"), body.get("content") or {}
        if kind == "text" and content.get("text"):
            text, media = str(content["text"]), []
        elif kind in ("image", "video", "audio", "file") and (content.get(kind) or {}).get("url"):
            text, media = str(content[kind].get("caption", "")), [{"url": content[kind]["url"], "kind": kind}]
        else:
            raise Reply(400, {"errors": [{"code": 21, "description": "content is invalid", "parameter": "content"}]})
        conversation = match.group(1)
        user = self.state.conversations.get(conversation, conversation)
        message_id = uuid.uuid4().hex
        self.state.record("messagebird", "bot", user, text, media=media, message_id=message_id,
                          request={"conversation_id": conversation, **body})
        return 201, {"id": message_id, "status": "accepted", "fallback": None}, {}

    # -- Bird ---------------------------------------------------------------------------------
    def _bird(self, match: re.Match, raw: bytes):
        key = self._value("BIRD_ACCESS_KEY")
        if not key or self.headers.get("Authorization") != f"AccessKey {key}":
            raise Reply(401, {"code": "Unauthorized", "message": "Invalid access key"})
        if match.group(1) != self._value("BIRD_WORKSPACE_ID"):
            raise Reply(404, {"code": "NotFound", "message": "workspace not found"})
        self._maybe_fail("bird")
        body = self._json(raw)
        contacts = (body.get("receiver") or {}).get("contacts") or []
        content = body.get("body") or {}
        kind = content.get("type")
        if not contacts or kind not in ("text", "image", "file"):
            raise Reply(422, {"code": "InvalidPayload", "message": "receiver.contacts and body.type are required"})
        item = content.get(kind) or {}
        media = [{"url": i.get("mediaUrl"), "kind": kind} for i in item.get("images") or item.get("files") or []]
        user = str(contacts[0].get("identifierValue") or contacts[0].get("id"))
        message_id = str(uuid.uuid4())
        self.state.record("bird", "bot", user, str(item.get("text", "")), media=media, message_id=message_id,
                          request={"channel_id": match.group(2), **body})
        return 202, {"id": message_id, "channelId": match.group(2), "status": "accepted"}, {}

    # -- generic callback ---------------------------------------------------------------------
    def _generic(self, raw: bytes):
        secret = self._value("GENERIC_CALLBACK_SECRET") or self._value("GENERIC_WEBHOOK_SECRET")
        verifier = standardwebhooks.Webhook(secret if secret.startswith("whsec_") else secret.encode())
        try:
            verifier.verify(raw, {k: v for k, v in self.headers.items()})
        except standardwebhooks.WebhookVerificationError as error:
            raise Reply(401, {"error": {"code": "InvalidSignature", "message": str(error)}}) from None
        self._maybe_fail("generic")
        body = self._json(raw)
        self.state.record("generic", "bot", str((body.get("user") or {}).get("id", "")), str(body.get("text", "")),
                          media=body.get("media") or [], actions=body.get("suggestedActions") or [],
                          message_id=str(body.get("id", "")), request=body)
        return 200, {"ok": True}, {}

    # -- Vonage -------------------------------------------------------------------------------
    def _vonage(self, raw: bytes):
        """Vonage's POST /v1/messages, no kinder than the real one. Sources: the Messages API reference
        (developer.vonage.com/en/api/messages, OpenAPI 1.17: 202 {message_uuid}; 401, 422, 429 answered as RFC 7807
        application/problem+json with type/title/detail/instance, 422 with invalid_parameters), the SDK's own test
        data for those bodies (Vonage/vonage-python-sdk messages/tests/data/*.json), its JwtClient for the
        application JWT (vonage_jwt/jwt.py: RS256, application_id, iat, jti, exp), "Working with WhatsApp
        Interactive Messages" (message_type custom on channel whatsapp carries Meta's interactive object) and the
        per-channel text limits of the reference (sms 1000, whatsapp 4096, messenger 640, viber_service 1000).
        Basic auth (api_key:api_secret) is refused: the simulator knows no API secret."""
        self._vonage_auth()
        failure = self.state.take_failure("vonage")
        if failure:
            status, retry_after = failure
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            if status == 429:
                raise _vonage_problem(429, "#throttled", "Rate Limit Hit", "Please wait, then retry your request",
                                      headers)
            if status < 500:
                raise _vonage_problem(status, "/messages#1150", "Invalid params", f"simulated {status}", headers)
            raise _vonage_problem(status, "#internal-error", "Internal Error", f"simulated {status}", headers)
        body = self._json(raw)
        if not isinstance(body, dict):
            raise _vonage_invalid("body", "must be a JSON object")
        channel, kind = body.get("channel"), body.get("message_type")
        for name in ("to", "from", "channel", "message_type"):
            if not isinstance(body.get(name), str) or not body[name]:
                raise _vonage_invalid(name, "is required")
        if channel not in vonage.TEXT_LIMITS:
            raise _vonage_invalid("channel", f"{channel!r} is not a supported channel")
        if body["from"] != webhooks.VONAGE_ADDRESSES[channel]:
            raise _vonage_invalid("from", f"is not a {channel} sender of this application")
        text, media = "", []
        choices: list[dict[str, str]] = []
        if kind == "text":
            text = body["text"] if isinstance(body.get("text"), str) else ""
            if not 0 < len(text) <= vonage.TEXT_LIMITS[channel]:
                raise _vonage_invalid("text", f"must be 1 to {vonage.TEXT_LIMITS[channel]} characters on {channel}")
        elif kind in vonage.MEDIA_TYPES[channel]:
            item = body.get(kind)
            if not isinstance(item, dict) or not str(item.get("url", "")).startswith(("https://", "http://")):
                raise _vonage_invalid(f"{kind}.url", "is required")
            media = [{"url": item["url"], "kind": kind}]
            text = str(item.get("caption", ""))
        elif kind == "custom" and channel == "whatsapp":
            custom = body.get("custom")
            if not isinstance(custom, dict) or custom.get("type") != "interactive":
                raise _vonage_invalid("custom", "is not an object WhatsApp takes")
            try:
                text, choices = _interactive_choices(custom.get("interactive"))
            except Reply:
                raise _vonage_invalid("custom.interactive", "is not an interactive message WhatsApp takes") from None
        else:
            raise _vonage_invalid("message_type", f"{kind!r} cannot be sent on {channel}")
        message_uuid = str(uuid.uuid4())
        self.state.record("vonage", "bot", vonage.channel_user(channel, body["to"]), text, media=media,
                          actions=[c["title"] for c in choices], choices=choices, message_id=message_uuid, request=body)
        return 202, {"message_uuid": message_uuid}, {}

    def _vonage_auth(self) -> None:
        """The application JWT as Vonage checks it: RS256 with the application's key, its application_id, not
        expired; 401 otherwise."""
        scheme, _, token = str(self.headers.get("Authorization") or "").partition(" ")
        refused = _vonage_problem(401, "#unauthorized", "Unauthorized", "You did not provide correct credentials.")
        pem = self._value("VONAGE_PRIVATE_KEY").replace("\\n", "\n")
        if scheme != "Bearer" or not token or not pem:
            raise refused
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise refused
        try:
            claims = jwt.decode(token, key.public_key(), algorithms=["RS256"],
                                options={"require": ["iat", "jti"], "verify_exp": False, "verify_iat": False})
        except jwt.PyJWTError:
            raise refused from None
        expiry = claims.get("exp")
        if claims.get("application_id") != self._value("VONAGE_APPLICATION_ID") \
                or (expiry is not None and (not isinstance(expiry, int | float) or expiry <= self.state.now())):
            raise refused

    def _vonage_media(self, media_id: str):
        """A user's file on Vonage's media store with "Secure inbound media" on (developer.vonage.com/en/messages/
        concepts/secure-inbound-media: GET the URL with the application's JWT as Bearer, else unauthorized)."""
        self._vonage_auth()
        data = _file_bytes(self.state.media.get(media_id))
        if data is None:
            raise _vonage_problem(404, "#not-found", "Not Found", "The requested media could not be found.")
        return 200, (data, self.state.media[media_id].content_type), {}

    # -- LINE ---------------------------------------------------------------------------------
    def _line_auth(self) -> None:
        token = self._value("LINE_CHANNEL_ACCESS_TOKEN")
        if not token or self.headers.get("Authorization") != f"Bearer {token}":
            raise Reply(401, {"message": "Authentication failed. Confirm that the access token in the "
                              "authorization header is valid."})

    def _line(self, path: str, raw: bytes):
        """A reply or a push, checked as LINE checks them (see _line_messages), from LINE's Messaging API
        reference and guides (developers.line.biz/en/reference/messaging-api/, .../docs/messaging-api/):
        - Bearer channel access token, else 401 {"message": "Authentication failed. ..."} (status codes table).
        - A reply token is issued per webhook event, may be used once, and "must be used within one minute"
          of the webhook (the reference since 2022; it was observed to lapse after about 30 s before: LINE
          keeps no promise past the minute); a used, unknown or lapsed one is 400 {"message": "Invalid reply
          token"}, the error table's wording for both "a used reply token" and one "that became invalid once a
          certain period of time had passed".
        - X-Line-Retry-Key (a UUID) is taken by push, multicast, narrowcast and broadcast only: on the reply
          API it is a 400; once a key's request was accepted, the same key answers 409 with the accepted
          request's id in `x-line-accepted-request-id` and the message is not sent again ("Retry failed API
          requests").
        - `to` must be a user, group or room id LINE gave ("The property, 'to', in the request body is
          invalid"); the user ids are "U" and 32 hex digits.
        - 429 (rate limit, or the month's message quota spent) and 5xx come from `/_sim/failures`: LINE
          documents that a 5xx or a timeout may still have sent the message."""
        self._line_auth()
        body = self._json(raw)
        retry_key = self.headers.get("X-Line-Retry-Key")
        if path == LINE_REPLY_PATH and retry_key is not None:
            raise Reply(400, {"message": "X-Line-Retry-Key header is not supported in this API"})
        if retry_key is not None and not _is_uuid(retry_key):
            raise Reply(400, {"message": "The value of the X-Line-Retry-Key header is invalid"})
        with self.state.lock:
            accepted = self.state.retry_keys.get(retry_key or "")
        if accepted:
            raise Reply(409, {"message": "The retry key is already accepted", "sentMessages": []},
                        {"x-line-accepted-request-id": accepted})
        self._maybe_fail("line")
        messages, text, media, choices = _line_messages(body.get("messages"))
        if path == LINE_REPLY_PATH:
            with self.state.lock:
                issued = self.state.reply_tokens.pop(str(body.get("replyToken") or ""), None)
            if issued is None or self.state.now() - issued[1] > LINE_REPLY_TOKEN_SECONDS:
                raise Reply(400, {"message": "Invalid reply token"})
            user = issued[0]
        else:
            user = str(body.get("to") or "")
            if not LINE_USER_ID.fullmatch(user):
                raise Reply(400, {"message": "The property, 'to', in the request body is invalid (line: -, "
                                  "column: -)"})
        request_id = str(uuid.uuid4())
        with self.state.lock:
            if retry_key:
                self.state.retry_keys[retry_key] = request_id
        self.state.record("line", "bot", user, text, media=media, actions=[c["title"] for c in choices],
                          choices=choices, message_id=request_id,
                          request={"api": "reply" if path == LINE_REPLY_PATH else "push", **body})
        return 200, {"sentMessages": [{"id": str(uuid.uuid4().int)[:18], "quoteToken": uuid.uuid4().hex}
                                      for _ in messages]}, {"x-line-request-id": request_id}

    def _line_content(self, message_id: str):
        """A user's file on LINE's content API, readable with the channel access token."""
        self._line_auth()
        self._maybe_fail("line")
        data = _file_bytes(self.state.media.get(message_id))
        if data is None:
            raise Reply(404, {"message": "Not found"})
        return 200, (data, self.state.media[message_id].content_type), {}

    # -- admin --------------------------------------------------------------------------------
    def _admin(self, method: str, name: str, query: dict[str, str], raw: bytes):
        state = self.state
        if name == "health" and method == "GET":
            return 200, {"ok": True, "relay_url": state.relay_url, "providers": list(webhooks.PROVIDERS)}, {}
        if name in ("replies", "messages") and method == "GET":
            direction = "bot" if name == "replies" else None
            found = state.select(query.get("provider"), query.get("user"), direction)
            return 200, {name: found}, {}
        if name == "replies" and method == "DELETE":
            state.clear()
            return 200, {"cleared": True}, {}
        if name == "failures" and method == "POST":
            return self._inject(self._json(raw))
        if name == "failures" and method == "GET":
            with state.lock:
                pending = len(state.failures.get(query.get("provider", ""), ()))
            return 200, {"provider": query.get("provider"), "pending": pending}, {}
        if name == "inbound" and method == "POST":
            return self._inbound(self._json(raw))
        if name == "handshake" and method == "POST":
            return self._handshake(self._json(raw))
        if name == "telegram" and method == "GET":
            return 200, state.telegram.admin_view(), {}
        raise Reply(404, {"error": {"code": "NotFound", "message": f"no admin {method} {name}"}})

    def _inject(self, body: dict[str, Any]):
        provider, status, after = body.get("provider"), body.get("status"), body.get("after", 0)
        if provider not in webhooks.PROVIDERS or not isinstance(status, int) or not 400 <= status <= 599:
            raise Reply(400, {"error": {"code": "BadFailure", "message": "give a known provider and a 4xx/5xx status"}})
        if not isinstance(after, int) or after < 0:
            raise Reply(400, {"error": {"code": "BadFailure", "message": "'after' must be a whole number of sends"}})
        retry_after = body.get("retry_after")
        with self.state.lock:
            queue = self.state.failures[provider]
            queue.extend([None] * after + [(status, retry_after)] * int(body.get("count", 1)))
            pending = len(queue)
        return 200, {"provider": provider, "pending": pending}, {}

    def _inbound(self, body: dict[str, Any]):
        provider, sender = body.get("provider"), str(body.get("from") or "")
        if provider not in webhooks.PROVIDERS or not sender:
            raise Reply(400, {"error": {"code": "BadInbound", "message": "give a known provider and 'from'"}})
        if provider == "vonage":
            try:
                webhooks.vonage_address(sender)
            except ValueError as error:
                raise Reply(400, {"error": {"code": "BadInbound", "message": str(error)}}) from None
        media = tuple(webhooks.Attachment.from_url(m["url"], m.get("contentType", ""))
                      for m in body.get("media") or [] if isinstance(m, dict) and m.get("url"))
        sent, hosted = media, {}
        if provider == "twilio":  # Twilio keeps the user's files under its API and sends those URLs
            account, message = self._value("TWILIO_ACCOUNT_SID"), "MM" + uuid.uuid4().hex
            hosted = {"ME" + uuid.uuid4().hex: item for item in media}
            sent = tuple(webhooks.Attachment(f"{self.state.base_url}/2010-04-01/Accounts/{account}/Messages/{message}"
                                             f"/Media/{sid}", item.content_type) for sid, item in hosted.items())
        if provider == "vonage":  # Vonage keeps the user's files on its media store and sends those URLs
            hosted = {str(uuid.uuid4()): item for item in media}
            sent = tuple(webhooks.Attachment(f"{self.state.base_url}/v3/media/{media_id}", item.content_type)
                         for media_id, item in hosted.items())
        reply = None
        if body.get("reply_id"):
            reply = self.state.interactive_reply(sender, str(body["reply_id"]), provider) \
                if provider in ("whatsapp", "vonage", "line", "telegram") else None
            if reply is None:
                raise Reply(400, {"error": {"code": "BadInbound", "message": f"no {provider} message to this user "
                                            "offered that reply_id"}})
        hook = webhooks.build(provider, self.state.values, self.state.relay_url, sender=sender,
                              text=str(body.get("text", "")), name=str(body.get("name", "")), media=sent,
                              reply=reply)
        with self.state.lock:
            if hook.conversation_id:
                self.state.conversations[hook.conversation_id] = sender
            self.state.media.update(hook.media_ids)
            self.state.media.update(hosted)
        for token in hook.reply_tokens:
            self.state.issue_reply_token(token, sender)
        if hook.callback_query_id:
            self.state.telegram.tapped(hook.callback_query_id)
        self.state.record(provider, "user", sender, reply.title if reply else str(body.get("text", "")),
                          media=[{"url": m.url, "contentType": m.content_type} for m in media],
                          message_id=hook.message_id)
        try:
            response = requests.post(hook.url, data=hook.body, headers=hook.headers, timeout=30)
        except requests.RequestException as error:
            raise Reply(502, {"error": {"code": "RelayUnreachable",
                                        "message": f"{hook.url}: {type(error).__name__}"}}) from None
        signed_body = hook.body if isinstance(hook.body, bytes) else str(hook.body).encode()
        # The signed request itself, so a test can deliver it again exactly as a provider's retry does.
        webhook = {"url": hook.url, "headers": dict(hook.headers), "body_b64": base64.b64encode(signed_body).decode()}
        return 200, {"status": response.status_code, "body": response.text, "message_id": hook.message_id,
                     "content_type": response.headers.get("Content-Type", ""), "webhook": webhook}, {}

    def _handshake(self, body: dict[str, Any]):
        challenge = str(body.get("challenge") or uuid.uuid4().int % 10**10)
        query = urlencode({"hub.mode": "subscribe", "hub.challenge": challenge,
                           "hub.verify_token": body.get("verify_token", self._value("WHATSAPP_VERIFY_TOKEN"))})
        try:
            response = requests.get(f"{self.state.relay_url}/api/channels/whatsapp?{query}", timeout=30)
        except requests.RequestException as error:
            raise Reply(502, {"error": {"code": "RelayUnreachable", "message": type(error).__name__}}) from None
        return 200, {"status": response.status_code, "body": response.text, "challenge": challenge}, {}


def _interactive_choices(interactive: Any) -> tuple[str, list[dict[str, str]]]:
    """The body text and the options ({id, title, kind}) of an interactive message, checked as Meta checks them
    (131009 "Parameter value is not valid" otherwise): 1-3 reply buttons with unique titles of at most 20
    characters, or a list of 1-10 rows in all (titles of at most 24, descriptions of 72, unique ids of at most
    200 characters) behind a button of at most 20; a body of 1-1024 characters."""
    invalid = Reply(400, _graph_error(131009, "Parameter value is not valid"))
    if not isinstance(interactive, dict):
        raise invalid
    text = str((interactive.get("body") or {}).get("text", ""))
    action = interactive.get("action") or {}
    if not 0 < len(text) <= whatsapp.INTERACTIVE_BODY_LIMIT or not isinstance(action, dict):
        raise invalid
    if interactive.get("type") == "button":
        buttons = action.get("buttons") or []
        choices = [{"id": str((b.get("reply") or {}).get("id", "")), "title": str((b.get("reply") or {}).get(
            "title", "")), "kind": "button_reply"} for b in buttons if isinstance(b, dict)]
        titles = [c["title"] for c in choices]
        if not 1 <= len(buttons) <= whatsapp.BUTTON_LIMIT or len(choices) != len(buttons) \
                or len(set(titles)) != len(titles) \
                or any(not 0 < len(t) <= whatsapp.BUTTON_TITLE_LIMIT for t in titles):
            raise invalid
    elif interactive.get("type") == "list":
        sections = action.get("sections") or []
        rows = [row for section in sections if isinstance(section, dict) for row in section.get("rows") or []]
        if not 0 < len(str(action.get("button") or "")) <= 20 or not 1 <= len(sections) <= 10 \
                or not 1 <= len(rows) <= whatsapp.LIST_ROW_LIMIT or not all(isinstance(r, dict) for r in rows) \
                or (len(sections) > 1 and not all(s.get("title") for s in sections)):
            raise invalid
        choices = [{"id": str(r.get("id") or ""), "title": str(r.get("title") or ""), "kind": "list_reply",
                    **({"description": str(r["description"])} if r.get("description") else {})} for r in rows]
        ids = [c["id"] for c in choices]
        if len(set(ids)) != len(ids) or any(not 0 < len(c["id"]) <= 200 or not 0 < len(c["title"])
                                            <= whatsapp.LIST_TITLE_LIMIT
                                            or len(c.get("description", "")) > whatsapp.LIST_DESCRIPTION_LIMIT
                                            for c in choices):
            raise invalid
    else:
        raise Reply(400, _graph_error(100, f"Unsupported interactive type {interactive.get('type')!r}"))
    return text, choices


LINE_REPLY_TOKEN_SECONDS = 60
LINE_USER_ID = re.compile(r"U[0-9a-f]{32}")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _line_messages(messages: Any) -> tuple[list[dict[str, Any]], str, list[dict[str, str]], list[dict[str, str]]]:
    """The message objects of a reply or push, their text, images and quick reply buttons ({id: the postback
    data, title, kind}), checked as LINE checks them (400 "The request body has 1 error(s)" otherwise): 1 to 5
    messages; text of 1 to 5000 characters; images with HTTPS URLs; at most 13 quick reply items, labels of
    1 to 20 characters, postback data of at most 300."""
    def invalid(message: str, prop: str) -> Reply:
        return Reply(400, {"message": "The request body has 1 error(s)",
                           "details": [{"message": message, "property": prop}]})

    if not isinstance(messages, list) or not 1 <= len(messages) <= 5:
        raise invalid("Size must be between 1 and 5", "messages")
    texts: list[str] = []
    media: list[dict[str, str]] = []
    choices: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid("Must be an object", f"messages[{index}]")
        if message.get("type") == "text":
            text = message.get("text")
            if not isinstance(text, str) or not 0 < len(text) <= 5000:
                raise invalid("Length must be between 0 and 5000", f"messages[{index}].text")
            texts.append(text)
        elif message.get("type") == "image":
            for key in ("originalContentUrl", "previewImageUrl"):
                if not str(message.get(key) or "").startswith("https://"):
                    raise invalid("Must be a valid HTTPS URL", f"messages[{index}].{key}")
            media.append({"url": message["originalContentUrl"], "kind": "image"})
        else:
            raise invalid("Must be one of the following values: [text, image, ...]", f"messages[{index}].type")
        items = (message.get("quickReply") or {}).get("items") if "quickReply" in message else None
        if items is not None:
            if not isinstance(items, list) or not 1 <= len(items) <= 13:
                raise invalid("Size must be between 1 and 13", f"messages[{index}].quickReply.items")
            choices = []
            for number, item in enumerate(items):
                action = (item or {}).get("action") or {}
                where = f"messages[{index}].quickReply.items[{number}].action"
                if action.get("type") != "postback":
                    raise invalid("Must be one of the following values: [postback, message, ...]", where + ".type")
                if not 0 < len(str(action.get("label") or "")) <= 20:
                    raise invalid("Length must be between 1 and 20", where + ".label")
                if not 0 < len(str(action.get("data") or "")) <= 300:
                    raise invalid("Length must be between 1 and 300", where + ".data")
                choices.append({"id": str(action["data"]), "title": str(action.get("displayText") or action["label"]),
                                "kind": "postback"})
    return messages, "\n".join(texts), media, choices


def _file_bytes(item: webhooks.Attachment | None) -> bytes | None:
    """The bytes of a file a user sent: a data: URL's own, else fetched from its URL; None when there are none."""
    if item is None:
        return None
    if item.url.startswith("data:"):
        header, _, data = item.url[5:].partition(",")
        try:
            return base64.b64decode(data) if header.endswith(";base64") else unquote_to_bytes(data)
        except (binascii.Error, ValueError):
            return None
    try:
        response = requests.get(item.url, timeout=10)
    except requests.RequestException:
        return None
    return response.content if response.ok else None


def _vonage_problem(status: int, kind: str, title: str, detail: str, headers: dict[str, str] | None = None,
                    **extra: Any) -> Reply:
    """A Vonage error as the Messages API answers one: RFC 7807 application/problem+json; `kind` is the part of
    the type URL after api-errors ("#unauthorized", "/messages#1150")."""
    body = {"type": f"https://developer.vonage.com/api-errors{kind}", "title": title, "detail": detail,
            "instance": uuid.uuid4().hex, **extra}
    return Reply(status, body, {"Content-Type": "application/problem+json", **(headers or {})})


def _vonage_invalid(name: str, reason: str) -> Reply:
    return _vonage_problem(422, "/messages#1150", "Invalid params", "The value of one or more parameters is invalid.",
                           invalid_parameters=[{"name": name, "reason": reason}])


def _graph_error(code: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": uuid.uuid4().hex}}


def _basic_auth(header: str | None) -> tuple[str, str]:
    if not header or not header.startswith("Basic "):
        return "", ""
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return user, password


class Handler(BaseHTTPRequestHandler):
    """Reads a request off the socket, lets `respond` answer it, and writes the answer back."""

    server_version = "ProviderSimulator/1.0"
    state: State  # set on the class built by make_server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), telegram_server.without_token(fmt % args))

    def _dispatch(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            answer = _answer(400, {"error": {"code": "BadRequest", "message": "malformed Content-Length"}})
        else:
            raw = self.rfile.read(length) if length > 0 and method in ("POST", "PUT", "DELETE") else b""
            answer = respond(self.state, method, self.path, self.headers, raw)
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


def make_server(port: int, values: dict[str, str], relay_url: str, host: str = "127.0.0.1") -> LocalHTTPServer:
    state = State(values, relay_url.rstrip("/"))
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = LocalHTTPServer((host, port), handler)
    state.base_url = f"http://{host}:{server.server_address[1]}"
    return server
