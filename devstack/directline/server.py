"""The emulator's state, the one function that answers its requests, and its HTTP layer.

The behaviour is described in the package docstring. `respond` maps one request to one answer for
the HTTP server here and for the in-process transport (transport.py) alike.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import email.message
import email.parser
import email.policy
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import socket
import string
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import requests

from devstack.directline import echo as echo_bot
from devstack.http_server import LocalHTTPServer
from devstack.inprocess import Answer, ConnectionDropped, Headers

log = logging.getLogger("devstack.directline")

API = "/v3/directline"
ADMIN = "/_emulator"
DIRECTLINE_ENDPOINTS = ("tokens/generate", "tokens/refresh", "conversations/start", "conversations/reconnect",
                        "activities/get", "activities/post", "upload")
JSON_TYPE = "application/json; charset=utf-8"
POLL_TOLERANCE_SECONDS = 0.05
FILE_TTL_SECONDS = 24 * 3600
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Options:
    secret: str
    port: int = 3000
    token_ttl: float = 1800
    conversation_ttl: float = 15 * 24 * 3600
    echo: bool = True
    bot_url: str | None = None
    bot_id: str = "relaybot"
    bot_name: str = "Echo Bot"
    bot_timeout: float = 15
    late_reply_seconds: float = echo_bot.DEFAULT_LATE_REPLY_SECONDS
    page_size: int = 100
    max_activity_chars: int = 256 * 1024
    max_upload_bytes: int = 4 * 1024 * 1024
    forward_end_of_conversation: bool = True
    seed: int | None = None


@dataclass
class Faults:
    """Injected misbehaviour; see the package docstring for each field."""

    latency_ms: int = 0
    throttle_rate: float = 0.0
    retry_after: str = "1"
    poll_limit: bool = False
    min_poll_interval: float = 1.0
    error_500_rate: float = 0.0
    error_502_rate: float = 0.0
    drop_rate: float = 0.0
    phase: str = "before"
    endpoints: list[str] = field(default_factory=list)
    limit: int | None = None

    def updated(self, changes: dict[str, Any]) -> Faults:
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(unknown)}; known: {', '.join(known)}")
        merged = {**asdict(self), **changes}
        for name in ("throttle_rate", "error_500_rate", "error_502_rate", "drop_rate"):
            merged[name] = float(merged[name])
            if not 0 <= merged[name] <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
        merged["latency_ms"] = int(merged["latency_ms"])
        merged["min_poll_interval"] = float(merged["min_poll_interval"])
        merged["retry_after"] = str(merged["retry_after"])
        if not isinstance(merged["poll_limit"], bool):
            raise ValueError("poll_limit must be true or false")
        if merged["phase"] not in ("before", "after"):
            raise ValueError("phase must be 'before' or 'after'")
        endpoints = merged["endpoints"] or []
        if not isinstance(endpoints, list) or set(endpoints) - set(DIRECTLINE_ENDPOINTS):
            raise ValueError(f"endpoints must be a list drawn from: {', '.join(DIRECTLINE_ENDPOINTS)}")
        merged["endpoints"] = list(endpoints)
        if merged["limit"] is not None:
            merged["limit"] = int(merged["limit"])
        return Faults(**merged)

    def applies_to(self, endpoint: str) -> bool:
        return endpoint in DIRECTLINE_ENDPOINTS and (not self.endpoints or endpoint in self.endpoints)


class ErrorResponse(Exception):
    """A Direct Line error answer: status and `{"error":{"code","message"}}`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Token:
    conversation_id: str
    user_id: str | None
    user_name: str | None
    trusted_origins: tuple[str, ...]
    issued_at: float
    expires_at: float


@dataclass
class Conversation:
    id: str
    mark: str
    created: float
    last_active: float
    user: dict[str, Any] | None = None
    started: bool = False
    activities: list[dict[str, Any]] = field(default_factory=list)
    next_sequence: int = 0
    replay_pending: bool = False
    tokens_revoked_at: float = 0.0
    last_poll: float = 0.0


