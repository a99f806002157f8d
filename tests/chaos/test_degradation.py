"""Degradation: what the relay does while a dependency is down, and that nothing is lost when it returns."""

from __future__ import annotations

import requests

from devstack.procs import free_port, wait_until


def health(stack) -> requests.Response:
    return requests.get(f"{stack.host.url}/api/health", timeout=30)


def user_texts_at_bot(stack, provider: str, user: str) -> list[str]:
    return stack.user_messages_at_bot(stack.record(provider, user).conversation_id)


def test_storage_down_answers_503_acknowledges_nothing_and_the_retry_is_relayed_once(relay_stack, own_azurite):
    stack = relay_stack()
    user = "15550500001"
    own_azurite.stop()
    answer = stack.simulator.send_inbound("whatsapp", user, "while storage is down")
    assert answer["status"] == 503, answer  # Meta retries a 5xx: the message is not the relay's yet
    assert '"code":"StorageUnavailable"' in answer["body"].replace(" ", "")
    assert stack.emulator.counters()["requests"].get("activities/post", 0) == 0
    down = health(stack)
    assert down.status_code == 503 and down.json()["failing"] == ["table_storage"]

    own_azurite.start()
    assert stack.replay(answer).status_code == 200  # the provider's retry
    assert stack.wait_for_replies("whatsapp", user, 1) == ["You said: while storage is down"]
    assert user_texts_at_bot(stack, "whatsapp", user) == ["while storage is down"]
    assert health(stack).json()["status"] == "healthy"


def test_directline_down_keeps_messages_in_the_outbox_and_they_flow_when_it_returns(relay_stack, start_emulator):
    port = free_port()
    stack = relay_stack(emulator_options={"port": port})
    user = "+15550500002"
    stack.emulator.stop()  # connection refused: not an error answer, no Direct Line at all
    answer = stack.send("twilio", user, "while Direct Line is down")
    assert answer["status"] == 200  # stored: Twilio would never retry, so the relay must keep it
    key = stack.record("twilio", user).key
    assert [m.activity["text"] for m in stack.store.outbox.list_messages(key)] == ["while Direct Line is down"]
    degraded = health(stack)
    assert degraded.status_code == 200, degraded.text  # still accepting webhooks: not to be evicted
    assert degraded.json()["status"] == "degraded" and degraded.json()["degraded"] == ["directline"]

    stack.emulator = start_emulator(port=port, extra_args=("--late-reply-seconds", "1"))
    assert stack.wait_for_replies("twilio", user, 1, timeout=60) == ["You said: while Direct Line is down"]
    assert user_texts_at_bot(stack, "twilio", user) == ["while Direct Line is down"]
    wait_until(lambda: not stack.store.outbox.list_messages(key), timeout=20, what="the outbox to empty")
    assert health(stack).json()["status"] == "healthy"
