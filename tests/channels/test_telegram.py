"""The Telegram channel against the running simulator: its updates verified by the secret token and parsed,
photos fetched through getFile, replies in parse_mode HTML with inline keyboards, a tap answered, the Bot
API's errors, and the webhook registered by `python -m relay.channels.telegram_webhook set-webhook`."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
import requests

from devstack.channels import DEV_VALUES
from relay.channels import telegram, telegram_webhook
from relay.channels.base import Choice, Media, OutboundMessage, WebhookRequest
from relay.errors import BadPayload, ProviderRejected, ProviderUnavailable, SignatureInvalid
from relay.formatting import ChannelKind, format_for
from tests.channels.conftest import make_adapter

TOKEN = DEV_VALUES["TELEGRAM_BOT_TOKEN"]
SECRET = DEV_VALUES["TELEGRAM_WEBHOOK_SECRET"]
USER = "5550100001"
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5Er"
                       "kJggg==")
NOW = int(time.time())


def adapter_for(sim, **values: str) -> telegram.TelegramAdapter:
    return make_adapter("telegram", {**sim.api_bases(), **values})


def update(body: dict, secret: str | None = SECRET) -> WebhookRequest:
    headers = {"Content-Type": "application/json", **({telegram.WEBHOOK_HEADER: secret} if secret is not None else {})}
    return WebhookRequest("POST", "https://relay.example.net/api/channels/telegram", headers,
                          json.dumps(body).encode())


@pytest.fixture
def relay_of(sim, fake_relay, monkeypatch):
    """The fake relay, its Telegram adapter configured like the test's: files are this simulator's."""
    monkeypatch.setitem(fake_relay.values, "TELEGRAM_API_BASE", sim.url)
    return fake_relay


def received(fake_relay, message_id: str):
    [messages] = [parsed for provider, _, parsed in fake_relay.received if provider == "telegram"
                  and [m.message_id for m in parsed] == [message_id]]
    return messages[0]


# -- in -----------------------------------------------------------------------------------------------


def test_a_users_message_passes_the_secret_token_and_keys_the_conversation_by_the_user(sim, fake_relay):
    answer = sim.send_inbound("telegram", USER, "Grüß Gott 👋", name="Anna Maria")
    assert answer["status"] == 200, answer
    message = received(fake_relay, answer["message_id"])
    assert (message.user_id, message.text, message.user_name, message.locale) == (USER, "Grüß Gott 👋",
                                                                                  "Anna Maria", "en")
    assert dict(message.reply_context) == {"chat_id": USER}


@pytest.mark.parametrize("given", [None, "", SECRET.upper(), SECRET + "x"])
def test_an_update_without_the_secret_token_is_refused(given):
    with pytest.raises(SignatureInvalid) as caught:
        make_adapter("telegram").verify(update({"update_id": 1}, given))
    assert SECRET not in str(caught.value)


def test_a_photo_is_its_largest_size_fetched_through_getfile_without_the_token_in_any_url(sim, relay_of):
    answer = sim.send_inbound("telegram", USER, "look", media=[
        {"url": "data:image/png;base64," + base64.b64encode(PNG).decode(), "contentType": "image/png"}])
    message = received(relay_of, answer["message_id"])
    [media] = message.media
    assert media.protected and TOKEN not in media.url and message.text == "look"
    sizes = message.raw["message"]["photo"]
    assert media.url.endswith(sizes[-1]["file_id"])  # the 1280 px one, not the thumbnails
    fetched = adapter_for(sim).fetch_media(media, max_bytes=1_000_000)
    assert (fetched.content, fetched.content_type) == (PNG, "image/jpeg")  # Telegram re-encodes photos as JPEG
    with pytest.raises(ProviderRejected, match="over the 10") as caught:
        adapter_for(sim).fetch_media(media, max_bytes=10)
    assert caught.value.reason == "MediaTooLarge"


def test_a_document_keeps_its_name_and_type(sim, relay_of):
    answer = sim.send_inbound("telegram", USER, "", media=[{"url": "data:application/pdf;base64,JVBERi0=",
                                                            "contentType": "application/pdf"}])
    [media] = received(relay_of, answer["message_id"]).media
    fetched = adapter_for(sim).fetch_media(media, max_bytes=1000)
    assert (fetched.content, fetched.content_type, fetched.name) == (b"%PDF-", "application/pdf", "file.pdf")


def test_a_file_of_another_bot_or_place_is_not_fetched(sim):
    for url in ("https://evil.example/getFile?file_id=x", f"{sim.url}/getFile?file_id=",
                f"{sim.url}/getFile?file_id=unknown"):
        with pytest.raises(ProviderRejected):
            adapter_for(sim).fetch_media(Media(url, protected=True), max_bytes=1000)


@pytest.mark.parametrize("chat", [{"id": -100123, "type": "supergroup", "title": "Team"},
                                  {"id": -4123, "type": "group", "title": "Family"},
                                  {"id": -100456, "type": "channel", "title": "News"}])
def test_a_groups_messages_and_taps_are_acknowledged_not_relayed(chat, caplog):
    """Every member of a group would see the bot's replies to one of them: only private chats are relayed."""
    said = {"update_id": 7, "message": {"message_id": 3, "date": NOW, "text": "my account number is 12345678",
                                        "from": {"id": 42, "first_name": "Ana"}, "chat": chat}}
    tapped = {"update_id": 8, "callback_query": {"id": "q7", "from": {"id": 42, "first_name": "Ana"}, "data": "x1",
                                                 "message": {"message_id": 4, "date": NOW, "chat": chat}}}
    with caplog.at_level(logging.INFO, logger="relay.channels.telegram"):
        assert make_adapter("telegram").parse(update(said)) == []
        assert make_adapter("telegram").parse(update(tapped)) == []
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "only private chats" in logged and str(chat["id"]) not in logged and "42" not in logged


