"""The token server and the timer's session refresh in this process: Azurite, the emulator's core (enhanced
authentication on unless a test says otherwise), and time in hand: the relay's clock and the emulator's move
together, so hours pass in a test and tokens expire as they would."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import requests
from azure.data.tables import UpdateMode
from requests.adapters import BaseAdapter

from devstack.directline.transport import DEFAULT_URL, InProcessEmulator
from relay.clock import SYSTEM_CLOCK, ManualClock
from relay.directline import TOKEN_REFRESH_SHARE, DirectLineClient, RetryPolicy
from relay.errors import (
    ConversationGone,
    DirectLineRejected,
    OriginNotAllowed,
    ResumeKeyReused,
    SessionExpired,
    SessionLapsed,
    SessionRevoked,
    StoreError,
    TokenExpired,
)
from relay.settings import Settings
from relay.store import RelayStore
from relay.tokens import (
    PAGE_TOKEN_REFRESH_AT,
    REFRESH_WORKERS,
    SESSION_REFRESH_BUDGET_SECONDS,
    SESSION_REFRESH_MAX_FAILURES,
    SESSION_REFRESH_TIMEOUT_SECONDS,
    Caller,
    SessionRefreshTick,
    TokenServer,
    refresh_session_tokens,
)
from tests.conftest import DIRECTLINE_TEST_SECRET
from tests.webchat.conftest import SHOP

RELAY_URL = "http://relay.invalid"
EVIL = "https://evil.example"
TOKEN_SECONDS = 1800


class Recording(BaseAdapter):
    """The emulator's transport, keeping every request the relay sent to Direct Line and the read timeout it
    gave; `stall` makes Direct Line slow on one path: the relay's clock moves on while it waits, and past its
    read timeout the request times out, as over a network."""

    def __init__(self, inner: BaseAdapter, time: ManualClock):
        super().__init__()
        self.inner = inner
        self.time = time
        self.sent: list[requests.PreparedRequest] = []
        self.read_timeouts: list[float | None] = []
        self.stalls: dict[str, float] = {}

    def stall(self, operation: str, seconds: float) -> None:
        """Each request to `operation` (e.g. "tokens/refresh") answers after `seconds` (0: at once again)."""
        self.stalls[operation] = seconds

    def send(self, request, **options):
        self.sent.append(request)
        timeout = options.get("timeout")
        read_timeout = timeout[1] if isinstance(timeout, tuple) else timeout
        self.read_timeouts.append(read_timeout)
        path = (request.path_url or "").split("?")[0]
        stall = max((s for operation, s in self.stalls.items() if path.endswith(operation)), default=0.0)
        if read_timeout is not None and stall > read_timeout:
            self.time.advance(read_timeout)
            raise requests.ReadTimeout(f"no answer within the read timeout ({read_timeout:g} s)", request=request)
        self.time.advance(stall)
        return self.inner.send(request, **options)

    def close(self) -> None:
        """Nothing of its own to close."""


@dataclass
class Relay:
    tokens: TokenServer
    store: RelayStore
    client: DirectLineClient
    emulator: InProcessEmulator
    time: ManualClock
    transport: Recording

    def calls(self, operation: str) -> list[requests.PreparedRequest]:
        """The relay's requests to one Direct Line path, e.g. "tokens/refresh"."""
        return [r for r in self.transport.sent if (r.path_url or "").split("?")[0].endswith(operation)]

    def read_timeouts(self, operation: str) -> list[float | None]:
        """The read timeout of each of the relay's requests to one Direct Line path."""
        return [timeout for request, timeout in zip(self.transport.sent, self.transport.read_timeouts, strict=True)
                if (request.path_url or "").split("?")[0].endswith(operation)]

    def due(self) -> list[str]:
        """The conversations whose held token is due for its refresh now."""
        return [d.conversation_id for d in self.store.sessions.list_due_refreshes(now=self.time.now())]

    def tick(self, **options: Any) -> SessionRefreshTick:
        """One run of the timer's session refresh at the current time."""
        return refresh_session_tokens(self.store, self.client, clock=self.time, **options)

    def advance(self, seconds: float) -> None:
        """Time passes, for the relay and for Direct Line alike."""
        self.time.advance(seconds)
        self.emulator.advance_clock(seconds)

    def wait(self, seconds: float, *, tick_every: float = 60) -> None:
        """Let `seconds` pass with the timer running every `tick_every` seconds (the poll schedule's 5 s would
        only take longer: a refresh is due every 15 minutes)."""
        while seconds > 0:
            step = min(tick_every, seconds)
            self.advance(step)
            seconds -= step
            self.tick()

    def resume(self, grant: dict, **caller: str) -> dict:
        body = json.dumps({"conversationId": grant["conversationId"], "resumeKey": grant["resumeKey"]}).encode()
        return self.tokens.resume(body, caller=Caller(**caller))

    def damage(self, conversation_id: str, /, **fields: Any) -> None:
        """Overwrite some of a stored session's properties with values of the wrong type, as a hand edit would."""
        self.store.tables.client("webchatsessions").update_entity(
            {"PartitionKey": self.store.tables.key_for("web chat session", conversation_id), "RowKey": "session",
             **fields}, mode=UpdateMode.MERGE)

    def held_token(self, conversation_id: str) -> str | None:
        session = self.store.sessions.get_session(conversation_id)
        assert session is not None
        return session.held.token if session.held else None


