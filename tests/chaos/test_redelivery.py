"""A reply sent again after a crash (between the provider's 200 and saving the delivered id) is
recognisable where the provider allows it: the generic channel's Standard Webhooks `webhook-id`."""

from __future__ import annotations

from devstack.channels import DEV_VALUES
from relay.channels import get_adapter
from relay.channels.base import OutboundMessage
from relay.settings import Settings


def test_a_resent_generic_reply_carries_the_same_webhook_id(start_simulator):
    simulator = start_simulator()
    settings = Settings.from_environ({**DEV_VALUES, **simulator.api_bases(), "DIRECTLINE_SECRET": "x",
                                      "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                                      "RELAY_PUBLIC_BASE_URL": "http://127.0.0.1:7071"})
    adapter = get_adapter("generic", settings)
    context = {"user_id": "redelivered-user"}
    reply = OutboundMessage(text="once, really", idempotency_key="conv|0000007")
    first = adapter.send(context, reply)
    again = adapter.send(context, reply)  # the worker that took over sends it again
    other = adapter.send(context, OutboundMessage(text="once, really", idempotency_key="conv|0000009"))
    assert first == again != other
    ids = [r["id"] for r in simulator.replies("generic", "redelivered-user")]
    assert ids == [first[0], first[0], other[0]]  # what a Standard Webhooks receiver deduplicates on
