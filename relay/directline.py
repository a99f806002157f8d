"""Direct Line 3.0 client: every call the relay and the token server make, on one pooled session.

Failures are raised as relay.errors.DirectLineError subclasses. Throttling (429) and transient
faults are retried with capped exponential backoff and full jitter within a bounded time budget,
honouring Retry-After (read as seconds, capped). A POST that may have reached the bot (502/504, a
read timeout, a dropped connection) is NEVER sent again here: BotFailed or
TransientError(ambiguous=True) is raised, and the caller looks for the activity's clientActivityID
(find_activity_by_client_id) before deciding to post again. A POST answered 200 or 204 without a
body succeeded: the activity's id is then None (some deployments never send one).

Token endpoint mode (DIRECTLINE_TOKEN_ENDPOINT, a Copilot Studio agent without web channel security;
/work/shared/reference/copilot-studio.md): there is no secret. `token_from_endpoint` GETs a token for
a new conversation from the agent's endpoint (no auth; `expires_in` as given), and a conversation
started without a token starts with one of those. Every other call needs a token of its conversation.
Without an explicit DIRECTLINE_ENDPOINT the Direct Line base is discovered once per client (the
process's one, shared by its clones) from the environment's
`GET /powervirtualagents/regionalchannelsettings?api-version=...` on the token endpoint's host:
`channelUrlsById.directline` + "v3/directline". A failed discovery is tried again on the next call.
A 4xx (not 429) from either agent route is AgentEndpointRefused, never a Direct Line verdict on a
conversation or a token.

GETs (the poller's peeks: most of a busy tick's CPU) go on http.client connections kept open
(relay/kept_connections.py) unless a proxy or a test transport serves the origin; everything else
on the requests session. Secrets and tokens never appear in log lines, exception messages or reprs.
`requests` and http.client are imported on first use: the module stays cheap to import at a cold start.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from relay import telemetry
from relay.clock import SYSTEM_CLOCK, Clock
from relay.errors import (
    AgentEndpointRefused,
    AuthenticationFailed,
    BadRequest,
    BotFailed,
    ConversationNotFound,
    DirectLineError,
    Throttled,
    TokenExpired,
    TransientError,
)
from relay.http_environment import OriginProxies, ca_bundle, origin_of
from relay.retry_after import retry_after_seconds
from relay.settings import DirectLineSettings, get_settings

if TYPE_CHECKING:
    import requests
    from requests.adapters import BaseAdapter

    from relay.kept_connections import HttpAnswer, KeptConnections

__all__ = [
    "DEFAULT_TOKEN_SECONDS",
    "TOKEN_REFRESH_SHARE",
    "ActivitySet",
    "ConversationToken",
    "DirectLineClient",
    "RetryPolicy",
    "UploadFile",
    "get_directline_client",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.05  # seconds; just above a TCP retransmission window
USER_AGENT = "directline-relay/0.1"
ACTIVITY_CONTENT_TYPE = "application/vnd.microsoft.activity"
REGIONAL_SETTINGS_PATH = "/powervirtualagents/regionalchannelsettings"
AGENT_API_VERSION = "2022-03-01-preview"
"""The api-version asked of regionalchannelsettings when the token endpoint's URL names none."""
DEFAULT_TOKEN_SECONDS = 1800
"""A token's lifetime when Direct Line's answer does not say (`expires_in`): its documented default."""
OPERATION_NAMES = {
    "tokens/generate": "generate", "agent token": "token_endpoint", "tokens/refresh": "refresh",
    "conversations/start": "start", "conversations/reconnect": "reconnect", "activities/get": "get",
    "activities/post": "post", "upload": "upload", "regionalchannelsettings": "discover",
}
"""Each call's name in telemetry (relay.directline.errors, dimension `operation`)."""
TOKEN_REFRESH_SHARE = (0.45, 0.55)
"""A token wants refreshing once this share of its lifetime has passed, drawn per token (jitter): about half
its life, for every token the relay keeps alive."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one call tries. The budget bounds the total time spent waiting between tries."""

    attempts: int = 4  # tries in all, the first included
    backoff: float = 0.5  # seconds before the first retry (full jitter), doubled per retry
    backoff_cap: float = 4.0
    max_retry_after: float = 30.0  # a longer Retry-After is capped to this
    budget: float = 10.0


