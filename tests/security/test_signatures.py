"""Nobody gets a message in without the provider's key: forged, stale and cross-provider signatures."""

from __future__ import annotations

import time
from urllib.parse import parse_qsl, urlencode

import pytest

from devstack.channels import webhooks
from devstack.procs import wait_until
from relay.channels import telegram
from relay.store.conversations import ConversationKey
from relay.store.sweep import DEDUPE_RETENTION
from tests.security.conftest import BODY_SIGNED, PROVIDERS

TIMESTAMPED: tuple[str, ...] = ("messagebird", "bird", "generic")  # the schemes that sign a time (window: 300 s)
TIMESTAMPED += ("vonage",)  # its JWT's iat


def nothing_stored(relay, provider: str, user: str) -> bool:
    return relay.store.conversations.get_record(ConversationKey(provider, user)) is None


@pytest.mark.parametrize("provider", BODY_SIGNED)
def test_a_forged_body_is_401_and_stores_nothing(exposed_relay, provider):
    user = f"+1555040{PROVIDERS.index(provider):04d}"
    hook = exposed_relay.webhook(provider, user, "payme")
    forged = hook.body.replace(b"payme", b"payME")
    assert forged != hook.body
    response = exposed_relay.request("POST", f"/api/channels/{provider}", data=forged, headers=hook.headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "InvalidSignature"
    assert nothing_stored(exposed_relay, provider, user)


@pytest.mark.parametrize("provider", TIMESTAMPED)
@pytest.mark.parametrize("age", [-3600, 3600])
def test_a_replay_outside_the_window_is_refused(exposed_relay, provider, age):
    """Genuinely signed, but an hour old (or from the future): a captured webhook cannot be replayed later."""
    user = f"+1555041{TIMESTAMPED.index(provider):02d}{'1' if age > 0 else '2'}0"
    hook = exposed_relay.webhook(provider, user, "old news", now=time.time() - age)
    response = exposed_relay.deliver(hook)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] in ("StaleTimestamp", "InvalidSignature")
    assert nothing_stored(exposed_relay, provider, user)


@pytest.mark.parametrize("provider", ("twilio", "whatsapp", "telegram"))
def test_a_replay_of_an_untimed_signature_is_deduplicated(exposed_relay, provider):
    """Twilio, Meta and Telegram sign no time: a replayed webhook is accepted (200) and relayed no second time."""
    user = {"twilio": "+15550420001", "whatsapp": "15550420002", "telegram": "5550420003"}[provider]
    hook = exposed_relay.webhook(provider, user, "once only")
    assert exposed_relay.deliver(hook).status_code == 200
    assert exposed_relay.deliver(hook).status_code == 200
    record = exposed_relay.store.conversations.get_record(ConversationKey(provider, user))
    wait_until(lambda: not exposed_relay.store.outbox.list_messages(record.key), timeout=20, what="the outbox to empty")
    conversation_id = exposed_relay.store.conversations.get_record(record.key).conversation_id
    texts = [a.get("text") for a in exposed_relay.emulator.conversation(conversation_id)["activities"]
             if a.get("type") == "message" and a["from"].get("role") != "bot"]
    assert texts == ["once only"]


def bot_saw(relay, provider: str, user: str) -> list[str]:
    """The user's texts in the bot's conversation, once nothing waits in the outbox."""
    key = ConversationKey(provider, user)
    wait_until(lambda: not relay.store.outbox.list_messages(key), timeout=20, what="the outbox to empty")
    conversation_id = relay.store.conversations.get_record(key).conversation_id
    return [a.get("text") for a in relay.emulator.conversation(conversation_id)["activities"]
            if a.get("type") == "message" and a["from"].get("role") != "bot"]


def test_a_twilio_replay_with_parameters_folded_into_its_message_sid_is_refused(exposed_relay):
    """Twilio signs names and values run together: `MessageSid=SM…` `NumMedia=0` signs as `MessageSid=SM…NumMedia0`.
    Such a replay carries a new dedupe key under the original signature; it is a 400, and the bot hears once."""
    user = "+15550440001"
    hook = exposed_relay.webhook("twilio", user, "fold me")
    assert exposed_relay.deliver(hook).status_code == 200
    params = dict(parse_qsl(hook.body.decode(), keep_blank_values=True))
    names = sorted(params)
    refused = []
    for folded_count in (1, 2, 3):  # MessageSid swallows the next one, two, three parameters
        swallowed = names[names.index("MessageSid") + 1:names.index("MessageSid") + 1 + folded_count]
        folded = {k: v for k, v in params.items() if k not in swallowed}
        folded["MessageSid"] = params["MessageSid"] + "".join(name + params[name] for name in swallowed)
        replay = exposed_relay.request("POST", "/api/channels/twilio", data=urlencode(folded), headers=hook.headers)
        refused.append((replay.status_code, replay.json()["error"]["code"]))
    assert refused == [(400, "BadPayload")] * 3
    assert bot_saw(exposed_relay, "twilio", user) == ["fold me"]


