"""What every adapter shares: settings checks, signature helpers, and the one way to call a provider's API.

Provider errors are mapped here once: 4xx (not 429) is permanent (ProviderRejected, dead-letter it),
429, 5xx, timeouts and connection errors are transient (ProviderUnavailable, retry later, after
`retry_after` seconds when the provider said so).

Hostile input is bounded here once, before any work that grows with it: a form or query of more
than MAX_FORM_FIELDS fields is refused (413) before it is parsed or signed, a timestamp is at most
TIMESTAMP_DIGITS digits (anything else is not a time, 401), a number in a body is at most MAX_NUMBER (a
larger one is no time or size, as a string would not be), and a JSON body's strings come out as
valid Unicode (a lone surrogate becomes U+FFFD), so nothing a provider sends becomes a 500 later.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import math
import mimetypes
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeGuard, TypeVar
from urllib.parse import parse_qsl

import requests
from requests.adapters import HTTPAdapter

from relay.channels.base import Media, MediaContent, OutboundMessage, WebhookAnswer, WebhookRequest
from relay.clock import SYSTEM_CLOCK, Clock
from relay.errors import (
    BadPayload,
    PayloadTooLarge,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    SettingsError,
    SignatureInvalid,
    StaleTimestamp,
)
from relay.retry_after import retry_after_seconds
from relay.store.sweep import DEDUPE_RETENTION

__all__ = [
    "MAX_FORM_FIELDS",
    "MAX_NUMBER",
    "TIMESTAMP_DIGITS",
    "AdapterBase",
    "b64decode_or_none",
    "call_provider",
    "download",
    "finite_number",
    "form_fields",
    "identifier",
    "json_body",
    "media_file_name",
    "message_text",
    "new_session",
    "require_header",
    "response_json",
    "same",
    "send_parts",
    "split_text",
    "unix_time",
]

TIMEOUT = (5.0, 20.0)
"""(connect, read) seconds for one provider call: long enough for a slow API, short enough for a timer run."""
DOWNLOAD_SECONDS = 30.0
"""Longest time one media download may take in all: a trickling server is given up on (and retried later)."""

MAX_FORM_FIELDS = 256
"""Most fields a form body or signed query may have: Twilio's richest inbound webhook (WhatsApp with ten
media) has well under 100. Checked before parsing, so a 1 MiB form of 160 000 fields costs nothing."""
TIMESTAMP_DIGITS = 12
"""Most digits a Unix timestamp may have (seconds until the year 33658): longer is not a time."""

MAX_NUMBER = 2 ** 53
"""Largest number a body's time or size is read as: exact as a float, and past any clock (JavaScript's limit)."""

Part = TypeVar("Part")

_UNIX_TIME = re.compile(f"[0-9]{{1,{TIMESTAMP_DIGITS}}}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_SOURCE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


class AdapterBase:
    """Plumbing shared by the adapters; each subclass reads and validates its own settings.

    `clock` is what a signature's timestamp is checked against and what provider calls time themselves by."""

    name = ""

    def __init__(self, config: Mapping[str, str], *, session: requests.Session, window_seconds: float = 300,
                 max_body_bytes: int = 1_048_576, clock: Clock = SYSTEM_CLOCK):
        self._config = dict(config)
        self.session = session
        self.window_seconds = window_seconds
        self.max_body_bytes = max_body_bytes
        self.clock = clock

    def __repr__(self) -> str:  # never the settings: several are secrets
        return f"<{type(self).__name__} channel={self.name!r}>"

    def _setting(self, name: str, *, required: bool = False, why: str = "") -> str:
        value = (self._config.get(name) or "").strip()
        if required and not value:
            raise SettingsError(f"{name} is not set: the {self.name} channel needs it{' ' + why if why else ''}")
        return value

    def handshake(self, request: WebhookRequest) -> WebhookAnswer | None:
        return None

    def acknowledgement(self) -> WebhookAnswer:
        return WebhookAnswer(200, b"", "text/plain")

    def spend(self, reply_context: Mapping[str, str]) -> Mapping[str, str]:
        return reply_context

    def fetch_media(self, media: Media, *, max_bytes: int) -> MediaContent:
        raise ProviderRejected(f"the {self.name} channel's media are public: nothing to fetch",
                               reason="MediaNotFetched")

    def check_size(self, request: WebhookRequest) -> None:
        if len(request.body) > self.max_body_bytes:
            raise PayloadTooLarge(f"the body has {len(request.body)} bytes, over the {self.max_body_bytes} allowed")

    def check_timestamp(self, raw: str | None, header: str) -> int:
        """The request's Unix timestamp, StaleTimestamp when it is outside the replay window; SignatureInvalid
        when it is missing or not plain ASCII digits (at most TIMESTAMP_DIGITS of them)."""
        if not raw:
            raise SignatureInvalid(f"the {header} header is missing")
        stamp = unix_time(raw)
        if stamp is None:
            raise SignatureInvalid(f"the {header} header is not a Unix timestamp")
        if abs(self.clock.now().timestamp() - stamp) > self.window_seconds:
            raise StaleTimestamp(f"the {header} is outside the {self.window_seconds:g}s replay window")
        return stamp

    def outlived_dedupe(self, sent_at: int) -> bool:
        """True for a message sent longer ago than the relay remembers message ids (DEDUPE_RETENTION): its
        dedupe row may be gone, so relaying it could relay a replay. The caller acknowledges it, unrelayed."""
        return self.clock.now().timestamp() - sent_at > DEDUPE_RETENTION.total_seconds()


