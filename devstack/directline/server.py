"""The emulator's state, the one function that answers its requests, and its HTTP layer.

The behaviour is described in the package docstring. `respond` maps one request to one answer for
the HTTP server here and for the in-process transport (transport.py) alike; the HTTP server alone
can also upgrade a request for `streamUrl` to a WebSocket (`Handler`, `_StreamSocket`), which
`respond` hands over after the same checks.
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
import io
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
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import requests
from websockets.frames import CloseCode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from devstack.directline import copilot as copilot_bot
from devstack.directline import echo as echo_bot
from devstack.http_server import LocalHTTPServer
from devstack.inprocess import Answer, ConnectionDropped, Headers

log = logging.getLogger("devstack.directline")

API = "/v3/directline"
ADMIN = "/_emulator"
DIRECTLINE_ENDPOINTS = ("tokens/generate", "tokens/refresh", "conversations/start", "conversations/reconnect",
                        "activities/get", "activities/post", "upload")
NO_CONTENT_ENDPOINTS = ("activities/post", "upload")
"""Where the no_content_rate fault answers 204 without a body (the generated .NET client accepts 200 and 204)."""
JSON_TYPE = "application/json; charset=utf-8"
POLL_TOLERANCE_SECONDS = 0.05
FILE_TTL_SECONDS = 24 * 3600
RETENTION_SECONDS = 24 * 3600
"""How long activities stay in the activity set and the stream ("messages are kept about 24 h")."""
STREAM_TOKEN_SECONDS = 60
"""A streamUrl must be opened within this long: its `t` is a stream token that lives 60 s."""
KEEPALIVE_SECONDS = 30.0
"""Seconds of silence after which a stream gets an empty keep-alive frame (the interval is undocumented)."""
CLOSE_TIMEOUT_SECONDS = 5.0
"""How long a stream waits for the client's half of the closing handshake before it drops the connection."""
_ALNUM = string.ascii_letters + string.digits
AGENT_API_VERSION = "2022-03-01-preview"
AGENT_TOKEN_PATH = ("/powervirtualagents/botsbyschema/cr_emulator_copilot/directline/token"
                    f"?api-version={AGENT_API_VERSION}")
"""The path of an agent's token endpoint on the emulator (any schema name is served)."""


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
    enhanced_auth: bool = False
    retention_seconds: float = RETENTION_SECONDS
    keepalive_seconds: float = KEEPALIVE_SECONDS
    copilot: bool = False
    """The Copilot-like built-in bot (copilot.py) answers instead of the echo bot."""
    copilot_delay: tuple[float, float] = copilot_bot.DEFAULT_DELAY


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
    no_content_rate: float = 0.0
    phase: str = "before"
    endpoints: list[str] = field(default_factory=list)
    limit: int | None = None

    def updated(self, changes: dict[str, Any]) -> Faults:
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(unknown)}; known: {', '.join(known)}")
        merged = {**asdict(self), **changes}
        for name in ("throttle_rate", "error_500_rate", "error_502_rate", "drop_rate", "no_content_rate"):
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
    stream: bool = False  # a stream token: the `t` of a streamUrl, good for opening that stream only


@dataclass(frozen=True)
class Kept:
    """An activity in a conversation's history: when it was appended (emulator clock) and its id's sequence number."""

    at: float
    sequence: int
    activity: dict[str, Any]


@dataclass
class Conversation:
    id: str
    mark: str
    created: float
    last_active: float
    user: dict[str, Any] | None = None
    started: bool = False
    activities: list[Kept] = field(default_factory=list)  # the polled set, oldest first, within retention
    typing: list[Kept] = field(default_factory=list)  # typing activities: for streams only, never polled
    first_position: int = 0  # watermark position of activities[0]: how many have aged out of retention
    next_sequence: int = 0
    replay_pending: bool = False
    tokens_revoked_at: float = 0.0
    last_poll: float = 0.0

    @property
    def end_position(self) -> int:
        """The watermark position after the last activity: it keeps counting when old activities age out."""
        return self.first_position + len(self.activities)


@dataclass
class Stream:
    """One open stream's place in its conversation: what it has been sent so far."""

    conversation: Conversation
    position: int  # watermark position of the next polled activity to send
    sequence: int  # sequence number from which typing activities are new to it
    replayed: bool = False  # the activities after the URL's watermark have been sent
    end_reason: str = ""  # why it ended: the close frame's reason
    close_code: int = CloseCode.NORMAL_CLOSURE


@dataclass(frozen=True)
class StoredFile:
    conversation_id: str
    name: str
    content_type: str
    data: bytes
    stored_at: float


