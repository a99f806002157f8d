"""The relay's metrics and spans, for Application Insights through OpenTelemetry: nothing at all until configured.

Every module records through this facade (`count`, `record`, `span`), which does nothing until
`configure_from_settings` (function_app.py, once at import) finds APPLICATIONINSIGHTS_CONNECTION_STRING, or a test
binds providers of its own (`use`). Only then is OpenTelemetry imported: an app without Application Insights
imports none of it, and its cold start stays as it was.

Dimensions are low-cardinality names only (channel, outcome, status, kind, operation); a conversation is named
by its tag (`conversation_tag`: a keyed hash, the same the admin CLI shows), never by a phone number, a user id,
a Direct Line conversation id, a token or message text. A span that ends with an exception says only the
exception's type, not its message. The metric names below are what the alerts in infra/ and the README query.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from relay.errors import SettingsError
from relay.settings import TelemetrySettings

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter, MeterProvider
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer, TracerProvider

    from relay.store import RelayStore
    from relay.store.conversations import ConversationKey
    from relay.store.tables import Tables

__all__ = [
    "DEAD_LETTERS",
    "DIRECTLINE_ERRORS",
    "MESSAGES_POSTED",
    "OUTBOX_AGE",
    "POLL_BATCHES",
    "POLL_CONVERSATIONS",
    "POLL_DURATION",
    "POLL_TICKS",
    "REPLIES_DELIVERED",
    "REPLY_LATENCY",
    "TOKENS_REFRESHED",
    "WEBHOOKS",
    "Span",
    "carry_context",
    "configure_from_settings",
    "conversation_tag",
    "count",
    "record",
    "span",
    "use",
]

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

METER = "relay"
WEBHOOKS = "relay.webhooks"
MESSAGES_POSTED = "relay.messages.posted"
REPLIES_DELIVERED = "relay.replies.delivered"
REPLY_LATENCY = "relay.reply.latency"
OUTBOX_AGE = "relay.outbox.age"
DEAD_LETTERS = "relay.dead_letters"
POLL_DURATION = "relay.poll.duration"
POLL_CONVERSATIONS = "relay.poll.conversations"
POLL_TICKS = "relay.poll.ticks"
POLL_BATCHES = "relay.poll.batches"
DIRECTLINE_ERRORS = "relay.directline.errors"
TOKENS_REFRESHED = "relay.tokens.refreshed"

_COUNTERS = {
    WEBHOOKS: "webhooks answered (channel, outcome: accepted, duplicate, refused, handshake; status)",
    MESSAGES_POSTED: "user messages taken to Direct Line (channel, outcome: posted, retry, dead_letter)",
    REPLIES_DELIVERED: "bot activities taken to the provider (channel, outcome: delivered, retry, dead_letter)",
    DEAD_LETTERS: "dead letters written (channel, kind: reply, media, inbound, event)",
    POLL_CONVERSATIONS: "conversations a poll tick handled (outcome: worked, quiet, failed)",
    POLL_TICKS: "poll ticks (outcome: ok, failed = the tick raised)",
    POLL_BATCHES: "poll queue batches worked (outcome: ok, failed = retried by the host, malformed = dropped)",
    DIRECTLINE_ERRORS: "Direct Line requests that failed (operation; status, or network)",
    TOKENS_REFRESHED: "Direct Line token refreshes (kind: conversation, session; outcome: refreshed, failed)",
}
_HISTOGRAMS = {
    REPLY_LATENCY: "the bot activity's timestamp to the provider's acceptance (channel)",
    OUTBOX_AGE: "age of the oldest user message waiting in a conversation's outbox (channel)",
    POLL_DURATION: "one poll tick (outcome: ok, failed)",
}
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Histogram buckets in seconds (Application Insights keeps only sum, count, min and max; an OTLP backend more)."""

TAG_LENGTH = 12
OFF_INSTRUMENTATIONS = ("azure_sdk", "django", "fastapi", "flask", "httpx", "httpx2", "psycopg2", "requests",
                        "urllib", "urllib3")
"""The distro's automatic instrumentations, all off: URLs carry conversation ids and tokens' owners, and one
dependency record per storage call every 5 s is ingestion paid for nothing."""


class Span:
    """The span of a `with span(...)` block: attributes known only later are added with `set`."""

    def __init__(self, otel_span: OtelSpan | None = None):
        self._span = otel_span

    def set(self, **attributes: str | int | float | bool) -> None:
        """Add attributes, each named "relay.<name>"."""
        if self._span is not None:
            self._span.set_attributes(_span_attributes(attributes))


_NO_SPAN = Span()


@dataclass
class _Bound:
    """The meter's instruments (made on first use) and the tracer the facade records to."""

    meter: Meter
    tracer: Tracer
    instruments: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def instrument(self, name: str) -> Any:
        found = self.instruments.get(name)
        if found is None:
            with self.lock:
                found = self.instruments.get(name)
                if found is None:
                    found = self.instruments[name] = self._create(name)
        return found

    def _create(self, name: str) -> Any:
        if name in _COUNTERS:
            return self.meter.create_counter(name, unit="1", description=_COUNTERS[name])
        if name in _HISTOGRAMS:
            return self.meter.create_histogram(name, unit="s", description=_HISTOGRAMS[name],
                                               explicit_bucket_boundaries_advisory=list(SECONDS_BUCKETS))
        raise ValueError(f"{name} is not one of the relay's metrics")