def test_a_private_chats_tap_is_relayed_to_be_answered_once(sim):
    tapped = {"update_id": 9, "callback_query": {"id": "q9", "from": {"id": 42, "first_name": "Ana"}, "data": "x1",
                                                 "message": {"message_id": 4, "date": NOW,
                                                             "chat": {"id": 42, "type": "private"}}}}
    adapter = adapter_for(sim)
    [message] = adapter.parse(update(tapped))
    assert (message.user_id, message.reply_id) == ("42", "x1")
    assert dict(message.reply_context) == {"chat_id": "42", "callback_query_id": "q9"}
    assert dict(adapter.spend(message.reply_context)) == {"chat_id": "42"}  # the next reply does not answer it


@pytest.mark.parametrize("body", [
    {"update_id": 8, "edited_message": {"message_id": 1, "date": NOW, "text": "typo fixed", "chat": {"id": 1}}},
    {"update_id": 9, "message": {"message_id": 1, "date": NOW, "chat": {"id": 1, "type": "private"},
                                 "sticker": {"file_id": "s"}}},
    {"update_id": 10, "my_chat_member": {"chat": {"id": 1}}},
    {"update_id": 11, "callback_query": {"id": "q", "from": {"id": 1}, "game_short_name": "g"}},
], ids=["edit", "sticker", "member update", "game button"])
def test_updates_with_nothing_for_the_bot_are_acknowledged_not_relayed(body):
    assert make_adapter("telegram").parse(update(body)) == []


@pytest.mark.parametrize("body", [b"[]", b'{"message": {"text": "no update_id"}}', b'{"update_id": [1]}',
                                  b'{"update_id": 1, "message": {"text": "no chat"}}',
                                  b'{"update_id": 1, "message": {"chat": {"id": 1, "type": "private"}, '
                                  b'"photo": [{"width": 1}]}}',
                                  b'{"update_id": 1, "callback_query": {"data": "x"}}'])
def test_malformed_updates_are_a_bad_payload(body):
    with pytest.raises(BadPayload):
        make_adapter("telegram").parse(WebhookRequest("POST", "https://r.example", {}, body))


# -- out ----------------------------------------------------------------------------------------------


def test_the_bots_markdown_is_sent_as_html_and_shown_as_the_user_sees_it(sim):
    text = "**Open** _today_ <b>not a tag</b> & [the site](https://shop.example/?a=1&b=2)"
    ids = adapter_for(sim).send({"chat_id": USER}, OutboundMessage(text=text))
    [reply] = sim.replies("telegram", USER)
    assert reply["text"] == "Open today <b>not a tag</b> & the site (https://shop.example/?a=1&b=2)"
    assert reply["request"]["parse_mode"] == "HTML" and reply["request"]["text"].startswith("<b>Open</b> <i>today")
    assert ids == [reply["id"]]


@pytest.mark.parametrize(("markdown", "html"), [
    ("a < b && c > d", "a &lt; b &amp;&amp; c &gt; d"),
    ("```\nif a<b:\n```", "<pre>if a&lt;b:</pre>"),
    ("use `x & y`", "use <code>x &amp; y</code>"),
    ("~~gone~~ ***both***", "<s>gone</s> <b><i>both</i></b>"),
    ("**a _b** c_", "a b c"),  # crossing emphasis: tags Telegram refuses, so none
])
def test_telegram_html_escapes_everything_but_its_tags(markdown, html):
    assert format_for(ChannelKind.TELEGRAM_HTML, markdown) == html


