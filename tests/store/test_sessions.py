"""Web Chat sessions against Azurite: resume keys rotated, a reused key revokes, the grace period, races; the
token a session holds and its refresh index."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import UpdateMode

from relay.errors import ConcurrencyConflict
from relay.store import RelayStore
from relay.store.sessions import GRACE_KEYS_LIMIT, RESUME_GRACE, HeldToken, ResumeOutcome
from tests.store.conftest import T0, make_store


def test_webchat_resume_rotates_and_detects_a_reused_key(store):
    store.sessions.create_session("conv/1", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 now=T0)
    assert store.sessions.resume_session("conv/1", resume_key="nope", new_resume_key="x",
                                        expires_at=T0, now=T0).outcome == ResumeOutcome.WRONG_KEY
    result = store.sessions.resume_session("conv/1", resume_key="key-1", new_resume_key="key-2",
                                          expires_at=T0 + timedelta(hours=2), now=T0)
    assert result.ok and result.session.expires_at == T0 + timedelta(hours=2)
    assert store.sessions.resume_session("conv/1", resume_key="key-2", new_resume_key="key-3",
                                        expires_at=T0 + timedelta(hours=2), now=T0).outcome == ResumeOutcome.RESUMED
    # key-1 was rotated away: whoever shows it now copied it, so the session dies
    assert store.sessions.resume_session("conv/1", resume_key="key-1", new_resume_key="x",
                                        expires_at=T0, now=T0).outcome == ResumeOutcome.REUSED_KEY
    assert store.sessions.get_session("conv/1").revoked
    assert store.sessions.resume_session("conv/1", resume_key="key-3", new_resume_key="x",
                                        expires_at=T0, now=T0).outcome == ResumeOutcome.REVOKED
    assert "key-" not in repr(store.sessions.get_session("conv/1"))


def test_webchat_unknown_expired_and_duplicate_sessions(store):
    assert store.sessions.resume_session("missing", resume_key="k", new_resume_key="x", expires_at=T0,
                                        now=T0).outcome == ResumeOutcome.UNKNOWN_SESSION
    store.sessions.create_session("conv-1", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(minutes=1))
    assert store.sessions.resume_session("conv-1", resume_key="k", new_resume_key="x", expires_at=T0,
                                        now=T0 + timedelta(minutes=2)).outcome == ResumeOutcome.EXPIRED
    with pytest.raises(ConcurrencyConflict):
        store.sessions.create_session("conv-1", user_id="dl_other", resume_key="k2", expires_at=T0)
    store.sessions.revoke_session("conv-1")
    assert store.sessions.get_session("conv-1").revoked


def resume(store: RelayStore, key: str, new_key: str, at: datetime, conversation_id: str = "conv-g") -> str:
    """Present `key` at `at` (offering `new_key` as the next one); the outcome."""
    return store.sessions.resume_session(conversation_id, resume_key=key, new_resume_key=new_key,
                                        expires_at=at + timedelta(hours=1), now=at).outcome


@pytest.fixture
def session(store) -> str:
    """A session whose first key, key-1, was rotated to key-2 at T0 (the page may never have seen key-2)."""
    store.sessions.create_session("conv-g", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 now=T0)
    assert resume(store, "key-1", "key-2", T0) == ResumeOutcome.RESUMED
    return "conv-g"


def test_webchat_a_lost_answer_is_retried_with_the_previous_key_within_the_grace_period(store, session):
    # The answer carrying key-2 never reached the page: it retries with the key it holds.
    result = store.sessions.resume_session(session, resume_key="key-1", new_resume_key="key-3",
                                          expires_at=T0 + timedelta(hours=3), now=T0 + timedelta(seconds=20))
    assert result.ok and result.outcome == ResumeOutcome.RETRIED
    assert not result.session.revoked and result.session.expires_at == T0 + timedelta(hours=3)
    assert result.session.user_id == "dl_u"
    # The fresh key works (and rotates as usual); key-1 is poison from then on.
    assert resume(store, "key-3", "key-4", T0 + timedelta(seconds=30)) == ResumeOutcome.RESUMED
    assert resume(store, "key-4", "key-5", T0 + timedelta(seconds=40)) == ResumeOutcome.RESUMED
    assert resume(store, "key-1", "x", T0 + timedelta(seconds=45)) == ResumeOutcome.REUSED_KEY
    assert store.sessions.get_session(session).revoked


def test_webchat_once_the_new_key_was_used_the_previous_one_revokes(store, session):
    assert resume(store, "key-2", "key-3", T0 + timedelta(seconds=5)) == ResumeOutcome.RESUMED
    assert resume(store, "key-1", "x", T0 + timedelta(seconds=10)) == ResumeOutcome.REUSED_KEY  # well within the window
    assert store.sessions.get_session(session).revoked
    assert resume(store, "key-3", "x", T0 + timedelta(seconds=11)) == ResumeOutcome.REVOKED


def test_webchat_unused_answers_of_the_grace_period_are_poison_once_one_is_used(store, session):
    assert resume(store, "key-1", "key-3", T0 + timedelta(seconds=1)) == ResumeOutcome.RETRIED
    # Until one is used, every answer is good (racing resumes: the page keeps whichever arrived last).
    assert resume(store, "key-2", "key-4", T0 + timedelta(seconds=2)) == ResumeOutcome.RESUMED
    assert resume(store, "key-3", "x", T0 + timedelta(seconds=3)) == ResumeOutcome.REUSED_KEY
    assert store.sessions.get_session(session).revoked


def test_webchat_the_previous_key_revokes_after_the_grace_period(store, session):
    assert resume(store, "key-1", "x", T0 + RESUME_GRACE) == ResumeOutcome.REUSED_KEY
    assert store.sessions.get_session(session).revoked


def test_webchat_retries_do_not_extend_the_grace_period(store, session):
    assert resume(store, "key-1", "key-3", T0 + RESUME_GRACE - timedelta(seconds=1)) == ResumeOutcome.RETRIED
    assert resume(store, "key-1", "x", T0 + RESUME_GRACE + timedelta(seconds=1)) == ResumeOutcome.REUSED_KEY
    assert store.sessions.get_session(session).revoked


def test_webchat_the_grace_period_answers_a_bounded_number_of_keys(store, session):
    moment = T0 + timedelta(seconds=1)
    retries = [resume(store, "key-1", f"retry-{n}", moment) for n in range(GRACE_KEYS_LIMIT - 1)]
    assert retries == [ResumeOutcome.RETRIED] * (GRACE_KEYS_LIMIT - 1)
    assert resume(store, "key-1", "x", moment) == ResumeOutcome.REUSED_KEY
    assert store.sessions.get_session(session).revoked


def test_webchat_only_the_latest_rotation_has_a_grace_period(store, session):
    assert resume(store, "key-2", "key-3", T0 + timedelta(seconds=1)) == ResumeOutcome.RESUMED
    # key-3's answer was lost: the page tries key-2 again
    assert resume(store, "key-2", "key-4", T0 + timedelta(seconds=2)) == ResumeOutcome.RETRIED
    assert resume(store, "key-1", "x", T0 + timedelta(seconds=3)) == ResumeOutcome.REUSED_KEY


class InterleavingTransport(RequestsTransport):
    """Runs `before_write` once, just before this store's next write of a Web Chat session: another
    instance's whole resume then lands between this one's read and its ETag-guarded write."""

    def __init__(self):
        super().__init__()
        self.before_write: Callable[[], None] | None = None

    def send(self, request, **kwargs):
        if self.before_write and request.method in ("PUT", "PATCH", "MERGE") and "webchatsessions" in request.url:
            run, self.before_write = self.before_write, None
            run()
        return super().send(request, **kwargs)


def test_webchat_two_racing_resumes_with_one_key_both_succeed(storage_connection_string, table_prefix, other_store):
    transport = InterleavingTransport()
    store = make_store(storage_connection_string, table_prefix, transport=transport)
    store.sessions.create_session("conv-race", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 now=T0)
    other: list[str] = []
    transport.before_write = lambda: other.append(resume(other_store, "key-1", "key-b", T0, "conv-race"))
    mine = resume(store, "key-1", "key-a", T0, "conv-race")
    # The other instance rotated first; this one's write then failed its ETag check, read again, and
    # found its key had just been rotated: a retry within the grace period, not a stolen key.
    assert (other, mine) == ([ResumeOutcome.RESUMED], ResumeOutcome.RETRIED)
    assert not store.sessions.get_session("conv-race").revoked
    # The page kept the answer that arrived last, either one: it works.
    assert resume(store, "key-b", "key-c", T0 + timedelta(seconds=1), "conv-race") == ResumeOutcome.RESUMED
    assert resume(store, "key-c", "key-d", T0 + timedelta(seconds=2), "conv-race") == ResumeOutcome.RESUMED


def test_webchat_many_concurrent_resumes_with_one_key_never_revoke(storage_connection_string, table_prefix):
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(4)]
    stores[0].sessions.create_session("conv-many", user_id="dl_u", resume_key="key-1",
                                     expires_at=T0 + timedelta(hours=1), now=T0)
    start = threading.Barrier(len(stores))

    def go(n: int) -> str:
        start.wait()
        return resume(stores[n], "key-1", f"key-{n}-next", T0, "conv-many")

    with ThreadPoolExecutor(len(stores)) as pool:
        outcomes = list(pool.map(go, range(len(stores))))
    assert sorted(outcomes) == sorted([ResumeOutcome.RESUMED] + [ResumeOutcome.RETRIED] * (len(stores) - 1))
    assert not stores[0].sessions.get_session("conv-many").revoked
    assert resume(stores[0], "key-2-next", "key-last", T0 + timedelta(seconds=1), "conv-many") == ResumeOutcome.RESUMED


# --------------------------------------------------------------------------------- the held token


def held(name: str, refresh_in: float, *, lives: float = 1800, at: datetime = T0) -> HeldToken:
    return HeldToken(name, expires_at=at + timedelta(seconds=lives), refresh_at=at + timedelta(seconds=refresh_in))


def due(store: RelayStore, at: datetime) -> list[str]:
    return [row.conversation_id for row in store.sessions.list_due_refreshes(now=at)]


def test_webchat_a_held_token_is_due_for_its_refresh_from_its_refresh_time_on_and_kept_out_of_reprs(store):
    store.sessions.create_session("conv-h", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(hours=24),
                                 held=held("token-1", 900), now=T0)
    store.sessions.create_session("conv-later", user_id="dl_v", resume_key="k", expires_at=T0 + timedelta(hours=24),
                                 held=held("token-2", 1000), now=T0)
    assert due(store, T0 + timedelta(seconds=899)) == []
    assert due(store, T0 + timedelta(seconds=900)) == ["conv-h"]
    assert due(store, T0 + timedelta(seconds=1000)) == ["conv-h", "conv-later"]  # earliest first
    session = store.sessions.get_session("conv-h")
    assert session.held == held("token-1", 900)
    assert "token-1" not in repr(session)


def test_webchat_holding_a_new_token_moves_its_refresh_and_leaves_no_row_behind(store):
    store.sessions.create_session("conv-m", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(hours=24),
                                 held=held("token-1", 900), now=T0)
    later = T0 + timedelta(seconds=900)
    kept = store.sessions.hold_token("conv-m", held("token-2", 900, at=later), now=later)
    assert kept is not None and kept.held.token == "token-2"
    assert due(store, later) == []
    assert due(store, later + timedelta(seconds=900)) == ["conv-m"]
    assert store.sessions.get_session("conv-m").held.token == "token-2"
    # A failed refresh is tried again sooner, if the session still holds that token.
    assert store.sessions.postpone_refresh("conv-m", "token-1", refresh_at=later, now=later) is None
    store.sessions.postpone_refresh("conv-m", "token-2", refresh_at=later + timedelta(seconds=30), now=later)
    assert due(store, later + timedelta(seconds=30)) == ["conv-m"]
    assert len(store.sessions.list_due_refreshes(now=later + timedelta(days=1))) == 1


def test_webchat_a_revoked_session_holds_no_token_and_is_not_due(store):
    store.sessions.create_session("conv-r", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(hours=24),
                                 held=held("token-1", 900), now=T0)
    store.sessions.revoke_session("conv-r", now=T0)
    session = store.sessions.get_session("conv-r")
    assert session.revoked and session.held is None
    assert due(store, T0 + timedelta(days=1)) == []
    assert store.sessions.hold_token("conv-r", held("token-2", 900), now=T0) is None
    assert store.sessions.get_session("conv-r").held is None


def test_webchat_a_reused_key_revokes_and_forgets_the_held_token(store):
    store.sessions.create_session("conv-s", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 held=held("token-1", 900), now=T0)
    assert resume(store, "key-1", "key-2", T0, "conv-s") == ResumeOutcome.RESUMED
    assert resume(store, "key-2", "key-3", T0, "conv-s") == ResumeOutcome.RESUMED
    assert resume(store, "key-1", "x", T0, "conv-s") == ResumeOutcome.REUSED_KEY
    assert store.sessions.get_session("conv-s").held is None
    assert due(store, T0 + timedelta(days=1)) == []


def test_webchat_a_lapsed_token_is_dropped_only_while_it_is_the_one_held(store):
    store.sessions.create_session("conv-l", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(hours=24),
                                 held=held("token-1", 900), now=T0)
    store.sessions.hold_token("conv-l", held("token-2", 900), now=T0)
    store.sessions.drop_token("conv-l", "token-1", now=T0)  # an older token lapsed: the newer one stays
    assert store.sessions.get_session("conv-l").held.token == "token-2"
    store.sessions.drop_token("conv-l", "token-2", now=T0)
    assert store.sessions.get_session("conv-l").held is None
    assert due(store, T0 + timedelta(days=1)) == []


def test_webchat_an_index_row_its_session_no_longer_points_at_can_be_ended(store, other_store):
    store.sessions.create_session("conv-o", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(hours=24),
                                 held=held("token-1", 900), now=T0)
    [stale] = store.sessions.list_due_refreshes(now=T0 + timedelta(seconds=900))
    other_store.sessions.hold_token("conv-o", held("token-2", 600), now=T0)
    assert store.sessions.get_session("conv-o").refresh_index_key != stale.index_key
    store.sessions.end_refresh(stale)
    assert [r.index_key for r in store.sessions.list_due_refreshes(now=T0 + timedelta(days=1))] == \
        [store.sessions.get_session("conv-o").refresh_index_key]


def test_webchat_extending_a_session_needs_it_unchanged_since_it_was_read(store):
    store.sessions.create_session("conv-e", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(hours=1),
                                 held=held("token-1", 900), now=T0)
    session = store.sessions.get_session("conv-e")
    assert store.sessions.extend_session(session, expires_at=T0 + timedelta(hours=5), now=T0)
    assert store.sessions.get_session("conv-e").expires_at == T0 + timedelta(hours=5)
    assert not store.sessions.extend_session(session, expires_at=T0 + timedelta(hours=9), now=T0)  # stale read
    assert store.sessions.get_session("conv-e").expires_at == T0 + timedelta(hours=5)



def test_webchat_extending_a_session_with_a_token_holds_it_and_moves_its_refresh(store):
    store.sessions.create_session("conv-x", user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(hours=1),
                                 now=T0)
    session = store.sessions.get_session("conv-x")  # holds no token (a session from before sessions held any)
    assert store.sessions.extend_session(session, expires_at=T0 + timedelta(hours=5), held=held("token-p", 1200),
                                         now=T0)
    assert store.sessions.get_session("conv-x").held == held("token-p", 1200)
    assert due(store, T0 + timedelta(seconds=1200)) == ["conv-x"]
    assert not store.sessions.extend_session(session, expires_at=T0, held=held("token-q", 600), now=T0)  # stale
    assert store.sessions.get_session("conv-x").held.token == "token-p"

# ------------------------------------------------------------------------------------------ malformed rows


def damage(store: RelayStore, conversation_id: str, /, **fields) -> None:
    """Overwrite some of a stored session's properties with values of the wrong type, as a hand edit would."""
    store.tables.client("webchatsessions").update_entity(
        {"PartitionKey": store.tables.key_for("web chat session", conversation_id), "RowKey": "session", **fields},
        mode=UpdateMode.MERGE)