@pytest.fixture
def relay(storage_connection_string, table_prefix) -> Iterator[Callable[..., Relay]]:
    """relay(WEBCHAT_*="...", token_ttl=..., enhanced_auth=..., token_endpoint=...) -> a token server of the test's
    own, its clock starting at the real time. `token_endpoint=True`: in front of the emulator's Copilot-like agent,
    in token endpoint mode (no secret; the Direct Line base discovered)."""
    built: list[Relay] = []

    def start(*, token_ttl: float = TOKEN_SECONDS, enhanced_auth: bool = True, token_endpoint: bool = False,
              **env: str) -> Relay:
        emulator = InProcessEmulator(secret=DIRECTLINE_TEST_SECRET, token_ttl=token_ttl, enhanced_auth=enhanced_auth,
                                     copilot=token_endpoint)
        directline = ({"DIRECTLINE_TOKEN_ENDPOINT": emulator.token_endpoint} if token_endpoint else
                      {"DIRECTLINE_SECRET": DIRECTLINE_TEST_SECRET, "DIRECTLINE_ENDPOINT": emulator.base_url})
        settings = Settings.from_environ({
            "AzureWebJobsStorage": storage_connection_string, "RELAY_TABLE_PREFIX": table_prefix, **directline,
            "RELAY_PUBLIC_BASE_URL": RELAY_URL, "WEBCHAT_ALLOWED_ORIGINS": SHOP, **env})
        time = ManualClock(SYSTEM_CLOCK.now().replace(microsecond=0))
        transport = Recording(emulator.transport, time)
        client = DirectLineClient(settings.directline, retry=RetryPolicy(attempts=1), clock=time, transport=transport)
        store = RelayStore.from_settings(settings.storage, clock=time)
        built.append(Relay(TokenServer(settings, client=client, store=store, clock=time), store, client, emulator,
                           time, transport))
        return built[-1]

    yield start
    for each in built:
        each.client.close()
        each.emulator.close()


