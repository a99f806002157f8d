"""Every error answer comes from relay.http.ERROR_ANSWERS: each row as the caller sees it (status, code,
JSON body, Retry-After), every exception of relay/errors.py with a row, and facts carried, not patched."""

from __future__ import annotations

import inspect
import json

import azure.functions as func
import pytest

from relay import errors
from relay.channels.common import send_parts
from relay.errors import (
    AuthenticationFailed,
    BadPayload,
    BadRequest,
    BotFailed,
    ChannelDisabled,
    ConcurrencyConflict,
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
    LeaseLost,
    MethodNotAllowed,
    MissingToken,
    OriginNotAllowed,
    PayloadTooLarge,
    ProviderRejected,
    ProviderUnavailable,
    RefreshTooLate,
    RelayError,
    RequestTooLarge,
    ResumeKeyReused,
    SessionExpired,
    SessionLapsed,
    SessionRevoked,
    SettingsError,
    SignatureInvalid,
    StaleTimestamp,
    StoreError,
    Throttled,
    TokenExpired,
    TooManyRequests,
    TransientError,
    VerifyTokenMismatch,
    WebChatFileNotFound,
)
from relay.http import ERROR_ANSWERS, cors_call, error_answer, guarded

SHOP = "https://shop.example"

# What a caller gets for each failure: (the exception, HTTP status, error code, Retry-After header or None).
ANSWERS = [
    (RelayError("an unforeseen failure"), 500, "RelayError", None),
    (SettingsError("DIRECTLINE_SECRET is not set"), 503, "Misconfigured", None),
    # a provider's webhook
    (ChannelDisabled("the twilio channel is not configured"), 404, "ChannelDisabled", None),
    (MethodNotAllowed("PUT is not accepted here"), 405, "MethodNotAllowed", None),
    (SignatureInvalid("the X-Twilio-Signature does not match"), 401, "InvalidSignature", None),
    (StaleTimestamp("outside the replay window"), 401, "StaleTimestamp", None),
    (VerifyTokenMismatch("the hub.verify_token does not match"), 403, "InvalidSignature", None),
    (BadPayload("the body is not valid JSON"), 400, "BadPayload", None),
    (PayloadTooLarge("the body has 2000000 bytes"), 413, "PayloadTooLarge", None),
    # upstreams failing under a request that was fine
    (ProviderRejected("the twilio API rejected the message with 400"), 502, "ProviderRejected", None),
    (ProviderUnavailable("the twilio API answered 503", retry_after=0.2), 503, "ProviderUnavailable", "1"),
    (DirectLineError("Direct Line failed"), 502, "DirectLineError", None),
    (Throttled("Direct Line answered 429", retry_after=30, upstream_status=429), 502, "DirectLineError", "30"),
    (BotFailed("Direct Line answered 502", upstream_status=502), 502, "DirectLineError", None),
    (StoreError("cannot write a conversation record: ServiceRequestError"), 503, "StorageUnavailable", None),
    (ConcurrencyConflict("a twilio conversation kept changing"), 503, "ConcurrencyConflict", None),
    (LeaseLost("the lease is no longer held"), 503, "LeaseLost", None),
    # the Web Chat token server and files
    (OriginNotAllowed("This origin may not use the token server"), 403, "OriginNotAllowed", None),
    (TooManyRequests("Too many tokens", retry_after=12.2), 429, "TooManyRequests", "13"),
    (RequestTooLarge("A token call sends at most 4096 bytes"), 413, "PayloadTooLarge", None),
    (InvalidJson("The body is not valid JSON"), 400, "InvalidJson", None),
    (InvalidRequest("'resumeKey' must be a non-empty string"), 400, "InvalidRequest", None),
    (MissingToken("Send the token to refresh"), 401, "MissingToken", None),
    (InvalidToken("Direct Line does not accept this token"), 403, "InvalidToken", None),
    (RefreshTooLate("The token has expired: resume"), 403, "TokenExpired", None),
    (ConversationGone("Direct Line no longer knows this conversation"), 404, "ConversationGone", None),
    (SessionRevoked("This session was revoked"), 403, "SessionRevoked", None),
    (SessionExpired("This session has expired"), 403, "SessionExpired", None),
    (SessionLapsed("Every token of this conversation expired"), 403, "SessionLapsed", None),
    (ResumeKeyReused("This resume key was already used"), 403, "ResumeKeyReused", None),
    (InvalidResumeKey("The resume key does not match"), 403, "InvalidResumeKey", None),
    (DirectLineRejected("Direct Line refused the relay's credentials"), 502, "DirectLineRejected", None),
    (DirectLineBusy("Direct Line is busy", retry_after=1), 503, "DirectLineBusy", "1"),
    (DirectLineUnavailable("Direct Line is unavailable", retry_after=2), 503, "DirectLineUnavailable", "2"),
    (WebChatFileNotFound("No Web Chat file named 'x'"), 404, "NotFound", None),
    (DemoDisabled("The Web Chat demo is off"), 404, "DemoDisabled", None),
]


