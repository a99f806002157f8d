"""relay/cards.py on plain activities: what each card element shows on a phone, and what each answer the
user can give sends to the bot (no server: rendering and matching are pure functions)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.activities import build_inbound_activity
from relay.cards import (
    NOT_SHOWN,
    PART_NOT_SHOWN,
    PENDING_LIMIT_BYTES,
    PendingQuestion,
    Rendering,
    answer,
    next_prompt,
    render_activity,
)
from relay.channels.base import InboundMessage

ADAPTIVE = "application/vnd.microsoft.card.adaptive"
SIZES = {"type": "Input.ChoiceSet", "id": "size", "label": "Which size?", "isRequired": True,
         "choices": [{"title": "Small", "value": "S"}, {"title": "Medium", "value": "M"},
                     {"title": "Large", "value": "L"}]}
COMMENT = {"type": "Input.Text", "id": "comment", "label": "Anything else?", "isRequired": True}
SUBMIT = {"type": "Action.Submit", "title": "Send", "data": {"action": "order"}}


def card(*body: dict, actions: list[dict] | None = None, **content: Any) -> dict:
    return {"type": "message", "id": "act-1", "attachments": [{"contentType": ADAPTIVE, "content": {
        "type": "AdaptiveCard", "version": "1.5", "body": list(body), "actions": actions or [], **content}}]}


def rendered(activity: dict) -> Rendering:
    result = render_activity(activity)
    assert result is not None
    return result


def said(text: str = "", *, reply_id: str | None = None, message_id: str = "m1") -> dict:
    """The inbound activity of a user's message, as the webhook stored it."""
    return build_inbound_activity(InboundMessage(message_id, "15550001", text, reply_id=reply_id), channel="whatsapp",
                                  user_id="dl_whatsapp_user")


def question_of(activity: dict) -> PendingQuestion:
    question = rendered(activity).question
    assert question is not None
    return question


# ------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize(("element", "text"), [
    ({"type": "TextBlock", "text": "Hello **there**"}, "Hello **there**"),
    ({"type": "RichTextBlock", "inlines": ["See ", {"type": "TextRun", "text": "the docs", "selectAction": {
        "type": "Action.OpenUrl", "url": "https://docs.example/a"}}]}, "See the docs (https://docs.example/a)"),
    ({"type": "FactSet", "facts": [{"title": "Order", "value": "42"}, {"title": "Status", "value": "sent"}]},
     "Order: 42\nStatus: sent"),
    ({"type": "Container", "items": [{"type": "TextBlock", "text": "inside"}]}, "inside"),
    ({"type": "ColumnSet", "columns": [{"type": "Column", "items": [{"type": "TextBlock", "text": "left"}]},
                                       {"type": "Column", "items": [{"type": "TextBlock", "text": "right"}]}]},
     "left\nright"),
    ({"type": "ActionSet", "actions": [{"type": "Action.OpenUrl", "title": "Track", "url": "https://t.example/1"}]},
     "Track: https://t.example/1"),
    ({"type": "TextBlock", "text": "hidden", "isVisible": False}, NOT_SHOWN),
    ({"type": "Carousel", "fallback": {"type": "TextBlock", "text": "instead"}}, "instead"),
], ids=["TextBlock", "RichTextBlock", "FactSet", "Container", "ColumnSet", "ActionSet", "hidden", "fallback"])
def test_each_card_element_shows_as_text(element, text):
    assert rendered(card(element)).message.text == text


def test_images_go_as_media_and_links_as_visible_urls():
    message = rendered(card({"type": "Image", "url": "https://img.example/a.png", "altText": "A"},
                            {"type": "ImageSet", "images": [{"type": "Image", "url": "https://img.example/b.jpg"}]},
                            actions=[{"type": "Action.OpenUrl", "title": "Open", "url": "https://x.example"}])).message
    assert [(m.url, m.content_type) for m in message.media] == [("https://img.example/a.png", "image/png"),
                                                                 ("https://img.example/b.jpg", "image/jpeg")]
    assert message.text == "Open: https://x.example"


def test_a_data_uri_image_cannot_go_as_media_and_shows_its_alt_text():
    message = rendered(card({"type": "Image", "url": "data:image/png;base64,AAAA", "altText": "Logo"})).message
    assert (message.media, message.text) == ((), "[Logo]")


@pytest.mark.parametrize(("content", "shown"), [
    ({"fallbackText": "Your order, in words"}, "Your order, in words"),
    ({}, NOT_SHOWN),
], ids=["its fallbackText", "a plain statement"])
def test_a_card_with_nothing_this_channel_can_show_sends(content, shown):
    activity = card({"type": "Carousel", "pages": []}, **content)
    assert rendered(activity).message.text == shown


@pytest.mark.parametrize(("content", "note"), [({"fallbackText": "Summary"}, "Summary"), ({}, PART_NOT_SHOWN)])
def test_a_card_with_a_part_it_cannot_show_says_so_after_what_it_can(content, note):
    activity = card({"type": "TextBlock", "text": "Shown"}, {"type": "Carousel"}, **content)
    assert rendered(activity).message.text == f"Shown\n{note}"