def test_a_token_carries_the_trusted_origins_and_a_foreign_page_gets_none(relay):
    """Direct Line does not check trusted origins on its API calls: what keeps a foreign page out is the
    token server's own check, before it asks Direct Line for anything."""
    server = relay()
    shop = server.tokens.issue_token(Caller(origin=SHOP))
    own = server.tokens.issue_token(Caller(origin=RELAY_URL))  # the demo page, served by the app itself
    bodies = [json.loads(r.body) for r in server.calls("tokens/generate")]
    assert [b["trustedOrigins"] for b in bodies] == [[SHOP], [SHOP, RELAY_URL]]
    assert [b["user"]["id"] for b in bodies] == [shop["userId"], own["userId"]]

    before = len(server.transport.sent)
    with pytest.raises(OriginNotAllowed):
        server.tokens.issue_token(Caller(origin=EVIL))
    with pytest.raises(OriginNotAllowed):
        server.tokens.refresh_token(shop["token"], caller=Caller(origin=EVIL))
    with pytest.raises(OriginNotAllowed):
        server.resume(shop, origin=EVIL)
    assert len(server.transport.sent) == before


def test_the_timer_refreshes_the_held_token_after_the_pages_own_refresh_was_due_then_at_about_half_its_life(relay):
    server = relay()
    grant = server.tokens.issue_token(Caller())
    cid = grant["conversationId"]
    assert server.held_token(cid) == grant["token"]
    early, late = (TOKEN_SECONDS * share for share in PAGE_TOKEN_REFRESH_AT)
    assert early > TOKEN_SECONDS * TOKEN_REFRESH_SHARE[1]  # the page refreshes first, while it is open

    server.advance(early - 1)
    assert server.tick() == SessionRefreshTick()  # nothing due: not even a Direct Line call
    assert server.calls("tokens/refresh") == []
    server.advance(late - early + 2)
    assert server.tick().refreshed == 1
    [refresh] = server.calls("tokens/refresh")
    assert refresh.headers["Authorization"] == f"Bearer {grant['token']}"  # the token held, never the secret
    second = server.held_token(cid)
    assert second not in (None, grant["token"])
    assert server.tick().due == 0  # the next refresh is half the new token's life away

    early, late = (TOKEN_SECONDS * share for share in TOKEN_REFRESH_SHARE)  # a token only the relay has
    server.advance(early - 1)
    assert server.tick().due == 0
    server.advance(late - early + 2)
    assert server.tick().refreshed == 1
    assert server.held_token(cid) not in (grant["token"], second)
    assert len(server.calls("tokens/refresh")) == 2


@pytest.mark.parametrize("enhanced_auth", [True, False], ids=["enhanced-auth", "no-enhanced-auth"])
def test_resume_after_the_pages_token_expired_answers_a_token_of_the_same_conversation_and_user(relay,
                                                                                                enhanced_auth):
    server = relay(enhanced_auth=enhanced_auth)
    grant = server.tokens.issue_token(Caller())
    cid = grant["conversationId"]
    server.client.start_conversation(token=grant["token"])
    server.client.post_activity(cid, {"type": "message", "text": "before", "from": {"id": grant["userId"]}},
                                token=grant["token"])
    server.wait(3 * 3600)  # hours asleep, while the timer keeps the held token fresh
    with pytest.raises(TokenExpired):
        server.client.refresh_token(token=grant["token"])  # the page's own token is long dead

    resumed = server.resume(grant)
    assert resumed["conversationId"] == cid and resumed["userId"] == grant["userId"]
    assert resumed["token"] == server.held_token(cid)  # held from now on, refreshed as before
    requests_made = server.emulator.counters()["requests"]
    assert "conversations/reconnect" not in requests_made
    # The page posts as its user (relay-webchat.js stamps from.id with it: without enhanced authentication
    # Direct Line takes from.id as sent) and reads the conversation's history. Under enhanced authentication
    # the token is the user's, whatever the activity says.
    posted = server.client.post_activity(cid, {"type": "message", "text": "back", "from": {"id": resumed["userId"]}},
                                         token=resumed["token"])
    if enhanced_auth:
        server.client.post_activity(cid, {"type": "message", "text": "as whom?", "from": {"id": "someone-else"}},
                                    token=resumed["token"])
    page = server.client.get_activities(cid, token=resumed["token"])
    assert [(a["from"]["id"], a["text"]) for a in page.activities if a["from"].get("role") != "bot"] == \
        [(grant["userId"], "before"), (grant["userId"], "back")] + [(grant["userId"], "as whom?")] * enhanced_auth
    assert posted in [a["id"] for a in page.activities]
    # A reconnect with the token the relay answered gets the page its stream (what DirectLineJS does next).
    assert server.client.reconnect(cid, token=resumed["token"]).stream_url


