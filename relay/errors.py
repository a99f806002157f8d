"""Every exception the relay raises on purpose, in one place. An exception records what happened;
`relay/http.py` (ERROR_ANSWERS) decides which HTTP status and code a caller gets for it.

    RelayError
    ├── SettingsError              an app setting is missing or malformed (the message names it, never its value)
    ├── DirectLineError            a Direct Line call failed: upstream_status, upstream_code (Direct Line's own,
    │   │                          None when no answer came); never a token in the text
    │   ├── BadRequest             4xx not listed below: our request is malformed; retrying will not help
    │   ├── AuthenticationFailed   401/403 other than expiry: wrong secret, wrong region, bot deleted
    │   ├── TokenExpired           403 TokenExpired: the token can be neither used nor refreshed any more
    │   ├── ConversationNotFound   404: Direct Line forgot the conversation; start a new one
    │   │   └── ConversationLapsed no token of the conversation is alive and there is no secret (token endpoint
    │   │                          mode): the relay can never read or write it again; start a new one
    │   ├── Throttled              429: retry_after (seconds) when Direct Line said
    │   ├── BotFailed              502/504 after a POST: the bot failed or timed out; the activity MAY have arrived
    │   ├── AgentEndpointRefused   a Copilot Studio agent's token endpoint or regionalchannelsettings answered a 4xx
    │   │                          (not 429) or nothing usable: DIRECTLINE_TOKEN_ENDPOINT is wrong, or the agent
    │   │                          needs a secret (web channel security on); retrying will not help
    │   └── TransientError         5xx, connection errors, timeouts, an answer without JSON; `ambiguous` for a POST
    ├── ChannelError               a channel webhook or provider API problem
    │   ├── ChannelDisabled        no such channel, or its settings are absent
    │   ├── MethodNotAllowed       the webhook was called with another method than POST (and is no handshake)
    │   ├── SignatureInvalid       missing or wrong signature
    │   │   ├── StaleTimestamp     signed, but outside the replay window
    │   │   └── VerifyTokenMismatch  WhatsApp's subscription handshake with a wrong hub.verify_token
    │   ├── BadPayload             malformed JSON or form, missing fields
    │   ├── PayloadTooLarge        the body is over RELAY_MAX_BODY_BYTES
    │   └── ProviderError          sending to or fetching from the provider failed: `reason` (a short code the
    │       │                      bot may see), retry_after, parts_sent of parts_total (a multi-part reply)
    │       ├── ProviderRejected   4xx (not 429) or a refused media: permanent, dead-letter the message
    │       └── ProviderUnavailable 429/5xx/connection: transient, retry later (after retry_after if known)
    ├── WebChatError               the token server or a Web Chat file refuses a request (retry_after: seconds
    │   │                          the page should wait, when there is a point in trying again)
    │   ├── OriginNotAllowed       the page's Origin is not in WEBCHAT_ALLOWED_ORIGINS
    │   ├── TooManyRequests        the client address is over WEBCHAT_TOKEN_RATE_LIMIT
    │   ├── RequestTooLarge        a body over the few KB a token call needs
    │   ├── InvalidJson            the resume body is not JSON
    │   ├── InvalidRequest         the resume body is JSON of the wrong shape
    │   ├── MissingToken           a refresh without `Authorization: Bearer <token>`
    │   ├── InvalidToken           Direct Line does not accept the page's token
    │   ├── RefreshTooLate         the page's token expired before its refresh: resume instead
    │   ├── ConversationGone       Direct Line no longer knows the conversation: start a new one
    │   ├── SessionRevoked         the session was revoked
    │   ├── SessionExpired         the session outlived WEBCHAT_SESSION_HOURS
    │   ├── SessionLapsed          every token of the conversation expired (Direct Line was out of reach
    │   │                          longer than a token lives): nobody can rejoin it, start a new one
    │   ├── ResumeKeyReused        a rotated-away resume key came back: the session is revoked now
    │   ├── InvalidResumeKey       a key the session never issued, or no such session: whether that
    │   │                          session exists, was revoked or expired is told only to a key holder
    │   ├── DirectLineRejected     Direct Line refused the relay's own secret (our configuration)
    │   ├── DirectLineBusy         Direct Line throttles the relay
    │   ├── DirectLineUnavailable  Direct Line failed otherwise
    │   ├── WebChatFileNotFound    no such Web Chat file, or it is missing from the deployment
    │   └── DemoDisabled           a demo file while WEBCHAT_DEMO_ENABLED is off
    └── StoreError                 Table Storage failed (the SDK's error translated in relay/store/tables.py)
        └── ConcurrencyConflict    an ETag-guarded update lost to another writer after retries
            └── LeaseLost          another poller took over the conversation's lease

`ambiguous` is true when an activity may have reached the bot although the call failed: the caller
must look for its clientActivityID before posting again, never re-post blindly.
"""

from __future__ import annotations