def test_an_unknown_attachment_is_never_dropped_in_silence():
    activity = {"type": "message", "attachments": [{"contentType": "application/vnd.contoso.widget", "content": {}}]}
    assert rendered(activity).message.text == NOT_SHOWN


def test_a_file_the_user_could_not_open_is_named_instead():
    activity = {"type": "message", "attachments": [{"contentType": "application/pdf", "name": "invoice.pdf",
                                                    "contentUrl": "data:application/pdf;base64,AAAA"}]}
    assert rendered(activity).message.text == "[invoice.pdf was sent here that this channel cannot show.]"


def test_nothing_is_delivered_for_typing_or_an_empty_message():
    assert render_activity({"type": "typing"}) is None
    assert render_activity({"type": "message", "text": "  "}) is None


def test_hero_and_thumbnail_cards_show_text_images_links_and_offer_their_buttons():
    activity = {"type": "message", "id": "a", "attachments": [
        {"contentType": "application/vnd.microsoft.card.hero", "content": {
            "title": "Shirt", "subtitle": "Blue", "text": "Cotton", "images": [{"url": "https://i.example/s.png"}],
            "buttons": [{"type": "imBack", "title": "Buy", "value": "buy shirt"},
                        {"type": "openUrl", "title": "Details", "value": "https://shop.example/s"}]}},
        {"contentType": "application/vnd.microsoft.card.thumbnail", "content": {
            "title": "Hat", "buttons": [{"type": "postBack", "title": "Buy hat", "value": "buy hat"}]}}]}
    result = rendered(activity)
    assert result.message.text == "Shirt\nBlue\nCotton\nDetails: https://shop.example/s\n\nHat"
    assert [m.url for m in result.message.media] == ["https://i.example/s.png"]
    assert [c.title for c in result.message.choices] == ["Buy", "Buy hat"]


def test_a_card_asks_its_first_input_in_the_message_itself():
    result = rendered(card({"type": "TextBlock", "text": "Your order"}, SIZES, COMMENT, actions=[SUBMIT]))
    assert result.message.text == "Your order\nWhich size?"
    assert [c.title for c in result.message.choices] == ["Small", "Medium", "Large"]
    assert len({c.id for c in result.message.choices}) == 3


def test_inputs_nothing_can_submit_are_not_asked():
    result = rendered(card({"type": "TextBlock", "text": "Read only"}, COMMENT))
    assert (result.question, result.message.text) == (None, f"Read only\n{PART_NOT_SHOWN}")


def test_a_question_too_large_to_remember_is_still_shown():
    many = {**SIZES, "choices": [{"title": f"Choice {n} " + "x" * 200, "value": str(n)} for n in range(100)]}
    assert len(json.dumps(many)) > PENDING_LIMIT_BYTES
    result = rendered(card(many, actions=[SUBMIT]))
    assert result.question is None and len(result.message.choices) == 100


# -------------------------------------------------------------------------------------------- answers


def choose(activity: dict, *messages: dict) -> tuple[dict | None, PendingQuestion | None]:
    """The user's messages answered in turn: what the last one posts and what is left of the question."""
    question: PendingQuestion | None = question_of(activity)
    posted = None
    for message in messages:
        result = answer(question, message, message_id=message["channelData"]["clientActivityID"])
        posted, question = result.activity, result.question
    return posted, question


@pytest.mark.parametrize("how", ["number", "title", "reply id"])
def test_a_choice_answered_by_number_title_or_button_reaches_the_bot_as_the_cards_value(how):
    activity = card(SIZES, actions=[SUBMIT])
    large = question_of(activity).choices()[2]
    message = {"number": said("3"), "title": said("  large "), "reply id": said("Large", reply_id=large.id)}[how]
    posted, left = choose(activity, message)
    assert posted is not None and left is None
    assert posted["value"] == {"action": "order", "size": "L"}
    assert "text" not in posted and posted["channelData"]["clientActivityID"] == "whatsapp:m1"


def test_a_card_with_a_choice_and_a_text_input_asks_both_then_posts_one_value():
    activity = card(SIZES, COMMENT, actions=[SUBMIT])
    posted, left = choose(activity, said("2", message_id="m1"))
    assert posted is None and left is not None and left.prompt_due
    prompt = next_prompt(left)
    assert prompt.text.startswith("Anything else?") and prompt.choices == ()
    posted, left = choose(activity, said("2", message_id="m1"), said("Gift wrap, please", message_id="m2"))
    assert left is None and posted is not None
    assert posted["value"] == {"action": "order", "size": "M", "comment": "Gift wrap, please"}


def test_a_message_already_taken_as_an_answer_is_not_taken_twice():
    activity = card(SIZES, COMMENT, actions=[SUBMIT])
    first = said("2", message_id="m1")
    _, left = choose(activity, first)
    again = answer(left, first, message_id="whatsapp:m1")
    assert (again.activity, again.question) == (None, left)