class EmulatorClock:
    """The emulator's one clock: the wall clock plus an offset that only ever moves forward.

    Every time the emulator reads (token lifetimes, retention, idle conversations, files, poll pacing,
    timestamps, keep-alives) comes from `now()`; `advance` stands in for waiting (POST /_emulator/clock)."""

    def __init__(self, wall: Callable[[], float] = time.time):
        self._wall = wall
        self._offset = 0.0

    def now(self) -> float:
        """Seconds since the epoch, as the emulator sees them."""
        return self._wall() + self._offset

    @property
    def offset(self) -> float:
        return self._offset

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` (>= 0) forward; ValueError for a negative or non-finite number."""
        if not 0 <= seconds < float("inf"):
            raise ValueError("advance_seconds must be a number of seconds, zero or more")
        self._offset += seconds

    def iso(self) -> str:
        """now() as Direct Line writes timestamps: ISO 8601 UTC with microseconds and a Z."""
        moment = dt.datetime.fromtimestamp(self.now(), dt.UTC)
        return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Emulator:
    """Every conversation, token check, stream and bot hand-off; thread-safe behind one lock, whose condition
    (`_changed`) wakes the open streams when something they wait for happens."""

    def __init__(self, options: Options, faults: Faults | None = None, clock: EmulatorClock | None = None):
        self.options = options
        self.faults = faults or Faults()
        self.clock = clock or EmulatorClock()
        self.root_url = f"http://127.0.0.1:{options.port}"
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._token_key = secrets.token_bytes(32)
        self._conversations: dict[str, Conversation] = {}
        self._files: dict[str, StoredFile] = {}
        self._random = random.Random(options.seed)
        self._last_sweep = self.clock.now()
        self._timers: set[threading.Timer] = set()
        self._http = requests.Session()
        self._closing = False
        self._streams_open = 0
        self._copilot = copilot_bot.TurnPlayer(self._copilot_sends) if options.copilot else None
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
                "clock": self.clock_state(),
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
        """(latency seconds, fault) for one request; fault is '429', 'poll-limit', '500', '502', 'drop',
        '204' (answer without a body once processed) or None."""
        with self._lock:
            faults = self.faults
            if not faults.applies_to(endpoint):
                return 0.0, None
            latency = faults.latency_ms / 1000
            if endpoint == "activities/get" and conversation_id and faults.poll_limit:
                conversation = self._conversations.get(conversation_id)
                if conversation is not None:
                    now = self.clock.now()
                    if now - conversation.last_poll < faults.min_poll_interval - POLL_TOLERANCE_SECONDS:
                        self._faults_injected["poll-limit"] += 1
                        return latency, "poll-limit"
                    conversation.last_poll = now
            if faults.limit is not None and faults.limit <= 0:
                return latency, None
            no_content = faults.no_content_rate if endpoint in NO_CONTENT_ENDPOINTS else 0.0
            for name, rate in (("drop", faults.drop_rate), ("429", faults.throttle_rate),
                               ("500", faults.error_500_rate), ("502", faults.error_502_rate), ("204", no_content)):
                if rate and self._random.random() < rate:
                    if faults.limit is not None:
                        self.faults = Faults(**{**asdict(faults), "limit": faults.limit - 1})
                    self._faults_injected[name] += 1
                    return latency, name
            return latency, None

    # ---------------------------------------------------------------- tokens

    def _mint(self, conversation_id: str, user: dict[str, Any] | None, origins: list[str], *,
              lifetime: float | None = None, stream: bool = False) -> tuple[str, int]:
        now = self.clock.now()
        lifetime = self.options.token_ttl if lifetime is None else lifetime
        claims = {"c": conversation_id, "u": (user or {}).get("id"), "n": (user or {}).get("name"),
                  "o": origins, "i": now, "e": now + lifetime, "j": secrets.token_hex(8)}
        if stream:
            claims["s"] = 1
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = _b64(hmac.new(self._token_key, payload.encode(), hashlib.sha256).digest())
        return f"{payload}.{signature}", int(lifetime)

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
        return Token(claims["c"], claims["u"], claims["n"], tuple(claims["o"]), claims["i"], claims["e"],
                     stream=bool(claims.get("s")))

    def _check_unexpired(self, token: Token) -> None:
        """403 TokenExpired when the token's lifetime is over or admin expire-tokens came after it was issued."""
        with self._lock:
            conversation = self._conversations.get(token.conversation_id)
            revoked = conversation is not None and token.issued_at <= conversation.tokens_revoked_at
        if revoked or self.clock.now() >= token.expires_at:
            raise ErrorResponse(403, "TokenExpired", "Token expired")

    def authenticate(self, headers: Headers) -> Token | None:
        """None for the secret, the Token for a valid token; ErrorResponse otherwise.

        The request's Origin is not looked at: trusted origins stay in the token but bind no API call."""
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
        if token is None or token.stream:
            raise ErrorResponse(403, "BadArgument", "Invalid token or secret")
        self._check_unexpired(token)
        return token

    # ---------------------------------------------------------------- conversations

    def _sweep(self) -> None:
        """Forget idle conversations and old files, drop activities past retention (at most every few seconds)."""
        now = self.clock.now()
        if now - self._last_sweep < 2:
            return
        self._last_sweep = now
        for cid in [c.id for c in self._conversations.values() if now - c.last_active > self.options.conversation_ttl]:
            self._forget(cid)
        for conversation in self._conversations.values():
            self._prune(conversation)
        for key in [k for k, f in self._files.items() if now - f.stored_at > FILE_TTL_SECONDS]:
            del self._files[key]

    def _prune(self, conversation: Conversation) -> None:
        """Drop the activities older than retention; their watermark positions stay counted (first_position)."""
        cutoff = self.clock.now() - self.options.retention_seconds
        aged = 0
        while aged < len(conversation.activities) and conversation.activities[aged].at < cutoff:
            aged += 1
        if aged:
            del conversation.activities[:aged]
            conversation.first_position += aged
        if conversation.typing and conversation.typing[0].at < cutoff:
            conversation.typing = [kept for kept in conversation.typing if kept.at >= cutoff]

    def _forget(self, conversation_id: str) -> bool:
        found = self._conversations.pop(conversation_id, None) is not None
        for key in [k for k, f in self._files.items() if f.conversation_id == conversation_id]:
            del self._files[key]
        self._changed.notify_all()  # its streams end
        return found

    def _new_conversation(self, user: dict[str, Any] | None) -> Conversation:
        now = self.clock.now()
        conversation = Conversation(id="".join(secrets.choice(_ALNUM) for _ in range(22)), mark=_new_mark(),
                                    created=now, last_active=now, user=user)
        self._conversations[conversation.id] = conversation
        return conversation

    def _idle_too_long(self, conversation: Conversation) -> bool:
        return self.clock.now() - conversation.last_active > self.options.conversation_ttl

    def conversation(self, conversation_id: str, token: Token | None) -> Conversation:
        """The conversation a caller may act in: 403 for a token of another one, 404 when unknown or idle too long."""
        if token is not None and token.conversation_id != conversation_id:
            raise ErrorResponse(403, "BadArgument", "The token is not valid for this conversation")
        with self._lock:
            self._sweep()
            conversation = self._conversations.get(conversation_id)
            if conversation is not None and self._idle_too_long(conversation):
                self._forget(conversation_id)
                conversation = None
        if conversation is None:
            raise ErrorResponse(404, "BadArgument", "Unknown conversation")
        return conversation

    def stream_url(self, conversation: Conversation, watermark: str | None = None) -> str:
        """ws://.../conversations/{id}/stream?[watermark=W&]t=<a stream token that must be used within 60 s>."""
        stream_token, _ = self._mint(conversation.id, None, [], lifetime=STREAM_TOKEN_SECONDS, stream=True)
        query = f"watermark={quote(watermark)}&t={stream_token}" if watermark else f"t={stream_token}"
        return f"ws{self.root_url.removeprefix('http')}{API}/conversations/{conversation.id}/stream?{query}"

    def watermark(self, conversation: Conversation, position: int) -> str:
        return f"{conversation.mark}-{position}"

    def position(self, conversation: Conversation, watermark: str | None) -> int:
        if not watermark:
            return 0
        match = re.fullmatch(re.escape(conversation.mark) + r"-(\d{1,9})", watermark)
        if not match or int(match.group(1)) > conversation.end_position:
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

    def agent_token(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """A Copilot Studio environment's token endpoint: no auth, a token for a new conversation, no user bound."""
        _require_api_version(query)
        with self._lock:
            conversation = self._new_conversation(None)
        value, expires_in = self._mint(conversation.id, None, [])
        return 200, {"token": value, "expires_in": expires_in, "conversationId": conversation.id}

    def regional_channel_settings(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Where the environment's Direct Line is: this emulator's root (the base is that + "v3/directline")."""
        _require_api_version(query)
        return 200, {"channelUrlsById": {"directline": f"{self.root_url}/"}}

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
                conversation.last_active = self.clock.now()
            value, expires_in = raw_token, max(0, int(token.expires_at - self.clock.now()))
        if status == 201:
            self._greet_bot(conversation)
        return status, {"conversationId": conversation.id, "token": value, "expires_in": expires_in,
                        "streamUrl": self.stream_url(conversation), "referenceGrammarId": ""}

    def reconnect(self, token: Token | None, conversation_id: str, watermark: str | None) -> tuple[int, dict]:
        """A new token and streamUrl. With the secret: under enhanced auth 400 MissingProperty (the secret names
        no user), otherwise a token without a user; with a token: one for the same user."""
        conversation = self.conversation(conversation_id, token)
        if token is None and self.options.enhanced_auth:
            raise ErrorResponse(400, "MissingProperty", "Missing user ID")
        with self._lock:
            self.position(conversation, watermark)
            conversation.last_active = self.clock.now()
        user = {"id": token.user_id, "name": token.user_name} if token and token.user_id else None
        value, expires_in = self._mint(conversation.id, user, list(token.trusted_origins) if token else [])
        return 200, {"conversationId": conversation.id, "token": value, "expires_in": expires_in,
                     "streamUrl": self.stream_url(conversation, watermark)}

    def get_activities(self, token: Token | None, conversation_id: str, watermark: str | None) -> tuple[int, dict]:
        conversation = self.conversation(conversation_id, token)
        with self._lock:
            self._prune(conversation)
            start = self.position(conversation, watermark)
            if conversation.replay_pending:
                start, conversation.replay_pending = conversation.first_position, False
            start = max(start, conversation.first_position)
            index = start - conversation.first_position
            page = [kept.activity for kept in conversation.activities[index:index + self.options.page_size]]
            body: dict[str, Any] = {"activities": _copy(page)}
            if conversation.end_position:
                body["watermark"] = self.watermark(conversation, start + len(page))
        return 200, body

    def post_activity(self, token: Token | None, conversation_id: str, raw: bytes) -> tuple[int, dict]:
        conversation = self.conversation(conversation_id, token)
        activity = self._parse_activity(raw)
        sender = activity.get("from")
        if not isinstance(sender, dict) or not sender.get("id"):
            raise ErrorResponse(400, "MissingProperty", "The activity needs from.id")
        self._stamp_token_user(sender, token)
        stored = self._append_user(conversation, activity)
        self._deliver(conversation, stored)
        return 200, {"id": stored["id"]}

    def _stamp_token_user(self, sender: dict[str, Any], token: Token | None) -> None:
        """Under enhanced authentication the user id bound to the token wins over from.id; without it, from.id
        (or upload's userId) is kept as the client sent it, whatever user the token carries."""
        if self.options.enhanced_auth and token is not None and token.user_id:
            sender["id"] = token.user_id

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
        self._stamp_token_user(sender, token)
        if not sender.get("id"):
            raise ErrorResponse(400, "MissingProperty", "Give the user id (userId query parameter or from.id)")
        activity["from"] = sender
        activity.setdefault("type", "message")
        attachments = []
        with self._lock:
            for name, content_type, data in files:
                key = secrets.token_urlsafe(16)
                self._files[key] = StoredFile(conversation.id, name, content_type, data, self.clock.now())
                attachments.append({"contentType": content_type, "name": name,
                                    "contentUrl": f"{self.root_url}{API}/attachments/{key}/{quote(name)}"})
        activity["attachments"] = attachments
        stored = self._append_user(conversation, activity)
        self._deliver(conversation, stored)
        return 200, {"id": stored["id"]}

    def get_file(self, key: str) -> StoredFile:
        with self._lock:
            stored = self._files.get(key)
        if stored is None or self.clock.now() - stored.stored_at > FILE_TTL_SECONDS:
            raise ErrorResponse(404, "BadArgument", "Unknown attachment")
        return stored

    # ---------------------------------------------------------------- the stream

    def grant_stream(self, conversation_id: str, stream_token: str | None, watermark: str | None) -> Stream:
        """The checks before a streamUrl is upgraded to a WebSocket, and where that stream starts.

        401 without `t`; 403 BadArgument for a `t` that is not a stream token of this emulator, or one of
        another conversation; 403 TokenExpired once it is older than STREAM_TOKEN_SECONDS; 404 for an unknown
        conversation; 400 for a watermark it does not accept. Without a watermark the stream sends only
        newer activities."""
        if not stream_token:
            raise ErrorResponse(401, "BadArgument", "The stream URL carries no token (t)")
        token = self._read_token(stream_token)
        if token is None or not token.stream:
            raise ErrorResponse(403, "BadArgument", "Invalid stream token")
        self._check_unexpired(token)
        conversation = self.conversation(conversation_id, token)
        with self._lock:
            position = self.position(conversation, watermark) if watermark else conversation.end_position
            return Stream(conversation, position, conversation.next_sequence)

    def stream_frames(self, stream: Stream, stopped: threading.Event) -> Generator[str, None, None]:
        """The text frames of an open stream as they fall due, each an ActivitySet `{"activities", "watermark"}`:
        first the retained activities after the URL's watermark (sets of at most page_size), then every new
        activity, typing included, in a set of its own; an empty frame (keep-alive) after keepalive_seconds
        without one. Ends, with `stream.end_reason` set, once `stopped` is set (call wake_streams after
        setting it), the conversation is gone or the emulator closes. It sleeps on the condition between
        frames: appends, forgets, clock moves and close wake it."""
        while True:
            with self._changed:
                deadline = self.clock.now() + self.options.keepalive_seconds
                while True:
                    stream.end_reason = self._stream_end(stream, stopped)
                    if stream.end_reason:
                        return
                    frames = self._due_frames(stream)
                    if frames:
                        break
                    remaining = deadline - self.clock.now()
                    if remaining <= 0:
                        frames = [""]
                        break
                    self._changed.wait(remaining)
            yield from frames

    @contextlib.contextmanager
    def serving_stream(self) -> Iterator[None]:
        """Around the whole life of one open stream, closing handshake included: close() waits for them."""
        with self._changed:
            self._streams_open += 1
        try:
            yield
        finally:
            with self._changed:
                self._streams_open -= 1
                self._changed.notify_all()

    def wake_streams(self) -> None:
        """Make every waiting stream look again (one of them was stopped)."""
        with self._changed:
            self._changed.notify_all()

    def _stream_end(self, stream: Stream, stopped: threading.Event) -> str:
        """Why the stream must end now, or ''."""
        if stopped.is_set():
            return "closed by the client"
        if self._closing:
            stream.close_code = CloseCode.GOING_AWAY
            return "the emulator is stopping"
        conversation = stream.conversation
        if self._conversations.get(conversation.id) is not conversation or self._idle_too_long(conversation):
            return "the conversation is gone"
        return ""

    def _due_frames(self, stream: Stream) -> list[str]:
        conversation = stream.conversation
        self._prune(conversation)
        stream.position = max(stream.position, conversation.first_position)
        new = conversation.activities[stream.position - conversation.first_position:]
        frames = []
        if not stream.replayed:
            stream.replayed = True
            replay = [kept for kept in new if kept.sequence < stream.sequence]
            for start in range(0, len(replay), self.options.page_size):
                chunk = replay[start:start + self.options.page_size]
                stream.position += len(chunk)
                frames.append(self._activity_set(conversation, [kept.activity for kept in chunk], stream.position))
            new = new[len(replay):]
        typing = [kept for kept in conversation.typing if kept.sequence >= stream.sequence]
        for kept in sorted(new + typing, key=lambda kept: kept.sequence):
            if kept.activity.get("type") != "typing":
                stream.position += 1
            frames.append(self._activity_set(conversation, [kept.activity], stream.position))
            stream.sequence = max(stream.sequence, kept.sequence + 1)
        return frames

    def _activity_set(self, conversation: Conversation, activities: list[dict[str, Any]], position: int) -> str:
        return json.dumps({"activities": activities, "watermark": self.watermark(conversation, position)},
                          separators=(",", ":"))

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
        """Number and stamp the activity and add it to the conversation (typing: to the streams only)."""
        with self._lock:
            sequence = conversation.next_sequence
            conversation.next_sequence += 1
            now = self.clock.now()
            activity["id"] = f"{conversation.id}|{sequence:07d}"
            activity["timestamp"] = self.clock.iso()
            activity["channelId"] = "directline"
            activity["conversation"] = {"id": conversation.id}
            conversation.last_active = now
            if self._conversations.get(conversation.id) is conversation:
                kept = Kept(now, sequence, activity)
                (conversation.typing if activity.get("type") == "typing" else conversation.activities).append(kept)
                self._changed.notify_all()
            return _copy(activity)

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
        elif self._copilot is not None:
            self._ask_copilot(conversation, activity)
        elif self.options.echo:
            self._echo(conversation, activity)

    def _ask_copilot(self, conversation: Conversation, activity: dict[str, Any]) -> None:
        """Queue the Copilot-like bot's turn for `activity`: composed once the turns before it were sent, from the
        conversation as it is then (the bot's activities so far and the user's up to `activity`)."""
        def compose() -> list[copilot_bot.Step]:
            with self._lock:
                sequence = int(activity["id"].rpartition("|")[2])
                history = _copy([kept.activity for kept in conversation.activities if kept.sequence < sequence
                                 or (kept.activity.get("from") or {}).get("role") == "bot"])
                delay = self._random.uniform(*self.options.copilot_delay)
            steps = copilot_bot.turn(activity, history, delay=delay)
            return [replace(step, activity={**step.activity, "recipient": activity.get("from")}) for step in steps]

        assert self._copilot is not None
        self._copilot.play(conversation.id, compose)

    def _copilot_sends(self, conversation_id: str, activity: dict[str, Any]) -> str | None:
        """The Copilot-like bot's activity appended to its conversation; None when the conversation is gone."""
        with self._lock:
            conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return None
        return self.append_bot(conversation, activity, None)

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
                  "id": f"{conversation.id}|update", "timestamp": self.clock.iso(), "channelId": "directline",
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

    def _known(self, conversation_id: str) -> Conversation:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            raise ErrorResponse(404, "BadArgument", "Unknown conversation")
        return conversation

    def admin_conversation(self, conversation_id: str) -> dict[str, Any]:
        """The retained activity set and the watermark after it (typing is never in it)."""
        with self._lock:
            conversation = self._known(conversation_id)
            self._prune(conversation)
            return _copy({
                "conversationId": conversation.id, "started": conversation.started, "user": conversation.user,
                "activities": [kept.activity for kept in conversation.activities],
                "watermark": self.watermark(conversation, conversation.end_position),
            })

    def forget(self, conversation_id: str) -> None:
        with self._lock:
            if not self._forget(conversation_id):
                raise ErrorResponse(404, "BadArgument", "Unknown conversation")

    def expire_tokens(self, conversation_id: str) -> None:
        with self._lock:
            self._known(conversation_id).tokens_revoked_at = self.clock.now()

    def reset_watermark(self, conversation_id: str) -> None:
        with self._lock:
            self._known(conversation_id).replay_pending = True

    def invalidate_watermarks(self, conversation_id: str) -> None:
        """Every watermark issued so far for the conversation is refused from now on (a new mark); positions go on."""
        with self._lock:
            conversation = self._known(conversation_id)
            previous = conversation.mark
            while conversation.mark == previous:
                conversation.mark = _new_mark()

    def clock_state(self) -> dict[str, Any]:
        return {"now": self.clock.iso(), "offset_seconds": self.clock.offset}

    def advance_clock(self, seconds: float) -> dict[str, Any]:
        """Move the emulator's clock forward (ValueError when `seconds` is negative); wakes the streams."""
        with self._changed:
            self.clock.advance(seconds)
            self._changed.notify_all()
            return self.clock_state()

    def close(self) -> None:
        """End every open stream (close code 1001, waiting for the closing handshakes a few seconds at most)
        and cancel the echo bot's pending late replies and the Copilot-like bot's pending turns."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._streams_open == 0, CLOSE_TIMEOUT_SECONDS + 1)
        for timer in list(self._timers):
            timer.cancel()
        if self._copilot is not None:
            self._copilot.close()
        self._http.close()


def _copy(value: Any) -> Any:
    """A deep copy of JSON data, so what leaves the lock is never shared with the conversation."""
    return json.loads(json.dumps(value))


def _new_mark() -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(4))


def _require_api_version(query: dict[str, str]) -> None:
    if not query.get("api-version"):
        raise ErrorResponse(400, "BadArgument", "The api-version query parameter is required")


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
    ("GET", re.compile(rf"{API}/conversations/(?P<cid>[^/]+)/stream"), "conversations/stream"),
    ("GET", re.compile(r"/powervirtualagents/botsbyschema/(?P<schema>[^/]+)/directline/token"), "agent/token"),
    ("GET", re.compile(r"/powervirtualagents/regionalchannelsettings"), "agent/regionalchannelsettings"),
    ("GET", re.compile(rf"{API}/attachments/(?P<key>[^/]+)(?:/[^/]*)?"), "attachments/get"),
    ("POST", re.compile(r"/v3/conversations/(?P<cid>[^/]+)/activities"), "connector/send"),
    ("POST", re.compile(r"/v3/conversations/(?P<cid>[^/]+)/activities/(?P<reply>[^/]+)"), "connector/reply"),
    ("GET", re.compile(rf"{ADMIN}/?"), "admin/state"),
    ("PUT", re.compile(rf"{ADMIN}/faults"), "admin/faults"),
    ("DELETE", re.compile(rf"{ADMIN}/faults"), "admin/clear-faults"),
    ("POST", re.compile(rf"{ADMIN}/counters/reset"), "admin/reset-counters"),
    ("POST", re.compile(rf"{ADMIN}/clock"), "admin/clock"),
    ("GET", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)"), "admin/conversation"),
    ("POST", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)/forget"), "admin/forget"),
    ("POST", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)/expire-tokens"), "admin/expire-tokens"),
    ("POST", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)/reset-watermark"), "admin/reset-watermark"),
    ("POST", re.compile(rf"{ADMIN}/conversations/(?P<cid>[^/]+)/invalidate-watermarks"),
     "admin/invalidate-watermarks"),
]
_MAX_BODY_BYTES = 64 * 1024 * 1024

UPGRADED = Answer(101)
"""What `respond` returns once its `upgrade` served a stream: the connection was the stream's, nothing is left."""


def respond(emulator: Emulator, method: str, target: str, headers: Headers, body: bytes, *,
            upgrade: Callable[[Stream], None] | None = None) -> Answer:
    """The emulator's whole answer to one request: the only way in, for the HTTP server and the in-process
    transport alike (devstack/directline/transport.py), so both get the same routing, checks and faults.

    `target` is the path and query as on the request line, `body` the request's whole body.
    ConnectionDropped when the injected fault is a dropped connection. A request for a streamUrl that
    passes its checks is handed to `upgrade` (the HTTP server's WebSocket, which serves the stream until
    it ends; then UPGRADED is returned), or answered 426 when there is none (in-process, or no
    `Upgrade: websocket` header)."""
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
    if endpoint == "conversations/stream":
        return _open_stream(emulator, params["cid"], query, headers, upgrade)
    latency, fault = emulator.draw_fault(endpoint, conversation_id)
    if latency:
        time.sleep(latency)
    # Throttling happens before any work, as in the real service: a 429 never follows processing.
    failure = fault if fault != "204" else None
    if failure and (emulator.faults.phase == "before" or failure in ("poll-limit", "429")):
        return _fault(emulator, failure, headers)
    try:
        status, content, extra = _dispatch(emulator, endpoint, params, query, headers, body)
    except ErrorResponse as error:
        status, content, extra = error.status, error.body(), error.headers
    if failure:
        return _fault(emulator, failure, headers)
    if fault == "204" and status == 200:
        return Answer(204, {"Cache-Control": "no-store", **_cors(headers)})
    return _answer(status, content, extra, headers)


def _open_stream(emulator: Emulator, conversation_id: str, query: dict[str, str], headers: Headers,
                 upgrade: Callable[[Stream], None] | None) -> Answer:
    try:
        stream = emulator.grant_stream(conversation_id, query.get("t"), query.get("watermark"))
        if upgrade is None:
            raise ErrorResponse(426, "BadArgument", "streamUrl is a WebSocket: open it with a WebSocket client",
                                {"Upgrade": "websocket"})
    except ErrorResponse as error:
        return error_answer(error, headers)
    upgrade(stream)
    return UPGRADED


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
    if endpoint == "agent/token":
        return (*emulator.agent_token(query), {})
    if endpoint == "agent/regionalchannelsettings":
        return (*emulator.regional_channel_settings(query), {})
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
    if endpoint == "admin/clock":
        return 200, emulator.advance_clock(_advance_seconds(_json_body(raw))), {}
    action = {"admin/forget": emulator.forget, "admin/expire-tokens": emulator.expire_tokens,
              "admin/reset-watermark": emulator.reset_watermark,
              "admin/invalidate-watermarks": emulator.invalidate_watermarks}[endpoint]
    action(cid)
    return 200, {"conversationId": cid, "done": endpoint.removeprefix("admin/")}, {}


def _advance_seconds(body: dict[str, Any]) -> float:
    """The `advance_seconds` of a POST /_emulator/clock body; 400 for anything but a number >= 0."""
    unknown = sorted(set(body) - {"advance_seconds"})
    seconds = body.get("advance_seconds")
    if unknown or isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < float("inf"):
        raise ErrorResponse(400, "BadArgument", 'Send {"advance_seconds": <seconds, zero or more>}')
    return float(seconds)


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


_STREAM_TOKEN_IN_URL = re.compile(r"([?&]t=)[^&\s\"]+")


class Handler(BaseHTTPRequestHandler):
    """Reads a request off the socket, lets `respond` answer it, and writes the answer back; a request for a
    streamUrl with `Upgrade: websocket` becomes that stream, on this connection and this thread, until it ends."""

    protocol_version = "HTTP/1.1"
    server_version = "DirectLineEmulator/1.0"
    emulator: Emulator  # set on the subclass built by make_server

    def log_message(self, fmt: str, *args) -> None:
        """One line per request, with a streamUrl's token (`t=`) left out."""
        log.info("%s %s", self.address_string(), _STREAM_TOKEN_IN_URL.sub(r"\1<redacted>", fmt % args))

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
        wants_websocket = "websocket" in (self.headers.get("Upgrade") or "").lower()
        try:
            answer = respond(self.emulator, method, self.path, self.headers, raw,
                             upgrade=self._serve_stream if method == "GET" and wants_websocket else None)
        except ConnectionDropped:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if answer is UPGRADED:
            self.close_connection = True
            return
        self._send(answer)

    def _serve_stream(self, stream: Stream) -> None:
        """The WebSocket handshake (websockets' sans-I/O ServerProtocol, on the request already read), then the
        stream's frames until it ends; a handshake websockets refuses gets its answer (400, 426...)."""
        self.close_connection = True
        protocol = ServerProtocol()
        protocol.receive_data(self._request_head())
        request = next(iter(protocol.events_received()), None)
        connection = _StreamSocket(self.connection, self.rfile, protocol, self.emulator.wake_streams)
        if not isinstance(request, Request):  # not a request websockets can parse: it has already said goodbye
            connection.flush()
            return
        response = protocol.accept(request)
        protocol.send_response(response)
        connection.flush()
        self.log_message('"%s" %s -', self.requestline, response.status_code)
        if response.status_code == 101:
            with self.emulator.serving_stream():
                connection.serve(self.emulator.stream_frames(stream, connection.ended), stream)

    def _request_head(self) -> bytes:
        """The request line and headers http.server has read, as they came (websockets parses them again)."""
        lines = [f"{self.command} {self.path} {self.request_version}",
                 *(f"{name}: {value}" for name, value in self.headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

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


class _StreamSocket:
    """One upgraded connection. The handler's thread sends the stream's frames (`serve`); a reader thread feeds
    what the client sends to the protocol, which answers its pings and its closing handshake (the client's
    own text frames, such as DirectLineJS's empty ones, are read and ignored: clients post over HTTP).
    The protocol and the socket's writes are used under one lock."""

    def __init__(self, connection: socket.socket, rfile: io.BufferedIOBase, protocol: ServerProtocol,
                 wake: Callable[[], None]):
        self._connection = connection
        self._rfile = rfile
        self._protocol = protocol
        self._wake = wake
        self._io = threading.Lock()
        self.ended = threading.Event()
        """Set once the client sent its close frame, or the connection ended or broke."""

    def flush(self) -> None:
        """Write what the protocol has to send; its end-of-stream marker half-closes the connection."""
        for data in self._protocol.data_to_send():
            if data:
                self._connection.sendall(data)
            else:
                with contextlib.suppress(OSError):
                    self._connection.shutdown(socket.SHUT_WR)

    def serve(self, frames: Generator[str, None, None], stream: Stream) -> None:
        """Send `frames` as text frames until they end or the client leaves, then close the stream cleanly
        (a close frame with the stream's close code and reason, the client's answer awaited)."""
        reader = threading.Thread(target=self._read, name="directline-stream-reader", daemon=True)
        reader.start()
        try:
            for frame in frames:
                with self._io:
                    if self._protocol.state is not State.OPEN:
                        break
                    self._protocol.send_text(frame.encode())
                    self.flush()
        except OSError:
            self.ended.set()  # the client is gone; the reader sees it too
        finally:
            frames.close()
            with self._io:
                if self._protocol.state is State.OPEN:
                    self._protocol.send_close(stream.close_code, stream.end_reason)
                    with contextlib.suppress(OSError):
                        self.flush()
            self.ended.wait(CLOSE_TIMEOUT_SECONDS)
            with contextlib.suppress(OSError):
                self._connection.shutdown(socket.SHUT_RDWR)
            reader.join(CLOSE_TIMEOUT_SECONDS)

    def _read(self) -> None:
        try:
            while True:
                try:
                    data = self._rfile.read1(65536)
                except (OSError, ValueError):
                    data = b""
                with self._io:
                    if data:
                        self._protocol.receive_data(data)
                    else:
                        self._protocol.receive_eof()
                    self._protocol.events_received()
                    with contextlib.suppress(OSError):
                        self.flush()
                    closing = self._protocol.close_rcvd is not None
                if closing and not self.ended.is_set():
                    self.ended.set()
                    self._wake()
                if not data or self._protocol.state is State.CLOSED:
                    return
        finally:
            self.ended.set()
            self._wake()


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