def test_a_question_is_an_inline_keyboard_whose_buttons_carry_the_choice_ids(sim):
    choices = (Choice("c0ffee00-0-1", "Small"), Choice("c0ffee00-0-2", "A very large one, with extra cheese"))
    adapter_for(sim).send({"chat_id": USER}, OutboundMessage(text="Which size?", choices=choices))
    [reply] = sim.replies("telegram", USER)
    assert reply["text"] == "Which size?"
    assert [(c["id"], c["title"]) for c in reply["choices"]] == [(c.id, c.title) for c in choices]


@pytest.mark.parametrize("message", [
    OutboundMessage(text="Pick some", choices=(Choice("q-0-1", "Red"), Choice("q-0-2", "Blue")), multiple=True),
    OutboundMessage(text="Pick one", choices=(Choice("q" * 65, "Red"), Choice("q-0-2", "Blue"))),
], ids=["several may be chosen", "an id over 64 bytes"])
def test_choices_no_keyboard_can_carry_are_numbered_in_the_text(sim, message):
    adapter_for(sim).send({"chat_id": USER}, message)
    [reply] = sim.replies("telegram", USER)
    assert reply["choices"] == [] and "1. Red\n2. Blue" in reply["text"]


def test_media_go_first_and_long_text_is_split_as_plain_text(sim):
    words = " ".join(f"**w{n}**" for n in range(1200))  # about 9,000 characters of Markdown
    adapter_for(sim).send({"chat_id": USER}, OutboundMessage(text=words, media=(
        Media("https://cdn.example/cat.png", "image/png"), Media("https://cdn.example/menu.pdf", "application/pdf"))))
    replies = sim.replies("telegram", USER)
    assert [r["media"][0]["kind"] for r in replies[:2]] == ["image", "document"]
    assert all(len(r["text"]) <= telegram.TEXT_LIMIT and "parse_mode" not in r["request"] for r in replies[2:])
    assert " ".join(r["text"] for r in replies[2:]) == " ".join(f"w{n}" for n in range(1200))


def test_a_tap_is_answered_before_the_reply_and_only_once(sim, fake_relay):
    adapter = adapter_for(sim)
    adapter.send({"chat_id": USER}, OutboundMessage(text="Sure?", choices=(Choice("feed-0-1", "Yes"),
                                                                          Choice("feed-0-2", "No"))))
    answer = sim.send_inbound("telegram", USER, reply_id="feed-0-2")
    tap = received(fake_relay, answer["message_id"])
    assert (tap.text, tap.reply_id) == ("No", "feed-0-2")
    adapter.send(tap.reply_context, OutboundMessage(text="Fine, no."))
    adapter.send(tap.reply_context, OutboundMessage(text="Anything else?"))  # the tap is answered already
    assert sim.telegram()["answered"] == [tap.reply_context["callback_query_id"]]
    assert [r["text"] for r in sim.replies("telegram", USER)][-2:] == ["Fine, no.", "Anything else?"]


def test_flood_control_is_retried_after_the_seconds_telegram_gives_in_its_body(sim):
    sim.fail_next("telegram", 429, retry_after=7)
    with pytest.raises(ProviderUnavailable) as caught:
        adapter_for(sim).send({"chat_id": USER}, OutboundMessage(text="too fast"))
    assert caught.value.retry_after == 7


@pytest.mark.parametrize(("context", "values", "said"), [
    ({"chat_id": USER}, {"TELEGRAM_BOT_TOKEN": "100000001:another-token"}, "Unauthorized"),
    ({"chat_id": "@nobody"}, {}, "chat not found"),
    ({}, {}, "needs 'chat_id'"),
])
def test_refusals_are_permanent_and_never_show_the_token(sim, context, values, said):
    with pytest.raises(ProviderRejected, match=said) as caught:
        adapter_for(sim, **values).send(context, OutboundMessage(text="hello"))
    assert TOKEN not in str(caught.value) and "another-token" not in str(caught.value)


def test_the_bot_token_is_masked_in_urllib3s_request_lines(sim, caplog):
    with caplog.at_level(logging.DEBUG, logger="urllib3"):
        adapter_for(sim).send({"chat_id": USER}, OutboundMessage(text="quiet"))
    assert "/bot[token]/sendMessage" in caplog.text and TOKEN not in caplog.text


# -- setWebhook -----------------------------------------------------------------------------------------


def test_set_webhook_registers_the_relay_with_the_secret_and_the_updates_it_relays(sim, capsys):
    environ = {**DEV_VALUES, **sim.api_bases(), "RELAY_PUBLIC_BASE_URL": "https://relay.example.net/"}
    assert telegram_webhook.main(["set-webhook"], environ=environ) == 0
    assert sim.telegram()["webhook"] == {"url": "https://relay.example.net/api/channels/telegram",
                                         "secret_token": SECRET, "allowed_updates": ["message", "callback_query"]}
    printed = capsys.readouterr()
    assert "https://relay.example.net/api/channels/telegram" in printed.out
    assert TOKEN not in printed.out + printed.err and SECRET not in printed.out + printed.err


