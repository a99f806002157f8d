"""Translation between azure.functions HTTP objects and the relay's plain results.

Every error answer is decided here, in one table: ERROR_ANSWERS maps an exception class of
relay/errors.py to the HTTP status and error code the caller gets, looked up along the class's MRO
(a subclass without a row of its own answers as its nearest listed parent). The body is always
{"error": {"code", "message"}}, with Retry-After when the exception says how long to wait.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
from collections.abc import Callable

import azure.functions as func

from relay.channels.base import WebhookAnswer, WebhookRequest
from relay.errors import (
    BadPayload,
    ChannelDisabled,
    ConcurrencyConflict,
    ConversationGone,
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
    TooManyRequests,
    VerifyTokenMismatch,
    WebChatFileNotFound,
)
from relay.settings import get_settings
from relay.tokens import MAX_BODY_BYTES, Caller, TokenServer, get_token_server, get_webchat_asset

__all__ = [
    "ERROR_ANSWERS",
    "answer_response",
    "bearer_token",
    "cors_call",
    "error_answer",
    "error_response",
    "guarded",
    "json_response",
    "serve_webchat_file",
    "token_server_call",
    "webhook_request",
]

log = logging.getLogger(__name__)

ERROR_ANSWERS: dict[type[RelayError], tuple[int, str]] = {
    RelayError: (500, "RelayError"),  # a failure of the relay's own with no row nearer to it
    SettingsError: (503, "Misconfigured"),
    # A provider's webhook. A 4xx tells the provider not to send it again: only for its own mistakes.
    ChannelDisabled: (404, "ChannelDisabled"),
    MethodNotAllowed: (405, "MethodNotAllowed"),
    SignatureInvalid: (401, "InvalidSignature"),
    StaleTimestamp: (401, "StaleTimestamp"),
    VerifyTokenMismatch: (403, "InvalidSignature"),  # Meta's handshake expects a 403
    BadPayload: (400, "BadPayload"),
    PayloadTooLarge: (413, "PayloadTooLarge"),
    # Our own upstreams failing: the caller's request was fine; 503 asks it to come back.
    ProviderRejected: (502, "ProviderRejected"),
    ProviderUnavailable: (503, "ProviderUnavailable"),
    DirectLineError: (502, "DirectLineError"),
    StoreError: (503, "StorageUnavailable"),
    ConcurrencyConflict: (503, "ConcurrencyConflict"),  # transient: a provider retries a 503, not a 409
    LeaseLost: (503, "LeaseLost"),
    # The Web Chat token server and files (relay-webchat.js reads the status: 403/404 start over).
    OriginNotAllowed: (403, "OriginNotAllowed"),
    TooManyRequests: (429, "TooManyRequests"),
    RequestTooLarge: (413, "PayloadTooLarge"),
    InvalidJson: (400, "InvalidJson"),
    InvalidRequest: (400, "InvalidRequest"),
    MissingToken: (401, "MissingToken"),
    InvalidToken: (403, "InvalidToken"),
    RefreshTooLate: (403, "TokenExpired"),
    ConversationGone: (404, "ConversationGone"),
    SessionRevoked: (403, "SessionRevoked"),
    SessionExpired: (403, "SessionExpired"),
    SessionLapsed: (403, "SessionLapsed"),
    ResumeKeyReused: (403, "ResumeKeyReused"),
    InvalidResumeKey: (403, "InvalidResumeKey"),
    DirectLineRejected: (502, "DirectLineRejected"),
    DirectLineBusy: (503, "DirectLineBusy"),
    DirectLineUnavailable: (503, "DirectLineUnavailable"),
    WebChatFileNotFound: (404, "NotFound"),
    DemoDisabled: (404, "DemoDisabled"),
}
"""Exception class -> (HTTP status, error code): the one place an error's answer is chosen."""


def json_response(body: dict | list, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
        mimetype="application/json",
    )


def error_answer(error: RelayError) -> tuple[int, str]:
    """(HTTP status, error code) for `error`: the ERROR_ANSWERS row of its class or nearest listed parent."""
    return next(ERROR_ANSWERS[cls] for cls in type(error).__mro__ if cls in ERROR_ANSWERS)


def error_response(error: RelayError, headers: dict[str, str] | None = None) -> func.HttpResponse:
    """`error` as the one error shape, {"error": {"code", "message"}}, with its ERROR_ANSWERS status and
    Retry-After (whole seconds, at least 1) when it says how long to wait."""
    status, code = error_answer(error)
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(retry_after)))}
    return json_response({"error": {"code": code, "message": error.message}}, status, headers)


