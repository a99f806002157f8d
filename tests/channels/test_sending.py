"""Sending through each provider's API, against the running simulator: text, media, long text, questions
(WhatsApp buttons and lists, numbered text elsewhere), and provider errors (4xx permanent,
429/5xx/connection transient)."""

from __future__ import annotations

import pytest
import requests

from devstack.inprocess import Answer, InProcessTransport
from devstack.procs import free_port
from relay.channels.base import Choice, Media, OutboundMessage
from relay.channels.common import call_provider
from relay.clock import SYSTEM_CLOCK
from relay.errors import ProviderRejected, ProviderUnavailable
from tests.channels.conftest import make_adapter

CONTEXTS = {
    "twilio": ("+15550001", {"to": "+15550001", "from": "+15005550006"}),
    "whatsapp": ("15550001", {"to": "15550001", "phone_number_id": "100000000000001"}),
    "messagebird": ("conv-1", {"conversation_id": "conv-1"}),
    "bird": ("+15550002", {"channel_id": "dev-channel", "identifier_key": "phonenumber",
                           "identifier_value": "+15550002"}),
    "generic": ("u-1", {"user_id": "u-1", "reply_to_id": "m-1"}),
    "vonage": ("whatsapp:447700900001", {"channel": "whatsapp", "to": "447700900001", "from": "447700900000"}),
}
CONTEXTS["line"] = ("U" + "1" * 32, {"to": "U" + "1" * 32})
PROVIDERS = list(CONTEXTS)


def adapter_for(sim, provider: str, **values: str):
    return make_adapter(provider, {**sim.api_bases(), **values})


@pytest.mark.parametrize("provider", PROVIDERS)
def test_text_reaches_the_user(sim, provider):
    user, context = CONTEXTS[provider]
    ids = adapter_for(sim, provider).send(context, OutboundMessage(text="Grüß Gott 👋"))
    [reply] = sim.replies(provider, user)
    assert reply["text"] == "Grüß Gott 👋"
    assert ids == [reply["id"]]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_media_reaches_the_user(sim, provider):
    user, context = CONTEXTS[provider]
    media = (Media("https://cdn.example/cat.png", "image/png"),)
    adapter_for(sim, provider).send(context, OutboundMessage(text="a cat", media=media))
    replies = sim.replies(provider, user)
    assert [m["url"] for r in replies for m in r["media"]] == ["https://cdn.example/cat.png"]
    assert "a cat" in [r["text"] for r in replies]


MARKDOWN = "**Open** _today_: see [the site](https://shop.example/opening_hours)"
AS_WHATSAPP = "*Open* _today_: see the site (https://shop.example/opening_hours)"
AS_PLAIN = "Open today: see the site (https://shop.example/opening_hours)"


@pytest.mark.parametrize(("provider", "user", "context", "shown"), [
    pytest.param("whatsapp", *CONTEXTS["whatsapp"], AS_WHATSAPP, id="WhatsApp Cloud"),
    pytest.param("twilio", "whatsapp:+15550003", {"to": "whatsapp:+15550003", "from": "whatsapp:+14155238886"},
                 AS_WHATSAPP, id="Twilio WhatsApp"),
    pytest.param("twilio", *CONTEXTS["twilio"], AS_PLAIN, id="Twilio SMS"),
    pytest.param("messagebird", "conv-wa", {"conversation_id": "conv-wa", "platform": "whatsapp"}, AS_WHATSAPP,
                 id="MessageBird WhatsApp"),
    pytest.param("messagebird", "conv-sms", {"conversation_id": "conv-sms", "platform": "sms"}, AS_PLAIN,
                 id="MessageBird SMS"),
    pytest.param("bird", "+15550004", {"identifier_key": "phonenumber", "identifier_value": "+15550004",
                                        "platform": "whatsapp"}, AS_WHATSAPP, id="Bird WhatsApp"),
    pytest.param("bird", "+15550005", {"identifier_key": "phonenumber", "identifier_value": "+15550005",
                                        "platform": "sms"}, AS_PLAIN, id="Bird SMS"),
    pytest.param("generic", *CONTEXTS["generic"], AS_PLAIN, id="generic"),
    pytest.param("vonage", *CONTEXTS["vonage"], AS_WHATSAPP, id="Vonage WhatsApp"),
    pytest.param("vonage", "447700900002", {"channel": "sms", "to": "447700900002", "from": "447700900000"},
                 AS_PLAIN, id="Vonage SMS"),
])
def test_the_bots_markdown_reaches_the_user_as_their_channel_shows_it(sim, provider, user, context, shown):
    adapter_for(sim, provider).send(context, OutboundMessage(text=MARKDOWN))
    assert [r["text"] for r in sim.replies(provider, user)] == [shown]