@dataclass(frozen=True)
class ConversationToken:
    """A token bound to one conversation: from generate, refresh, start or reconnect.

    `expires_in` is None when Direct Line did not say (reconnect); `stream_url` carries the token too.
    """

    conversation_id: str
    token: str = field(repr=False)
    expires_in: int | None = None
    stream_url: str | None = field(default=None, repr=False)

    @property
    def lifetime_seconds(self) -> int:
        """`expires_in`, or DEFAULT_TOKEN_SECONDS when Direct Line did not say."""
        return self.expires_in if self.expires_in is not None else DEFAULT_TOKEN_SECONDS

    def schedule(self, *, now: datetime, clock: Clock,
                 share: tuple[float, float] = TOKEN_REFRESH_SHARE) -> tuple[datetime, datetime]:
        """(when it expires, when it wants refreshing), for a token granted at `now`: its lifetime as given,
        and a `share` of that drawn from `clock`."""
        lifetime = timedelta(seconds=self.lifetime_seconds)
        return now + lifetime, now + lifetime * clock.uniform(*share)


@dataclass(frozen=True)
class ActivitySet:
    """One page of activities. `watermark` is opaque: store it, send it back, never parse or compare it."""

    activities: tuple[dict[str, Any], ...]
    watermark: str | None


@dataclass(frozen=True)
class UploadFile:
    name: str
    content: bytes = field(repr=False)
    content_type: str = "application/octet-stream"