def test_a_whatsapp_webhook_older_than_the_dedupe_memory_is_acknowledged_and_not_relayed(exposed_relay):
    """Its dedupe row may have been swept: relayed, a replay would reach the bot again. 200, so Meta stops."""
    user = "15550450001"
    old = exposed_relay.webhook("whatsapp", user, "eight days late",
                                now=time.time() - DEDUPE_RETENTION.total_seconds() - 86400)
    response = exposed_relay.deliver(old)
    assert response.status_code == 200, response.text
    assert nothing_stored(exposed_relay, "whatsapp", user)
    assert "eight days" not in exposed_relay.log_path.read_text()  # logged by id, never by text
    assert old.message_id in exposed_relay.log_path.read_text()
    fresh = exposed_relay.webhook("whatsapp", user, "in time", now=time.time() - 3600)
    assert exposed_relay.deliver(fresh).status_code == 200
    assert bot_saw(exposed_relay, "whatsapp", user) == ["in time"]


def test_a_line_event_older_than_the_dedupe_memory_is_acknowledged_and_not_relayed(exposed_relay):
    """As WhatsApp's: LINE signs no time in a header, but each event's `timestamp` is in the signed body."""
    user = webhooks.line_user("security-line-1")
    old = exposed_relay.webhook("line", user, "eight days late",
                                now=time.time() - DEDUPE_RETENTION.total_seconds() - 86400)
    assert exposed_relay.deliver(old).status_code == 200
    assert nothing_stored(exposed_relay, "line", user)
    assert old.message_id in exposed_relay.log_path.read_text()
    fresh = exposed_relay.webhook("line", user, "in time", now=time.time() - 3600)
    assert exposed_relay.deliver(fresh).status_code == 200
    assert exposed_relay.deliver(fresh).status_code == 200  # LINE's redelivery, or a replay: relayed once
    assert bot_saw(exposed_relay, "line", user) == ["in time"]


@pytest.mark.parametrize("signed_for", PROVIDERS)
def test_a_signature_for_one_provider_opens_no_other(exposed_relay, signed_for):
    for target in PROVIDERS:
        if target == signed_for:
            continue
        user = f"+1555043{PROVIDERS.index(signed_for)}{PROVIDERS.index(target)}00"
        hook = exposed_relay.webhook(signed_for, user, "wrong door")
        response = exposed_relay.deliver(hook, channel=target)
        assert response.status_code in (400, 401), (signed_for, target, response.status_code, response.text)
        assert response.json()["error"]["code"], response.text
        assert nothing_stored(exposed_relay, target, user) and nothing_stored(exposed_relay, signed_for, user)


def test_whatsapp_handshake_needs_the_verify_token(exposed_relay):
    query = {"hub.mode": "subscribe", "hub.challenge": "12345"}
    wrong = exposed_relay.request("GET", "/api/channels/whatsapp", params={**query, "hub.verify_token": "guess"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "InvalidSignature"
    from devstack.channels import DEV_VALUES

    right = exposed_relay.request("GET", "/api/channels/whatsapp",
                                  params={**query, "hub.verify_token": DEV_VALUES["WHATSAPP_VERIFY_TOKEN"]})
    assert right.status_code == 200 and right.text == "12345"


@pytest.mark.parametrize(("given", "user"), [
    pytest.param(None, "5550460001", id="missing"),
    pytest.param("", "5550460002", id="empty"),
    pytest.param("dev-only-telegram-webhook-secreT", "5550460003", id="one letter off"),
    pytest.param("dev-only-telegram-webhook-secret-and-more", "5550460004", id="longer"),
])
def test_a_telegram_update_without_the_secret_token_is_401_and_stores_nothing(exposed_relay, given, user):
    """Telegram signs nothing: the secret token in its header is all that tells its updates from anyone's."""
    hook = exposed_relay.webhook("telegram", user, "let me in")
    headers = {k: v for k, v in hook.headers.items() if k != telegram.WEBHOOK_HEADER}
    if given is not None:
        headers[telegram.WEBHOOK_HEADER] = given
    response = exposed_relay.request("POST", "/api/channels/telegram", data=hook.body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "InvalidSignature"
    assert nothing_stored(exposed_relay, "telegram", user)


def test_a_telegram_update_older_than_the_dedupe_memory_is_acknowledged_and_not_relayed(exposed_relay):
    """As WhatsApp's: its update_id's dedupe row may have been swept, so it is answered 200 and relayed nowhere."""
    user = "5550470001"
    old = exposed_relay.webhook("telegram", user, "eight days late",
                                now=time.time() - DEDUPE_RETENTION.total_seconds() - 86400)
    response = exposed_relay.deliver(old)
    assert response.status_code == 200, response.text
    assert nothing_stored(exposed_relay, "telegram", user)
    assert "eight days" not in exposed_relay.log_path.read_text()
    assert old.message_id in exposed_relay.log_path.read_text()
    fresh = exposed_relay.webhook("telegram", user, "in time", now=time.time() - 3600)
    assert exposed_relay.deliver(fresh).status_code == 200
    assert bot_saw(exposed_relay, "telegram", user) == ["in time"]
