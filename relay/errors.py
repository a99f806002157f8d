"""Every exception the relay raises on purpose, in one place.

    RelayError
    ├── DirectLineError            a Direct Line call failed (status, code; never a token in the text)
    │   ├── BadRequest             400: our request is malformed; retrying will not help
    │   ├── AuthenticationFailed   401/403 other than expiry: wrong secret, wrong region, bot deleted
    │   ├── TokenExpired           403 TokenExpired: recover with the secret (reconnect)
    │   ├── ConversationNotFound   404: Direct Line forgot the conversation; start a new one
    │   ├── Throttled              429: carries retry_after (seconds)
    │   ├── BotFailed              502/504: the bot failed or timed out; the activity MAY have arrived
    │   └── TransientError         500, 503, connection errors, timeouts; `ambiguous` for a POST
    ├── ChannelError               a channel webhook or provider API problem
    │   ├── ChannelDisabled        404: the provider's settings are absent
    │   ├── SignatureInvalid       401: missing or wrong signature (403 in the WhatsApp handshake)
    │   │   └── StaleTimestamp     401: signed, but outside the replay window
    │   ├── BadPayload             400: malformed JSON or form, missing fields
    │   ├── PayloadTooLarge        413
    │   └── ProviderError          sending to the provider failed (parts_sent: how far a multi-part reply got)
    │       ├── ProviderRejected   4xx (not 429): permanent, dead-letter the message
    │       └── ProviderUnavailable 429/5xx/connection: transient, retry later (retry_after if known)
    ├── WebChatError               the Web Chat token server refuses a request: status and code say why
    │                              (retry_after, in seconds, for 429 and 503)
    └── StoreError                 Table Storage
        └── ConcurrencyConflict    an ETag-guarded update lost to another writer after retries
            └── LeaseLost          another poller took over the conversation's lease

`ambiguous` is true when an activity may have reached the bot although the call failed: the caller
must look for its clientActivityID before posting again, never re-post blindly.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BadPayload",
    "BadRequest",
    "BotFailed",
    "ChannelDisabled",
    "ChannelError",
    "ConcurrencyConflict",
    "ConversationNotFound",
    "DirectLineError",
    "LeaseLost",
    "PayloadTooLarge",
    "ProviderError",
    "ProviderRejected",
    "ProviderUnavailable",
    "RelayError",
    "SignatureInvalid",
    "StaleTimestamp",
    "StoreError",
    "Throttled",
    "TokenExpired",
    "TransientError",
    "WebChatError",
]


class RelayError(Exception):
    status: int = 500
    code: str = "RelayError"
    ambiguous: bool = False

    def __init__(self, message: str = "", *, status: int | None = None, code: str | None = None):
        super().__init__(message or self.__class__.__name__)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class DirectLineError(RelayError):
    code = "DirectLineError"


class BadRequest(DirectLineError):
    status, code = 400, "BadArgument"


class AuthenticationFailed(DirectLineError):
    status, code = 401, "Unauthorized"


class TokenExpired(DirectLineError):
    status, code = 403, "TokenExpired"


class ConversationNotFound(DirectLineError):
    status, code = 404, "BadArgument"


class Throttled(DirectLineError):
    status, code = 429, "Throttled"

    def __init__(self, message: str = "", *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class BotFailed(DirectLineError):
    status, code = 502, "BotError"
    ambiguous = True


class TransientError(DirectLineError):
    status, code = 503, "ServiceError"

    def __init__(self, message: str = "", *, ambiguous: bool = False, **kwargs):
        super().__init__(message, **kwargs)
        self.ambiguous = ambiguous


class ChannelError(RelayError):
    code = "ChannelError"


class ChannelDisabled(ChannelError):
    status, code = 404, "ChannelDisabled"


class SignatureInvalid(ChannelError):
    status, code = 401, "InvalidSignature"


class StaleTimestamp(SignatureInvalid):
    status, code = 401, "StaleTimestamp"


class BadPayload(ChannelError):
    status, code = 400, "BadPayload"


class PayloadTooLarge(ChannelError):
    status, code = 413, "PayloadTooLarge"


class ProviderError(ChannelError):
    code = "ProviderError"
    parts_sent = 0
    """Of a reply sent as several provider calls, how many the provider accepted before this one failed."""
    parts_total = 1

    def __init__(self, message: str = "", *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ProviderRejected(ProviderError):
    status, code = 400, "ProviderRejected"


class ProviderUnavailable(ProviderError):
    status, code = 503, "ProviderUnavailable"


class WebChatError(RelayError):
    status, code = 400, "BadRequest"

    def __init__(self, message: str = "", *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class StoreError(RelayError):
    status, code = 503, "StorageUnavailable"


class ConcurrencyConflict(StoreError):
    status, code = 409, "ConcurrencyConflict"


class LeaseLost(ConcurrencyConflict):
    code = "LeaseLost"
