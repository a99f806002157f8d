"""The Web Chat token server: issue, refresh, and resume a page's own conversation.

A Direct Line token lives about 30 minutes and an expired one cannot be refreshed; with enhanced
authentication (on for many bots) nothing else gets back into a conversation either: reconnect with
the secret is refused (400 MissingProperty). So a page that slept past its token (a closed lid, a
phone in a pocket) would lose its conversation. Here the relay keeps a token of every live session's
conversation itself (relay/store/sessions.py: HeldToken) and the poll timer refreshes it at about half
its life (`refresh_session_tokens`) unless the page did, for as long as the session lasts. The page
gets, with its first token, a resume key: random (256 bits), stored only as a SHA-256 hash with the
session, checked in constant time. Presenting it gets a fresh token of the same conversation and the
same user (the held token, refreshed), in either authentication mode, and a new key; the old key is
kept as a hash, and presenting a rotated key again revokes the session: two holders of one key means
one of them copied it. Except briefly (RESUME_GRACE in relay/store/sessions.py): the key the last
resume used answers again, with another new key, while none of its successors was used, so a page
whose answer the network lost, or whose two resumes raced, keeps its conversation. The relay never
reconnects with the secret.

Choices:
- Tokens are bound to a fresh `dl_` user id and to the allowed origins (trustedOrigins): the
  configured WEBCHAT_ALLOWED_ORIGINS plus the calling page's origin when it is allowed. Refreshed
  tokens keep both. Direct Line does not check trusted origins on its API calls: the origin check
  that holds is this server's own, an Origin that is not allowed is refused (OriginNotAllowed) and gets
  no CORS headers.
- The key is checked before Direct Line is called, and rotated only after the refresh worked: a failed
  refresh (Direct Line busy, the network) leaves the page's key valid for its next try.
- A session lasts WEBCHAT_SESSION_HOURS past its page's last token, resume or refresh: a page's own
  refresh extends it, so a page open all day can still sleep that long. Past it, resume is
  SessionExpired and the relay stops refreshing the held token. If the held token lapsed anyway
  (Direct Line out of reach for longer than a token lives), nobody can rejoin the conversation: resume
  is SessionLapsed, and the page starts a new one.
- The page's own refresh is held too: the session holds the page's fresh token from then on, refreshed by
  the timer only after the page's next refresh was due (PAGE_TOKEN_REFRESH_AT; likewise the token a page
  is issued or resumed with). So an open page's conversation is refreshed once per half-life, by the page,
  and the timer takes over when the page closes. It also gives a token back to a session that held none
  (stored before sessions held tokens) or whose held token lapsed while its page stayed open: its next
  resume works. The page had that token already: holding it shows it to nobody new.
- The timer spends a few seconds of each run on held tokens (SESSION_REFRESH_BUDGET_SECONDS, each call with a
  short read timeout; less once Direct Line throttles or fails a few times): a Direct Line that hangs never
  holds up the channel poller that runs it. The rows not reached are due again at the next run.
- A revoked session's tokens are not refreshed, neither the page's (refresh is SessionRevoked) nor the
  held one (revoking forgets it).
- The page's watermark is the page's business: resume accepts and ignores it (older pages send one).
- Token issuance and resume attempts are rate limited per client address in Table Storage (so
  it holds across instances), each up to WEBCHAT_TOKEN_RATE_LIMIT a minute; refresh needs a token
  Direct Line issued, which cannot be guessed.
- The held token is a bearer secret: stored like a conversation record's token, never logged, and
  answered only to the holder of the session's resume key.
- Token endpoint mode (DIRECTLINE_TOKEN_ENDPOINT, a Copilot Studio agent without web channel security):
  with no secret, tokens come from the agent's token endpoint, and such a token is bound to no user and
  no origin. The page still gets its own fresh `dl_` user id (which it sends as from.id, and resume
  answers again), but Direct Line does not enforce it: anyone holding the token may post as any user,
  and no trusted origins are recorded. The origin check and rate limits here hold as before; refresh,
  the held token and resume work unchanged (they only ever use tokens). The answer's `domain` is the
  Direct Line base the relay uses (discovered from the agent's environment when DIRECTLINE_ENDPOINT is
  not set). An endpoint that refuses (AgentEndpointRefused) is our configuration: DirectLineRejected.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from relay import telemetry
from relay.clock import SYSTEM_CLOCK, Clock
from relay.directline import (
    TOKEN_REFRESH_SHARE,
    ConversationToken,
    DirectLineClient,
    RetryPolicy,
    get_directline_client,
)
from relay.errors import (
    AgentEndpointRefused,
    AuthenticationFailed,
    ConversationGone,
    ConversationNotFound,
    DemoDisabled,
    DirectLineBusy,
    DirectLineError,
    DirectLineRejected,
    DirectLineUnavailable,
    InvalidJson,
    InvalidRequest,
    InvalidResumeKey,
    InvalidToken,
    MissingToken,
    OriginNotAllowed,
    RefreshTooLate,
    ResumeKeyReused,
    SessionExpired,
    SessionLapsed,
    SessionRevoked,
    Throttled,
    TokenExpired,
    TooManyRequests,
    TransientError,
    WebChatError,
    WebChatFileNotFound,
)
from relay.settings import Settings, WebChatSettings, get_settings
from relay.store import RelayStore, get_store
from relay.store.sessions import DueRefresh, HeldToken, ResumeOutcome, WebChatSession

__all__ = [
    "MAX_BODY_BYTES",
    "PAGE_TOKEN_REFRESH_AT",
    "REFRESH_WORKERS",
    "SESSION_REFRESH_BUDGET_SECONDS",
    "SESSION_REFRESH_MAX_FAILURES",
    "SESSION_REFRESH_TIMEOUT_SECONDS",
    "Asset",
    "Caller",
    "SessionRefreshTick",
    "TokenServer",
    "get_token_server",
    "get_webchat_asset",
    "rate_limit_bucket",
    "refresh_session_tokens",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

RATE_WINDOW_SECONDS = 60
PAGE_TOKEN_REFRESH_AT = (0.6, 0.7)
"""When the timer refreshes a held token that the page has too (issued, resumed or refreshed by the page): after the
page's own refresh (relay-webchat.js: at 0.45 to 0.55 of its life, a browser's throttled timer up to a minute
late), so that an open page's conversation is refreshed once, by the page. A closed page's is then refreshed by
the timer, with 30 to 40% of the token's life left for retries."""
REFRESH_RETRY_SECONDS = 30.0  # a failed refresh is tried again this soon (sooner when the token has less left)
MAX_REFRESHES_PER_TICK = 500
REFRESH_WORKERS = 8
SESSION_REFRESH_BUDGET_SECONDS = 5.0
"""How long one timer run starts refreshes of held tokens; the rows it does not reach stay due for the next run
(every few seconds: a held token is due at half its life, so a few seconds late costs nothing). The run ends
at most one read timeout (SESSION_REFRESH_TIMEOUT_SECONDS, plus the connect timeout) after this: the
channel poller that runs it is never held up for long."""
SESSION_REFRESH_TIMEOUT_SECONDS = 5.0
"""The read timeout of the timer's refresh of one held token (a refresh answers in well under a second)."""
SESSION_REFRESH_MAX_FAILURES = 3
"""Timeouts, lost connections or 5xx answers in one timer run after which it starts no more refreshes: Direct
Line is in trouble, the rest of the run's rows stay due for the next run (as after a 429)."""
MAX_FIELD_CHARS = 512
MAX_BODY_BYTES = 4096
"""The largest body a token call may send: a resume body is a few short strings."""
# A page waits on these calls: fail within seconds rather than ride out a long Direct Line outage.
TOKEN_SERVER_RETRY = RetryPolicy(attempts=3, backoff=0.25, backoff_cap=1.0, max_retry_after=2.0, budget=3.0)
# The timer tries each held token once per tick: a failure is scheduled again rather than waited out.
SESSION_REFRESH_RETRY = RetryPolicy(attempts=1)