class DirectLineClient:
    """Direct Line 3.0 on one pooled requests.Session and, for GETs, kept connections (thread-safe for the
    poller's workers).

    Every conversation call authenticates with the secret unless a `token` is given. The waits between
    tries, their jitter and the reading of a Retry-After date go through `clock`. `transport` is a
    test seam, unused in production: a requests adapter mounted for the endpoint instead of the network
    (devstack/directline/transport.py serves the emulator through one); every call, GETs included, then
    goes through it. `pool_size` bounds the connections kept open to each origin, on either path.
    """

    def __init__(self, settings: DirectLineSettings, *, retry: RetryPolicy = RetryPolicy(),
                 clock: Clock = SYSTEM_CLOCK, pool_size: int = 32, transport: BaseAdapter | None = None):
        self._settings = settings
        self._retry = retry
        self._clock = clock
        self._pool_size = pool_size
        self._transport = transport
        self._session: requests.Session | None = None
        self._lock = threading.Lock()
        self._discovered = _Discovered()
        self._proxies = OriginProxies()
        self._kept: dict[str, KeptConnections] = {}  # by origin: the GETs' connections

    def __repr__(self) -> str:
        where = self._settings.endpoint or f"discovered from {origin_of(self._settings.token_endpoint)}"
        return f"DirectLineClient(endpoint={where!r})"

    @property
    def uses_token_endpoint(self) -> bool:
        """Token endpoint mode: there is no secret, and every call but the endpoint's needs a conversation's token."""
        return self._settings.uses_token_endpoint

    @property
    def endpoint(self) -> str:
        """The Direct Line 3.0 base URL: DIRECTLINE_ENDPOINT, else discovered from the agent's environment (once;
        AgentEndpointRefused or another DirectLineError when that fails, tried again next time)."""
        if self._settings.endpoint:
            return self._settings.endpoint
        with self._discovered.lock:
            if not self._discovered.endpoint:
                self._discovered.endpoint = self._discover()
            return self._discovered.endpoint

    def with_options(self, *, timeout_seconds: float | None = None,
                     retry: RetryPolicy | None = None) -> DirectLineClient:
        """A client sharing this one's connection pool with another read timeout or retry policy.

        For callers with a deadline of their own, e.g. a webhook that must answer a provider within 15 s.
        Close only the original client.
        """
        settings = replace(self._settings, timeout_seconds=timeout_seconds) if timeout_seconds else self._settings
        clone = DirectLineClient(settings, retry=retry or self._retry, clock=self._clock, pool_size=self._pool_size,
                                 transport=self._transport)
        clone._session = self._http()
        clone._discovered = self._discovered
        clone._kept = self._kept
        return clone

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        with self._lock:  # emptied in place: clones share the dict, and find new pools in it
            kept = list(self._kept.values())
            self._kept.clear()
        for connections in kept:
            connections.close()

    # ------------------------------------------------------------------------------------ tokens

    def generate_token(self, *, user_id: str | None = None, user_name: str | None = None,
                       trusted_origins: Sequence[str] = ()) -> ConversationToken:
        """A token for a new conversation (with the secret); starts nothing, contacts no bot."""
        body = _token_body(user_id, user_name, trusted_origins)
        payload = self._call("tokens/generate", "POST", "/tokens/generate", auth=self._auth(None),
                             json_body=body, idempotent=True)
        return _conversation_token(payload)

    def token_from_endpoint(self) -> ConversationToken:
        """A token for a new conversation from the agent's token endpoint (token endpoint mode), bound to no user
        and no origin; `expires_in` as the endpoint gave it. AgentEndpointRefused for a 4xx (not 429)."""
        payload = self._call("agent token", "GET", self._settings.token_endpoint, auth=None, idempotent=True,
                             agent_route=True)
        if not isinstance(payload.get("token"), str) or not payload.get("conversationId"):
            raise AgentEndpointRefused("the agent's token endpoint answered without a token and a conversationId")
        return _conversation_token(payload)

    def refresh_token(self, *, token: str) -> ConversationToken:
        """A fresh token for the same conversation; an expired token raises TokenExpired."""
        payload = self._call("tokens/refresh", "POST", "/tokens/refresh", auth=token, idempotent=True)
        return _conversation_token(payload)

    # ----------------------------------------------------------------------------- conversations

    def start_conversation(self, *, token: str | None = None, user_id: str | None = None,
                           user_name: str | None = None, trusted_origins: Sequence[str] = ()) -> ConversationToken:
        """Start a conversation: with a generated token, that token's one; else a new one, with the secret, or in
        token endpoint mode with a token from the agent's endpoint (which binds no user: activities keep the
        from.id they are sent with)."""
        if token is None and self.uses_token_endpoint:
            token = self.token_from_endpoint().token
        body = _token_body(user_id, user_name, trusted_origins)
        payload = self._call("conversations/start", "POST", "/conversations", auth=self._auth(token),
                             json_body=body, idempotent=True)
        return _conversation_token(payload)

    def reconnect(self, conversation_id: str, *, watermark: str | None = None,
                  token: str | None = None) -> ConversationToken:
        """A new token (and stream URL) for an existing conversation, from a still-valid `token` of it.

        With the secret this fails under enhanced authentication (400 MissingProperty "Missing user ID"),
        and an expired token cannot be used: whoever must stay in a conversation refreshes its token in time."""
        payload = self._call("conversations/reconnect", "GET", f"/conversations/{_segment(conversation_id)}",
                             auth=self._auth(token), params=_watermark(watermark), idempotent=True)
        return _conversation_token(payload)

    # ------------------------------------------------------------------------------- activities

    def get_activities(self, conversation_id: str, *, watermark: str | None = None,
                       token: str | None = None) -> ActivitySet:
        """The activities after `watermark`; the answer keeps `watermark` when Direct Line sends none."""
        payload = self._call("activities/get", "GET", f"/conversations/{_segment(conversation_id)}/activities",
                             auth=self._auth(token), params=_watermark(watermark), idempotent=True)
        activities = payload.get("activities") or []
        return ActivitySet(tuple(activities), payload.get("watermark") or watermark)

    def post_activity(self, conversation_id: str, activity: Mapping[str, Any], *,
                      token: str | None = None) -> str | None:
        """Send one activity; returns its id, None when Direct Line took it without saying (204, or no body).
        Never re-sent after an ambiguous failure (see the module doc)."""
        payload = self._call("activities/post", "POST", f"/conversations/{_segment(conversation_id)}/activities",
                             auth=self._auth(token), json_body=dict(activity), idempotent=False)
        return _activity_id(payload)

    def upload(self, conversation_id: str, files: Iterable[UploadFile], *, user_id: str,
               activity: Mapping[str, Any] | None = None, token: str | None = None) -> str | None:
        """Send files (and optionally the activity carrying them) as one message; returns the activity id,
        None when Direct Line took it without saying (204, or no body)."""
        parts: list[tuple[str, tuple[str, bytes, str]]] = []
        if activity is not None:
            parts.append(("activity", ("activity", json.dumps(dict(activity)).encode(), ACTIVITY_CONTENT_TYPE)))
        parts += [("file", (f.name, f.content, f.content_type)) for f in files]
        payload = self._call("upload", "POST", f"/conversations/{_segment(conversation_id)}/upload",
                             auth=self._auth(token), params={"userId": user_id}, files=parts,
                             idempotent=False)
        return _activity_id(payload)

    def find_activity_by_client_id(self, conversation_id: str, client_activity_id: str, *,
                                   watermark: str | None = None, token: str | None = None,
                                   max_pages: int = 50) -> dict[str, Any] | None:
        """The activity posted with `channelData.clientActivityID`, or None: the check after an ambiguous post.

        Reads from `watermark` (None: the whole retained history) until a page comes back empty.
        """
        for _ in range(max_pages):
            page = self.get_activities(conversation_id, watermark=watermark, token=token)
            for activity in page.activities:
                channel_data = activity.get("channelData")
                if isinstance(channel_data, dict) and channel_data.get("clientActivityID") == client_activity_id:
                    return activity
            if not page.activities or page.watermark == watermark:
                return None
            watermark = page.watermark
        return None

    def is_from_bot(self, activity: Mapping[str, Any]) -> bool:
        """The bot's activities have from.role "bot" (not guaranteed) or a from.id in DIRECTLINE_BOT_IDS."""
        sender = activity.get("from") or {}
        return sender.get("role") == "bot" or sender.get("id") in self._settings.bot_ids

    # -------------------------------------------------------------------------------- transport

    def _auth(self, token: str | None) -> str:
        """The credential of a call: `token`, else the secret; ValueError in token endpoint mode without a token
        (a caller's mistake: with no secret, every call names its conversation's token)."""
        if token:
            return token
        if self.uses_token_endpoint:
            raise ValueError("no token given, and there is no secret in token endpoint mode")
        return self._settings.secret

    def _discover(self) -> str:
        """The Direct Line base named by the environment of the agent's token endpoint (regionalchannelsettings)."""
        token_endpoint = self._settings.token_endpoint
        version = parse_qs(urlsplit(token_endpoint).query).get("api-version", [AGENT_API_VERSION])[-1]
        payload = self._call("regionalchannelsettings", "GET", origin_of(token_endpoint) + REGIONAL_SETTINGS_PATH,
                             auth=None, idempotent=True, params={"api-version": version}, agent_route=True)
        urls = payload.get("channelUrlsById")
        directline = urls.get("directline") if isinstance(urls, dict) else None
        if not isinstance(directline, str) or urlsplit(directline).scheme not in ("http", "https") \
                or not urlsplit(directline).netloc:
            raise AgentEndpointRefused("regionalchannelsettings named no Direct Line URL (channelUrlsById.directline)")
        endpoint = directline.rstrip("/") + "/v3/directline"
        log.info("Direct Line of the agent's environment: %s", endpoint)
        return endpoint

    def _http(self) -> requests.Session:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    import requests
                    from requests.adapters import HTTPAdapter

                    session = requests.Session()
                    # The environment read once (relay/http_environment.py), not at every request. (No .netrc
                    # login ever replaces our credential.)
                    session.trust_env = False
                    session.verify = ca_bundle() or True
                    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self._pool_size, max_retries=0)
                    session.mount("https://", adapter)
                    session.mount("http://", adapter)
                    if self._transport is not None:
                        for url in (self._settings.endpoint, origin_of(self._settings.token_endpoint)):
                            if url:
                                session.mount(url, self._transport)
                    session.headers["User-Agent"] = USER_AGENT
                    self._session = session
        return self._session

    def _call(self, operation: str, method: str, path: str, *, auth: str | None, idempotent: bool,
              json_body: Any = None, params: dict[str, str] | None = None,
              files: list | None = None, agent_route: bool = False) -> dict[str, Any]:
        """Direct Line's JSON answer to `method` on the base URL + `path`, tried again as the policy allows;
        `agent_route`: `path` is a whole URL of the agent's environment, called without auth when `auth` is None."""
        waited = 0.0
        for attempt in range(1, self._retry.attempts + 1):
            try:
                answer = self._attempt(operation, method, path if agent_route else self.endpoint + path, auth=auth,
                                       idempotent=idempotent, json_body=json_body, params=params, files=files,
                                       agent_route=agent_route)
            except DirectLineError as error:
                delay = self._retry_delay(error, attempt, waited)
                if delay is None:
                    raise
                log.info("%s; retry %d in %.2f s", error, attempt, delay)
                self._clock.sleep(delay)
                waited += delay
                continue
            return _json(answer, operation, idempotent)
        raise AssertionError("unreachable")  # the last attempt always raises

    def _attempt(self, operation: str, method: str, url: str, *, auth: str | None, idempotent: bool,
                 json_body: Any, params: dict[str, str] | None, files: list | None,
                 agent_route: bool) -> HttpAnswer:
        """One request: Direct Line's successful answer, or its failure raised as a DirectLineError.

        A GET to Direct Line goes on a kept connection (relay/kept_connections.py: a third of the CPU) unless a
        proxy or a test transport stands in the way; everything else on the requests session, and so does a GET
        answered with a redirect (the session follows it, as it always did). The agent routes (token endpoint,
        discovery: rare) stay on the session too."""
        from relay.kept_connections import HttpAnswer  # with http.client: not at a cold start

        started = self._clock.monotonic()
        headers = {"Authorization": f"Bearer {auth}"} if auth else {}
        kept = self._kept_connections(url) if method == "GET" and not agent_route else None
        answer = self._get_kept(kept, operation, url, headers, params) if kept is not None else None
        if answer is None or 300 <= answer.status < 400:
            with _connection_errors(operation, idempotent):
                response = self._http().request(method, url, headers=headers, params=params, json=json_body,
                                                files=files, proxies=self._proxies(url),
                                                timeout=(CONNECT_TIMEOUT, self._settings.timeout_seconds))
            answer = HttpAnswer(response.status_code, response.reason or "", response.headers, response.content)
        log.debug("Direct Line %s: %s in %.0f ms", operation, answer.status,
                  (self._clock.monotonic() - started) * 1000)
        if answer.status >= 300:
            telemetry.count(telemetry.DIRECTLINE_ERRORS, operation=OPERATION_NAMES[operation],
                            status=str(answer.status))
            error = _status_error(operation, answer, idempotent, secrets=(auth or "", self._settings.secret),
                                  retry_after_cap=self._retry.max_retry_after, now=self._clock.now())
            if agent_route and not isinstance(error, Throttled | TransientError):
                raise AgentEndpointRefused(str(error), upstream_status=error.upstream_status,
                                           upstream_code=error.upstream_code)
            raise error
        return answer

    def _kept_connections(self, url: str) -> KeptConnections | None:
        """The kept connections to `url`'s origin; None when a test transport or a proxy serves it."""
        origin = origin_of(url)
        if self._transport is not None or self._proxies(url):
            return None
        kept = self._kept.get(origin)
        if kept is None:
            from relay.kept_connections import KeptConnections

            new = KeptConnections(urlsplit(origin), size=self._pool_size, connect_timeout=CONNECT_TIMEOUT)
            with self._lock:
                kept = self._kept.setdefault(origin, new)
        return kept

    def _get_kept(self, kept: KeptConnections, operation: str, url: str, headers: dict[str, str],
                  params: dict[str, str] | None) -> HttpAnswer:
        """GET `url` on `kept`, its path quoted as requests quotes it; a request that failed is a TransientError,
        as on the session (its type named, never a header or the URL: they carry the credential)."""
        import http.client

        from requests.utils import requote_uri

        from relay.kept_connections import ConnectFailed

        parts = urlsplit(requote_uri(url))
        query = "&".join(part for part in (parts.query, urlencode(params or {})) if part)
        try:
            return kept.get(parts.path + (f"?{query}" if query else ""),
                            {"User-Agent": USER_AGENT, **headers}, read_timeout=self._settings.timeout_seconds)
        except (OSError, ValueError, http.client.HTTPException) as error:
            what = ("could not connect" if isinstance(error, ConnectFailed)
                    else "could not be sent" if isinstance(error, ValueError)  # a header or URL http.client refuses
                    else "timed out" if isinstance(error, TimeoutError) else "lost its connection")
            raise _network_failure(operation, what, error) from None

    def _retry_delay(self, error: DirectLineError, attempt: int, waited: float) -> float | None:
        """Seconds to wait before trying again, or None to give up and raise `error`."""
        policy = self._retry
        if error.ambiguous or not isinstance(error, Throttled | TransientError) or attempt >= policy.attempts:
            return None
        remaining = policy.budget - waited
        if isinstance(error, Throttled) and error.retry_after is not None:
            delay = error.retry_after
        else:
            delay = self._clock.uniform(0, min(policy.backoff_cap, policy.backoff * 2 ** (attempt - 1)))
        return delay if delay <= remaining else None


