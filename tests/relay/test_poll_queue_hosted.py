"""The poll queue through the local Functions host, as it runs in Azure: the webhook's queue output binding
leaves a chase, the host's queue trigger runs poll_batch, the timer fans out above RELAY_FANOUT_THRESHOLD
(relay/fanout.py). Real processes: Azurite (tables and queues), the emulator, the provider simulator, the host.
"""

from __future__ import annotations

import base64
import re

from azure.storage.queue import QueueClient

from devstack.procs import wait_until
from tests.relay.conftest import EVERY_SECOND, NEVER, queue_exists_with_messages


def queue_of(stack, suffix: str = "") -> QueueClient:
    """The stack's poll queue (batches), or with suffix "-chase" its chase queue."""
    return QueueClient.from_connection_string(stack.env["AzureWebJobsStorage"], stack.env["RELAY_POLL_QUEUE"] + suffix)


def drained(queue: QueueClient) -> bool:
    """Nothing waiting or being worked (the count includes messages a worker holds)."""
    return (queue.get_queue_properties().approximate_message_count or 0) == 0


def host_log(stack) -> str:
    return stack.host.log_path.read_text(errors="replace")


def test_a_late_reply_reaches_the_user_through_the_chase_without_the_timer(relay_stack):
    stack = relay_stack(schedule=NEVER, emulator_options={"extra_args": ("--late-reply-seconds", "4")})
    user = "+15550300001"

    stack.send("twilio", user, "later")  # echoed at once (the burst delivers it), answered again 4 s later

    assert stack.wait_for_replies("twilio", user, 2, timeout=30) == ["You said: later", "Late reply: later"]
    queue = queue_of(stack, "-chase")
    wait_until(lambda: drained(queue), timeout=30, what="the chase done")
    assert stack.replies("twilio", user) == ["You said: later", "Late reply: later"]
    assert "Executed 'Functions.chase' (Succeeded" in host_log(stack)
    # The chase names the conversation by its keyed hash: no phone number went into the queue.
    assert user not in host_log(stack) and user.lstrip("+") not in host_log(stack)


def test_without_a_chase_a_late_reply_waits_for_the_timer(relay_stack):
    stack = relay_stack(schedule=NEVER, env={"RELAY_CHASE_SECONDS": "0"},
                        emulator_options={"extra_args": ("--late-reply-seconds", "4")})
    user = "+15550300002"
    stack.send("twilio", user, "later")
    assert stack.wait_for_replies("twilio", user, 1) == ["You said: later"]
    conversation_id = stack.record("twilio", user).conversation_id
    wait_until(lambda: any(a.get("text") == "Late reply: later"
                           for a in stack.emulator.conversation(conversation_id)["activities"]),
               timeout=30, what="the bot's late reply in the conversation")
    assert not queue_exists_with_messages(queue_of(stack, "-chase"))
    assert stack.replies("twilio", user) == ["You said: later"]  # nobody polls: no timer, no chase


def test_above_the_threshold_the_timer_hands_the_conversations_to_poll_batch(relay_stack):
    stack = relay_stack(schedule=EVERY_SECOND, burst="0",
                        env={"RELAY_FANOUT_THRESHOLD": "3", "RELAY_CHASE_SECONDS": "0"})
    users = [f"+1555031{n:04d}" for n in range(8)]

    for user in users:  # no burst: every message waits for the poll, 8 due at once
        stack.send("twilio", user, f"hello {user[-4:]}")

    for user in users:
        assert stack.wait_for_replies("twilio", user, 1, timeout=60) == [f"You said: hello {user[-4:]}"]
    wait_until(lambda: "Executed 'Functions.poll_batch' (Succeeded" in host_log(stack), timeout=30,
               what="a batch worked by poll_batch")
    assert "batches=1" in host_log(stack)
    wait_until(lambda: drained(queue_of(stack)), timeout=30, what="the batches done")
    assert all(stack.replies("twilio", user) == [f"You said: hello {user[-4:]}"] for user in users)
    messages = queue_of(stack).peek_messages(max_messages=32)
    assert all(base64.b64decode(m.content) for m in messages)  # nothing left but well-formed messages


def test_a_webhook_is_answered_200_when_the_poll_queue_is_down(relay_stack, storage_connection_string):
    """The chase is an optimisation: a queue outage must not turn stored, relayed messages into errors the
    provider retries (or counts against the webhook)."""
    no_queues = re.sub(r"QueueEndpoint=[^;]*;", "QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;",
                       storage_connection_string)
    stack = relay_stack(schedule=NEVER, env={"AzureWebJobsStorage": no_queues})
    user = "+15550300003"

    answer = stack.simulator.send_inbound("twilio", user, "hello")

    assert answer["status"] == 200, answer
    assert stack.wait_for_replies("twilio", user, 1) == ["You said: hello"]