STATIC_DIR = Path(__file__).with_name("static")
WEBCHAT_BUNDLE = Path(__file__).resolve().parent.parent / "node_modules/botframework-webchat/dist/webchat.js"


@dataclass(frozen=True)
class Caller:
    """Who asks: the client address (for the rate limits) and the page's Origin."""

    address: str = "unknown"
    origin: str = ""


class TokenServer:
    """The three token endpoints as plain calls; each answers the JSON body or raises a WebChatError
    (StoreError when Table Storage fails).

    Sessions last WEBCHAT_SESSION_HOURS past `clock`'s now at their last issue, refresh or resume."""

    def __init__(self, settings: Settings, *, client: DirectLineClient, store: RelayStore,
                 clock: Clock = SYSTEM_CLOCK):
        self._clock = clock
        self._webchat = settings.webchat
        self._session_lifetime = timedelta(hours=settings.webchat.session_hours)
        self._public_origin = _origin_of(settings.relay.public_base_url)
        self._client = client
        self._store = store

    def __repr__(self) -> str:
        return f"TokenServer(client={self._client!r})"

    def is_origin_allowed(self, caller: Caller) -> bool:
        """No Origin (not a browser), listed in WEBCHAT_ALLOWED_ORIGINS ("*": any), or the relay's own (the demo).

        The relay's own origin is RELAY_PUBLIC_BASE_URL's, never the Host the request names: a caller
        chooses its Host header (and its Origin) freely."""
        allowed = self._webchat.allowed_origins
        return (not caller.origin or "*" in allowed or caller.origin in allowed
                or (bool(self._public_origin) and caller.origin == self._public_origin))

    def issue_token(self, caller: Caller) -> dict[str, Any]:
        """A token for a new conversation, with the resume key that proves the page owns it; the session holds
        the same token from now on, and keeps it fresh."""
        self._check_origin(caller)
        limit = self._store.rate_limits.count_request(rate_limit_bucket(caller.address),
                                                      limit=self._webchat.token_rate_limit,
                                                      window_seconds=RATE_WINDOW_SECONDS)
        if not limit.allowed:
            raise TooManyRequests(f"Too many tokens for this client address: at most {limit.limit} per minute",
                                  retry_after=limit.retry_after)
        user_id = "dl_" + secrets.token_hex(16)
        trusted = [o for o in self._webchat.allowed_origins if o != "*"]
        if caller.origin and caller.origin not in trusted and "*" not in self._webchat.allowed_origins:
            trusted.append(caller.origin)
        if not self._client.uses_token_endpoint:
            grant = self._directline(lambda: self._client.generate_token(user_id=user_id, trusted_origins=trusted))
        else:  # token endpoint mode: the token binds neither the user nor the origins (see the module doc)
            grant = self._directline(self._client.token_from_endpoint)
        domain = self._domain()
        resume_key = _new_resume_key()
        now = self._clock.now()
        self._store.sessions.create_session(grant.conversation_id, user_id=user_id, resume_key=resume_key,
                                            expires_at=now + self._session_lifetime,
                                            held=_held_token(grant, now=now, clock=self._clock, page_has_it=True),
                                            now=now)
        log.info("Web Chat token issued for conversation %s", grant.conversation_id)
        return {**self._grant(grant), "userId": user_id, "resumeKey": resume_key, "domain": domain}

    def refresh_token(self, token: str, *, caller: Caller = Caller()) -> dict[str, Any]:
        """A fresh token for the same conversation; an expired one is RefreshTooLate (the page resumes).

        A live page's refresh extends its session (WEBCHAT_SESSION_HOURS from now), and the session holds the
        fresh token from now on: the timer leaves it to the page until the page stops refreshing."""
        self._check_origin(caller)
        if not token:
            raise MissingToken("Send the token to refresh as 'Authorization: Bearer <token>'")
        grant = self._directline(lambda: self._client.refresh_token(token=token), callers_token=True)
        session = self._store.sessions.get_session(grant.conversation_id)
        if session is not None and session.revoked:
            raise SessionRevoked("This conversation's session was revoked: start a new conversation")
        now = self._clock.now()
        if session is not None and now < session.expires_at:
            # Under the ETag of what was read: a write in between (a resume, the timer, a revocation) wins, and
            # the page's next refresh extends it.
            self._store.sessions.extend_session(session, expires_at=now + self._session_lifetime, now=now,
                                                held=_held_token(grant, now=now, clock=self._clock, page_has_it=True))
        return self._grant(grant)

    def resume(self, body: bytes, *, caller: Caller = Caller()) -> dict[str, Any]:
        """A fresh token of the page's own conversation and user, and the next resume key.

        `body` is the page's JSON `{conversationId, resumeKey}` (a `watermark` older pages send is
        ignored), parsed only after the attempt counted against the caller's rate limit."""
        self._check_origin(caller)
        # A 256-bit key cannot be guessed anyway; the limit keeps anyone from trying at our expense.
        limit = self._store.rate_limits.count_request(f"resume|{rate_limit_bucket(caller.address)}",
                                                      limit=self._webchat.token_rate_limit,
                                                      window_seconds=RATE_WINDOW_SECONDS)
        if not limit.allowed:
            raise TooManyRequests("Too many resume attempts from this client address: "
                                  f"at most {limit.limit} per minute", retry_after=limit.retry_after)
        request = _parse_resume_body(body)
        conversation_id, resume_key = request.conversation_id, request.resume_key
        now = self._clock.now()
        session = self._store.sessions.get_session(conversation_id)
        grant = None
        if session is not None and session.resume_outcome(resume_key, now=now).accepted:
            grant = self._fresh_token(session, now)
        next_key = _new_resume_key()
        result = self._store.sessions.resume_session(conversation_id, resume_key=resume_key, new_resume_key=next_key,
                                                     expires_at=now + self._session_lifetime, now=now)
        if not result.ok or result.session is None:  # an accepted resume always carries the session
            raise _refusal(result.outcome, conversation_id)
        if grant is None:  # only if the session changed between the check and the rotation
            grant = self._fresh_token(result.session, now)
        retried = result.outcome == ResumeOutcome.RETRIED
        log.info("Web Chat conversation %s resumed%s", conversation_id,
                 " (the previous key again, within the grace period)" if retried else "")
        return {**self._grant(grant), "resumeKey": next_key, "userId": result.session.user_id,
                "domain": self._domain()}

    # ----------------------------------------------------------------------------------------- helpers

    def _check_origin(self, caller: Caller) -> None:
        if not self.is_origin_allowed(caller):
            raise OriginNotAllowed("This origin may not use the token server: add it to WEBCHAT_ALLOWED_ORIGINS")

    def _fresh_token(self, session: WebChatSession, now: datetime) -> ConversationToken:
        """The session's held token refreshed (and held from now on): a token of its conversation and user.

        SessionLapsed when the held token expired (it cannot be refreshed, and nothing else rejoins the
        conversation); ConversationGone, and the session revoked, when Direct Line forgot the conversation."""
        conversation_id, held = session.conversation_id, session.held
        if held is None or not held.alive(now):
            if held is not None:
                self._store.sessions.drop_token(conversation_id, held.token, now=now)
            raise _lapsed()
        try:
            grant = self._directline(lambda: self._client.refresh_token(token=held.token))
        except RefreshTooLate:
            self._store.sessions.drop_token(conversation_id, held.token, now=now)
            raise _lapsed() from None
        except ConversationGone:
            self._store.sessions.revoke_session(conversation_id, now=now)
            raise
        self._store.sessions.hold_token(conversation_id, _held_token(grant, now=now, clock=self._clock,
                                                                     page_has_it=True), now=now)
        return grant

    def _domain(self) -> str:
        """The Direct Line base the page talks to (discovered from the agent's environment when not set)."""
        return self._directline(lambda: self._client.endpoint)

    def _directline(self, call: Callable[[], T], *, callers_token: bool = False) -> T:
        """Direct Line's answer, or its failure as what the page should do next."""
        try:
            return call()
        except AgentEndpointRefused as error:
            log.error("the agent's token endpoint refused the relay: %s", error)  # our configuration, not the page's
            raise DirectLineRejected("The agent's token endpoint refused the relay") from None
        except TokenExpired:
            raise RefreshTooLate("The token has expired: resume the conversation with its resume key") from None
        except ConversationNotFound:
            raise ConversationGone("Direct Line no longer knows this conversation: start a new one") from None
        except AuthenticationFailed as error:
            if callers_token:
                raise InvalidToken("Direct Line does not accept this token") from None
            log.error("Direct Line refused the relay's credentials: %s", error)  # our configuration, not the page's
            raise DirectLineRejected("Direct Line refused the relay's credentials") from None
        except Throttled as error:
            raise DirectLineBusy("Direct Line is busy: try again shortly", retry_after=error.retry_after or 1) from None
        except DirectLineError as error:
            log.warning("Direct Line token call failed: %s", error)
            raise DirectLineUnavailable("Direct Line is unavailable: try again shortly", retry_after=2) from None

    @staticmethod
    def _grant(grant: ConversationToken) -> dict[str, Any]:
        return {"token": grant.token, "conversationId": grant.conversation_id,
                "expires_in": grant.lifetime_seconds}