__all__ = [
    "AgentEndpointRefused",
    "AuthenticationFailed",
    "BadPayload",
    "BadRequest",
    "BotFailed",
    "ChannelDisabled",
    "ChannelError",
    "ConcurrencyConflict",
    "ConversationGone",
    "ConversationLapsed",
    "ConversationNotFound",
    "DemoDisabled",
    "DirectLineBusy",
    "DirectLineError",
    "DirectLineRejected",
    "DirectLineUnavailable",
    "InvalidJson",
    "InvalidRequest",
    "InvalidResumeKey",
    "InvalidToken",
    "LeaseLost",
    "MethodNotAllowed",
    "MissingToken",
    "OriginNotAllowed",
    "PayloadTooLarge",
    "ProviderError",
    "ProviderRejected",
    "ProviderUnavailable",
    "RefreshTooLate",
    "RelayError",
    "RequestTooLarge",
    "ResumeKeyReused",
    "SessionExpired",
    "SessionLapsed",
    "SessionRevoked",
    "SettingsError",
    "SignatureInvalid",
    "StaleTimestamp",
    "StoreError",
    "Throttled",
    "TokenExpired",
    "TooManyRequests",
    "TransientError",
    "VerifyTokenMismatch",
    "WebChatError",
    "WebChatFileNotFound",
]


class RelayError(Exception):
    """The relay's own failure; the message says what happened, in words that may be logged and shown."""

    def __init__(self, message: str = ""):
        super().__init__(message or type(self).__name__)

    @property
    def message(self) -> str:
        return str(self)


class SettingsError(RelayError):
    """An app setting is missing or malformed; the message names it and says what is expected."""


# ------------------------------------------------------------------------------------------ Direct Line


class DirectLineError(RelayError):
    """A Direct Line call failed. `upstream_status` and `upstream_code` are what Direct Line answered
    (its HTTP status and its error code); both None when no answer came (a timeout, a lost connection)."""

    ambiguous: bool = False

    def __init__(self, message: str = "", *, upstream_status: int | None = None, upstream_code: str | None = None):
        super().__init__(message)
        self.upstream_status = upstream_status
        self.upstream_code = upstream_code


class BadRequest(DirectLineError):
    pass


class AgentEndpointRefused(DirectLineError):
    """The agent's token endpoint, or its environment's regionalchannelsettings, refused (a 4xx but 429) or gave an
    answer without what it should hold; upstream_status is its HTTP status (None for an unusable 200)."""


class AuthenticationFailed(DirectLineError):
    pass


class TokenExpired(DirectLineError):
    pass


class ConversationNotFound(DirectLineError):
    pass


class ConversationLapsed(ConversationNotFound):
    """Token endpoint mode: the conversation's tokens lapsed and no secret can read it: for the relay it is gone."""


class Throttled(DirectLineError):
    def __init__(self, message: str = "", *, retry_after: float | None = None, upstream_status: int | None = None,
                 upstream_code: str | None = None):
        super().__init__(message, upstream_status=upstream_status, upstream_code=upstream_code)
        self.retry_after = retry_after


class BotFailed(DirectLineError):
    ambiguous = True


class TransientError(DirectLineError):
    def __init__(self, message: str = "", *, ambiguous: bool = False, upstream_status: int | None = None,
                 upstream_code: str | None = None):
        super().__init__(message, upstream_status=upstream_status, upstream_code=upstream_code)
        self.ambiguous = ambiguous


# ---------------------------------------------------------------------------------------------- channels


class ChannelError(RelayError):
    pass


class ChannelDisabled(ChannelError):
    pass


class MethodNotAllowed(ChannelError):
    pass


class SignatureInvalid(ChannelError):
    pass


class StaleTimestamp(SignatureInvalid):
    pass


class VerifyTokenMismatch(SignatureInvalid):
    pass


class BadPayload(ChannelError):
    pass


class PayloadTooLarge(ChannelError):
    pass


class ProviderError(ChannelError):
    """A provider call failed. `reason`: a short code for what failed (the class name unless more is known,
    e.g. "MediaTooLarge"), shown to the bot for media it did not get. Of a reply sent as several provider
    calls, `parts_sent` were accepted (of `parts_total`) before this one failed."""

    def __init__(self, message: str = "", *, reason: str = "", retry_after: float | None = None,
                 parts_sent: int = 0, parts_total: int = 1):
        super().__init__(message)
        self.reason = reason or type(self).__name__
        self.retry_after = retry_after
        self.parts_sent = parts_sent
        self.parts_total = parts_total


class ProviderRejected(ProviderError):
    pass


class ProviderUnavailable(ProviderError):
    pass


# ---------------------------------------------------------------------------------------------- Web Chat


class WebChatError(RelayError):
    """The token server or a Web Chat file refuses a request; `retry_after`: seconds the page should wait."""

    def __init__(self, message: str = "", *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class OriginNotAllowed(WebChatError):
    pass


class TooManyRequests(WebChatError):
    pass


class InvalidJson(WebChatError):
    pass


class RequestTooLarge(WebChatError):
    pass


class InvalidRequest(WebChatError):
    pass


class MissingToken(WebChatError):
    pass


class InvalidToken(WebChatError):
    pass


class RefreshTooLate(WebChatError):
    pass


class ConversationGone(WebChatError):
    pass


class SessionRevoked(WebChatError):
    pass


class SessionExpired(WebChatError):
    pass


class SessionLapsed(WebChatError):
    pass


class ResumeKeyReused(WebChatError):
    pass


class InvalidResumeKey(WebChatError):
    pass


class DirectLineRejected(WebChatError):
    pass


class DirectLineBusy(WebChatError):
    pass


class DirectLineUnavailable(WebChatError):
    pass


class WebChatFileNotFound(WebChatError):
    pass


class DemoDisabled(WebChatError):
    pass


# ------------------------------------------------------------------------------------------------- store


class StoreError(RelayError):
    pass


class ConcurrencyConflict(StoreError):
    pass


class LeaseLost(ConcurrencyConflict):
    pass