@dataclass(frozen=True)
class StoredFile:
    conversation_id: str
    name: str
    content_type: str
    data: bytes
    stored_at: float


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Emulator:
    """Every conversation, token check and bot hand-off; thread-safe behind one lock."""

    def __init__(self, options: Options, faults: Faults | None = None):
        self.options = options
        self.faults = faults or Faults()
        self.root_url = f"http://127.0.0.1:{options.port}"
        self._lock = threading.RLock()
        self._token_key = secrets.token_bytes(32)
        self._conversations: dict[str, Conversation] = {}
        self._files: dict[str, StoredFile] = {}
        self._random = random.Random(options.seed)
        self._last_sweep = time.monotonic()
        self._timers: set[threading.Timer] = set()
        self._http = requests.Session()
        self.reset_counters()

    # ---------------------------------------------------------------- counters and faults

    def reset_counters(self) -> None:
        with self._lock:
            self._requests: Counter[str] = Counter()
            self._per_conversation: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self._faults_injected: Counter[str] = Counter()

    def count(self, endpoint: str, conversation_id: str | None) -> None:
        with self._lock:
            self._requests[endpoint] += 1
            if conversation_id:
                self._per_conversation[conversation_id][endpoint] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "faults": asdict(self.faults),
                "counters": {
                    "requests": dict(self._requests),
                    "conversations": {cid: dict(c) for cid, c in self._per_conversation.items()},
                    "faults": dict(self._faults_injected),
                },
                "conversations": len(self._conversations),
                "options": {k: v for k, v in asdict(self.options).items() if k != "secret"},
            }

    def set_faults(self, changes: dict[str, Any]) -> Faults:
        with self._lock:
            self.faults = self.faults.updated(changes)
            return self.faults

    def clear_faults(self) -> Faults:
        with self._lock:
            self.faults = Faults()
            return self.faults

    def draw_fault(self, endpoint: str, conversation_id: str | None) -> tuple[float, str | None]:
        """(latency seconds, fault) for one request; fault is '429', 'poll-limit', '500', '502', 'drop' or None."""
        with self._lock:
            faults = self.faults
            if not faults.applies_to(endpoint):
                return 0.0, None
            latency = faults.latency_ms / 1000
            if endpoint == "activities/get" and conversation_id and faults.poll_limit:
                conversation = self._conversations.get(conversation_id)
                if conversation is not None:
                    now = time.monotonic()
                    if now - conversation.last_poll < faults.min_poll_interval - POLL_TOLERANCE_SECONDS:
                        self._faults_injected["poll-limit"] += 1
                        return latency, "poll-limit"
                    conversation.last_poll = now
            if faults.limit is not None and faults.limit <= 0:
                return latency, None
            for name, rate in (("drop", faults.drop_rate), ("429", faults.throttle_rate),
                               ("500", faults.error_500_rate), ("502", faults.error_502_rate)):
                if rate and self._random.random() < rate:
                    if faults.limit is not None:
                        self.faults = Faults(**{**asdict(faults), "limit": faults.limit - 1})
                    self._faults_injected[name] += 1
                    return latency, name
            return latency, None

    # ---------------------------------------------------------------- tokens

    def _mint(self, conversation_id: str, user: dict[str, Any] | None, origins: list[str]) -> tuple[str, int]:
        now = time.time()
        claims = {"c": conversation_id, "u": (user or {}).get("id"), "n": (user or {}).get("name"),
                  "o": origins, "i": now, "e": now + self.options.token_ttl, "j": secrets.token_hex(8)}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = _b64(hmac.new(self._token_key, payload.encode(), hashlib.sha256).digest())
        return f"{payload}.{signature}", int(self.options.token_ttl)

    def _read_token(self, value: str) -> Token | None:
        payload, dot, signature = value.partition(".")
        if not dot:
            return None
        expected = _b64(hmac.new(self._token_key, payload.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            return None
        try:
            claims = json.loads(_unb64(payload))
        except ValueError:
            return None
        return Token(claims["c"], claims["u"], claims["n"], tuple(claims["o"]), claims["i"], claims["e"])

    def authenticate(self, headers: Headers) -> Token | None:
        """None for the secret, the Token for a valid token; ErrorResponse otherwise."""
        header = headers.get("Authorization")
        if not header:
            raise ErrorResponse(401, "BadArgument", "Missing Authorization header: send 'Bearer <secret or token>'")
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise ErrorResponse(401, "BadArgument",
                                "Malformed Authorization header: expected 'Bearer <secret or token>'")
        if hmac.compare_digest(value.encode(), self.options.secret.encode()):
            return None
        token = self._read_token(value)
        if token is None:
            raise ErrorResponse(403, "BadArgument", "Invalid token or secret")
        with self._lock:
            conversation = self._conversations.get(token.conversation_id)
            revoked = conversation is not None and token.issued_at <= conversation.tokens_revoked_at
        if revoked or time.time() >= token.expires_at:
            raise ErrorResponse(403, "TokenExpired", "Token expired")
        origin = headers.get("Origin")
        if token.trusted_origins and origin and origin not in token.trusted_origins:
            raise ErrorResponse(403, "BadArgument", "The request's origin is not among the token's trusted origins")
        return token

    # ---------------------------------------------------------------- conversations

    def _sweep(self) -> None:
        """Forget idle conversations and old files (at most every few seconds)."""
        now = time.monotonic()
        if now - self._last_sweep < 2:
            return
        self._last_sweep = now
        wall = time.time()
        for cid in [c.id for c in self._conversations.values() if wall - c.last_active > self.options.conversation_ttl]:
            self._forget(cid)
        for key in [k for k, f in self._files.items() if wall - f.stored_at > FILE_TTL_SECONDS]:
            del self._files[key]

    def _forget(self, conversation_id: str) -> bool:
        found = self._conversations.pop(conversation_id, None) is not None
        for key in [k for k, f in self._files.items() if f.conversation_id == conversation_id]:
            del self._files[key]
        return found

    def _new_conversation(self, user: dict[str, Any] | None) -> Conversation:
        now = time.time()
        conversation = Conversation(
            id="".join(secrets.choice(_ALNUM) for _ in range(22)),
            mark="".join(secrets.choice(string.ascii_lowercase) for _ in range(4)),
            created=now, last_active=now, user=user,
        )
        self._conversations[conversation.id] = conversation
        return conversation

    def conversation(self, conversation_id: str, token: Token | None) -> Conversation:
        """The conversation a caller may act in: 403 for a token of another one, 404 when unknown or idle too long."""
        if token is not None and token.conversation_id != conversation_id:
            raise ErrorResponse(403, "BadArgument", "The token is not valid for this conversation")
        with self._lock:
            self._sweep()
            conversation = self._conversations.get(conversation_id)
            if conversation is not None and time.time() - conversation.last_active > self.options.conversation_ttl:
                self._forget(conversation_id)
                conversation = None
        if conversation is None:
            raise ErrorResponse(404, "BadArgument", "Unknown conversation")
        return conversation

    def stream_url(self, conversation: Conversation, token: str, watermark: str | None = None) -> str:
        query = f"watermark={quote(watermark)}&t={token}" if watermark else f"t={token}"
        return f"ws{self.root_url.removeprefix('http')}{API}/conversations/{conversation.id}/stream?{query}"

    def watermark(self, conversation: Conversation, position: int) -> str:
        return f"{conversation.mark}-{position}"

    def position(self, conversation: Conversation, watermark: str | None) -> int:
        if not watermark:
            return 0
        match = re.fullmatch(re.escape(conversation.mark) + r"-(\d{1,9})", watermark)
        if not match or int(match.group(1)) > len(conversation.activities):
            raise ErrorResponse(400, "BadArgument", "Invalid watermark for this conversation")
        return int(match.group(1))

    # ---------------------------------------------------------------- Direct Line endpoints

    def generate_token(self, token: Token | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if token is not None:
            raise ErrorResponse(403, "BadArgument", "tokens/generate needs the secret, not a token")
        user, origins = _user_and_origins(body)
        with self._lock:
            conversation = self._new_conversation(user)
        value, expires_in = self._mint(conversation.id, user, origins)
        return 200, {"conversationId": conversation.id, "token": value, "expires_in": expires_in}

    def refresh_token(self, token: Token | None) -> tuple[int, dict[str, Any]]:
        if token is None:
            raise ErrorResponse(403, "BadArgument", "tokens/refresh needs a token, not the secret")
        conversation = self.conversation(token.conversation_id, token)
        user = {"id": token.user_id, "name": token.user_name} if token.user_id else None
        value, expires_in = self._mint(conversation.id, user, list(token.trusted_origins))
        return 200, {"conversationId": conversation.id, "token": value, "expires_in": expires_in}

    def start_conversation(self, token: Token | None, raw_token: str, body: dict[str, Any]) -> tuple[int, dict]:
        user, origins = _user_and_origins(body)
        if token is None:
            with self._lock:
                conversation = self._new_conversation(user)
                conversation.started = True
            value, expires_in = self._mint(conversation.id, user, origins)
            status = 201
        else:
            conversation = self.conversation(token.conversation_id, token)
            with self._lock:
                status = 200 if conversation.started else 201
                conversation.started = True
                conversation.last_active = time.time()
            value, expires_in = raw_token, max(0, int(token.expires_at - time.time()))
        if status == 201:
            self._greet_bot(conversation)
        return status, {"conversationId": conversation.id, "token": value, "expires_in": expires_in,
                        "streamUrl": self.stream_url(conversation, value), "referenceGrammarId": ""}

    def reconnect(self, token: Token | None, conversation_id: str, watermark: str | None) -> tuple[int, dict]:
        conversation = self.conversation(conversation_id, token)
        with self._lock:
            self.position(conversation, watermark)
            conversation.last_active = time.time()
        user = {"id": token.user_id, "name": token.user_name} if token and token.user_id else None
        value, expires_in = self._mint(conversation.id, user, list(token.trusted_origins) if token else [])
        return 200, {"conversationId": conversation.id, "token": value, "expires_in": expires_in,
                     "streamUrl": self.stream_url(conversation, value, watermark)}

    def get_activities(self, token: Token | None, conversation_id: str, watermark: str | None) -> tuple[int, dict]:
        conversation = self.conversation(conversation_id, token)
        with self._lock:
            start = self.position(conversation, watermark)
            if conversation.replay_pending:
                start, conversation.replay_pending = 0, False
            page = conversation.activities[start:start + self.options.page_size]
            body: dict[str, Any] = {"activities": json.loads(json.dumps(page))}
            if conversation.activities:
                body["watermark"] = self.watermark(conversation, start + len(page))
        return 200, body

    def post_activity(self, token: Token | None, conversation_id: str, raw: bytes) -> tuple[int, dict]:
        conversation = self.conversation(conversation_id, token)
        activity = self._parse_activity(raw)
        sender = activity.get("from")
        if not isinstance(sender, dict) or not sender.get("id"):
            raise ErrorResponse(400, "MissingProperty", "The activity needs from.id")
        if token is not None and token.user_id:
            sender["id"] = token.user_id
        stored = self._append_user(conversation, activity)
        self._deliver(conversation, stored)
        return 200, {"id": stored["id"]}

    def upload(self, token: Token | None, conversation_id: str, user_id: str | None, headers: Headers,
               raw: bytes) -> tuple[int, dict[str, Any]]:
        conversation = self.conversation(conversation_id, token)
        if len(raw) > self.options.max_upload_bytes:
            raise ErrorResponse(413, "MessageSizeTooBig", f"Upload larger than {self.options.max_upload_bytes} bytes")
        activity, files = _parse_upload(headers, raw)
        if not files:
            raise ErrorResponse(400, "BadArgument", "The upload holds no file")
        sender = activity.get("from")
        if not isinstance(sender, dict):
            sender = {}
        if user_id:
            sender["id"] = user_id
        if token is not None and token.user_id:
            sender["id"] = token.user_id
        if not sender.get("id"):
            raise ErrorResponse(400, "MissingProperty", "Give the user id (userId query parameter or from.id)")
        activity["from"] = sender
        activity.setdefault("type", "message")
        attachments = []
        with self._lock:
            for name, content_type, data in files:
                key = secrets.token_urlsafe(16)
                self._files[key] = StoredFile(conversation.id, name, content_type, data, time.time())
                attachments.append({"contentType": content_type, "name": name,
                                    "contentUrl": f"{self.root_url}{API}/attachments/{key}/{quote(name)}"})
        activity["attachments"] = attachments
        stored = self._append_user(conversation, activity)
        self._deliver(conversation, stored)
        return 200, {"id": stored["id"]}

    def get_file(self, key: str) -> StoredFile:
        with self._lock:
            stored = self._files.get(key)
        if stored is None or time.time() - stored.stored_at > FILE_TTL_SECONDS:
            raise ErrorResponse(404, "BadArgument", "Unknown attachment")
        return stored

    # ---------------------------------------------------------------- the bot side

    def bot_account(self) -> dict[str, str]:
        return {"id": self.options.bot_id, "name": self.options.bot_name, "role": "bot"}

    def _parse_activity(self, raw: bytes) -> dict[str, Any]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ErrorResponse(400, "BadArgument", "The body is not UTF-8") from error
        if len(text) > self.options.max_activity_chars:
            raise ErrorResponse(413, "MessageSizeTooBig",
                                f"The activity is larger than {self.options.max_activity_chars} characters")
        try:
            activity = json.loads(text)
        except ValueError as error:
            raise ErrorResponse(400, "BadArgument", "The body is not valid JSON") from error
        if not isinstance(activity, dict):
            raise ErrorResponse(400, "BadArgument", "The body must be one activity (a JSON object)")
        if not isinstance(activity.get("type"), str) or not activity["type"]:
            raise ErrorResponse(400, "MissingProperty", "The activity needs a type")
        return activity

    def _append(self, conversation: Conversation, activity: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            activity["id"] = f"{conversation.id}|{conversation.next_sequence:07d}"
            conversation.next_sequence += 1
            activity["timestamp"] = _now_iso()
            activity["channelId"] = "directline"
            activity["conversation"] = {"id": conversation.id}
            conversation.last_active = time.time()
            if activity.get("type") != "typing" and conversation.id in self._conversations:
                conversation.activities.append(activity)
            return json.loads(json.dumps(activity))

    def _append_user(self, conversation: Conversation, activity: dict[str, Any]) -> dict[str, Any]:
        activity.pop("serviceUrl", None)
        activity["recipient"] = self.bot_account()
        return self._append(conversation, activity)

    def append_bot(self, conversation: Conversation, activity: dict[str, Any], reply_to: str | None) -> str:
        sender = activity.get("from")
        if not isinstance(sender, dict):
            sender = {}
        sender.setdefault("id", self.options.bot_id)
        sender.setdefault("name", self.options.bot_name)
        sender.setdefault("role", "bot")
        activity["from"] = sender
        if reply_to and not activity.get("replyToId"):
            activity["replyToId"] = reply_to
        activity.pop("serviceUrl", None)
        return self._append(conversation, activity)["id"]

    def _deliver(self, conversation: Conversation, activity: dict[str, Any]) -> None:
        if activity["type"] == "endOfConversation" and not self.options.forward_end_of_conversation:
            return
        if self.options.bot_url:
            self._forward(self.options.bot_url, conversation, activity)
        elif self.options.echo:
            self._echo(conversation, activity)

    def _echo(self, conversation: Conversation, activity: dict[str, Any]) -> None:
        user = activity.get("from")
        for reply in echo_bot.replies_to(activity):
            self.append_bot(conversation, {**reply, "recipient": user}, activity["id"])
        late = echo_bot.late_reply_to(activity)
        if late is not None:
            def send_late() -> None:
                with self._lock:
                    alive = self._conversations.get(conversation.id) is conversation
                if alive:
                    self.append_bot(conversation, {**late, "recipient": user}, None)

            self._later(self.options.late_reply_seconds, send_late)

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        def run() -> None:
            self._timers.discard(timer)
            action()

        timer = threading.Timer(delay, run)
        timer.daemon = True
        self._timers.add(timer)
        timer.start()

    def _to_bot(self, activity: dict[str, Any]) -> dict[str, Any]:
        return {**activity, "serviceUrl": self.root_url, "recipient": self.bot_account()}

    def _forward(self, bot_url: str, conversation: Conversation, activity: dict[str, Any]) -> None:
        try:
            response = self._http.post(bot_url, json=self._to_bot(activity),
                                       timeout=(5, self.options.bot_timeout))
        except requests.Timeout as error:
            message = f"The bot did not answer within {self.options.bot_timeout:g}s"
            raise ErrorResponse(504, "BotError", message) from error
        except requests.RequestException as error:
            raise ErrorResponse(502, "BotRejectedActivity", "The bot is unavailable") from error
        if response.status_code >= 400:
            raise ErrorResponse(502, "BotRejectedActivity", f"The bot answered HTTP {response.status_code}")

    def _greet_bot(self, conversation: Conversation) -> None:
        """Tell a real bot the conversation started (conversationUpdate), without holding up the client."""
        bot_url = self.options.bot_url
        if not bot_url:
            return
        members = [self.bot_account()] + ([conversation.user] if conversation.user else [])
        update = {"type": "conversationUpdate", "membersAdded": members, "from": conversation.user or {"id": ""},
                  "id": f"{conversation.id}|update", "timestamp": _now_iso(), "channelId": "directline",
                  "conversation": {"id": conversation.id}}

        def send() -> None:
            try:
                self._forward(bot_url, conversation, update)
            except ErrorResponse as error:
                log.warning("conversationUpdate for %s not delivered: %s", conversation.id, error.message)

        threading.Thread(target=send, daemon=True).start()

    def bot_sends(self, conversation_id: str, reply_to: str | None, raw: bytes) -> tuple[int, dict]:
        """Bot Connector: POST /v3/conversations/{id}/activities[/{replyToId}] (anonymous, as locally)."""
        with self._lock:
            conversation = self._conversations.get(conversation_id)
        if conversation is None:
            raise ErrorResponse(404, "BadArgument", "Unknown conversation")
        activity = self._parse_activity(raw)
        return 200, {"id": self.append_bot(conversation, activity, reply_to)}

    # ---------------------------------------------------------------- admin

    def admin_conversation(self, conversation_id: str) -> dict[str, Any]:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                raise ErrorResponse(404, "BadArgument", "Unknown conversation")
            return json.loads(json.dumps({
                "conversationId": conversation.id, "started": conversation.started, "user": conversation.user,
                "activities": conversation.activities,
                "watermark": self.watermark(conversation, len(conversation.activities)),
            }))

    def forget(self, conversation_id: str) -> None:
        with self._lock:
            if not self._forget(conversation_id):
                raise ErrorResponse(404, "BadArgument", "Unknown conversation")

    def expire_tokens(self, conversation_id: str) -> None:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                raise ErrorResponse(404, "BadArgument", "Unknown conversation")
            conversation.tokens_revoked_at = time.time()

    def reset_watermark(self, conversation_id: str) -> None:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                raise ErrorResponse(404, "BadArgument", "Unknown conversation")
            conversation.replay_pending = True

    def close(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        self._http.close()


def _user_and_origins(body: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    user = body.get("user")
    if user is not None and (not isinstance(user, dict) or not isinstance(user.get("id", ""), str | None)):
        raise ErrorResponse(400, "BadArgument", "user must be an object with a string id")
    if user is not None and not user.get("id"):
        user = None
    elif user is not None:
        user = {"id": user["id"], **({"name": user["name"]} if isinstance(user.get("name"), str) else {})}
    origins = body.get("trustedOrigins") or []
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ErrorResponse(400, "BadArgument", "trustedOrigins must be a list of strings")
    return user, origins


def _disposition_filename(header: str | None) -> str | None:
    if not header:
        return None
    message = email.message.Message()
    message["Content-Disposition"] = header
    return message.get_filename()


def _parse_upload(headers: Headers, raw: bytes) -> tuple[dict[str, Any], list[tuple[str, str, bytes]]]:
    """(activity template, [(name, content type, bytes)]) from a single-file or multipart upload."""
    content_type = headers.get("Content-Type") or "application/octet-stream"
    if not content_type.lower().startswith("multipart/"):
        if not raw:
            return {}, []
        name = _disposition_filename(headers.get("Content-Disposition")) or "file"
        return {}, [(name, content_type.split(";")[0].strip(), raw)]
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        raise ErrorResponse(400, "BadArgument", "Malformed multipart body")
    activity: dict[str, Any] = {}
    files = []
    for index, part in enumerate(message.iter_parts()):
        field_name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            data = b""
        part_type = part.get_content_type()
        if field_name == "activity" or part_type == "application/vnd.microsoft.activity":
            try:
                activity = json.loads(data)
            except ValueError as error:
                raise ErrorResponse(400, "BadArgument", "The activity part is not valid JSON") from error
            if not isinstance(activity, dict):
                raise ErrorResponse(400, "BadArgument", "The activity part must be a JSON object")
        else:
            files.append((part.get_filename() or f"file{index}", part_type, data))
    return activity, files


# -------------------------------------------------------------------- requests to answers


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(rf"{API}/tokens/generate"), "tokens/generate"),
    ("POST", re.compile(rf"{API}/tokens/refresh"), "tokens/refresh"),
    ("POST", re.compile(rf"{API}/conversations"), "conversations/start"),
    ("GET", re.compile(rf"{API}/conversations/(?P<cid>[^/]+)"), "conversations/reconnect"),
    ("GET", re.compile(rf"{API}/conversations/(?P<cid>[^/]+)/activities"), "activities/get"),
    ("POST", re.compile(rf"{API}/conversations/(?P<cid>[^/]+)/activities"), "activities/post"),
    ("POST", re.compile(rf"{API}/conversations/(?P<cid>[^/]+)/upload"), "upload"),
    ("GET", re.compile(rf"{API}/attachments/(?P<key>[^/]+)(?:/[^/]*)?"), "attachments/get"),
    ("POST", re.compile(r"/v3/conversations/(?P<cid>[^/]+)/activities"), "connector/send"),
    ("POST", re.compile(r"/v3/conversations/(?P<cid>[^/]+)/activities/(?P<reply>[^/]+)"), "connector/reply"),
    ("GET", re.compile(rf"{ADMIN}/?"), "admin/state"),
    ("PUT", re.compile(rf"{ADMIN}/faults"), "admin/faults"),
    ("DELETE", re.compile(rf"{ADMIN}/faults"), "admin/clear-faults"),
    ("POST", re.compile(rf"{ADMIN}/counters/reset"), "admin/reset-counters"),
    ("GET", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)"), "admin/conversation"),
    ("POST", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)/forget"), "admin/forget"),
    ("POST", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)/expire-tokens"), "admin/expire-tokens"),
    ("POST", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)/reset-watermark"), "admin/reset-watermark"),
]
_MAX_BODY_BYTES = 64 * 1024 * 1024


def respond(emulator: Emulator, method: str, target: str, headers: Headers, body: bytes) -> Answer:
    """The emulator's whole answer to one request: the only way in, for the HTTP server and the in-process
    transport alike (devstack/directline/transport.py), so both get the same routing, checks and faults.

    `target` is the path and query as on the request line, `body` the request's whole body.
    ConnectionDropped when the injected fault is a dropped connection."""
    if method == "OPTIONS":
        return _preflight(headers)
    if len(body) > _MAX_BODY_BYTES:  # the HTTP layer refuses it before reading it all
        return error_answer(ErrorResponse(413, "MessageSizeTooBig", "Request body too large"), headers)
    url = urlsplit(target)
    path = unquote(url.path).rstrip("/") or "/"
    query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    try:
        endpoint, params = _route(method, path)
    except ErrorResponse as error:
        return error_answer(error, headers)
    conversation_id = params.get("cid")
    if not endpoint.startswith("admin/"):
        emulator.count(endpoint, conversation_id)
    latency, fault = emulator.draw_fault(endpoint, conversation_id)
    if latency:
        time.sleep(latency)
    # Throttling happens before any work, as in the real service: a 429 never follows processing.
    if fault and (emulator.faults.phase == "before" or fault in ("poll-limit", "429")):
        return _fault(emulator, fault, headers)
    try:
        status, content, extra = _dispatch(emulator, endpoint, params, query, headers, body)
    except ErrorResponse as error:
        status, content, extra = error.status, error.body(), error.headers
    if fault:
        return _fault(emulator, fault, headers)
    return _answer(status, content, extra, headers)


def error_answer(error: ErrorResponse, headers: Headers) -> Answer:
    """A Direct Line error as an answer to a request with these headers."""
    return _answer(error.status, error.body(), error.headers, headers)


def _preflight(headers: Headers) -> Answer:
    """CORS preflight: Web Chat pages call Direct Line from their own origin, as with the real service."""
    return Answer(204, {
        **_cors(headers),
        "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type",
        "Access-Control-Max-Age": "600",
    })


def _cors(headers: Headers) -> dict[str, str]:
    if not headers.get("Origin"):
        return {}
    return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "Retry-After"}


def _answer(status: int, content: Any, extra: dict[str, str], headers: Headers) -> Answer:
    """`content` as the body (bytes as they are, anything else as JSON) with `extra` headers."""
    if isinstance(content, bytes):
        data, kind = content, {}
    else:
        data, kind = json.dumps(content, separators=(",", ":")).encode(), {"Content-Type": JSON_TYPE}
    return Answer(status, {**kind, **extra, "Cache-Control": "no-store", **_cors(headers)}, data)


def _route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """(endpoint, path parameters); ErrorResponse 405 or 404 when nothing here answers `method` on `path`."""
    allowed = False
    for route_method, pattern, endpoint in _ROUTES:
        match = pattern.fullmatch(path)
        if match:
            if route_method == method:
                return endpoint, match.groupdict()
            allowed = True
    if allowed:
        raise ErrorResponse(405, "BadArgument", f"{method} is not allowed on {path}")
    if path.endswith("/stream"):
        raise ErrorResponse(404, "BadArgument", "WebSocket streams are not emulated: poll the activities")
    raise ErrorResponse(404, "BadArgument", f"Unknown resource {path}")


def _json_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise ErrorResponse(400, "BadArgument", "The body is not valid JSON") from error
    if not isinstance(body, dict):
        raise ErrorResponse(400, "BadArgument", "The body must be a JSON object")
    return body


def _dispatch(emulator: Emulator, endpoint: str, params: dict[str, str], query: dict[str, str], headers: Headers,
              raw: bytes) -> tuple[int, Any, dict[str, str]]:
    cid = params.get("cid", "")
    if endpoint.startswith("admin/"):
        return _admin(emulator, endpoint, cid, raw)
    if endpoint == "attachments/get":
        stored = emulator.get_file(params["key"])
        return 200, stored.data, {"Content-Type": stored.content_type,
                                  "Content-Disposition": f'inline; filename="{quote(stored.name)}"'}
    if endpoint.startswith("connector/"):
        return (*emulator.bot_sends(cid, params.get("reply"), raw), {})
    token = emulator.authenticate(headers)
    result: tuple[int, dict[str, Any]]
    if endpoint == "tokens/generate":
        result = emulator.generate_token(token, _json_body(raw))
    elif endpoint == "tokens/refresh":
        result = emulator.refresh_token(token)
    elif endpoint == "conversations/start":
        raw_token = (headers.get("Authorization") or "").partition(" ")[2].strip()
        result = emulator.start_conversation(token, raw_token, _json_body(raw))
    elif endpoint == "conversations/reconnect":
        result = emulator.reconnect(token, cid, query.get("watermark"))
    elif endpoint == "activities/get":
        result = emulator.get_activities(token, cid, query.get("watermark"))
    elif endpoint == "activities/post":
        result = emulator.post_activity(token, cid, raw)
    else:
        result = emulator.upload(token, cid, query.get("userId"), headers, raw)
    return (*result, {})


def _admin(emulator: Emulator, endpoint: str, cid: str, raw: bytes) -> tuple[int, Any, dict[str, str]]:
    if endpoint == "admin/state":
        return 200, emulator.snapshot(), {}
    if endpoint == "admin/faults":
        try:
            faults = emulator.set_faults(_json_body(raw))
        except (ValueError, TypeError) as error:
            raise ErrorResponse(400, "BadArgument", str(error)) from error
        return 200, asdict(faults), {}
    if endpoint == "admin/clear-faults":
        return 200, asdict(emulator.clear_faults()), {}
    if endpoint == "admin/reset-counters":
        emulator.reset_counters()
        return 200, emulator.snapshot()["counters"], {}
    if endpoint == "admin/conversation":
        return 200, emulator.admin_conversation(cid), {}
    action = {"admin/forget": emulator.forget, "admin/expire-tokens": emulator.expire_tokens,
              "admin/reset-watermark": emulator.reset_watermark}[endpoint]
    action(cid)
    return 200, {"conversationId": cid, "done": endpoint.removeprefix("admin/")}, {}


def _fault(emulator: Emulator, fault: str, headers: Headers) -> Answer:
    """The injected fault's answer; ConnectionDropped for a dropped connection."""
    if fault == "drop":
        raise ConnectionDropped
    if fault in ("429", "poll-limit"):
        message = (f"Polled faster than once every {emulator.faults.min_poll_interval:g}s"
                   if fault == "poll-limit" else "Too many requests")
        error = ErrorResponse(429, "TooManyRequests", message, {"Retry-After": emulator.faults.retry_after})
    else:
        error = ErrorResponse(int(fault), "ServiceError", f"Injected fault: HTTP {fault}")
    return error_answer(error, headers)


# -------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """Reads a request off the socket, lets `respond` answer it, and writes the answer back."""

    protocol_version = "HTTP/1.1"
    server_version = "DirectLineEmulator/1.0"
    emulator: Emulator  # set on the subclass built by make_server

    def log_message(self, fmt: str, *args) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        try:
            raw = self._read_body()
        except ErrorResponse as error:
            self.close_connection = True
            self._send(error_answer(error, self.headers))
            return
        try:
            answer = respond(self.emulator, method, self.path, self.headers, raw)
        except ConnectionDropped:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(answer)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > _MAX_BODY_BYTES:
                    raise ErrorResponse(413, "MessageSizeTooBig", "Request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as error:
            raise ErrorResponse(400, "BadArgument", "Malformed Content-Length") from error
        if length > _MAX_BODY_BYTES:
            raise ErrorResponse(413, "MessageSizeTooBig", "Request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, answer: Answer) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)


class EmulatorServer(LocalHTTPServer):
    allow_reuse_address = True


def make_server(options: Options, faults: Faults | None = None) -> tuple[EmulatorServer, Emulator]:
    """The server bound to 127.0.0.1 (call serve_forever), and the emulator behind it."""
    emulator = Emulator(options, faults)
    handler = type("BoundHandler", (Handler,), {"emulator": emulator})
    server = EmulatorServer(("127.0.0.1", options.port), handler)
    if options.port == 0:
        emulator.options = Options(**{**asdict(options), "port": server.server_address[1]})
        emulator.root_url = f"http://127.0.0.1:{emulator.options.port}"
    return server, emulator