def _held_token(grant: ConversationToken, *, now: datetime, clock: Clock, page_has_it: bool) -> HeldToken:
    """`grant` as a session holds it: expiring `expires_in` (as Direct Line gave it) after `now`, refreshed at
    about half of that (TOKEN_REFRESH_SHARE, a draw of `clock`), or after the page's own refresh when the page
    has it too (PAGE_TOKEN_REFRESH_AT)."""
    expires_at, refresh_at = grant.schedule(now=now, clock=clock,
                                            share=PAGE_TOKEN_REFRESH_AT if page_has_it else TOKEN_REFRESH_SHARE)
    return HeldToken(grant.token, expires_at=expires_at, refresh_at=refresh_at)


def _lapsed() -> SessionLapsed:
    return SessionLapsed("Every token of this conversation expired, so nobody can rejoin it: start a new conversation")


# ------------------------------------------------------------------------------------- the timer's part


class _Refresh(StrEnum):
    """What became of one due refresh index row."""

    REFRESHED = "refreshed"
    LAPSED = "lapsed"  # the held token had expired: the session can no longer be resumed
    ENDED = "ended"  # the session is gone, revoked, expired or rescheduled: nothing to refresh
    POSTPONED = "postponed"  # Direct Line failed or throttled: tried again later
    SKIPPED = "skipped"  # left due for the next tick (Direct Line throttles or fails, or the tick's time is up)
    FAILED = "failed"  # Table Storage or something unforeseen: tried again later if the row can be moved


