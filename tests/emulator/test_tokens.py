"""Authentication and tokens: generate, refresh, lifetimes, and the 401/403 answers."""

from __future__ import annotations

import pytest

from tests.emulator.conftest import DirectLineCalls, error_of


def test_generate_needs_the_secret_and_starts_nothing(dl, directline_emulator):
    response = dl.call("POST", "/tokens/generate", json={"user": {"id": "dl_alice", "name": "Alice"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"conversationId", "token", "expires_in"}
    assert body["expires_in"] == 1800
    assert directline_emulator.conversation(body["conversationId"])["started"] is False

    as_token = dl.call("POST", "/tokens/generate", auth=body["token"])
    assert error_of(as_token) == (403, "BadArgument")


def test_generated_token_is_bound_to_its_user(dl):
    generated = dl.call("POST", "/tokens/generate", json={"user": {"id": "dl_alice"}}).json()
    conversation = dl.start(auth=generated["token"])
    dl.say(conversation["conversationId"], "who am I", user="someone-else", auth=generated["token"])
    mine = [a for a in dl.all_activities(conversation["conversationId"]) if a["from"].get("role") != "bot"]
    assert [a["from"]["id"] for a in mine] == ["dl_alice"]


def test_refresh_gives_a_new_token_for_the_same_conversation_again_and_again(dl):
    token = dl.call("POST", "/tokens/generate").json()
    for _ in range(3):
        response = dl.call("POST", "/tokens/refresh", auth=token["token"])
        assert response.status_code == 200, response.text
        refreshed = response.json()
        assert refreshed["conversationId"] == token["conversationId"]
        assert refreshed["token"] != token["token"]
        assert refreshed["expires_in"] == 1800
        token = refreshed
    assert dl.start(auth=token["token"])["conversationId"] == token["conversationId"]


def test_refresh_refuses_the_secret(dl):
    assert error_of(dl.call("POST", "/tokens/refresh")) == (403, "BadArgument")


@pytest.mark.parametrize("header", [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer   "])
def test_missing_or_malformed_authorization_is_401(dl, header):
    headers = {"Authorization": header} if header is not None else {}
    response = dl.call("POST", "/conversations", auth=None, headers=headers)
    assert error_of(response) == (401, "BadArgument")


@pytest.mark.parametrize("credential", ["wrong-secret", "not.a-token", "e30.AAAA"])
def test_unknown_secret_or_token_is_403(dl, credential):
    assert error_of(dl.call("POST", "/conversations", auth=credential)) == (403, "BadArgument")


def test_a_forged_token_for_another_conversation_is_refused(dl):
    mine = dl.start()
    other = dl.start()
    payload, _, signature = mine["token"].partition(".")
    forged = f"{payload[:-2]}AA.{signature}"
    assert error_of(dl.get(other["conversationId"], auth=forged)) == (403, "BadArgument")


def test_a_token_only_works_in_its_own_conversation(dl):
    mine, other = dl.start(), dl.start()
    assert dl.get(mine["conversationId"], auth=mine["token"]).status_code == 200
    assert error_of(dl.get(other["conversationId"], auth=mine["token"])) == (403, "BadArgument")
    activity = {"type": "message", "from": {"id": "dl_x"}, "text": "hi"}
    assert error_of(dl.post(other["conversationId"], activity, auth=mine["token"])) == (403, "BadArgument")


def test_trusted_origins_bind_no_api_call_as_with_the_real_service(dl):
    token = dl.call("POST", "/tokens/generate", json={"trustedOrigins": ["https://shop.example"]}).json()["token"]
    foreign = {"Origin": "https://evil.example"}
    started = dl.call("POST", "/conversations", auth=token, headers=foreign)
    assert started.status_code == 201, started.text
    cid = started.json()["conversationId"]
    posted = dl.call("POST", f"/conversations/{cid}/activities", auth=token, headers=foreign,
                     json={"type": "message", "from": {"id": "dl_u"}, "text": "from anywhere"})
    assert posted.status_code == 200, posted.text
    refreshed = dl.call("POST", "/tokens/refresh", auth=token, headers=foreign)
    assert refreshed.status_code == 200, refreshed.text
    read = dl.call("GET", f"/conversations/{cid}/activities", auth=refreshed.json()["token"], headers=foreign)
    assert read.status_code == 200 and read.headers["Access-Control-Allow-Origin"] == "*"
    assert [a["text"] for a in read.json()["activities"]] == ["from anywhere", "You said: from anywhere"]


def test_token_expires_after_token_ttl_and_cannot_be_refreshed(start_emulator):
    emulator = start_emulator(token_ttl=600)
    dl = DirectLineCalls(emulator.base_url)
    conversation = dl.start()
    assert conversation["expires_in"] == 600
    emulator.advance_clock(599)
    assert dl.get(conversation["conversationId"], auth=conversation["token"]).status_code == 200
    emulator.advance_clock(1)
    assert error_of(dl.get(conversation["conversationId"], auth=conversation["token"])) == (403, "TokenExpired")
    assert error_of(dl.call("POST", "/tokens/refresh", auth=conversation["token"])) == (403, "TokenExpired")
    assert dl.get(conversation["conversationId"]).status_code == 200  # the secret never expires


def test_admin_expire_tokens_expires_every_token_of_one_conversation(dl, directline_emulator):
    first, second = dl.start(), dl.start()
    refreshed = dl.call("POST", "/tokens/refresh", auth=first["token"]).json()["token"]
    directline_emulator.expire_tokens(first["conversationId"])
    for token in (first["token"], refreshed):
        assert error_of(dl.get(first["conversationId"], auth=token)) == (403, "TokenExpired")
    assert dl.get(second["conversationId"], auth=second["token"]).status_code == 200
    assert dl.get(first["conversationId"]).status_code == 200  # the secret still reads it