def test_a_session_lasts_webchat_session_hours_past_its_last_resume_then_stops(relay):
    server = relay(WEBCHAT_SESSION_HOURS="1")
    grant = server.tokens.issue_token(Caller())
    cid = grant["conversationId"]
    server.wait(50 * 60)
    grant = {**grant, **server.resume(grant)}  # 50 minutes in: the session now ends an hour from here
    server.wait(59 * 60)
    grant = {**grant, **server.resume(grant)}
    server.wait(61 * 60)
    with pytest.raises(SessionExpired):
        server.resume(grant)
    # Past its end the session is not refreshed any more: its token is forgotten, its index row gone.
    refreshes = len(server.calls("tokens/refresh"))
    server.wait(3600)
    assert len(server.calls("tokens/refresh")) == refreshes
    assert server.held_token(cid) is None
    assert server.store.sessions.list_due_refreshes(now=server.time.now() + timedelta(days=1)) == []


def test_a_pages_own_refresh_extends_its_session(relay):
    """A page open all day refreshes its own token: it may still sleep a whole session's length after that."""
    server = relay(WEBCHAT_SESSION_HOURS="1")
    grant = server.tokens.issue_token(Caller())
    token = grant["token"]
    for _ in range(3):  # open for 45 minutes, refreshing its token as relay-webchat.js does
        server.wait(15 * 60)
        token = server.tokens.refresh_token(token)["token"]
    server.wait(59 * 60)  # then asleep: 1 h 44 min after its first token, 59 min after its last refresh
    assert server.resume(grant)["conversationId"] == grant["conversationId"]


def test_a_session_holding_no_token_holds_its_pages_refreshed_one_and_can_be_resumed_again(relay):
    """A session stored before sessions held tokens, or whose held token lapsed in an outage while its page stayed
    open and refreshed its own: the page's next refresh gives the session a token to resume with."""
    server = relay()
    grant = server.tokens.issue_token(Caller())
    cid = grant["conversationId"]
    server.store.sessions.drop_token(cid, grant["token"])
    assert server.held_token(cid) is None
    with pytest.raises(SessionLapsed):
        server.resume(grant)
    refreshed = server.tokens.refresh_token(grant["token"])
    assert server.held_token(cid) == refreshed["token"]
    server.wait(3 * 3600)  # the page asleep; the timer keeps the token it now holds fresh
    resumed = server.resume(grant)
    assert (resumed["conversationId"], resumed["userId"]) == (cid, grant["userId"])


def test_an_open_pages_conversation_is_refreshed_by_the_page_alone_and_by_the_timer_once_it_closes(relay):
    server = relay()
    grant = server.tokens.issue_token(Caller())
    cid, token = grant["conversationId"], grant["token"]
    for _ in range(6):  # open for an hour and a half, refreshing as relay-webchat.js does: at half its token's life
        server.wait(TOKEN_SECONDS * TOKEN_REFRESH_SHARE[1])
        token = server.tokens.refresh_token(token)["token"]
    assert len(server.calls("tokens/refresh")) == 6  # the page's refreshes only
    assert server.held_token(cid) == token
    server.wait(3 * 3600)  # closed: the timer keeps the conversation's token alive from here on
    assert len(server.calls("tokens/refresh")) > 6
    assert server.resume(grant)["conversationId"] == cid


def test_a_revoked_session_is_not_refreshed(relay):
    server = relay()
    grant = server.tokens.issue_token(Caller())
    owner = {**grant, **server.resume(grant)}
    server.resume(owner)  # the owner used its new key: the first one is poison now
    with pytest.raises(ResumeKeyReused):
        server.resume(grant)  # someone copied the first key: the session is revoked
    assert server.held_token(grant["conversationId"]) is None
    refreshes = len(server.calls("tokens/refresh"))
    server.wait(2 * TOKEN_SECONDS)
    assert len(server.calls("tokens/refresh")) == refreshes
    with pytest.raises(SessionRevoked):
        server.resume(owner)