class _TickBudget:
    """Whether a timer run may start another refresh: not once its time is up (`seconds` from now on `clock`),
    Direct Line throttled it, or failed SESSION_REFRESH_MAX_FAILURES times. Shared by the run's workers."""

    def __init__(self, clock: Clock, seconds: float):
        self._clock = clock
        self._deadline = clock.monotonic() + seconds
        self._lock = threading.Lock()
        self._failures = 0
        self._stopped = False

    def may_start(self) -> bool:
        with self._lock:
            return not self._stopped and self._clock.monotonic() < self._deadline

    def throttled(self) -> None:
        with self._lock:
            self._stopped = True

    def failed(self) -> None:
        """Direct Line timed out, dropped the connection or answered 5xx."""
        with self._lock:
            self._failures += 1
            self._stopped = self._stopped or self._failures >= SESSION_REFRESH_MAX_FAILURES


@dataclass(frozen=True)
class SessionRefreshTick:
    """What one timer run did to the held tokens of Web Chat sessions: each due row counted once."""

    due: int = 0
    refreshed: int = 0
    lapsed: int = 0
    ended: int = 0
    postponed: int = 0
    skipped: int = 0
    failed: int = 0


def refresh_session_tokens(store: RelayStore, client: DirectLineClient, *, clock: Clock,
                           limit: int = MAX_REFRESHES_PER_TICK, workers: int = REFRESH_WORKERS,
                           budget_seconds: float = SESSION_REFRESH_BUDGET_SECONDS) -> SessionRefreshTick:
    """Refresh every held token whose time has come (the sessions' refresh index, one range query), up to
    `limit` of them, `workers` at a time, each call with a read timeout of SESSION_REFRESH_TIMEOUT_SECONDS.

    Refreshes start for `budget_seconds`; the rows not reached by then stay due for the next run, and so do
    the rest of the rows once Direct Line throttles (429) or fails SESSION_REFRESH_MAX_FAILURES times (a
    timeout, a lost connection, 5xx). One session's trouble never stops the others: a Direct Line failure is
    tried again soon (within the token's life, counted from when the call failed), a throttled refresh after
    Retry-After, and a row that fails for another reason (Table Storage) about as soon as a Direct Line failure,
    so that it does not stay first in line. An expired or revoked session's row goes; a token found expired
    goes too (resume is then SessionLapsed)."""
    due = store.sessions.list_due_refreshes(now=clock.now(), limit=limit)
    if not due:
        return SessionRefreshTick()
    client = client.with_options(retry=SESSION_REFRESH_RETRY, timeout_seconds=SESSION_REFRESH_TIMEOUT_SECONDS)
    budget = _TickBudget(clock, budget_seconds)

    def work(item: DueRefresh) -> _Refresh:
        if not budget.may_start():
            return _Refresh.SKIPPED
        try:
            return _refresh_held_token(store, client, clock, item, budget)
        except Exception:  # one session's trouble never stops the others
            log.exception("Web Chat session refresh failed")
            _put_off(store, clock, item)
            return _Refresh.FAILED

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(due))), thread_name_prefix="session") as pool:
        outcomes = list(pool.map(work, due))
    tick = SessionRefreshTick(due=len(due), **{o.value: outcomes.count(o) for o in _Refresh})
    telemetry.count(telemetry.TOKENS_REFRESHED, tick.refreshed, kind="session", outcome="refreshed")
    telemetry.count(telemetry.TOKENS_REFRESHED, tick.lapsed + tick.postponed + tick.failed, kind="session",
                    outcome="failed")
    log.info("session tokens: due=%d refreshed=%d lapsed=%d ended=%d postponed=%d skipped=%d failed=%d",
             tick.due, tick.refreshed, tick.lapsed, tick.ended, tick.postponed, tick.skipped, tick.failed)
    return tick


