"""A Direct Line 3.0 emulator: the documented service, offline, for development and every relay test.

    python -m devstack.directline --port 3000 --secret S [--enhanced-auth] [--token-ttl 1800]
        [--echo | --copilot [--copilot-delay MIN MAX] | --bot-url URL]

The secret may also come from the DIRECTLINE_SECRET environment variable (keeps it out of `ps`);
with `--copilot` it may be left out (a random one is made: clients use the token endpoint).
Multi-threaded, bound to 127.0.0.1 only, all state in memory. The Direct Line API is served under
http://127.0.0.1:PORT/v3/directline with every call of the reference table (tokens/generate,
tokens/refresh, start conversation, reconnect, GET/POST activities, upload), the documented statuses
and error bodies `{"error": {"code": "...", "message": "..."}}`, and the WebSocket stream at each
streamUrl (ws://127.0.0.1:PORT/v3/directline/conversations/{id}/stream?watermark=W&t=...), on the
same port. It is meant to be no kinder than the real service: where the service refuses or forgets,
so does the emulator. Sources: /work/shared/reference/directline.md and the issues named below.

The bot
- `--echo` (default): a built-in echo bot, no other process. It says what devstack/bot.py says
  (devstack/directline/echo.py): a `typing` activity, then "You said: <text>" with replyToId;
  "later" also gets "Late reply: later" `--late-reply-seconds` after the turn; "card" a hero card
  with suggested actions; "bye" "Goodbye." then endOfConversation. Replies come from {id: --bot-id
  (default "relaybot"), name: --bot-name, role: "bot"} and are in the activity set before the
  user's POST returns, as a real bot's in-turn replies are.
- `--copilot`: a built-in Copilot-like bot (devstack/directline/copilot.py, whose docstring lists
  everything it does, after /work/shared/reference/copilot-studio.md): tokens of 3,600 s (unless
  `--token-ttl`), a greeting only on an `event` named `startConversation` (in its `locale`), answers
  `--copilot-delay MIN MAX` seconds (1-4) after the user's message on a thread of its own, each turn
  preceded by `typing` and holding several Markdown messages; "choice" asks a multiple-choice
  question as suggestedActions, "card" an Adaptive Card question whose answer `value` it checks,
  "agent" sends a `handoff.initiate` event, "stream" streams an answer as typing activities with a
  `streaminfo` entity before the final message. Its from.name is "Copilot" unless `--bot-name`.
- `--bot-url URL`: each client activity is POSTed to the bot's messaging endpoint (Bot Connector
  protocol, no auth header) with `serviceUrl` = http://127.0.0.1:PORT; the bot answers through
  `POST /v3/conversations/{id}/activities[/{replyToId}]` here (anonymous accepted, as locally
  without an app id). No answer within `--bot-timeout` (15 s) -> 504 BotError; connection refused
  or a 4xx/5xx from the bot -> 502 BotRejectedActivity. In both cases the user's activity is
  already in the activity set (so clients must look for it before re-posting).
- `--no-bot`: activities are stored and nothing answers (tests drive the bot side through the
  connector endpoint).

Copilot Studio environment routes (no auth, whatever the bot; the host of a real agent's token endpoint
serves them: "Getting a token without a secret", "Which Direct Line host" in copilot-studio.md)
- `GET /powervirtualagents/botsbyschema/{schema}/directline/token?api-version=V` (AGENT_TOKEN_PATH):
  200 {"token", "expires_in", "conversationId"}: a token for a new conversation, bound to no user and
  no origin (as generate without a body); start it with `POST /v3/directline/conversations` and that
  token. Any schema name is served. Without api-version: 400 BadArgument.
- `GET /powervirtualagents/regionalchannelsettings?api-version=V`: 200
  {"channelUrlsById": {"directline": "http://127.0.0.1:PORT/"}}: the Direct Line base is that URL +
  "v3/directline". Without api-version: 400 BadArgument.
Both are counted (agent/token, agent/regionalchannelsettings); faults never apply to them.

Choices where the documentation is silent or inconsistent (configurable where it matters)
- Enhanced authentication (`--enhanced-auth`; off by default on the command line as on a new
  Direct Line site, ON by default in DirectLineEmulator and InProcessEmulator, the stricter mode):
  reconnect (GET /conversations/{id}) with the SECRET answers 400
  {"error": {"code": "MissingProperty", "message": "Missing user ID"}} ("Reconnect to a
  conversation" page; MicrosoftDocs/bot-docs#412 and #679, BotFramework-DirectLineJS#191), after
  the 404 for an unknown conversation (the order is unconfirmed). With a still-valid token of the
  conversation it works and the new token carries the same user. Without enhanced auth, reconnect
  with the secret works and the new token carries no user (BotFramework-Services#277). In both
  modes GET/POST activities and upload accept the secret. With enhanced auth the user id bound to a
  token wins over the activity's from.id (and upload's userId); without it, from.id (or userId) is
  kept as the client sent it, whatever user its token carries, as on the real service: a client
  stamps from.id itself. "dl_" prefixes are not required.
  Whether the service invents a user id for a token asked for without one under enhanced auth is
  unconfirmed: here such a token carries no user.
- Tokens: opaque `<base64url payload>.<HMAC>` strings signed with a key made at start-up, bound to
  one conversation, the user and the trusted origins given to generate/start (refresh and
  reconnect keep them). A token survives its conversation being forgotten (then calls answer 404),
  as a signed token would. No token can be revoked before it expires (admin expire-tokens stands
  in for time passing).
- Auth: no Authorization header, or not `Bearer <value>` -> 401 BadArgument; a value that is
  neither the secret nor a valid token (malformed, forged, from an earlier emulator run, a stream
  token) -> 403 BadArgument "Invalid token or secret"; an expired token -> 403 TokenExpired (also
  for refresh). A token used on another conversation -> 403 BadArgument. tokens/generate with a
  token and tokens/refresh with the secret -> 403 BadArgument.
- Trusted origins are NOT enforced on API calls: a token bound to origins works from any Origin
  (or none) for every call, as with the real service (BotFramework-DirectLineJS#259 and #187,
  BotFramework-WebChat#4189; they only matter for session/getsessionid, sign-in, not emulated).
- CORS: every answer to a request with an Origin carries `Access-Control-Allow-Origin: *`, and
  OPTIONS preflights are answered 204, so Web Chat pages on any origin can call it.
- tokens/generate reserves the conversation without contacting the bot; the first start with that
  token answers 201 (and greets the bot), every later one 200 with the same token and its
  remaining lifetime. Start with the secret always makes a new conversation (201).
- Start conversation sends the `--bot-url` bot a conversationUpdate (membersAdded: bot, user if
  known) in the background; a failure there does not fail the start. conversationUpdate is never
  sent to clients.
- Reconnect returns a new token with `expires_in` (= --token-ttl) and a streamUrl (with the
  watermark given, if any); an invalid watermark -> 400 BadArgument.
- The stream (WebSocket, RFC 6455 through the `websockets` library's sans-I/O protocol): each
  streamUrl's `t` is a stream token that must be used within 60 s ("open it within 60 s"; it opens
  that conversation's stream and nothing else). Without `t` -> 401 BadArgument; a `t` that is not
  a stream token of this emulator or is for another conversation -> 403 BadArgument; older than
  60 s (or issued before admin expire-tokens) -> 403 TokenExpired; unknown conversation -> 404;
  invalid watermark -> 400; all answered before the upgrade, with the JSON error body. A valid
  request without `Upgrade: websocket` (or in-process) -> 426. Once open, the server sends only
  text frames, each a JSON ActivitySet {"activities": [...], "watermark": "..."}: first the
  retained activities after the URL's watermark (none without one: only newer activities come),
  in sets of at most --page-size, then every new activity in a set of its own as it is appended,
  the user's own and `typing` included (typing comes only over the stream, never in GET
  activities; its set repeats the current watermark). An empty text frame is a keep-alive, sent
  after `--keepalive-seconds` (30) without a frame: the service's empty keep-alive frames are
  documented, their interval is not (unconfirmed). The server answers pings, ignores the client's
  own text frames (DirectLineJS sends empty ones as pings), and closes cleanly (close frame 1000
  when the conversation is forgotten, 1001 when the emulator stops). An open stream outlives its
  token. Faults never apply to streams; each opening is counted as conversations/stream.
- Watermarks: `<4 random letters>-<position>`, e.g. "qkzd-12": never a plain integer, specific to
  one conversation; a watermark that does not belong to the conversation -> 400 BadArgument (the
  real answer to a refused watermark is undocumented). An empty watermark means "from the start".
  No watermark in the answer while the conversation never had an activity. Pages hold at most
  `--page-size` (100) activities.
- Retention: activities older than `--retention-seconds` (24 h: "messages are kept about 24 h")
  are gone from GET activities, the stream's replay and the admin view; watermark positions keep
  counting, so an old watermark still reads whatever is newer.
- One clock: every time the emulator reads (token lifetimes, retention, idle conversations,
  files, poll pacing, timestamps, keep-alive deadlines) is the wall clock plus an offset that
  admin POST /_emulator/clock moves forward.
- Activity ids: `<conversationId>|0000012` (7 digits, one sequence per conversation, bot and user).
  typing activities get an id too.
- POST activity: `type` and `from.id` required (400 MissingProperty); larger than
  `--max-activity-chars` (256K characters) -> 413 MessageSizeTooBig. Answered 200 {"id"}, or 204
  with no body under the no_content_rate fault ("may answer 204 with no body in some
  deployments").
- endOfConversation from the client is stored and forwarded to the bot
  (`--no-forward-end-of-conversation` stores it only); the conversation stays usable afterwards.
- Upload: `?userId=` or the activity part's from.id is required (400 MissingProperty); larger than
  `--max-upload-bytes` (4 MiB) -> 413 MessageSizeTooBig. Files are served without auth at their
  contentUrl (http://127.0.0.1:PORT/v3/directline/attachments/<random>/<name>) for 24 h.
- Idle conversations (no activity posted by anyone, no start or reconnect; polling and streams do
  not count) are forgotten after `--conversation-ttl` seconds (15 days: "roughly 15-20 days"),
  then every call on them answers 404 BadArgument "Unknown conversation".
- 429: `Retry-After` is in seconds (the HTTP unit), default "1"; code TooManyRequests. Injected
  500/502: code ServiceError.

Admin API (no auth, loopback only; JSON in and out)
- `GET /_emulator/`: {"faults": {...}, "counters": {"requests": {endpoint: n},
  "conversations": {conversationId: {endpoint: n}}, "faults": {"429"|"poll-limit"|"500"|"502"|"drop"|"204": n}},
  "conversations": <number alive>, "clock": {"now", "offset_seconds"}, "options": {... no secret}}.
  Endpoints counted: tokens/generate, tokens/refresh, conversations/start, conversations/reconnect,
  conversations/stream, activities/get, activities/post, upload, attachments/get, connector/send,
  connector/reply, agent/token, agent/regionalchannelsettings.
- `POST /_emulator/counters/reset`: zero the counters.
- `PUT /_emulator/faults` with any of (merged into the current settings; 400 on an unknown key):
    latency_ms (0)           added to every matching request
    throttle_rate (0.0)      share of requests answered 429 with Retry-After
    retry_after ("1")        the Retry-After header value
    poll_limit (false)       429 when one conversation's activities are polled faster than
    min_poll_interval (1.0)  once every this many seconds (50 ms tolerance)
    error_500_rate, error_502_rate (0.0)   share answered 500 / 502 ServiceError
    drop_rate (0.0)          share whose connection is closed without an answer
    no_content_rate (0.0)    share of POST activities / upload processed and answered 204, no body
    phase ("before")         "after": the request is processed (activity stored, bot called) and
                             then the fault replaces the answer: the ambiguous failure
                             (500, 502 and dropped connections only: a 429 always comes first)
    endpoints ([] = all)     Direct Line endpoint names the faults apply to
    limit (null)             inject at most this many rate-based faults, then none
  Faults (and the CLI flags of the same names) apply only to the Direct Line endpoints, never to
  the stream, the admin, connector or attachment ones.
- `DELETE /_emulator/faults`: back to no faults.
- `POST /_emulator/clock` {"advance_seconds": N}: move the emulator's clock N >= 0 seconds forward
  (tokens expire, activities age out, idle conversations and files are forgotten as if the time
  had passed); answers {"now", "offset_seconds"}. 400 for anything but a number >= 0.
- `GET /_emulator/conversations/{id}`: {"conversationId", "started", "user", "activities" (retained),
  "watermark"}.
- `POST /_emulator/conversations/{id}/forget`: forget it now (next call 404; its streams close).
- `POST /_emulator/conversations/{id}/expire-tokens`: every token issued so far for it (stream
  tokens included) is expired (403 TokenExpired).
- `POST /_emulator/conversations/{id}/reset-watermark`: the next GET activities replays the
  retained history from the first activity whatever watermark it sends.
- `POST /_emulator/conversations/{id}/invalidate-watermarks`: every watermark issued so far for it
  is refused from now on (400 BadArgument on GET activities, reconnect and streamUrl), as after a
  service-side change; reading without a watermark works (and returns the retained history, so
  clients dedupe by id), and new watermarks go on from the same positions.
A bot activity can be injected with `POST /v3/conversations/{id}/activities` (the connector endpoint).

From Python use `DirectLineEmulator` (a devstack.procs.ManagedProcess), or `InProcessEmulator`
(devstack/directline/transport.py: the same core mounted on a `requests` session, no process, no
stream: it answers a streamUrl 426).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from devstack.directline.copilot import COPILOT_TOKEN_SECONDS
from devstack.directline.server import AGENT_TOKEN_PATH
from devstack.procs import ManagedProcess, free_port, http_ok, python_module

__all__ = ["DirectLineEmulator", "EmulatorAdmin"]


class EmulatorAdmin:
    """The admin API's calls (see above), on an emulator behind a socket or in-process (transport.py)."""

    admin_url: str

    def _request(self, method: str, url: str, *, timeout: float, **options: Any) -> requests.Response:
        """Where the calls go: over the network here; InProcessEmulator sends them through its transport."""
        return requests.request(method, url, timeout=timeout, **options)

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self._request(method, f"{self.admin_url}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def state(self) -> dict[str, Any]:
        """Everything GET /_emulator/ says: faults, counters, live conversations, options."""
        return self._admin("GET", "/")

    def counters(self) -> dict[str, Any]:
        """{"requests": {endpoint: n}, "conversations": {id: {endpoint: n}}, "faults": {kind: n}}."""
        return self.state()["counters"]

    def reset_counters(self) -> None:
        self._admin("POST", "/counters/reset")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge fault settings (see the package docstring); returns them all."""
        return self._admin("PUT", "/faults", faults)

    def clear_faults(self) -> dict[str, Any]:
        return self._admin("DELETE", "/faults")

    def conversation(self, conversation_id: str) -> dict[str, Any]:
        """The whole activity set of a conversation, without auth or paging."""
        return self._admin("GET", f"/conversations/{conversation_id}")

    def forget(self, conversation_id: str) -> None:
        self._admin("POST", f"/conversations/{conversation_id}/forget")

    def expire_tokens(self, conversation_id: str) -> None:
        self._admin("POST", f"/conversations/{conversation_id}/expire-tokens")

    def reset_watermark(self, conversation_id: str) -> None:
        self._admin("POST", f"/conversations/{conversation_id}/reset-watermark")

    def invalidate_watermarks(self, conversation_id: str) -> None:
        """Every watermark issued so far for the conversation is refused (400) from now on."""
        self._admin("POST", f"/conversations/{conversation_id}/invalidate-watermarks")

    def advance_clock(self, seconds: float) -> dict[str, Any]:
        """Move the emulator's clock `seconds` forward; returns {"now", "offset_seconds"}."""
        return self._admin("POST", "/clock", {"advance_seconds": seconds})


class DirectLineEmulator(EmulatorAdmin, ManagedProcess):
    """`python -m devstack.directline` on a loopback port, with helpers for its admin API.

    Enhanced authentication is on unless `enhanced_auth=False`; other flags go in `extra_args`.
    `copilot=True` runs the Copilot-like bot (tokens of 3,600 s unless `token_ttl`, answers `copilot_delay`
    seconds late); `token_endpoint` is its agent token endpoint URL either way."""

    def __init__(self, *, secret: str, port: int | None = None, token_ttl: float | None = None, echo: bool = True,
                 bot_url: str | None = None, enhanced_auth: bool = True, copilot: bool = False,
                 copilot_delay: tuple[float, float] | None = None, extra_args: Sequence[str] = (),
                 log_path: Path | None = None, env: dict[str, str] | None = None, startup_timeout: float = 30):
        self.port = port or free_port()
        self.secret = secret
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v3/directline"
        self.admin_url = f"{self.url}/_emulator"
        self.token_endpoint = f"{self.url}{AGENT_TOKEN_PATH}"
        if token_ttl is None:
            token_ttl = COPILOT_TOKEN_SECONDS if copilot else 1800
        argv = python_module("devstack.directline", "--port", str(self.port), "--token-ttl", f"{token_ttl:g}",
                             "--enhanced-auth" if enhanced_auth else "--no-enhanced-auth")
        if bot_url:
            argv += ["--bot-url", bot_url]
        elif copilot:
            argv += ["--copilot"]
            if copilot_delay is not None:
                argv += ["--copilot-delay", f"{copilot_delay[0]:g}", f"{copilot_delay[1]:g}"]
        elif not echo:
            argv += ["--no-bot"]
        argv += list(extra_args)
        child_env = {**(env if env is not None else os.environ), "DIRECTLINE_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        super().__init__("directline emulator", argv, env=child_env, log_path=log_path,
                         ready=lambda: http_ok(f"{self.admin_url}/"), startup_timeout=startup_timeout)

    def __repr__(self) -> str:
        return f"DirectLineEmulator(base_url={self.base_url!r})"
