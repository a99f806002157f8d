"""Secrets stay secret: not in any log line, not in any answer beyond what the caller owns, and a
resume key can neither be guessed nor used twice."""

from __future__ import annotations

import requests

from devstack.channels import webhooks
from devstack.procs import wait_until
from relay.store.conversations import ConversationKey
from relay.store.sessions import hash_resume_key
from tests.security.conftest import ALLOWED_ORIGIN, PROVIDERS
from tests.security.leaks import configured_secrets, directline_tokens, find_leaks, log_files

USERS = {"twilio": "+15550600001", "whatsapp": "15550600002", "messagebird": "+15550600003",
         "bird": "+15550600004", "generic": "secret-user-5"}
USERS["vonage"] = "15550600006"
USERS["line"] = webhooks.line_user("secret-user-7")
USERS["telegram"] = "5550600006"


def test_the_leak_finder_finds_what_it_looks_for():
    """The scan itself can fail: a secret, an encoded secret and an emulator token are all found."""
    secrets = configured_secrets()
    token = ("eyJjIjoiYWJjIiwidSI6bnVsbCwibiI6bnVsbCwibyI6W10sImkiOjEuMCwiZSI6Mi4wLCJqIjoiMDAifQ."
             "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    text = f"x {secrets['TWILIO_AUTH_TOKEN (Basic auth)']} y {token} z"
    leaks = find_leaks({"a log": text}, secrets)
    assert "TWILIO_AUTH_TOKEN (Basic auth) in a log" in leaks and "a Direct Line token in a log" in leaks
    assert find_leaks({"a log": "conversation Ff06hMxCcf8d4kOhuCh6SS|0000003 delivered"}, secrets) == []


def test_no_secret_token_or_resume_key_in_any_log_or_answer(exposed_relay):
    relay = exposed_relay
    answers: list[requests.Response] = []
    # Every provider, both directions: webhooks in, replies out with each provider's credentials.
    for provider in PROVIDERS:
        answers.append(relay.deliver(relay.webhook(provider, USERS[provider], "hello secret world")))
    wait_until(lambda: all(any(r["text"] == "You said: hello secret world" for r in relay.simulator.replies(p))
                           for p in PROVIDERS), timeout=30, what="a reply on every provider")
    # The token server: issue, refresh, resume, a wrong key, a rotated key presented again.
    client = {"X-Forwarded-For": "192.0.2.10", "Origin": ALLOWED_ORIGIN}
    issued = relay.request("POST", "/api/directline/token", headers=client)
    grant = issued.json()
    refreshed = relay.request("POST", "/api/directline/refresh",
                              headers={**client, "Authorization": f"Bearer {grant['token']}"})
    resumed = relay.request("POST", "/api/directline/resume", headers=client,
                            json={"conversationId": grant["conversationId"], "resumeKey": grant["resumeKey"]})
    wrong = relay.request("POST", "/api/directline/resume", headers=client,
                          json={"conversationId": grant["conversationId"], "resumeKey": "not-the-key"})
    # The owner moves on with the rotated key; the first key is then poison (no grace for a used rotation).
    moved_on = relay.request("POST", "/api/directline/resume", headers=client,
                             json={"conversationId": grant["conversationId"], "resumeKey": resumed.json()["resumeKey"]})
    thief = {**client, "X-Forwarded-For": "198.51.100.77"}  # someone who copied the first key
    replayed = relay.request("POST", "/api/directline/resume", headers=thief,
                             json={"conversationId": grant["conversationId"], "resumeKey": grant["resumeKey"]})
    forged = relay.request("POST", "/api/directline/refresh", headers={**client, "Authorization": "Bearer forged.x"})
    assert [issued.status_code, refreshed.status_code, resumed.status_code, moved_on.status_code] == [200] * 4
    assert wrong.json()["error"]["code"] == "InvalidResumeKey"
    assert replayed.status_code == 403 and replayed.json()["error"]["code"] == "ResumeKeyReused"
    answers += [wrong, replayed, forged]

    handed_out = {"the issued token": grant["token"], "the refreshed token": refreshed.json()["token"],
                  "the resumed token": resumed.json()["token"], "the first resume key": grant["resumeKey"],
                  "the rotated resume key": resumed.json()["resumeKey"],
                  "the twice rotated resume key": moved_on.json()["resumeKey"]}
    for provider in PROVIDERS:
        record = relay.store.conversations.get_record(ConversationKey(provider, USERS[provider]))
        handed_out[f"the {provider} conversation's token"] = record.token
    secrets = {**configured_secrets(), **handed_out}
    logs = {**log_files(relay.log_path.parent), str(relay.emulator.log_path): relay.emulator.log_path.read_text(),
            str(relay.simulator.log_path): relay.simulator.log_path.read_text()}
    assert "DEBUG" in logs[str(relay.log_path)]  # the most talkative level was on
    assert find_leaks(logs, secrets) == []
    # Refusals and acknowledgements carry nothing secret (the grants above are the caller's own).
    assert find_leaks({f"answer {n}": a.text for n, a in enumerate(answers)}, secrets) == []
    assert not directline_tokens(" ".join(a.text for a in answers))


def test_resume_keys_are_long_random_and_stored_only_as_a_hash(exposed_relay):
    grants = [exposed_relay.request("POST", "/api/directline/token",
                                    headers={"X-Forwarded-For": f"192.0.2.{20 + n}"}).json() for n in range(3)]
    keys = [g["resumeKey"] for g in grants]
    assert len(set(keys)) == 3 and all(len(k) >= 43 for k in keys)  # >= 256 bits of base64url
    for grant in grants:
        session = exposed_relay.store.sessions.get_session(grant["conversationId"])
        assert session.resume_key_hash == hash_resume_key(grant["resumeKey"]) != grant["resumeKey"]


def test_guessing_resume_keys_is_rate_limited_per_client_address(exposed_relay):
    grant = exposed_relay.request("POST", "/api/directline/token", headers={"X-Forwarded-For": "192.0.2.30"}).json()
    guesser = {"X-Forwarded-For": "198.51.100.66"}
    body = {"conversationId": grant["conversationId"], "resumeKey": "guess"}
    statuses = [exposed_relay.request("POST", "/api/directline/resume", headers=guesser, json=body).status_code
                for _ in range(4)]
    assert statuses == [403, 403, 403, 429]  # WEBCHAT_TOKEN_RATE_LIMIT is 3 here
    limited = exposed_relay.request("POST", "/api/directline/resume", headers=guesser,
                                    json={**body, "resumeKey": grant["resumeKey"]})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1  # even the right key waits
    owner = exposed_relay.request("POST", "/api/directline/resume", headers={"X-Forwarded-For": "192.0.2.30"},
                                  json={**body, "resumeKey": grant["resumeKey"]})
    assert owner.status_code == 200, owner.text  # the page's own address is not punished for the guesser