def unix_time(raw: str) -> int | None:
    """`raw` as Unix seconds, or None unless it is 1 to TIMESTAMP_DIGITS ASCII digits (no sign, no
    fraction, no 400-digit number that no clock can be compared with)."""
    raw = raw.strip()
    return int(raw) if _UNIX_TIME.fullmatch(raw) else None


def form_fields(text: str, what: str) -> list[tuple[str, str]]:
    """The name/value pairs of a form body or query string, blank values kept; PayloadTooLarge past
    MAX_FORM_FIELDS (counted before parsing, so an oversized form costs no parsing or signing)."""
    separators = text.count("&")
    if separators >= MAX_FORM_FIELDS:
        raise PayloadTooLarge(f"{what} has {separators + 1} fields, over the {MAX_FORM_FIELDS} allowed")
    return parse_qsl(text, keep_blank_values=True)


def json_body(request: WebhookRequest) -> Any:
    """The request's JSON body; BadPayload for anything that is not JSON (invalid UTF-8, nested too deeply).

    Its strings are valid Unicode: a lone surrogate (an escape like "\\ud800" that no second half
    completes) cannot be written as UTF-8, so neither Table Storage nor Direct Line could take the
    message. It becomes U+FFFD, as a UTF-8 decoder treats a broken sequence: a name or text cut in the
    middle of an emoji still reaches the bot, instead of failing later or being refused."""
    try:
        body = json.loads(request.body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadPayload("the body is not valid JSON") from None
    # Only a body that may hold a surrogate is walked: an escape of one, or its bytes (json.loads lets
    # UTF-8-encoded surrogates through). Paired ones came out of json.loads as one character already.
    return _without_lone_surrogates(body) if _SURROGATE_SOURCE.search(request.body) else body


def _without_lone_surrogates(value: Any) -> Any:
    try:
        if isinstance(value, str):
            return _LONE_SURROGATE.sub("\ufffd", value)
        if isinstance(value, list):
            return [_without_lone_surrogates(item) for item in value]
        if isinstance(value, dict):
            return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
        return value
    except RecursionError:
        raise BadPayload("the body is nested too deeply") from None


def identifier(value: Any) -> str | None:
    """A provider's id as text: a JSON string, or an integer (some providers send numbers); None for
    anything else (a list, an object, a bool), which no id is."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def finite_number(value: Any) -> TypeGuard[int | float]:
    """True for a JSON number that can be compared with a clock: not a bool, NaN or infinity, nor beyond
    ±MAX_NUMBER (a 400-digit integer overflows as a float)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        (isinstance(value, int) or math.isfinite(value)) and abs(value) <= MAX_NUMBER


def require_header(request: WebhookRequest, name: str) -> str:
    value = request.header(name)
    if not value:
        raise SignatureInvalid(f"the {name} header is missing")
    return value.strip()


def same(expected: bytes | str, given: bytes | str) -> bool:
    """Constant-time equality of two signatures (a given value that is not valid Unicode never matches)."""
    if isinstance(expected, str):
        expected = expected.encode()
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(expected, given)


def b64decode_or_none(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def split_text(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters, cut at the last line break or space when there is one."""
    pieces = []
    while len(text) > limit:
        cut = max(text.rfind("\n", 0, limit + 1), text.rfind(" ", 0, limit + 1))
        if cut > limit // 2:  # drop the blank the text is cut at
            pieces.append(text[:cut])
            text = text[cut + 1:]
        else:
            pieces.append(text[:limit])
            text = text[limit:]
    if text or not pieces:
        pieces.append(text)
    return pieces


def message_text(message: OutboundMessage) -> str:
    """The whole text of a message for a channel without buttons: its text, then its choices numbered and how
    to answer them. The one place a reply's text is assembled."""
    if not message.choices:
        return message.text
    lines = [f"{number}. {choice.title}" for number, choice in enumerate(message.choices, start=1)]
    how = ("Reply with the numbers of your choices, separated by commas." if message.multiple
           else "Reply with the number of your choice.")
    return "\n".join([message.text, "", *lines, "", how] if message.text else [*lines, "", how])


def new_session() -> requests.Session:
    """One pooled session per process; no automatic retries: the relay's outbox retries with backoff."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=8, pool_maxsize=32, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def send_parts(parts: Sequence[Part], send_one: Callable[[Part], str], *, first_part: int = 0) -> list[str]:
    """Send a reply's provider calls in order from `first_part`; the provider's ids of those sent now.

    A failure is raised again (the same class, chained) with how many parts are done (`parts_sent`, of
    `parts_total`), so a retry resumes at the first part not yet accepted instead of showing the user
    the accepted ones twice."""
    ids = []
    for index in range(first_part, len(parts)):
        try:
            ids.append(send_one(parts[index]))
        except ProviderError as error:
            raise type(error)(str(error), reason=error.reason, retry_after=error.retry_after, parts_sent=index,
                              parts_total=len(parts)) from error
    return ids


@contextlib.contextmanager
def _provider_errors(what: str) -> Iterator[None]:
    """Raises ProviderUnavailable("<what> did not answer in time", "<what> is unreachable or broke off") for any
    failure of `requests` inside the block: the provider may answer a later try."""
    try:
        yield
    except requests.Timeout:
        raise ProviderUnavailable(f"{what} did not answer in time") from None
    except requests.RequestException as error:
        raise ProviderUnavailable(f"{what} is unreachable or broke off ({type(error).__name__})") from None


def call_provider(session: requests.Session, provider: str, method: str, url: str, *, clock: Clock,
                  answers: Collection[int] = (),
                  retry_after_in_body: Callable[[requests.Response], float | None] | None = None,
                  **kwargs: Any) -> requests.Response:
    """Make one API call; raise ProviderRejected or ProviderUnavailable unless it succeeded (a Retry-After
    date counted from `clock`; without that header, what `retry_after_in_body` reads from a provider that
    says it in the error's body, as Telegram does) or its status is one of `answers`, which the caller reads
    itself (LINE's 409 for a push it already took)."""
    with _provider_errors(f"the {provider} API"):
        response = session.request(method, url, timeout=TIMEOUT, **kwargs)
    if response.status_code < 400 or response.status_code in answers:
        return response
    detail = _detail(response)
    if response.status_code == 429 or response.status_code >= 500:
        retry_after = retry_after_seconds(response.headers.get("Retry-After"), now=clock.now())
        if retry_after is None and retry_after_in_body is not None:
            retry_after = retry_after_in_body(response)
        raise ProviderUnavailable(f"the {provider} API answered {response.status_code}: {detail}",
                                  retry_after=retry_after)
    raise ProviderRejected(f"the {provider} API rejected the message with {response.status_code}: {detail}")


def download(session: requests.Session, provider: str, url: str, *, max_bytes: int, clock: Clock,
             **kwargs: Any) -> tuple[bytes, str]:
    """The bytes at `url` and their content type, read as they come and refused for good past `max_bytes`
    or after DOWNLOAD_SECONDS on `clock`."""
    too_large = ProviderRejected(f"the {provider} media is larger than the {max_bytes} bytes the relay forwards",
                                 reason="MediaTooLarge")
    deadline = clock.monotonic() + DOWNLOAD_SECONDS
    response = call_provider(session, provider, "GET", url, stream=True, clock=clock, **kwargs)
    with response:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise too_large
        chunks, size = [], 0
        with _provider_errors(f"the {provider} media download"):
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise too_large
                if clock.monotonic() > deadline:
                    raise ProviderUnavailable(f"the {provider} media download took over {DOWNLOAD_SECONDS:g}s")
                chunks.append(chunk)
    return b"".join(chunks), (response.headers.get("Content-Type") or "").split(";")[0].strip()


def media_file_name(stem: str, content_type: str) -> str:
    """A file name for a media item that came without one: its provider id and the type's extension."""
    return stem + (mimetypes.guess_extension(content_type or "") or "")


_NUMBER = re.compile(r"\+?\d(?:[\d\s().-]{5,}\d)")
"""A run of 7 or more digits, maybe with separators: what a phone number looks like in a provider's error."""


def _detail(response: requests.Response) -> str:
    """The provider's error, for logs and dead letters: 300 characters at most, numbers of 7 digits or more
    (a recipient's phone number) masked; error codes such as Twilio's 21211 stay."""
    text = _NUMBER.sub("[number]", " ".join(response.text.split()))
    return (text[:300] + "...") if len(text) > 300 else (text or response.reason or "no details")


def response_json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