def test_a_held_token_that_lapsed_makes_resume_say_start_over(relay):
    """Direct Line unreachable for longer than a token lives: nothing can rejoin the conversation any more."""
    server = relay()
    grant = server.tokens.issue_token(Caller())
    server.emulator.set_faults(error_500_rate=1.0, endpoints=["tokens/refresh"])
    server.wait(TOKEN_SECONDS + 60)  # every refresh failed, and was tried again, until the token had expired
    assert len(server.calls("tokens/refresh")) > 3
    assert server.held_token(grant["conversationId"]) is None
    assert server.store.sessions.list_due_refreshes(now=server.time.now() + timedelta(days=1)) == []
    server.emulator.clear_faults()
    with pytest.raises(SessionLapsed):
        server.resume(grant)


def test_one_sessions_trouble_does_not_stop_the_others(relay):
    server = relay()
    grants = [server.tokens.issue_token(Caller()) for _ in range(3)]
    server.emulator.forget(grants[1]["conversationId"])
    server.advance(TOKEN_SECONDS * PAGE_TOKEN_REFRESH_AT[1] + 1)
    tick = server.tick()
    assert (tick.due, tick.refreshed, tick.ended) == (3, 2, 1)
    held = [server.held_token(g["conversationId"]) for g in grants]
    assert held[0] not in (None, grants[0]["token"]) and held[1] is None and held[2] not in (None, grants[2]["token"])
    with pytest.raises(SessionRevoked):  # Direct Line forgot it: the page starts over
        server.resume(grants[1])
    assert server.resume(grants[0])["conversationId"] == grants[0]["conversationId"]


def test_a_throttled_refresh_waits_for_retry_after_and_leaves_the_rest_for_the_next_tick(relay):
    server = relay()
    grants = [server.tokens.issue_token(Caller()) for _ in range(3)]
    server.advance(TOKEN_SECONDS * PAGE_TOKEN_REFRESH_AT[1] + 1)
    server.emulator.set_faults(throttle_rate=1.0, retry_after="20", endpoints=["tokens/refresh"])
    tick = server.tick(workers=1)
    assert (tick.due, tick.postponed, tick.skipped) == (3, 1, 2)
    assert len(server.calls("tokens/refresh")) == 1  # one 429, then no more asking this tick
    server.emulator.clear_faults()
    server.advance(5)
    assert server.tick().refreshed == 2  # the throttled one waits for its Retry-After
    server.advance(15)
    assert server.tick().refreshed == 1
    assert all(server.held_token(g["conversationId"]) != g["token"] for g in grants)


def test_a_forgotten_conversation_found_on_resume_says_start_over(relay):
    server = relay()
    grant = server.tokens.issue_token(Caller())
    server.emulator.forget(grant["conversationId"])
    with pytest.raises(ConversationGone):
        server.resume(grant)
    with pytest.raises(SessionRevoked):
        server.resume(grant)
    assert server.store.sessions.list_due_refreshes(now=server.time.now() + timedelta(days=1)) == []