def _client_address(req: func.HttpRequest, *, proxy_hops: int) -> str:
    """The caller's IP address, for per-client limits ("unknown" when there is none).

    Azure's front end appends the address it was called from to X-Forwarded-For, with a port
    ("203.0.113.7:51234", dropped here); entries left of it are whatever earlier hops (or the caller)
    wrote. With `proxy_hops` proxies of the deployer's own in front, the client is that many entries
    further left: each proxy appended the address that called it.
    """
    hops = [hop.strip() for hop in (req.headers.get("X-Forwarded-For") or "").split(",") if hop.strip()]
    if not hops:
        return "unknown"
    hop = hops[max(0, len(hops) - 1 - proxy_hops)]
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return "unknown"


def bearer_token(req: func.HttpRequest) -> str:
    """The value of `Authorization: Bearer <value>`, or "" when there is none."""
    scheme, _, value = (req.headers.get("Authorization") or "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


def token_server_call(req: func.HttpRequest, call: Callable[[TokenServer, Caller, bytes], dict]) -> func.HttpResponse:
    """One call of the Web Chat token server with the caller's address, origin and body (at most
    MAX_BODY_BYTES, refused by its declared length before it is read), CORS and errors translated."""

    def answer() -> func.HttpResponse:
        tokens = get_token_server()
        caller = Caller(address=_client_address(req, proxy_hops=get_settings().webchat.proxy_hops),
                        origin=req.headers.get("Origin") or "")
        return cors_call(req, lambda: call(tokens, caller, _capped_body(req)),
                         origin_allowed=tokens.is_origin_allowed(caller))

    return guarded(answer)


def _capped_body(req: func.HttpRequest) -> bytes:
    """The request body, or RequestTooLarge past MAX_BODY_BYTES (by Content-Length first, so a huge one is
    turned away before anything reads it)."""
    declared = (req.headers.get("Content-Length") or "").strip()
    if (declared.isdigit() and int(declared) > MAX_BODY_BYTES) or len(req.get_body() or b"") > MAX_BODY_BYTES:
        raise RequestTooLarge(f"A token call sends at most {MAX_BODY_BYTES} bytes")
    return req.get_body() or b""


def cors_call(req: func.HttpRequest, call: Callable[[], dict], *, origin_allowed: bool) -> func.HttpResponse:
    """Answer a JSON endpoint browsers call from other origins.

    An allowed Origin gets CORS headers (its preflight too); any other gets none, so the browser
    keeps the answer from the page (OriginNotAllowed). A RelayError becomes its JSON error.
    """
    origin = req.headers.get("Origin") or ""
    cors = {}
    if origin and origin_allowed:
        cors = {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": "Retry-After",
                "Vary": "Origin"}
    if origin and not cors:
        return error_response(OriginNotAllowed(f"The origin {origin[:100]} may not call this endpoint"))
    if req.method == "OPTIONS":
        return func.HttpResponse(status_code=204, headers={**cors, **PREFLIGHT_HEADERS, "Allow": "POST, OPTIONS"})
    return guarded(lambda: json_response(call(), headers=cors), error_headers={**cors, "Vary": "Origin"})


def _file_response(content: bytes, mimetype: str, *, max_age: int = 300) -> func.HttpResponse:
    """A static UTF-8 text file (a page or a script)."""
    return func.HttpResponse(content, status_code=200, mimetype=mimetype, charset="utf-8",
                             headers={"Cache-Control": f"public, max-age={max_age}",
                                      "X-Content-Type-Options": "nosniff"})


def webhook_request(req: func.HttpRequest, public_base_url: str) -> WebhookRequest:
    """The provider's call as adapters see it: the public URL it signed, its headers and raw body."""
    from relay.channels import public_url

    return WebhookRequest(method=req.method.upper(), url=public_url(public_base_url, req.url),
                          headers=dict(req.headers), body=req.get_body() or b"", query=dict(req.params))


def answer_response(answer: WebhookAnswer) -> func.HttpResponse:
    return func.HttpResponse(answer.body, status_code=answer.status, mimetype=answer.content_type)


def guarded(handler: Callable[[], func.HttpResponse], *,
            error_headers: dict[str, str] | None = None) -> func.HttpResponse:
    """Run a handler; the relay's own errors become their JSON answer (error_response, with `error_headers`)."""
    try:
        return handler()
    except RelayError as error:
        status, code = error_answer(error)
        if isinstance(error, SettingsError):
            log.error("app settings are not valid: %s", error)
        elif status >= 500:
            log.warning("answering %d %s: %s", status, code, error)
        return error_response(error, error_headers)


def serve_webchat_file(name: str) -> func.HttpResponse:
    """GET /api/webchat/{name}: relay-webchat.js always; the demo page and Web Chat's bundle when the demo is on."""

    def answer() -> func.HttpResponse:
        asset = get_webchat_asset(name, webchat=get_settings().webchat)
        if asset.redirect_to:
            return func.HttpResponse(status_code=302, headers={"Location": asset.redirect_to,
                                                               "Cache-Control": "public, max-age=300"})
        return _file_response(asset.content, asset.mimetype)

    return guarded(answer)