_bound: _Bound | None = None


def count(name: str, amount: int = 1, **dimensions: str) -> None:
    """Add `amount` to the counter `name` (one of the constants above) with these low-cardinality dimensions."""
    bound = _bound
    if bound is not None:
        bound.instrument(name).add(amount, _attributes(dimensions))


def record(name: str, value: float, **dimensions: str) -> None:
    """Record `value` (seconds) in the histogram `name` with these low-cardinality dimensions."""
    bound = _bound
    if bound is not None:
        bound.instrument(name).record(value, _attributes(dimensions))


@contextlib.contextmanager
def span(name: str, **attributes: str | int | float | bool) -> Iterator[Span]:
    """A span around the block, the child of the current one, with `attributes` named "relay.<name>"; an exception
    leaving the block marks it failed with the exception's type (never its message, which may name a conversation
    or a user)."""
    bound = _bound
    if bound is None:
        yield _NO_SPAN
        return
    from opentelemetry.trace import Status, StatusCode

    with bound.tracer.start_as_current_span(name, attributes=_span_attributes(attributes), record_exception=False,
                                            set_status_on_exception=False) as otel_span:
        try:
            yield Span(otel_span)
        except BaseException as error:
            otel_span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise


def carry_context(function: Callable[P, T]) -> Callable[P, T]:
    """`function` run, on whatever thread calls it, in the context of the caller of carry_context (so a span
    started on a pool's thread is the child of the one that was current here); `function` itself when
    telemetry is off."""
    if _bound is None:
        return function
    context = contextvars.copy_context()

    def in_context(*args: P.args, **kwargs: P.kwargs) -> T:
        return context.copy().run(function, *args, **kwargs)

    return in_context


def conversation_tag(store_or_tables: RelayStore | Tables, key: ConversationKey) -> str:
    """The conversation's name in telemetry and in the admin CLI: 12 hex digits of a keyed hash of its channel and
    user (Tables.key_for), so an operator can find its story without anyone reading a phone number in it."""
    from relay.store import RelayStore

    tables = store_or_tables.tables if isinstance(store_or_tables, RelayStore) else store_or_tables
    return tables.key_for("telemetry", key.channel, key.user)[:TAG_LENGTH]


def use(*, meter_provider: MeterProvider | None = None, tracer_provider: TracerProvider | None = None) -> None:
    """Record to these providers from now on (tests pass opentelemetry-sdk ones with in-memory readers);
    with neither, record nothing again."""
    global _bound
    if meter_provider is None and tracer_provider is None:
        _bound = None
        return
    from opentelemetry import metrics, trace

    meter = (meter_provider or metrics.get_meter_provider()).get_meter(METER)
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(METER)
    _bound = _Bound(meter, tracer)


def configure_from_settings(load_settings: Callable[[], TelemetrySettings] = TelemetrySettings.from_environ) -> bool:
    """Send the relay's metrics and spans to Application Insights when APPLICATIONINSIGHTS_CONNECTION_STRING is set,
    with the managed identity APPLICATIONINSIGHTS_AUTHENTICATION_STRING names; True when it does.

    Log lines are left to the Functions host, which sends the worker's already: the distro sending them too
    would bill each line twice (OTEL_LOGS_EXPORTER=none for this process unless set otherwise). Telemetry never
    takes the app down: a malformed setting or a failing distro is logged and the relay runs without it. Without
    a connection string nothing of OpenTelemetry or the distro is imported."""
    try:
        settings = load_settings()
    except SettingsError as error:
        log.error("telemetry is off: %s", error)
        return False
    if not settings.connection_string:
        return False
    os.environ.setdefault("OTEL_LOGS_EXPORTER", "none")  # the distro reads no argument for it
    try:
        import azure.monitor.opentelemetry as distro

        distro.configure_azure_monitor(
            connection_string=settings.connection_string,
            credential=_credential(settings),
            instrumentation_options={name: {"enabled": False} for name in OFF_INSTRUMENTATIONS},
            enable_live_metrics=False,
            enable_performance_counters=False,
        )
    except Exception as error:  # the distro's own trouble (a bad connection string, an import): run without it
        log.error("telemetry is off: the Azure Monitor distro could not be configured (%s)", type(error).__name__)
        return False
    from opentelemetry import metrics, trace

    use(meter_provider=metrics.get_meter_provider(), tracer_provider=trace.get_tracer_provider())
    log.info("telemetry goes to Application Insights%s",
             " with the managed identity" if settings.entra_id else "")
    return True


def _credential(settings: TelemetrySettings) -> Any:
    """The managed identity that sends telemetry (Entra ID; App Insights local auth is off), or None for the
    connection string's instrumentation key alone."""
    if not settings.entra_id:
        return None
    from azure.identity import ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=settings.client_id) if settings.client_id \
        else ManagedIdentityCredential()


def _attributes(values: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """Attribute values as OpenTelemetry takes them: enums by their value, None left out."""
    return {name: value if isinstance(value, bool | int | float) else str(value)
            for name, value in values.items() if value is not None}


def _span_attributes(values: dict[str, Any]) -> dict[str, str | int | float | bool]:
    return {f"relay.{name}": value for name, value in _attributes(values).items()}