def test_in_token_endpoint_mode_pages_get_agent_tokens_and_resume_after_theirs_expired(relay):
    """A Copilot Studio agent without a secret: the token comes from its endpoint (hour-long, bound to no user or
    origin), the page is told the discovered Direct Line base, and the held token carries it through a sleep."""
    server = relay(token_endpoint=True, token_ttl=3600)
    grant = server.tokens.issue_token(Caller(origin=SHOP))
    cid = grant["conversationId"]
    assert grant["expires_in"] == 3600 and grant["domain"] == server.emulator.base_url
    assert server.calls("tokens/generate") == [] and len(server.calls("/directline/token")) == 1
    assert server.held_token(cid) == grant["token"]
    server.client.start_conversation(token=grant["token"])
    server.client.post_activity(cid, {"type": "message", "text": "before", "from": {"id": grant["userId"]}},
                                token=grant["token"])

    server.wait(3 * 3600)  # hours asleep, while the timer keeps the held token fresh
    with pytest.raises(TokenExpired):
        server.client.refresh_token(token=grant["token"])
    resumed = server.resume(grant, origin=SHOP)
    assert (resumed["conversationId"], resumed["userId"], resumed["domain"]) == (cid, grant["userId"],
                                                                                 server.emulator.base_url)
    server.client.post_activity(cid, {"type": "message", "text": "back", "from": {"id": grant["userId"]}},
                                token=resumed["token"])
    page = server.client.get_activities(cid, token=resumed["token"])
    assert [a["text"] for a in page.activities if a["from"].get("role") != "bot"] == ["before", "back"]
    assert len(server.calls("/directline/token")) == 1  # one token from the endpoint; refreshes did the rest
    secret = f"Bearer {DIRECTLINE_TEST_SECRET}"
    assert all(r.headers.get("Authorization") != secret for r in server.transport.sent)
    assert all("Authorization" not in r.headers for r in server.transport.sent if "powervirtualagents" in r.url)


def test_an_agent_endpoint_that_refuses_is_the_relays_configuration_not_the_pages(relay, caplog):
    server = relay(token_endpoint=True, DIRECTLINE_TOKEN_ENDPOINT=f"{DEFAULT_URL}/powervirtualagents/botsbyschema/"
                   "cr_agent/directline/token")  # no api-version: the environment answers 400
    with pytest.raises(DirectLineRejected):
        server.tokens.issue_token(Caller(origin=SHOP))
    assert "token endpoint refused" in caplog.text


# ----------------------------------------------------------------------- Direct Line slow, hanging, failing


def due_sessions(server: Relay, count: int) -> list[dict]:
    """`count` pages' sessions, every held token due for its refresh."""
    grants = [server.tokens.issue_token(Caller(address=f"192.0.2.{n}")) for n in range(count)]  # under the rate limit
    server.advance(TOKEN_SECONDS * PAGE_TOKEN_REFRESH_AT[1] + 1)
    return grants


def test_a_hanging_direct_line_holds_the_timer_up_for_one_short_timeout_and_the_rest_wait_for_the_next_tick(relay):
    """Direct Line takes the connection and never answers: the run stops starting refreshes once its few seconds
    are spent, each call gives up after a short timeout, and the channel poller that runs it moves on."""
    server = relay()
    grants = due_sessions(server, 20)
    server.transport.stall("tokens/refresh", 3600)
    tick = server.tick()
    tried = server.read_timeouts("tokens/refresh")
    assert tried == [SESSION_REFRESH_TIMEOUT_SECONDS] * len(tried)
    assert 0 < len(tried) <= REFRESH_WORKERS  # one round of the workers' timeouts at most
    assert (tick.due, tick.postponed, tick.skipped) == (20, len(tried), 20 - len(tried))
    asked = {r.headers["Authorization"] for r in server.calls("tokens/refresh")}
    not_reached = {g["conversationId"] for g in grants if f"Bearer {g['token']}" not in asked}
    assert len(not_reached) == tick.skipped and not_reached <= set(server.due())  # first in line next time

    server.transport.stall("tokens/refresh", 0)
    server.advance(30)
    assert server.tick().refreshed == 20
    assert all(server.held_token(g["conversationId"]) != g["token"] for g in grants)


def test_direct_line_failing_fast_stops_the_runs_refreshes_after_a_few_failures(relay):
    server = relay()
    due_sessions(server, 12)
    server.emulator.set_faults(error_500_rate=1.0, endpoints=["tokens/refresh"])
    tick = server.tick(workers=1)
    assert len(server.calls("tokens/refresh")) == SESSION_REFRESH_MAX_FAILURES
    assert (tick.postponed, tick.skipped) == (SESSION_REFRESH_MAX_FAILURES, 12 - SESSION_REFRESH_MAX_FAILURES)
    server.emulator.clear_faults()
    assert server.tick().refreshed == tick.skipped


