"""Vonage end to end, through the local host: a signed webhook reaches the bot once and its reply reaches
the user on the channel they wrote on; a changed, replayed or stale webhook is refused and relays nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid

import requests

from devstack.channels import DEV_VALUES, webhooks
from devstack.procs import wait_until
from relay.channels import vonage
from relay.store.conversations import ConversationKey


def test_an_sms_and_a_whatsapp_message_each_get_their_reply_on_their_own_channel(relay_stack):
    stack = relay_stack()
    for user in ("447700900101", "whatsapp:447700900101"):  # one number, two channels: two conversations
        stack.send("vonage", user, f"hello from {user}")
    for user in ("447700900101", "whatsapp:447700900101"):
        assert stack.wait_for_replies("vonage", user, 1) == [f"You said: hello from {user}"]
        [reply] = stack.simulator.replies("vonage", user)
        assert reply["request"]["channel"] == ("sms" if user.isdigit() else "whatsapp")
        assert stack.user_messages_at_bot(stack.record("vonage", user).conversation_id) == [f"hello from {user}"]


def test_a_redelivered_webhook_is_relayed_once(relay_stack):
    stack = relay_stack()
    user = "viber_service:447700900102"
    answer = stack.send("vonage", user, "only once")
    assert [stack.replay(answer).status_code for _ in range(2)] == [200, 200]
    stack.send("vonage", user, "and then this")
    assert stack.wait_for_replies("vonage", user, 2) == ["You said: only once", "You said: and then this"]
    assert stack.user_messages_at_bot(stack.record("vonage", user).conversation_id) == ["only once", "and then this"]


def test_a_changed_body_under_a_genuine_jwt_is_401_and_relays_nothing(relay_stack):
    stack = relay_stack()
    hook = stack.send("vonage", "447700900103", "genuine")["webhook"]
    forged = base64.b64decode(hook["body_b64"]).replace(b"447700900103", b"447700900104")
    response = requests.post(hook["url"], data=forged, headers=hook["headers"], timeout=10)
    assert (response.status_code, response.json()["error"]["code"]) == (401, "InvalidSignature")
    assert stack.record("vonage", "447700900104") is None


def test_a_webhook_signed_longer_ago_than_the_window_is_refused(relay_stack):
    stack = relay_stack()
    hook = webhooks.build("vonage", DEV_VALUES, stack.env["RELAY_PUBLIC_BASE_URL"], sender="447700900105",
                          text="from the past", now=time.time() - 600)
    response = requests.post(hook.url, data=hook.body, headers=hook.headers, timeout=10)
    assert response.status_code == 401
    assert stack.record("vonage", "447700900105") is None


def test_a_media_url_the_relay_cannot_read_never_holds_back_the_users_next_message(relay_stack):
    """"\\uff0f" (a full-width slash) made urlsplit raise ValueError: the image's message was never posted and
    every later message of its user waited behind it. Now the image goes without its file, the text follows."""
    stack = relay_stack()
    user = "whatsapp:447700900106"
    genuine = json.loads(webhooks.build("vonage", DEV_VALUES, stack.env["RELAY_PUBLIC_BASE_URL"], sender=user,
                                        text="").body)
    image = {**genuine, "message_type": "image", "image": {"url": "https://evil.com\uff0fx.nexmo.com/v3/media/1"}}
    del image["text"]
    body = json.dumps(image).encode()
    claims = {"iat": int(time.time()), "jti": str(uuid.uuid4()), "payload_hash": hashlib.sha256(body).hexdigest(),
              "application_id": DEV_VALUES["VONAGE_APPLICATION_ID"]}
    token = vonage.signed_webhook_jwt(claims, DEV_VALUES["VONAGE_SIGNATURE_SECRET"])
    response = requests.post(f"{stack.env['RELAY_PUBLIC_BASE_URL']}/api/channels/vonage", data=body, timeout=10,
                             headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    stack.send("vonage", user, "and my question")
    wait_until(lambda: "and my question" in stack.user_messages_at_bot(stack.record("vonage", user).conversation_id),
               timeout=30, what="the text after the unreadable image to reach the bot")
    [letter] = stack.store.dead_letters.list_letters(ConversationKey("vonage", user))
    assert (letter.kind, "MediaNotFetched" in letter.reason) == ("media", True)