@functools.lru_cache(maxsize=1)
def get_directline_client() -> DirectLineClient:
    """The process's client on the app settings and the system clock: one connection pool shared by every invocation."""
    return DirectLineClient(get_settings().directline, clock=SYSTEM_CLOCK, pool_size=64)  # one per poller worker


# ------------------------------------------------------------------------------------------ helpers


def _token_body(user_id: str | None, user_name: str | None, trusted_origins: Sequence[str]) -> dict | None:
    body: dict[str, Any] = {}
    if user_id:
        body["user"] = {"id": user_id, **({"name": user_name} if user_name else {})}
    if trusted_origins:
        body["trustedOrigins"] = list(trusted_origins)
    return body or None


@dataclass
class _Discovered:
    """The Direct Line base discovered from the agent's environment, shared by a client and its clones."""

    endpoint: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


def _segment(value: str) -> str:
    return quote(value, safe="")


def _watermark(watermark: str | None) -> dict[str, str] | None:
    return None if watermark is None else {"watermark": watermark}


def _conversation_token(payload: Mapping[str, Any]) -> ConversationToken:
    expires_in = payload.get("expires_in")
    return ConversationToken(conversation_id=payload["conversationId"], token=payload["token"],
                             expires_in=int(expires_in) if expires_in is not None else None,
                             stream_url=payload.get("streamUrl"))