def test_a_slow_direct_line_gets_the_runs_few_seconds_and_the_rest_are_refreshed_next_tick(relay):
    server = relay()
    grants = due_sessions(server, 12)
    server.transport.stall("tokens/refresh", 1)  # every refresh works, in a second
    started = server.time.monotonic()
    first = server.tick(workers=1)
    assert server.time.monotonic() - started <= SESSION_REFRESH_BUDGET_SECONDS + 1
    assert 0 < first.refreshed < 12 and first.skipped == 12 - first.refreshed
    assert len(server.due()) == first.skipped
    while server.due():
        assert server.tick(workers=1).refreshed > 0
    assert all(server.held_token(g["conversationId"]) != g["token"] for g in grants)


def test_a_refresh_that_timed_out_is_tried_again_counting_from_its_failure_not_from_its_start(relay):
    """A short-lived token is retried within seconds: counted from before the call, it would be due again at
    once, and every tick would spend its time on it."""
    server = relay(token_ttl=40)
    grant = server.tokens.issue_token(Caller())
    server.advance(40 * PAGE_TOKEN_REFRESH_AT[1] + 0.5)  # 11.5 s left: tried again within 3 s, less than the timeout
    server.transport.stall("tokens/refresh", 3600)
    assert server.tick().postponed == 1
    assert server.due() == []
    assert server.tick().due == 0
    server.transport.stall("tokens/refresh", 0)
    server.advance(2)
    assert server.tick().refreshed == 1
    assert server.held_token(grant["conversationId"]) != grant["token"]


# -------------------------------------------------------------------------- rows the timer cannot work


@pytest.mark.parametrize(("fields", "refusal"), [
    ({"token_expires_at": "2030-01-01T00:00:00Z"}, SessionLapsed),
    ({"token": 12345}, SessionLapsed),
    ({"expires_at": "2030-01-01T00:00:00Z"}, SessionExpired),
    ({"user_id": 7}, SessionExpired),
], ids=["token expiry", "token", "session end", "user"])
def test_a_malformed_session_row_gets_a_clear_refusal_and_the_timer_lets_it_go(relay, caplog, fields, refusal):
    server = relay()
    grant = server.tokens.issue_token(Caller())
    server.damage(grant["conversationId"], **fields)
    with pytest.raises(refusal):
        server.resume(grant)
    server.advance(TOKEN_SECONDS * PAGE_TOKEN_REFRESH_AT[1] + 1)
    assert server.tick().failed == 0
    assert server.due() == []
    assert server.tick().due == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no traceback, in this tick or any later


def test_a_row_whose_refresh_keeps_failing_is_put_off_and_does_not_keep_the_others_waiting(relay, monkeypatch):
    """Table Storage refuses to keep one session's refreshed token, every time. The timer reads only the earliest
    due rows: that one must not stay first in line."""
    server = relay()
    grants = due_sessions(server, 2)
    [first] = server.store.sessions.list_due_refreshes(now=server.time.now(), limit=1)
    hold_token = server.store.sessions.hold_token

    def failing_for_the_first(conversation_id, held, **options):
        if conversation_id == first.conversation_id:
            raise StoreError("cannot keep a Web Chat session's token: the table refused it")
        return hold_token(conversation_id, held, **options)

    monkeypatch.setattr(server.store.sessions, "hold_token", failing_for_the_first)
    assert server.tick(limit=1).failed == 1
    assert server.tick(limit=1).refreshed == 1
    [other] = [g for g in grants if g["conversationId"] != first.conversation_id]
    assert server.held_token(other["conversationId"]) != other["token"]
    assert server.due() == []  # the failing one is tried again later, not at once
    server.advance(30)
    assert server.due() == [first.conversation_id]