@pytest.mark.parametrize("fields", [{"token_expires_at": "2030-01-01T12:30:00Z"}, {"token": 42},
                                    {"token_refresh_at": True}], ids=["expiry", "token", "refresh time"])
def test_webchat_a_held_token_that_cannot_be_read_is_no_held_token(store, fields):
    store.sessions.create_session("conv-d", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 held=held("token-1", 900), now=T0)
    damage(store, "conv-d", **fields)
    session = store.sessions.get_session("conv-d")
    assert session.held is None and session.user_id == "dl_u"
    assert resume(store, "key-1", "key-2", T0, "conv-d") == ResumeOutcome.RESUMED  # the rest of the session works


@pytest.mark.parametrize("fields", [{"expires_at": "2030-01-01T13:00:00Z"}, {"user_id": 7}],
                         ids=["end", "user"])
def test_webchat_a_session_whose_end_or_user_cannot_be_read_has_ended(store, fields):
    store.sessions.create_session("conv-e", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 held=held("token-1", 900), now=T0)
    damage(store, "conv-e", **fields)
    assert store.sessions.get_session("conv-e").expires_at <= T0
    assert resume(store, "key-1", "key-2", T0, "conv-e") == ResumeOutcome.EXPIRED


def test_webchat_key_hashes_that_cannot_be_read_match_no_key(store):
    store.sessions.create_session("conv-k", user_id="dl_u", resume_key="key-1", expires_at=T0 + timedelta(hours=1),
                                 now=T0)
    assert resume(store, "key-1", "key-2", T0, "conv-k") == ResumeOutcome.RESUMED
    damage(store, "conv-k", previous_key_hashes="[not json", retry_key_hashes="[1, 2]", grace_key_hash=5,
           rotated_at="just now", created_at=3, conversation_id=8)
    session = store.sessions.get_session("conv-k")
    assert (session.conversation_id, session.previous_key_hashes, session.retry_key_hashes, session.rotated_at) == \
        ("conv-k", (), (), None)
    assert resume(store, "key-1", "x", T0, "conv-k") == ResumeOutcome.WRONG_KEY  # no longer known as rotated away
    assert resume(store, "key-2", "key-3", T0, "conv-k") == ResumeOutcome.RESUMED
    damage(store, "conv-k", resume_key_hash=12345)
    assert resume(store, "key-3", "key-4", T0, "conv-k") == ResumeOutcome.WRONG_KEY