def test_twilio_splits_long_text_at_1600_characters(sim):
    user, context = CONTEXTS["twilio"]
    words = " ".join(f"word{n}" for n in range(700))  # about 5,400 characters
    ids = adapter_for(sim, "twilio").send(context, OutboundMessage(text=words))
    replies = sim.replies("twilio", user)
    assert len(ids) == len(replies) == 4
    assert all(len(r["text"]) <= 1600 for r in replies)
    assert " ".join(r["text"] for r in replies) == words


def test_whatsapp_splits_long_text_at_4096_characters(sim):
    user, context = CONTEXTS["whatsapp"]
    text = "x" * 5000
    adapter_for(sim, "whatsapp").send(context, OutboundMessage(text=text))
    assert [len(r["text"]) for r in sim.replies("whatsapp", user)] == [4096, 904]


def choices(*titles: str) -> tuple[Choice, ...]:
    return tuple(Choice(f"q1-0-{n}", title) for n, title in enumerate(titles, start=1))


def interactive_of(reply: dict) -> dict:
    assert reply["request"]["type"] == "interactive", reply["request"]
    return reply["request"]["interactive"]


def test_whatsapp_offers_up_to_three_short_choices_as_reply_buttons_with_the_questions_ids(sim):
    user, context = CONTEXTS["whatsapp"]
    adapter_for(sim, "whatsapp").send(context, OutboundMessage(text="Pick one", choices=choices("Yes", "No")))
    [reply] = sim.replies("whatsapp", user)
    interactive = interactive_of(reply)
    assert (interactive["type"], reply["text"]) == ("button", "Pick one")
    assert [(c["id"], c["title"]) for c in reply["choices"]] == [("q1-0-1", "Yes"), ("q1-0-2", "No")]


@pytest.mark.parametrize("titles", [
    ("Small", "Medium", "Large", "Extra large"),  # more than three
    ("Twenty-two characters.", "Short"),  # too long for a button, not for a row
    tuple(f"Option {n}" for n in range(1, 11)),  # ten: the most a list holds
])
def test_whatsapp_offers_choices_that_do_not_fit_buttons_as_a_list_of_rows(sim, titles):
    user, context = CONTEXTS["whatsapp"]
    adapter_for(sim, "whatsapp").send(context, OutboundMessage(text="Pick one", choices=choices(*titles)))
    [reply] = sim.replies("whatsapp", user)
    assert interactive_of(reply)["type"] == "list"
    assert [(c["id"], c["title"]) for c in reply["choices"]] == [(c.id, c.title) for c in choices(*titles)]


def test_whatsapp_list_rows_shorten_a_long_title_and_keep_it_whole_in_the_description(sim):
    user, context = CONTEXTS["whatsapp"]
    long_title = "Deliver it to my office address instead"
    adapter_for(sim, "whatsapp").send(context, OutboundMessage(text="Where to?", choices=choices(long_title, "Home")))
    [reply] = sim.replies("whatsapp", user)
    [row, _] = reply["choices"]
    assert len(row["title"]) == 24 and long_title.startswith(row["title"].rstrip("\u2026"))
    assert row["description"] == long_title


@pytest.mark.parametrize("message", [
    OutboundMessage(text="Pick one", choices=choices(*(f"Option {n}" for n in range(1, 12)))),  # eleven
    OutboundMessage(text="Pick some", choices=choices("Red", "Blue"), multiple=True),  # a list picks one only
], ids=["eleven choices", "several at once"])
def test_whatsapp_choices_no_interactive_message_can_offer_are_numbered_in_the_text(sim, message):
    user, context = CONTEXTS["whatsapp"]
    adapter_for(sim, "whatsapp").send(context, message)
    [reply] = sim.replies("whatsapp", user)
    assert reply["request"]["type"] == "text"
    lines = reply["text"].split("\n")
    assert lines[:2] == [message.text, ""]
    assert lines[2:2 + len(message.choices)] == [f"{n}. {c.title}" for n, c in enumerate(message.choices, start=1)]
    assert lines[-1].startswith("Reply with the number")


def test_whatsapp_text_too_long_for_an_interactive_body_goes_before_the_buttons(sim):
    user, context = CONTEXTS["whatsapp"]
    text = "x" * 1500
    adapter_for(sim, "whatsapp").send(context, OutboundMessage(text=text, choices=choices("Yes", "No")))
    first, second = sim.replies("whatsapp", user)
    assert (first["request"]["type"], first["text"]) == ("text", text)
    assert interactive_of(second)["type"] == "button" and second["text"]


