"""Enhanced authentication on and off: what reconnect with the secret gives, and whose id an activity carries.

The shared emulator runs with enhanced authentication (DirectLineEmulator's default); the other mode
gets an emulator of this module's own, started with --no-enhanced-auth.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.directline import DirectLineEmulator
from tests.conftest import DIRECTLINE_TEST_SECRET, subprocess_env
from tests.emulator.conftest import DirectLineCalls, error_of


@pytest.fixture(scope="module")
def plain_emulator(tmp_path_factory) -> Iterator[DirectLineEmulator]:
    emulator = DirectLineEmulator(secret=DIRECTLINE_TEST_SECRET, enhanced_auth=False, env=subprocess_env(),
                                  log_path=tmp_path_factory.mktemp("directline-plain") / "directline.log")
    with emulator:
        yield emulator


@pytest.fixture(params=[True, False], ids=["enhanced auth", "no enhanced auth"])
def enhanced(request) -> bool:
    return request.param


@pytest.fixture
def site(enhanced, directline_emulator, plain_emulator) -> DirectLineEmulator:
    """An emulator in the mode under test."""
    return directline_emulator if enhanced else plain_emulator


def senders(calls: DirectLineCalls, conversation_id: str) -> list[str]:
    return [a["from"]["id"] for a in calls.all_activities(conversation_id) if a["from"].get("role") != "bot"]


def test_reconnect_with_the_secret_is_refused_under_enhanced_auth_and_gives_a_userless_token_without(site, enhanced):
    dl = DirectLineCalls(site.base_url)
    cid = dl.start(user={"id": "dl_alice"})["conversationId"]
    response = dl.call("GET", f"/conversations/{cid}")
    if enhanced:
        assert error_of(response) == (400, "MissingProperty")
        assert response.json()["error"]["message"] == "Missing user ID"
        return
    assert response.status_code == 200, response.text
    rejoined = response.json()
    assert rejoined["conversationId"] == cid and rejoined["streamUrl"]
    dl.say(cid, "from the reconnected token", user="dl_someone_else", auth=rejoined["token"])
    assert senders(dl, cid) == ["dl_someone_else"]  # the token carries no user: from.id stays as sent


def test_reconnect_with_a_valid_token_keeps_the_conversation_and_its_user_in_both_modes(site, enhanced):
    dl = DirectLineCalls(site.base_url)
    started = dl.start(user={"id": "dl_alice"})
    cid = started["conversationId"]
    response = dl.call("GET", f"/conversations/{cid}", auth=started["token"])
    assert response.status_code == 200, response.text
    rejoined = response.json()
    assert rejoined["conversationId"] == cid and rejoined["token"] != started["token"]
    dl.say(cid, "as the page says", user="dl_alice", auth=rejoined["token"])
    if enhanced:  # the user the new token carries shows where it wins over from.id
        dl.say(cid, "who am I", user="dl_mallory", auth=rejoined["token"])
        assert senders(dl, cid) == ["dl_alice", "dl_alice"]
    else:
        assert senders(dl, cid) == ["dl_alice"]


def test_the_tokens_user_wins_over_from_id_under_enhanced_auth_only(site, enhanced):
    """Without enhanced authentication Direct Line takes from.id (and upload's userId) as the client sends it."""
    dl = DirectLineCalls(site.base_url)
    started = dl.start(user={"id": "dl_alice"})
    cid = started["conversationId"]
    dl.say(cid, "who am I", user="dl_mallory", auth=started["token"])
    uploaded = dl.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_mallory"}, data=b"a file",
                       headers={"Content-Type": "text/plain"}, auth=started["token"])
    assert uploaded.status_code == 200, uploaded.text
    expected = "dl_alice" if enhanced else "dl_mallory"
    assert senders(dl, cid) == [expected, expected]


def test_the_secret_reads_and_posts_in_both_modes_with_from_id_as_sent(site):
    dl = DirectLineCalls(site.base_url)
    cid = dl.start(user={"id": "dl_alice"})["conversationId"]
    dl.say(cid, "service to service", user="dl_bob")
    assert senders(dl, cid) == ["dl_bob"]


def test_once_every_token_expired_only_a_site_without_enhanced_auth_lets_the_secret_rejoin(site, enhanced):
    dl = DirectLineCalls(site.base_url)
    started = dl.start(user={"id": "dl_alice"})
    cid = started["conversationId"]
    site.expire_tokens(cid)
    assert error_of(dl.call("GET", f"/conversations/{cid}", auth=started["token"])) == (403, "TokenExpired")
    assert error_of(dl.call("POST", "/tokens/refresh", auth=started["token"])) == (403, "TokenExpired")
    with_secret = dl.call("GET", f"/conversations/{cid}")
    if enhanced:
        assert error_of(with_secret) == (400, "MissingProperty")
    else:
        assert with_secret.status_code == 200 and dl.get(cid, auth=with_secret.json()["token"]).status_code == 200