def test_a_message_that_matches_no_choice_goes_as_text_and_the_question_is_forgotten():
    posted, left = choose(card(SIZES, actions=[SUBMIT]), said("what sizes are there?"))
    assert left is None and posted is not None
    assert posted["text"] == "what sizes are there?" and "value" not in posted


def test_a_stale_button_of_an_older_question_is_not_taken_for_the_current_one():
    posted, left = choose(card(SIZES, actions=[SUBMIT]), said("Large", reply_id="0000dead-0-3"))
    assert left is None and posted is not None and "value" not in posted  # posted as text, not as a choice


def test_several_submit_buttons_are_the_choice_and_each_posts_its_own_data():
    activity = card({"type": "TextBlock", "text": "Confirm?"}, actions=[
        {"type": "Action.Submit", "title": "Yes", "data": {"confirm": True}},
        {"type": "Action.Execute", "title": "No", "verb": "cancel", "data": {"confirm": False}}])
    assert [c.title for c in rendered(activity).message.choices] == ["Yes", "No"]
    posted, _ = choose(activity, said("no"))
    assert posted is not None and posted["value"] == {"confirm": False}


def test_a_submit_with_string_data_posts_it_as_text_as_web_chat_does():
    posted, _ = choose(card(actions=[{"type": "Action.Submit", "title": "Help", "data": "help"}]), said("1"))
    assert posted is not None and (posted["text"], posted.get("value")) == ("help", None)


@pytest.mark.parametrize(("action", "typed", "text", "value"), [
    ({"type": "imBack", "title": "Yes please", "value": "yes"}, "yes please", "yes", None),
    ({"type": "postBack", "title": "Order", "value": "order"}, "1", "order", "order"),
    ({"type": "postBack", "title": "Order", "value": {"id": 7}}, "order", None, {"id": 7}),
    ({"type": "messageBack", "title": "Go", "text": "go", "value": {"step": 2}}, "Go", "go", {"step": 2}),
])
def test_a_suggested_action_posts_what_web_chat_posts(action, typed, text, value):
    activity = {"type": "message", "id": "s", "text": "Ready?", "suggestedActions": {"actions": [action]}}
    posted, left = choose(activity, said(typed))
    assert left is None and posted is not None
    assert (posted.get("text"), posted.get("value")) == (text, value)


NUMBER = {"type": "Input.Number", "id": "guests", "label": "How many guests?", "min": 1, "max": 8,
          "isRequired": True}


def test_a_number_out_of_range_is_asked_again_once_then_passed_on_as_text():
    activity = card(NUMBER, actions=[SUBMIT])
    _, left = choose(activity, said("12"))
    assert left is not None and left.prompt_due and "out of range" in next_prompt(left).text
    posted, left = choose(activity, said("12"), said("twelve", message_id="m2"))
    assert left is None and posted is not None and posted["text"] == "twelve" and "value" not in posted


@pytest.mark.parametrize(("element", "typed", "value"), [
    (NUMBER, "3", "3"),
    (NUMBER, "2,5", "2.5"),
    ({"type": "Input.Date", "id": "day", "isRequired": True}, "2026-12-24", "2026-12-24"),
    ({"type": "Input.Toggle", "id": "news", "title": "Newsletter?", "valueOn": "subscribe", "valueOff": "no thanks",
      "isRequired": True}, "Yes", "subscribe"),
    ({"type": "Input.Toggle", "id": "news", "title": "Newsletter?", "isRequired": True}, "no", "false"),
    ({"type": "Input.Text", "id": "note"}, "-", ""),  # optional: skipped
    ({**SIZES, "isMultiSelect": True}, "1, 3", "S,L"),
])
def test_a_typed_answer_is_checked_and_sent_as_the_inputs_value(element, typed, value):
    posted, left = choose(card(element, actions=[SUBMIT]), said(typed))
    assert left is None and posted is not None
    assert posted["value"] == {"action": "order", element["id"]: value}


@pytest.mark.parametrize(("element", "typed"), [
    ({"type": "Input.Date", "id": "day", "isRequired": True}, "24/12"),
    ({"type": "Input.Toggle", "id": "ok", "title": "Agree?", "isRequired": True}, "perhaps"),
    (NUMBER, "many"),
])
def test_a_bad_typed_answer_is_asked_again_saying_why(element, typed):
    _, left = choose(card(element, actions=[SUBMIT]), said(typed))
    assert left is not None and left.prompt_due and left.reason
    assert next_prompt(left).text.startswith(left.reason)


def test_the_stored_question_reads_back_as_it_was():
    _, left = choose(card(SIZES, NUMBER, actions=[SUBMIT]), said("1"))
    assert left is not None
    stored = json.loads(json.dumps(left.to_json()))
    assert PendingQuestion.from_json(stored) == left


def test_no_question_means_the_message_goes_as_it_is():
    message = said("hello")
    result = answer(None, message, message_id="whatsapp:m1")
    assert (result.activity, result.question) == (message, None)
