"""What an operator sees in Application Insights after a real webhook, poll and delivery: the relay's metrics and spans
(relay/telemetry.py), read from opentelemetry-sdk's in-memory reader and exporter bound with `telemetry.use`.

The relay runs in this process on Azurite and the real cores of the Direct Line emulator and the provider simulator
(`inprocess_relay`). No attribute of any span, data point or resource may carry a phone number, the Direct Line
secret, a token the emulator issued, a Direct Line conversation id or a provider key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from devstack.channels import DEV_VALUES, webhooks
from devstack.procs import free_port
from relay import telemetry
from relay.channels.base import WebhookRequest
from relay.errors import ChannelDisabled, SignatureInvalid, StoreError
from relay.inbound import handle_webhook
from relay.operations import conversation_view
from relay.poller import poll_tick
from relay.settings import SETTINGS
from relay.store import RelayStore
from relay.store.conversations import ConversationKey
from relay.tokens import PAGE_TOKEN_REFRESH_AT, Caller, TokenServer
from tests.conftest import DIRECTLINE_TEST_SECRET
from tests.relay.conftest import RELAY_URL, InProcessRelay

PHONE = "+15557770101"


@dataclass
class Recorded:
    """The metrics and spans the relay recorded since the test began."""

    metrics: InMemoryMetricReader
    spans: InMemorySpanExporter

    def points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        return [point for resource_metrics in (data.resource_metrics if data else [])
                for scope in resource_metrics.scope_metrics for metric in scope.metrics if metric.name == name
                for point in metric.data.data_points]

    def total(self, name: str, **dimensions: str) -> int:
        """The counter's value over the data points that have these dimensions (and any others)."""
        return sum(p.value for p in self.points(name) if dimensions.items() <= dict(p.attributes).items())

    def recorded(self, name: str, **dimensions: str) -> tuple[int, float]:
        """(how many values, their sum) of a histogram over the data points that have these dimensions."""
        points = [p for p in self.points(name) if dimensions.items() <= dict(p.attributes).items()]
        return sum(p.count for p in points), sum(p.sum for p in points)

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def attribute_values(self) -> list[str]:
        """Every attribute value and key of every span (its events and links too), data point and resource."""
        found: list[Any] = []
        for span in self.spans.get_finished_spans():
            found += [*span.attributes.items(), *span.resource.attributes.items()]
            found += [item for event in span.events for item in event.attributes.items()]
            found += [item for link in span.links for item in (link.attributes or {}).items()]
            found.append(span.status.description)
        data = self.metrics.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else []:
            found += resource_metrics.resource.attributes.items()
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    found += [item for point in metric.data.data_points for item in point.attributes.items()]
        return [str(value) for item in found for value in (item if isinstance(item, tuple) else (item,))]


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use(meter_provider=meter_provider, tracer_provider=tracer_provider)
    yield Recorded(reader, exporter)
    telemetry.use()
    meter_provider.shutdown()
    tracer_provider.shutdown()


def webhook(channel: str, user: str, text: str) -> WebhookRequest:
    """A provider's signed webhook of a user's message, as the function app hands it to handle_webhook."""
    hook = webhooks.build(channel, DEV_VALUES, RELAY_URL, sender=user, text=text)
    return WebhookRequest("POST", hook.url, hook.headers, hook.body)


def assert_nothing_personal_or_secret(recorded: Recorded, relay: InProcessRelay, key: ConversationKey) -> None:
    """No phone number, secret, token, provider key or conversation id in any attribute; and the relay's own
    attribute values are of the few shapes telemetry allows (names, statuses, counts, a 12-digit tag)."""
    record = relay.record(key)
    secrets = [DIRECTLINE_TEST_SECRET, record.token, record.conversation_id, record.user_id,
               *(DEV_VALUES[name] for name, setting in SETTINGS.items() if setting.secret and DEV_VALUES.get(name))]
    values = recorded.attribute_values()
    assert values, "nothing was recorded"
    digits = PHONE.lstrip("+")
    assert not [v for v in values if digits[1:] in v], "a phone number in telemetry"
    assert not [v for v in values for secret in secrets if secret and secret in v], "a secret or an id in telemetry"
    relay_values = [str(v) for s in recorded.spans.get_finished_spans() for k, v in s.attributes.items()
                    if k.startswith("relay.")]
    relay_values += [str(v) for name in (telemetry.WEBHOOKS, telemetry.MESSAGES_POSTED, telemetry.REPLIES_DELIVERED,
                                         telemetry.DEAD_LETTERS, telemetry.DIRECTLINE_ERRORS)
                     for point in recorded.points(name) for v in point.attributes.values()]
    allowed = re.compile(r"[a-z_]+|\d{1,4}|[0-9a-f]{12}")
    assert [v for v in relay_values if not allowed.fullmatch(v)] == []


