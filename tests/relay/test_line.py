"""LINE end to end: a user's message reaches the bot once and its answer goes back with the webhook's reply token
(free); a tampered webhook is refused, a replayed one relays nothing more; a reply token is used once, so the
bot's later messages are pushed."""

from __future__ import annotations

import base64

import requests

from devstack.channels import DEV_VALUES, webhooks
from relay.channels.line import compute_signature
from tests.relay.conftest import RELAY_URL


def apis(replies: list[dict]) -> list[tuple[str, str]]:
    return [(r["text"], r["request"]["api"]) for r in replies]


def test_a_line_message_reaches_the_bot_once_and_is_answered_with_its_reply_token(relay_stack):
    stack = relay_stack()
    user = webhooks.line_user("relay-line-1")
    answer = stack.send("line", user, "hello LINE ✓")
    stack.wait_for_replies("line", user, 1)
    assert apis(stack.simulator.replies("line", user)) == [("You said: hello LINE ✓", "reply")]

    assert stack.replay(answer).status_code == 200  # LINE's redelivery of the same event
    hook = answer["webhook"]
    body = base64.b64decode(hook["body_b64"]).replace(b"hello LINE", b"forged LINE")
    tampered = requests.post(hook["url"], data=body, headers=hook["headers"], timeout=10)
    assert tampered.status_code == 401 and tampered.json()["error"]["code"] == "InvalidSignature"

    stack.send("line", user, "and again")
    stack.wait_for_replies("line", user, 2)
    assert apis(stack.simulator.replies("line", user)) == [("You said: hello LINE ✓", "reply"),
                                                           ("You said: and again", "reply")]
    record = stack.record("line", user)
    assert stack.user_messages_at_bot(record.conversation_id) == ["hello LINE ✓", "and again"]


def test_a_reply_token_is_used_once_and_the_bots_later_messages_are_pushed(inprocess_relay):
    relay = inprocess_relay()
    user = webhooks.line_user("relay-line-2")
    key = relay.message("line", user, "hello")
    relay.work(key)
    conversation_id = relay.record(key).conversation_id
    relay.bot_says(conversation_id, "one more thing")
    relay.time.advance(1)
    relay.work(key)
    assert apis(relay.simulator.replies("line", user)) == [("You said: hello", "reply"), ("one more thing", "push")]
    assert "reply_token" not in relay.record(key).reply_context


def test_a_webhook_signed_with_another_secret_relays_nothing(relay_stack):
    stack = relay_stack()
    user = webhooks.line_user("relay-line-3")
    hook = webhooks.build("line", {**DEV_VALUES, "LINE_CHANNEL_SECRET": "not-the-channels"}, RELAY_URL,
                          sender=user, text="forged")
    response = requests.post(stack.host.url + "/api/channels/line", data=hook.body, headers=hook.headers, timeout=10)
    assert response.status_code == 401
    assert compute_signature(DEV_VALUES["LINE_CHANNEL_SECRET"], hook.body) != hook.headers["X-Line-Signature"]
    assert stack.record("line", user) is None


def test_a_reply_that_failed_with_its_token_is_retried_as_a_push_never_with_the_token_again(inprocess_relay):
    relay = inprocess_relay()
    user = webhooks.line_user("relay-line-4")
    key = relay.message("line", user, "hello")
    relay.simulator.fail_next("line", 503, retry_after=1)  # LINE may or may not have used the token
    relay.work(key)
    assert relay.simulator.replies("line", user) == [] and "reply_token" not in relay.record(key).reply_context
    relay.time.advance(2)
    relay.work(key)
    assert apis(relay.simulator.replies("line", user)) == [("You said: hello", "push")]