def _activity_id(payload: Mapping[str, Any]) -> str | None:
    """The id a successful POST answered with; None when it had none (a 204, an empty body)."""
    activity_id = payload.get("id")
    return str(activity_id) if activity_id else None


def _json(answer: HttpAnswer, operation: str, idempotent: bool) -> dict[str, Any]:
    """The answer's JSON object ({} when it has none); TransientError when it is not JSON, ambiguous
    for a POST: Direct Line took it, but its id cannot be read."""
    if not answer.content:
        return {}
    try:
        payload = json.loads(answer.content)
    except ValueError:
        raise TransientError(f"Direct Line {operation} answered {answer.status} without JSON",
                             ambiguous=not idempotent, upstream_status=answer.status) from None
    return payload if isinstance(payload, dict) else {}


def _status_error(operation: str, answer: HttpAnswer, idempotent: bool, *, secrets: Sequence[str],
                  retry_after_cap: float, now: datetime) -> DirectLineError:
    status = answer.status
    code, message = _error_body(answer)
    text = _redact(f"Direct Line {operation} answered {status} {code}: {message}", secrets)
    upstream: dict[str, Any] = {"upstream_status": status, "upstream_code": code}
    if status == 401:
        return AuthenticationFailed(text, **upstream)
    if status == 403:
        return (TokenExpired if code == "TokenExpired" else AuthenticationFailed)(text, **upstream)
    if status == 404:
        return ConversationNotFound(text, **upstream)
    if status == 429:
        retry_after = retry_after_seconds(answer.headers.get("Retry-After"), cap=retry_after_cap, now=now)
        return Throttled(text, retry_after=retry_after, **upstream)
    if status < 500:
        return BadRequest(text, **upstream)
    if status in (502, 504) and not idempotent:
        return BotFailed(text, **upstream)
    # 500 after a POST may come after the activity was stored: as ambiguous as a 502
    return TransientError(text, ambiguous=not idempotent and status == 500, **upstream)