def _refresh_held_token(store: RelayStore, client: DirectLineClient, clock: Clock, item: DueRefresh,
                        budget: _TickBudget) -> _Refresh:
    now = clock.now()
    session = store.sessions.get_session(item.conversation_id)
    if session is None or session.held is None or session.refresh_index_key != item.index_key:
        store.sessions.end_refresh(item)  # a row nothing points at any more
        return _Refresh.ENDED
    conversation_id, held = session.conversation_id, session.held
    if session.revoked or session.expires_at <= now:
        store.sessions.drop_token(conversation_id, held.token, now=now, current=session)
        return _Refresh.ENDED
    if not held.alive(now):
        return _lapse(store, session, now)
    try:
        grant = client.refresh_token(token=held.token)
    except TokenExpired:
        return _lapse(store, session, now)
    except ConversationNotFound:
        log.info("Web Chat session %s revoked: Direct Line forgot its conversation", conversation_id)
        store.sessions.revoke_session(conversation_id, now=now)
        return _Refresh.ENDED
    except Throttled as error:
        budget.throttled()
        _postpone(store, clock, session, seconds=error.retry_after or REFRESH_RETRY_SECONDS)
        return _Refresh.POSTPONED
    except DirectLineError as error:
        if isinstance(error, TransientError):
            budget.failed()
        log.warning("could not refresh the token of Web Chat conversation %s: %s", conversation_id, error)
        _postpone(store, clock, session)
        return _Refresh.POSTPONED
    store.sessions.hold_token(conversation_id, _held_token(grant, now=clock.now(), clock=clock, page_has_it=False),
                              current=session)
    return _Refresh.REFRESHED


