"""The token server against callers who lie: the Host and Origin they name, bodies of any size and shape,
addresses they rotate, and keys they guess (issue 13). Through the local host, on Azurite and the emulator."""

from __future__ import annotations

import json
import secrets

import pytest

from relay.tokens import rate_limit_bucket
from tests.webchat.test_token_api import assert_error

# ---------------------------------------------------------------------------------------- own origin


def test_a_page_is_the_apps_own_only_on_the_public_base_url_whatever_host_it_names(stack):
    forged = stack.post("token", headers={"Origin": "http://evil.example", "Host": "evil.example"})
    assert_error(forged, 403, "OriginNotAllowed")
    assert "Access-Control-Allow-Origin" not in forged.headers
    own = stack.post("token", headers={"Origin": stack.url})  # RELAY_PUBLIC_BASE_URL's origin: the demo page
    assert own.status_code == 200 and own.headers["Access-Control-Allow-Origin"] == stack.url


# -------------------------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("path", ["token", "refresh", "resume"])
def test_a_body_over_a_few_kilobytes_is_refused(stack, path):
    huge = b"[" + b"1," * 50_000 + b"1]"
    response = stack.post(path, data=huge, headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
    assert_error(response, 413, "PayloadTooLarge")


@pytest.mark.parametrize("field", ["conversationId", "resumeKey"])
def test_a_lone_surrogate_in_a_resume_field_is_a_bad_request_not_a_crash(stack, field):
    body = {"conversationId": "conversation", "resumeKey": secrets.token_urlsafe(32), field: "a\ud800b"}
    response = stack.post("resume", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "InvalidRequest")
    assert field in error["message"]


def test_a_lone_surrogate_in_the_ignored_watermark_changes_nothing(stack):
    grant = stack.token()
    body = {"conversationId": grant["conversationId"], "resumeKey": grant["resumeKey"], "watermark": "a\ud800b"}
    response = stack.post("resume", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


def test_resume_attempts_count_against_the_rate_limit_before_their_body_is_read(new_stack):
    stack = new_stack(env={"WEBCHAT_TOKEN_RATE_LIMIT": "3"})
    client = {"X-Forwarded-For": "198.51.100.20:4431", "Content-Type": "application/json"}
    for _ in range(3):
        assert_error(stack.post("resume", data=b"[[[[not json", headers=client), 400, "InvalidJson")
    assert_error(stack.post("resume", data=b"[[[[not json", headers=client), 429, "TooManyRequests")


# ------------------------------------------------------------------------------------ rate limit keys


@pytest.mark.parametrize(("address", "bucket"), [
    ("198.51.100.7", "198.51.100.7"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:198.51.100.7", "198.51.100.7"),  # an IPv4 client seen through an IPv6 socket
    ("unknown", "unknown"),
])
def test_an_ipv4_address_or_an_ipv6_64_is_one_rate_limit_bucket(address, bucket):
    assert rate_limit_bucket(address) == bucket


def test_the_addresses_of_one_ipv6_64_share_one_rate_limit(new_stack):
    stack = new_stack(env={"WEBCHAT_TOKEN_RATE_LIMIT": "3"})
    for n in range(3):
        assert stack.post("token", headers={"X-Forwarded-For": f"[2001:db8:1:2::{n + 1}]:443"}).status_code == 200
    assert_error(stack.post("token", headers={"X-Forwarded-For": "2001:db8:1:2:ffff::9"}), 429, "TooManyRequests")
    assert stack.post("token", headers={"X-Forwarded-For": "2001:db8:1:3::1"}).status_code == 200  # the next /64


def test_behind_a_proxy_of_ones_own_the_client_is_the_address_it_forwarded(new_stack):
    stack = new_stack(env={"WEBCHAT_TOKEN_RATE_LIMIT": "2", "WEBCHAT_PROXY_HOPS": "1"})
    front_door = "203.0.113.50:443"  # what Azure's front end appends: the proxy that called it

    def client(*addresses: str) -> dict[str, str]:
        return {"X-Forwarded-For": ", ".join((*addresses, front_door))}

    for _ in range(2):
        assert stack.post("token", headers=client("198.51.100.1")).status_code == 200
    assert_error(stack.post("token", headers=client("198.51.100.1")), 429, "TooManyRequests")
    assert stack.post("token", headers=client("198.51.100.2")).status_code == 200  # not the proxy's bucket
    # What the client itself wrote further left does not make it someone else.
    assert_error(stack.post("token", headers=client("192.0.2.1", "198.51.100.1")), 429, "TooManyRequests")


# ----------------------------------------------------------------------------------------- no oracle


def test_only_a_key_holder_learns_that_a_session_was_revoked(stack):
    grant = stack.token()
    cid = grant["conversationId"]
    owner = stack.resume(cid, grant["resumeKey"]).json()
    owner = stack.resume(cid, owner["resumeKey"]).json()
    assert_error(stack.resume(cid, grant["resumeKey"]), 403, "ResumeKeyReused")  # revoked now

    guessed = assert_error(stack.resume(cid, secrets.token_urlsafe(32)), 403, "InvalidResumeKey")
    unknown = assert_error(stack.resume("no-such-conversation", secrets.token_urlsafe(32)), 403, "InvalidResumeKey")
    assert guessed == unknown  # a revoked conversation and one that never existed look the same
    assert_error(stack.resume(cid, owner["resumeKey"]), 403, "SessionRevoked")  # the holder is told why

