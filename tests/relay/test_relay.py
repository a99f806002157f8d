"""End to end: a provider's signed webhook reaches the bot, and the bot's replies reach the provider,
exactly once, through the local host, Azurite, the Direct Line emulator and the provider simulator.

The top layer: each promise across the processes once. The worker's decisions behind them (leases,
peeks, token renewal, forgotten and ended conversations, failed posts, multi-part replies) are
tabled case by case in test_worker_decisions.py, in this process and in milliseconds."""

from __future__ import annotations

import base64
import threading

import pytest
import requests

from devstack.bot import EchoBot
from devstack.channels import DEV_VALUES, webhooks
from devstack.procs import free_port, wait_until
from tests.conftest import subprocess_env
from tests.relay.conftest import NEVER, PROVIDERS, RelayStack

USERS = {"twilio": "+15550000001", "whatsapp": "15550000002", "messagebird": "+15550000003",
         "bird": "+15550000004", "generic": "user-5"}
USERS["vonage"] = "whatsapp:15550000006"
USERS["line"] = webhooks.line_user("relay-user-6")
USERS["telegram"] = "5550000006"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_signed_webhook_gets_the_bots_reply_at_the_provider(relay_stack, provider):
    stack = relay_stack()
    user = USERS[provider]
    stack.send(provider, user, f"hello from {provider} ✓")
    assert stack.wait_for_replies(provider, user, 1) == [f"You said: hello from {provider} ✓"]
    record = stack.record(provider, user)
    assert record.conversation_id
    assert stack.user_messages_at_bot(record.conversation_id) == [f"hello from {provider} ✓"]


def test_burst_polling_answers_before_the_webhook_returns(relay_stack):
    stack = relay_stack(schedule=NEVER)
    stack.send("twilio", "+15550001000", "quick")
    # No timer runs here: the reply can only have come from the webhook's own burst.
    assert stack.replies("twilio", "+15550001000") == ["You said: quick"]


def test_with_burst_off_the_timer_delivers(relay_stack):
    stack = relay_stack(burst="0")
    answer = stack.send("twilio", "+15550001001", "no burst")
    assert answer["status"] == 200
    assert stack.wait_for_replies("twilio", "+15550001001", 1) == ["You said: no burst"]


def test_late_proactive_reply_arrives_through_the_timer(relay_stack):
    stack = relay_stack()
    stack.send("whatsapp", "15550002000", "later")
    replies = stack.wait_for_replies("whatsapp", "15550002000", 2)
    assert replies == ["You said: later", "Late reply: later"]


def test_hero_card_and_suggested_actions_are_rendered_for_the_channel(relay_stack):
    stack = relay_stack()
    stack.send("whatsapp", "15550002001", "card")
    wait_until(lambda: stack.simulator.replies("whatsapp", "15550002001"), timeout=20, what="the card")
    reply = stack.simulator.replies("whatsapp", "15550002001")[0]
    assert "Here is a card." in reply["text"]
    assert reply["actions"], reply