@pytest.mark.parametrize(("args", "values", "said"), [
    (["set-webhook"], {"RELAY_PUBLIC_BASE_URL": ""}, "RELAY_PUBLIC_BASE_URL is not set"),
    (["set-webhook", "--url", "http://relay.example.net/api/channels/telegram"], {}, "An HTTPS URL must be"),
    (["set-webhook", "--url", "https://relay.example.net:7071/api/channels/telegram"], {}, "ports 80, 88, 443"),
    (["set-webhook"], {"TELEGRAM_BOT_TOKEN": "1:wrong"}, "401"),
    (["set-webhook"], {"TELEGRAM_WEBHOOK_SECRET": "with spaces"}, "TELEGRAM_WEBHOOK_SECRET must be"),
])
def test_set_webhook_says_in_one_line_why_it_failed(sim, capsys, args, values, said):
    environ = {**DEV_VALUES, **sim.api_bases(), "RELAY_PUBLIC_BASE_URL": "https://relay.example.net", **values}
    assert telegram_webhook.main(args, environ=environ) == 1
    printed = capsys.readouterr()
    assert said in printed.err and "Traceback" not in printed.err and printed.err.count("\n") == 1
    assert TOKEN not in printed.err and SECRET not in printed.err


# -- the simulator answers as Telegram does ---------------------------------------------------------


@pytest.mark.parametrize(("method", "params", "status", "description"), [
    ("sendMessage", {"chat_id": USER, "text": "a < b", "parse_mode": "HTML"}, 400,
     "Bad Request: can't parse entities: Can't find end of the entity"),
    ("sendMessage", {"chat_id": USER, "text": "<b>open", "parse_mode": "HTML"}, 400,
     "Bad Request: can't parse entities: Can't find end tag corresponding to start tag \"b\""),
    ("sendMessage", {"chat_id": USER, "text": "<blink>x</blink>", "parse_mode": "HTML"}, 400,
     "Bad Request: can't parse entities: Unsupported start tag \"blink\""),
    ("sendMessage", {"chat_id": USER, "text": ""}, 400, "Bad Request: message text is empty"),
    ("sendMessage", {"chat_id": USER, "text": "x" * 4097}, 400, "Bad Request: message is too long"),
    ("sendMessage", {"chat_id": USER, "text": "pick", "reply_markup": {"inline_keyboard": [[
        {"text": "A", "callback_data": "a" * 65}]]}}, 400, "Bad Request: BUTTON_DATA_INVALID"),
    ("getFile", {"file_id": "nobody-sent-this"}, 400, "Bad Request: invalid file_id"),
    ("answerCallbackQuery", {"callback_query_id": "123"}, 400,
     "Bad Request: query is too old and response timeout expired or query ID is invalid"),
    ("setWebhook", {"url": "https://relay.example.net/x", "secret_token": "no spaces"}, 400,
     "Bad Request: secret token contains unallowed characters"),
    ("getMe2", {}, 404, "Not Found"),
])
def test_the_simulator_refuses_as_the_bot_api_does(sim, method, params, status, description):
    response = requests.post(f"{sim.url}/bot{TOKEN}/{method}", json=params, timeout=10)
    assert (response.status_code, response.json()) == (status, {"ok": False, "error_code": status,
                                                                "description": description})


def test_the_simulator_wants_the_bots_token_and_takes_parameters_as_a_form_too(sim):
    wrong = requests.post(f"{sim.url}/bot1:wrong/sendMessage", data={"chat_id": USER, "text": "hi"}, timeout=10)
    assert (wrong.status_code, wrong.json()) == (401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
    form = requests.post(f"{sim.url}/bot{TOKEN}/SENDMESSAGE", data={"chat_id": USER, "text": "hi"}, timeout=10)
    assert form.json()["ok"] is True and form.json()["result"]["text"] == "hi"
    sim.fail_next("telegram", 429, retry_after=3)
    throttled = requests.post(f"{sim.url}/bot{TOKEN}/sendMessage", json={"chat_id": USER, "text": "hi"}, timeout=10)
    assert throttled.status_code == 429 and "Retry-After" not in throttled.headers
    assert throttled.json()["parameters"] == {"retry_after": 3}


@pytest.mark.parametrize("path", [f"/bot{TOKEN}/", f"/bot{TOKEN}/send-message", f"/file/bot{TOKEN}/x",
                                  f"/file/bot{TOKEN}/photos/a/b.jpg"])
def test_the_simulator_answers_any_bot_path_in_telegrams_shape_and_never_repeats_the_token(sim, path):
    response = requests.get(sim.url + path, timeout=10)
    assert response.status_code == 404 and response.json() == {"ok": False, "error_code": 404,
                                                               "description": "Not Found"}