def raising(error: Exception):
    def handler() -> func.HttpResponse:
        raise error

    return handler


def body_of(response: func.HttpResponse) -> dict:
    assert response.mimetype == "application/json"
    return json.loads(response.get_body())


def relay_error_classes() -> list[type[RelayError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, RelayError) and c.__module__ == errors.__name__]


@pytest.mark.parametrize(("error", "status", "code", "retry_after"), ANSWERS,
                         ids=[type(case[0]).__name__ for case in ANSWERS])
def test_each_error_answers_with_its_status_code_and_message(error, status, code, retry_after):
    response = guarded(raising(error))
    assert response.status_code == status
    assert body_of(response) == {"error": {"code": code, "message": str(error)}}
    assert response.headers.get("Retry-After") == retry_after
    assert response.headers["Cache-Control"] == "no-store"


def test_every_row_of_the_table_is_exercised_above():
    assert set(ERROR_ANSWERS) <= {type(error) for error, *_ in ANSWERS}


def test_the_table_lists_only_the_relays_own_exceptions():
    assert set(ERROR_ANSWERS) <= set(relay_error_classes())


def test_every_exception_raised_has_an_answer_of_its_own_family():
    """A class nothing derives from is raised somewhere: its answer must not be the catch-all 500."""
    classes = relay_error_classes()
    leaves = [c for c in classes if not any(other is not c and issubclass(other, c) for other in classes)]
    assert TooManyRequests in leaves and BadRequest in leaves
    for cls in leaves:
        assert error_answer(cls()) != ERROR_ANSWERS[RelayError], cls.__name__


def test_a_subclass_without_a_row_answers_as_its_nearest_listed_parent():
    for error in (BadRequest(), AuthenticationFailed(), TokenExpired(), ConversationNotFound(), TransientError()):
        assert error_answer(error) == ERROR_ANSWERS[DirectLineError]
    assert error_answer(StaleTimestamp()) != error_answer(SignatureInvalid())  # its own row comes first


def token_request(origin: str = "", method: str = "POST") -> func.HttpRequest:
    return func.HttpRequest(method=method, url="https://relay.example/api/directline/token",
                            headers={"Origin": origin} if origin else {}, body=b"")


def test_an_origin_not_allowed_is_refused_from_the_table_without_cors_headers():
    response = cors_call(token_request(SHOP), lambda: {"token": "never"}, origin_allowed=False)
    assert (response.status_code, body_of(response)["error"]["code"]) == (403, "OriginNotAllowed")
    assert "Access-Control-Allow-Origin" not in response.headers


def test_an_allowed_page_can_read_the_error_and_its_retry_after():
    def refuse() -> dict:
        raise TooManyRequests("Too many tokens for this client address", retry_after=41.5)

    response = cors_call(token_request(SHOP), refuse, origin_allowed=True)
    assert (response.status_code, body_of(response)["error"]["code"]) == (429, "TooManyRequests")
    assert response.headers["Retry-After"] == "42"
    assert response.headers["Access-Control-Allow-Origin"] == SHOP
    assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]


def test_direct_line_failures_keep_direct_lines_own_status_and_code_as_facts():
    error = Throttled("Direct Line activities/get answered 429 Throttled", retry_after=3, upstream_status=429,
                      upstream_code="Throttled")
    assert (error.upstream_status, error.upstream_code, error.retry_after, error.ambiguous) == (429, "Throttled", 3,
                                                                                                False)
    assert BotFailed().ambiguous and TransientError(ambiguous=True).ambiguous and not TransientError().ambiguous


def test_a_failed_part_is_raised_again_with_how_far_the_reply_got():
    refused = ProviderUnavailable("the bird API answered 503", reason="Busy", retry_after=4)
    sent = []

    def send_one(part: str) -> str:
        if part == "third":
            raise refused
        sent.append(part)
        return f"id-{part}"

    with pytest.raises(ProviderUnavailable) as caught:
        send_parts(["first", "second", "third", "fourth"], send_one, first_part=1)
    error = caught.value
    assert sent == ["second"]
    assert (error.parts_sent, error.parts_total, error.retry_after, error.reason) == (2, 4, 4, "Busy")
    assert error.__cause__ is refused and str(error) == str(refused)
    assert (refused.parts_sent, refused.parts_total) == (0, 1)  # the original is left as it was raised