def _postpone(store: RelayStore, clock: Clock, session: WebChatSession, *, seconds: float | None = None) -> None:
    """Refresh the held token of `session` (as read) again `seconds` from now; by default soon, and several times
    before it expires (a quarter of what it has left, at most REFRESH_RETRY_SECONDS). Now is after the failed
    call, however long that took."""
    held = session.held
    if held is None:
        return
    now = clock.now()
    if seconds is None:
        seconds = max(1.0, min(REFRESH_RETRY_SECONDS, (held.expires_at - now).total_seconds() / 4))
    store.sessions.postpone_refresh(session.conversation_id, held.token, refresh_at=now + timedelta(seconds=seconds),
                                    now=now, current=session)


def _put_off(store: RelayStore, clock: Clock, item: DueRefresh) -> None:
    """After an unforeseen failure: the row's refresh tried again later (as after a Direct Line failure), or the
    row deleted when its session no longer points at it. A row that fails every time must not stay first in
    line, taking a place in every run. Best effort: when this fails too, the row stays due."""
    try:
        session = store.sessions.get_session(item.conversation_id)
        if session is None or session.held is None or session.refresh_index_key != item.index_key:
            store.sessions.end_refresh(item)
        else:
            _postpone(store, clock, session)
    except Exception as error:
        log.warning("could not put off the refresh of Web Chat conversation %s: %s", item.conversation_id,
                    type(error).__name__)


def _lapse(store: RelayStore, session: WebChatSession, now: datetime) -> _Refresh:
    log.warning("Web Chat conversation %s can no longer be resumed: its token expired before the relay could "
                "refresh it", session.conversation_id)
    if session.held is not None:
        store.sessions.drop_token(session.conversation_id, session.held.token, now=now, current=session)
    return _Refresh.LAPSED