def test_whatsapp_images_of_a_question_go_as_media_before_the_buttons(sim):
    user, context = CONTEXTS["whatsapp"]
    picture = Media("https://cdn.example/shirt.png", "image/png")
    adapter_for(sim, "whatsapp").send(context, OutboundMessage(text="Size?", media=(picture,),
                                                               choices=choices("S", "M")))
    image, buttons = sim.replies("whatsapp", user)
    assert (image["request"]["type"], image["media"][0]["url"]) == ("image", picture.url)
    assert interactive_of(buttons)["type"] == "button"


@pytest.mark.parametrize("provider", ["twilio", "messagebird", "bird", "generic"])
def test_choices_elsewhere_are_numbered_text_saying_how_to_answer(sim, provider):
    user, context = CONTEXTS[provider]
    adapter_for(sim, provider).send(context, OutboundMessage(text="Pick", choices=choices("Small", "Large")))
    [reply] = sim.replies(provider, user)
    assert reply["text"] == "Pick\n\n1. Small\n2. Large\n\nReply with the number of your choice."


def test_generic_callbacks_also_name_the_choices_for_a_receiver_with_buttons(sim):
    adapter_for(sim, "generic").send(CONTEXTS["generic"][1], OutboundMessage(text="Pick",
                                                                             choices=choices("Red", "Blue")))
    [reply] = sim.replies("generic", "u-1")
    assert reply["actions"] == ["Red", "Blue"] and reply["request"]["replyToId"] == "m-1"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_4xx_is_permanent(sim, provider):
    sim.fail_next(provider, 400)
    with pytest.raises(ProviderRejected, match="400"):
        adapter_for(sim, provider).send(CONTEXTS[provider][1], OutboundMessage(text="hi"))
    adapter_for(sim, provider).send(CONTEXTS[provider][1], OutboundMessage(text="hi"))  # only the next one failed
    assert len(sim.replies(provider)) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_429_and_5xx_are_transient(sim, provider):
    sim.fail_next(provider, 429, retry_after=7)
    sim.fail_next(provider, 503)
    adapter = adapter_for(sim, provider)
    with pytest.raises(ProviderUnavailable) as throttled:
        adapter.send(CONTEXTS[provider][1], OutboundMessage(text="hi"))
    assert throttled.value.retry_after == 7
    with pytest.raises(ProviderUnavailable) as failed:
        adapter.send(CONTEXTS[provider][1], OutboundMessage(text="hi"))
    assert failed.value.retry_after is None
    assert sim.replies(provider) == []


@pytest.mark.parametrize(("provider", "wrong"), [
    ("twilio", {"TWILIO_AUTH_TOKEN": "wrong-token"}), ("whatsapp", {"WHATSAPP_ACCESS_TOKEN": "wrong-token"}),
    ("messagebird", {"MESSAGEBIRD_ACCESS_KEY": "wrong-key"}), ("bird", {"BIRD_ACCESS_KEY": "wrong-key"}),
    ("generic", {"GENERIC_CALLBACK_SECRET": "whsec_d3Jvbmctc2VjcmV0"}),
    ("vonage", {"VONAGE_APPLICATION_ID": "wrong-application"}),
])
def test_wrong_credentials_are_rejected_permanently_without_echoing_them(sim, provider, wrong):
    with pytest.raises(ProviderRejected, match="401") as caught:
        adapter_for(sim, provider, **wrong).send(CONTEXTS[provider][1], OutboundMessage(text="hi"))
    assert "wrong-" not in str(caught.value) and "d3Jvbmc" not in str(caught.value)
    assert sim.replies(provider) == []


def test_an_unreachable_provider_is_transient():
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ProviderUnavailable, match="unreachable"):
        make_adapter("twilio", {"TWILIO_API_BASE": nowhere}).send(CONTEXTS["twilio"][1], OutboundMessage(text="x"))


def test_a_providers_error_naming_the_recipients_number_is_kept_without_the_number():
    """The error text goes to the log and the dead letter: Twilio's 21211 names the number it refused."""
    twilio_error = (b'{"code": 21211, "message": "The \'To\' number +15559822325 is not a valid phone number.",'
                    b' "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}')
    session = requests.Session()
    session.mount("http://twilio.invalid/", InProcessTransport(lambda method, target, headers, body: Answer(
        400, {"Content-Type": "application/json"}, twilio_error)))
    with pytest.raises(ProviderRejected) as refused:
        call_provider(session, "twilio", "POST", "http://twilio.invalid/Messages.json", clock=SYSTEM_CLOCK)
    assert "15559822325" not in str(refused.value) and "[number]" in str(refused.value)
    assert "21211" in str(refused.value)  # the error code stays: it says what went wrong