def test_a_webhook_its_post_and_the_reply_are_counted_and_traced_with_nothing_personal(inprocess_relay, recorded):
    relay = inprocess_relay()
    request = webhook("twilio", PHONE, "hello")
    assert handle_webhook(relay.ctx, "twilio", request).status == 200
    key = ConversationKey("twilio", PHONE)
    assert relay.replies(key) == ["You said: hello"]  # within the webhook's burst

    assert recorded.total(telemetry.WEBHOOKS, channel="twilio", outcome="accepted", status="200") == 1
    assert recorded.total(telemetry.MESSAGES_POSTED, channel="twilio", outcome="posted") == 1
    assert recorded.total(telemetry.REPLIES_DELIVERED, channel="twilio", outcome="delivered") == 1
    replies, latency = recorded.recorded(telemetry.REPLY_LATENCY, channel="twilio")
    assert replies == 1 and 0 <= latency < 60
    assert recorded.recorded(telemetry.OUTBOX_AGE, channel="twilio")[0] == 1  # its age when posted

    [root], [post], [deliver] = (recorded.finished(n) for n in ("relay.webhook", "relay.post", "relay.deliver"))
    assert root.parent is None and dict(root.attributes) == {"relay.channel": "twilio", "relay.outcome": "accepted",
                                                               "relay.status": 200}
    assert post.context.trace_id == deliver.context.trace_id == root.context.trace_id
    assert post.parent.span_id == root.context.span_id
    tag = conversation_view(relay.store, key)["telemetry_tag"]  # what `relay.admin conversations show` prints
    assert post.attributes["relay.conversation"] == deliver.attributes["relay.conversation"] == tag

    assert handle_webhook(relay.ctx, "twilio", request).status == 200  # the provider's retry
    assert recorded.total(telemetry.WEBHOOKS, channel="twilio", outcome="duplicate", status="200") == 1
    tampered = replace(request, body=request.body.replace(b"hello", b"hellO"))
    with pytest.raises(SignatureInvalid):
        handle_webhook(relay.ctx, "twilio", tampered)
    assert recorded.total(telemetry.WEBHOOKS, channel="twilio", outcome="refused", status="401") == 1
    assert recorded.total(telemetry.MESSAGES_POSTED) == 1
    assert relay.replies(key) == ["You said: hello"]
    assert_nothing_personal_or_secret(recorded, relay, key)


def test_a_webhook_to_a_route_of_no_channel_is_counted_without_its_name(inprocess_relay, recorded):
    relay = inprocess_relay()
    with pytest.raises(ChannelDisabled):
        handle_webhook(relay.ctx, "+15557770102", webhook("twilio", PHONE, "hello"))
    assert recorded.total(telemetry.WEBHOOKS, channel="other", outcome="refused", status="404") == 1


def test_a_poll_tick_traces_each_conversation_it_works_and_its_delivery(inprocess_relay, recorded):
    relay = inprocess_relay()
    key = relay.message("twilio", PHONE, "hello")  # stored, as by a webhook whose burst did not get to it
    result = relay.tick()
    assert relay.replies(key) == ["You said: hello"]

    assert recorded.total(telemetry.POLL_TICKS, outcome="ok") == 1
    assert recorded.recorded(telemetry.POLL_DURATION, outcome="ok")[0] == 1
    assert recorded.total(telemetry.POLL_CONVERSATIONS, outcome="worked") == result.worked == 1
    assert recorded.total(telemetry.MESSAGES_POSTED, channel="twilio", outcome="posted") == 1
    assert recorded.total(telemetry.REPLIES_DELIVERED, channel="twilio", outcome="delivered") == 1
    [poll], [conversation], [deliver] = (recorded.finished(n)
                                         for n in ("relay.poll", "relay.conversation", "relay.deliver"))
    assert poll.parent is None and poll.attributes["relay.due"] == 1 and poll.attributes["relay.worked"] == 1
    assert conversation.parent.span_id == poll.context.span_id  # across the poller's thread pool
    assert deliver.parent.span_id == conversation.context.span_id
    assert deliver.context.trace_id == poll.context.trace_id

    relay.time.advance(120)
    relay.tick()  # the settled conversation is peeked and found quiet: no span of its own
    assert recorded.total(telemetry.POLL_CONVERSATIONS, outcome="quiet") == 1
    assert len(recorded.finished("relay.conversation")) == 1
    assert_nothing_personal_or_secret(recorded, relay, key)