def test_retried_webhook_is_relayed_once(relay_stack):
    stack = relay_stack()
    user = "+15550003000"
    answer = stack.send("twilio", user, "only once")
    results = []
    threads = [threading.Thread(target=lambda: results.append(stack.replay(answer).status_code)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200, 200, 200]
    stack.send("twilio", user, "and then this")
    assert stack.wait_for_replies("twilio", user, 2) == ["You said: only once", "You said: and then this"]
    record = stack.record("twilio", user)
    assert stack.user_messages_at_bot(record.conversation_id) == ["only once", "and then this"]


def test_messages_of_one_user_reach_the_bot_in_order(relay_stack):
    stack = relay_stack()
    user = "15550003001"
    for n in range(5):
        stack.send("whatsapp", user, f"message {n}")
    replies = stack.wait_for_replies("whatsapp", user, 5)
    assert replies == [f"You said: message {n}" for n in range(5)]


def test_host_killed_between_ticks_loses_and_duplicates_nothing(relay_stack):
    # A chase may hold a conversation's lease when the host dies: it is the others' again once the lease expired.
    stack = relay_stack(burst="0", env={"RELAY_LEASE_SECONDS": "15"})
    users = [f"+1555000400{n}" for n in range(4)]
    for user in users:
        stack.send("twilio", user, "later")
    stack.host.kill()  # SIGKILL: no clean-up, leases, outbox rows and fetched queue messages stay as they were
    stack.restart_host()
    for user in users:
        assert stack.wait_for_replies("twilio", user, 2, timeout=60) == ["You said: later", "Late reply: later"]
    for user in users:
        record = stack.record("twilio", user)
        assert stack.user_messages_at_bot(record.conversation_id) == ["later"]
    # Nothing more trickles in afterwards.
    wait_until(lambda: all(stack.record("twilio", u).next_poll_at is not None for u in users), timeout=10)
    assert all(stack.replies("twilio", u) == ["You said: later", "Late reply: later"] for u in users)


def test_provider_outage_is_retried_and_a_refusal_dead_lettered(relay_stack):
    stack = relay_stack()
    user = "15550009000"
    stack.simulator.fail_next("whatsapp", 503, retry_after=1)
    stack.send("whatsapp", user, "retry me")
    assert stack.wait_for_replies("whatsapp", user, 1) == ["You said: retry me"]
    stack.simulator.fail_next("whatsapp", 400)
    stack.send("whatsapp", user, "refused")
    key = stack.record("whatsapp", user).key
    wait_until(lambda: stack.store.dead_letters.list_letters(key), timeout=20, what="a dead letter")
    assert stack.store.dead_letters.list_letters(key)[0].kind == "reply"
    stack.send("whatsapp", user, "next")
    assert stack.wait_for_replies("whatsapp", user, 2) == ["You said: retry me", "You said: next"]


def test_disabled_or_unknown_channel_is_404(relay_stack):
    stack = relay_stack(env={"BIRD_SIGNING_KEY": ""})
    for channel in ("bird", "pigeon"):  # disabled, and no such channel
        response = requests.post(f"{stack.host.url}/api/channels/{channel}", data=b"{}", timeout=10)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "ChannelDisabled"


def test_bad_signature_is_401_and_relays_nothing(relay_stack):
    stack = relay_stack()
    answer = stack.send("twilio", "+15550010000", "genuine")
    hook = answer["webhook"]
    headers = {**hook["headers"], "X-Twilio-Signature": "AAAAAAAAAAAAAAAAAAAAAAAAAAA="}
    response = requests.post(hook["url"], data=b"Body=forged&From=%2B15550010001&MessageSid=SMforged",
                             headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "InvalidSignature"
    assert stack.record("twilio", "+15550010001") is None


def test_botbuilder_bot_answers_through_the_relay_including_a_late_reply(relay_stack, tmp_path):
    with EchoBot(late_reply_seconds=1, env=subprocess_env(), log_path=tmp_path / "bot.log") as bot:
        stack = relay_stack(emulator_options={"echo": False, "bot_url": bot.url})
        stack.send("twilio", "+15550011000", "later")
        replies = stack.wait_for_replies("twilio", "+15550011000", 2)
    assert replies == ["You said: later", "Late reply: later"]


LONG_TEXT = " ".join(f"word{n:03d}" for n in range(250))  # 1,999 characters: "You said: ..." takes 2 Twilio messages


def test_a_long_reply_failing_part_way_is_resumed_not_repeated(relay_stack):
    stack = relay_stack()
    user = "+15550014000"
    stack.simulator.fail_next("twilio", 503, after=1, retry_after=1)  # the reply's 2nd message fails once
    stack.send("twilio", user, LONG_TEXT)
    stack.wait_for_replies("twilio", user, 2)
    wait_until(lambda: stack.simulator.pending_failures("twilio") == 0, timeout=10, what="the 503 to be served")
    # Settled: the reply is recorded as delivered, with no part-way progress left to resume from.
    wait_until(lambda: (ids := stack.record("twilio", user).delivered_ids) and not any("#" in i for i in ids),
               timeout=20, what="the reply to be recorded as delivered")
    replies = stack.replies("twilio", user)
    assert len(replies) == 2  # each part once: the first was not sent again with the retry
    assert " ".join(replies) == f"You said: {LONG_TEXT}"


PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # binary, every byte value, ~10 KB
PHOTO_URL = "data:image/png;base64," + base64.b64encode(PHOTO).decode()  # the file on the user's phone


def user_activities(stack: RelayStack, provider: str, user: str) -> list[dict]:
    activities = stack.emulator.conversation(stack.record(provider, user).conversation_id)["activities"]
    return [a for a in activities if a.get("type") == "message" and (a.get("from") or {}).get("role") != "bot"]


@pytest.mark.parametrize(("provider", "user"), [("whatsapp", "15550017000"), ("twilio", "whatsapp:+15550017001"),
                                               ("vonage", "whatsapp:15550017003")])
def test_media_behind_the_providers_credentials_reach_the_bot_as_files_it_can_open(relay_stack, provider, user):
    stack = relay_stack()
    answer = stack.send(provider, user, "look", media=[{"url": PHOTO_URL, "contentType": "image/png"}])
    assert stack.wait_for_replies(provider, user, 1) == ["You said: look"]
    [activity] = user_activities(stack, provider, user)  # exactly once
    assert activity["channelData"]["clientActivityID"] == f"{provider}:{answer['message_id']}"
    [attachment] = activity["attachments"]
    assert attachment["contentType"] == "image/png"
    assert not attachment["contentUrl"].startswith(stack.simulator.url)  # not the provider's protected URL
    assert requests.get(attachment["contentUrl"], timeout=10).content == PHOTO  # the bot opens it, no credentials
    assert "relayPendingMedia" not in activity
    wait_until(lambda: stack.store.outbox.list_messages(stack.record(provider, user).key) == [], timeout=20,
               what="the outbox to empty")
    assert len(user_activities(stack, provider, user)) == 1


def test_a_media_download_outage_holds_the_message_until_the_provider_is_back(relay_stack):
    stack = relay_stack()
    user = "15550017002"
    stack.simulator.fail_next("whatsapp", 503, retry_after=1)  # the media object cannot be read at first
    stack.send("whatsapp", user, "look", media=[{"url": PHOTO_URL, "contentType": "image/png"}])
    assert stack.wait_for_replies("whatsapp", user, 1) == ["You said: look"]
    assert stack.simulator.pending_failures("whatsapp") == 0
    [activity] = user_activities(stack, "whatsapp", user)
    assert requests.get(activity["attachments"][0]["contentUrl"], timeout=10).content == PHOTO


def test_media_the_provider_cannot_give_leave_the_text_for_the_bot_and_a_dead_letter(relay_stack):
    stack = relay_stack()
    user = "15550017003"
    gone = f"http://127.0.0.1:{free_port()}/expired.png"  # nothing listens: the provider has no such file
    stack.send("whatsapp", user, "look", media=[{"url": gone, "contentType": "image/png"}])
    assert stack.wait_for_replies("whatsapp", user, 1) == ["You said: look"]
    [activity] = user_activities(stack, "whatsapp", user)
    assert not activity.get("attachments")
    assert activity["channelData"]["relay"]["unavailableMedia"] == [{"contentType": "image/png",
                                                                     "reason": "ProviderRejected"}]
    key = stack.record("whatsapp", user).key
    [dead] = stack.store.dead_letters.list_letters(key)
    assert dead.kind == "media" and "404" in dead.reason
    assert DEV_VALUES["WHATSAPP_ACCESS_TOKEN"] not in dead.reason


def test_an_ambiguous_upload_is_not_repeated(relay_stack):
    stack = relay_stack()
    user = "15550017004"
    # Direct Line takes the upload and then fails the call: the relay must find it by clientActivityID.
    stack.emulator.set_faults(error_502_rate=1.0, phase="after", endpoints=["upload"], limit=1)
    stack.send("whatsapp", user, "look", media=[{"url": PHOTO_URL, "contentType": "image/png"}])
    assert stack.wait_for_replies("whatsapp", user, 1) == ["You said: look"]
    assert stack.emulator.counters()["faults"]["502"] == 1
    wait_until(lambda: stack.store.outbox.list_messages(stack.record("whatsapp", user).key) == [], timeout=20,
               what="the outbox to empty")
    [activity] = user_activities(stack, "whatsapp", user)
    assert requests.get(activity["attachments"][0]["contentUrl"], timeout=10).content == PHOTO