def _new_resume_key() -> str:
    """256 random bits, URL-safe: guessing one is hopeless, so a plain hash may store it."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class _ResumeRequest:
    conversation_id: str
    resume_key: str = field(repr=False)


def _parse_resume_body(body: bytes) -> _ResumeRequest:
    """`{conversationId, resumeKey}`, each a string of at most MAX_FIELD_CHARS that UTF-8 can encode (anything
    else in the object is ignored); InvalidJson or InvalidRequest otherwise."""
    try:
        payload = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        raise InvalidJson("The body is not valid JSON") from None
    if not isinstance(payload, Mapping):
        raise InvalidRequest('Send a JSON object: {"conversationId", "resumeKey"}')
    return _ResumeRequest(conversation_id=_text_field(payload, "conversationId"),
                         resume_key=_text_field(payload, "resumeKey"))


def _text_field(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{name}' must be a non-empty string")
    if len(value) > MAX_FIELD_CHARS:
        raise InvalidRequest(f"'{name}' is longer than {MAX_FIELD_CHARS} characters")
    try:
        value.encode()
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\\ud800"); no store or hash takes one
        raise InvalidRequest(f"'{name}' is not valid Unicode text") from None
    return value


def rate_limit_bucket(address: str) -> str:
    """Whose rate limit a client address counts against: its own for IPv4, its /64 for IPv6 (one
    subscriber gets a whole /64 at least, so single IPv6 addresses cost an attacker nothing)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _refusal(outcome: ResumeOutcome, conversation_id: str) -> WebChatError:
    if outcome == ResumeOutcome.REUSED_KEY:
        log.warning("Web Chat session %s revoked: a rotated resume key was presented again", conversation_id)
        return ResumeKeyReused("This resume key was already used: the session is revoked, start a new conversation")
    if outcome == ResumeOutcome.REVOKED:
        return SessionRevoked("This session was revoked: start a new conversation")
    if outcome == ResumeOutcome.EXPIRED:
        return SessionExpired("This session has expired: start a new conversation")
    # A key the session never issued, an unknown conversation, and (WebChatSession.resume_outcome) a
    # revoked or expired session met with such a key answer alike: no oracle for which conversations exist.
    return InvalidResumeKey("The resume key does not match this conversation")


def _origin_of(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if rest else ""


@dataclass(frozen=True)
class Asset:
    """A file the app serves, or (`redirect_to`) the URL the browser fetches it from instead."""

    content: bytes = b""
    mimetype: str = ""
    redirect_to: str = ""


_ASSETS = {  # name: (file, mimetype, served only when the demo is on)
    "demo": (STATIC_DIR / "demo.html", "text/html", True),
    "webchat.js": (WEBCHAT_BUNDLE, "application/javascript", True),
    "relay-webchat.js": (STATIC_DIR / "relay-webchat.js", "application/javascript", False),
}


def get_webchat_asset(name: str, *, webchat: WebChatSettings) -> Asset:
    """The script pages include (always), and the demo page with its Web Chat bundle (when the demo is on).

    The bundle is served from node_modules where npm installed it (the local stack); a deployed app
    has no node_modules, so the page is sent to WEBCHAT_BUNDLE_URL (Microsoft's CDN by default)."""
    if name not in _ASSETS:
        raise WebChatFileNotFound(f"No Web Chat file named {name!r}")
    path, mimetype, demo_only = _ASSETS[name]
    if demo_only and not webchat.demo_enabled:
        raise DemoDisabled("The Web Chat demo is off: set WEBCHAT_DEMO_ENABLED=true")
    content = _read_asset(path)
    if content is None and path == WEBCHAT_BUNDLE:
        return Asset(redirect_to=webchat.bundle_url)
    if content is None:
        raise WebChatFileNotFound(f"{name} is missing from this deployment")
    return Asset(content, mimetype)


@functools.lru_cache(maxsize=8)
def _read_asset(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def get_token_server() -> TokenServer:
    """The process's token server on the app settings, the shared Direct Line pool, the store and the system clock."""
    client = get_directline_client().with_options(retry=TOKEN_SERVER_RETRY)
    return TokenServer(get_settings(), client=client, store=get_store(), clock=SYSTEM_CLOCK)