def _error_body(answer: HttpAnswer) -> tuple[str, str]:
    try:
        error = json.loads(answer.content).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code") or answer.reason or "Error")[:80]
    return code, str(error.get("message") or "")[:200]


@contextlib.contextmanager
def _connection_errors(operation: str, idempotent: bool) -> Iterator[None]:
    """Raises TransientError for a request that failed on the wire inside the block: ambiguous for a
    POST unless it surely never left."""
    import requests

    try:
        yield
    except requests.RequestException as exc:
        never_sent = isinstance(exc, requests.ConnectTimeout) or _refused(exc)
        what = "timed out" if isinstance(exc, requests.Timeout) else "lost its connection"
        raise _network_failure(operation, what, exc, ambiguous=not idempotent and not never_sent) from None


def _network_failure(operation: str, what: str, error: Exception, *, ambiguous: bool = False) -> TransientError:
    """A request that failed on the wire, counted; the error's type named, never its text (it may quote a header)."""
    telemetry.count(telemetry.DIRECTLINE_ERRORS, operation=OPERATION_NAMES[operation], status="network")
    return TransientError(f"Direct Line {operation} {what} ({type(error).__name__})", ambiguous=ambiguous)


def _refused(exc: Exception) -> bool:
    """True when no connection was made (refused, DNS): nothing reached Direct Line."""
    from urllib3.exceptions import NameResolutionError, NewConnectionError

    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError | NameResolutionError)


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