def test_a_tick_that_fails_is_counted_failed(inprocess_relay, recorded):
    relay = inprocess_relay()
    storage = relay.ctx.settings.storage  # the same account, at a port nothing listens on: storage is down
    down = re.sub(r"(TableEndpoint=http://[^:/;]+):\d+", rf"\g<1>:{free_port()}", storage.connection_string)
    assert down != storage.connection_string
    nowhere = replace(storage, connection_string=down)
    ctx = replace(relay.ctx, store=RelayStore.from_settings(nowhere, clock=relay.time, retry_total=0,
                                                            connection_timeout=2))
    with pytest.raises(StoreError):
        poll_tick(ctx)
    assert recorded.total(telemetry.POLL_TICKS, outcome="failed") == 1
    assert recorded.recorded(telemetry.POLL_DURATION, outcome="failed")[0] == 1
    [poll] = recorded.finished("relay.poll")
    assert poll.status.description == "StoreError"


def test_a_provider_refusal_is_a_reply_dead_letter(inprocess_relay, recorded):
    relay = inprocess_relay()
    relay.simulator.fail_next("twilio", 400)
    key = relay.message("twilio", PHONE, "hello")
    relay.work(key)
    assert relay.replies(key) == []
    assert recorded.total(telemetry.DEAD_LETTERS, channel="twilio", kind="reply") == 1
    assert recorded.total(telemetry.REPLIES_DELIVERED, channel="twilio", outcome="dead_letter") == 1
    assert recorded.total(telemetry.REPLIES_DELIVERED, outcome="delivered") == 0
    assert recorded.recorded(telemetry.REPLY_LATENCY)[0] == 0
    assert_nothing_personal_or_secret(recorded, relay, key)


def test_direct_line_throttling_is_counted_by_operation_and_status_and_the_message_waits(inprocess_relay,
                                                                                          recorded):
    relay = inprocess_relay()
    key = relay.message("twilio", PHONE, "hello")
    relay.work(key)
    relay.emulator.set_faults(throttle_rate=1.0, endpoints=["activities/post"], limit=1)
    key = relay.message("twilio", PHONE, "again")
    relay.work(key)
    assert recorded.total(telemetry.DIRECTLINE_ERRORS, operation="post", status="429") == 1
    assert recorded.total(telemetry.MESSAGES_POSTED, channel="twilio", outcome="retry") == 1
    waited, age = recorded.recorded(telemetry.OUTBOX_AGE, channel="twilio")
    assert waited == 2 and age >= 1  # the first message's age at its post; the second's, left waiting
    relay.time.advance(5)
    relay.work(key)
    assert relay.replies(key) == ["You said: hello", "You said: again"]
    assert recorded.total(telemetry.MESSAGES_POSTED, channel="twilio", outcome="posted") == 2


def test_a_conversations_token_refresh_is_counted(inprocess_relay, recorded):
    relay = inprocess_relay()
    key = relay.message("twilio", PHONE, "hello")
    relay.work(key)
    refresh_at = relay.record(key).token_refresh_at
    assert refresh_at is not None
    relay.time.advance((refresh_at - relay.time()).total_seconds() + 1)
    relay.work(key)
    assert recorded.total(telemetry.TOKENS_REFRESHED, kind="conversation", outcome="refreshed") == 1
    assert_nothing_personal_or_secret(recorded, relay, key)


def test_the_timers_refresh_of_a_web_chat_sessions_token_is_counted(inprocess_relay, recorded):
    relay = inprocess_relay()
    tokens = TokenServer(relay.ctx.settings, client=relay.ctx.directline, store=relay.store, clock=relay.time)
    grant = tokens.issue_token(Caller())
    relay.time.advance(grant["expires_in"] * PAGE_TOKEN_REFRESH_AT[1] + 1)  # the page is gone: the timer refreshes
    relay.tick()
    assert recorded.total(telemetry.TOKENS_REFRESHED, kind="session", outcome="refreshed") == 1
    assert recorded.total(telemetry.TOKENS_REFRESHED, kind="session", outcome="failed") == 0
    assert not [v for v in recorded.attribute_values() if grant["token"] in v or grant["conversationId"] in v]
