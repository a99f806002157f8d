"""Rich replies on channels that show text: a bot's cards become text, images, links and one question,
and the user's answer to that question goes back to the bot as the `value` it expects.

Promises:
- Never silence: a message activity with anything in it renders as something. A card, or a part of
  one, that cannot be shown sends the card's `fallbackText`, else a plain statement that it was not
  shown (NOT_SHOWN, PART_NOT_SHOWN).
- At most one question per activity: the first Adaptive Card with inputs or submit actions asks
  it; otherwise the hero/thumbnail cards' buttons and the suggested actions together are its
  choices. (Suggested actions beside an Adaptive Card question are not offered.)
- A card's inputs are asked one at a time (a choice, or a text answer in the next message); the
  first is asked in the message itself, the relay asks the next ones (`next_prompt`). Once all are
  answered, the bot gets one message whose `value` is the submit action's data merged with the
  inputs' values keyed by input id, every value a string (as Web Chat submits them): a choice's
  `value`, a toggle's valueOn/valueOff, a number as typed, a date as YYYY-MM-DD; an optional input
  skipped with "-" is "". A choice is answered by a WhatsApp reply id, its number, or its title (or
  value) typed back, case-insensitively. Suggested actions and card buttons post what Web Chat posts:
  imBack its value as text, postBack its value as text and value, messageBack its text and value.
  Action.Execute is answered like Action.Submit, as a message (Direct Line gives a channel user no
  invoke response); Input.Time and other inputs are not asked (the card says a part is not shown).
- A bad answer to a number, date or yes/no question is asked again once, saying why; a second bad
  answer, and any message that answers a choice with nothing it offers, reaches the bot as the
  plain text it is, and the question is forgotten.
- The question is plain JSON (`PendingQuestion.to_json`) of at most PENDING_LIMIT_BYTES: a larger
  one is not remembered (its answers reach the bot as plain text). `answer` is a pure function of
  the stored question and the user's message: retried after a failed post, it decides the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from typing import Any

from relay.channels.base import Choice, Media, OutboundMessage

__all__ = [
    "NOT_SHOWN",
    "PART_NOT_SHOWN",
    "PENDING_LIMIT_BYTES",
    "REPLY_ID_KEY",
    "Answer",
    "PendingQuestion",
    "Rendering",
    "StepKind",
    "answer",
    "next_prompt",
    "render_activity",
]

log = logging.getLogger(__name__)

NOT_SHOWN = "[A card was sent here that this channel cannot show.]"
PART_NOT_SHOWN = "[Part of this card cannot be shown here.]"
PENDING_LIMIT_BYTES = 16 * 1024
"""Most a remembered question may take in the conversation record (as JSON)."""
REPLY_ID_KEY = "replyId"
"""Key under channelData.relay of an inbound activity: the id of the button or list row the user chose."""
ASK_AGAIN = 1
"""Times a bad answer to a number, date or yes/no question is asked again before it goes to the bot as text."""
SKIP = "-"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,3})?")

ADAPTIVE = "application/vnd.microsoft.card.adaptive"
BUTTON_CARDS = ("application/vnd.microsoft.card.hero", "application/vnd.microsoft.card.thumbnail",
                "application/vnd.microsoft.card.signin", "application/vnd.microsoft.card.oauth")
MEDIA_CARDS = ("application/vnd.microsoft.card.audio", "application/vnd.microsoft.card.video",
               "application/vnd.microsoft.card.animation")
RECEIPT = "application/vnd.microsoft.card.receipt"
SUBMIT_ACTIONS = ("Action.Submit", "Action.Execute")
CHOICE_ACTIONS = ("imBack", "postBack", "messageBack")
LINK_ACTIONS = ("openUrl", "signin", "downloadFile", "playAudio", "playVideo", "showImage")
TRUE_WORDS = ("yes", "y", "true", "on", "ok")
FALSE_WORDS = ("no", "n", "false", "off")


class StepKind(StrEnum):
    """What one step of a question asks for (stored as the value)."""

    CHOICE = "choice"
    TEXT = "text"
    NUMBER = "number"
    DATE = "date"
    TOGGLE = "toggle"


@dataclass(frozen=True)
class _Option:
    title: str
    value: str = ""
    """What a card's choice puts under its input id."""
    answer: Mapping[str, Any] | None = None
    """What choosing it posts, ending the question ({"text"?, "value"?}); None for an input's choice."""


@dataclass(frozen=True)
class _Step:
    kind: StepKind
    prompt: str
    input_id: str = ""
    options: tuple[_Option, ...] = ()
    multiple: bool = False
    optional: bool = False
    low: str = ""
    high: str = ""
    on: str = "true"
    off: str = "false"


@dataclass(frozen=True)
class PendingQuestion:
    """The question the user was last asked, and how far they got: stored on the conversation record."""

    id: str
    steps: tuple[_Step, ...]
    data: Any = None
    """The submit action's data, merged with the inputs' values once the last step is answered."""
    step: int = 0
    collected: Mapping[str, str] = field(default_factory=dict)
    consumed: tuple[str, ...] = ()
    """Provider message ids that answered a step without reaching the bot (a retry recognises them)."""
    prompt_due: bool = False
    """The current step's prompt is still to be sent to the user (a later step, or a bad answer asked again)."""
    retries: int = 0
    reason: str = ""

    @property
    def current(self) -> _Step:
        return self.steps[self.step]

    def choices(self) -> tuple[Choice, ...]:
        """The current step's options as the channel offers them (ids come back in WhatsApp replies)."""
        return tuple(Choice(f"{self.id}-{self.step}-{n}", o.title)
                     for n, o in enumerate(self.current.options, start=1))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "data": self.data, "step": self.step, "collected": dict(self.collected),
                "consumed": list(self.consumed), "prompt_due": self.prompt_due, "retries": self.retries,
                "reason": self.reason, "steps": [_step_json(s) for s in self.steps]}

    @classmethod
    def from_json(cls, stored: Mapping[str, Any] | None) -> PendingQuestion | None:
        """The stored question, or None when there is none (or it is not one this code can read)."""
        if not stored:
            return None
        try:
            steps = tuple(_Step(kind=StepKind(s["kind"]), prompt=str(s["prompt"]), input_id=str(s.get("input", "")),
                                options=tuple(_Option(str(o["title"]), str(o.get("value", "")), o.get("answer"))
                                              for o in s.get("options", [])),
                                multiple=bool(s.get("multiple")), optional=bool(s.get("optional")),
                                low=str(s.get("low", "")), high=str(s.get("high", "")),
                                on=str(s.get("on", "true")), off=str(s.get("off", "false")))
                          for s in stored["steps"])
            question = cls(id=str(stored["id"]), steps=steps, data=stored.get("data"), step=int(stored["step"]),
                           collected=dict(stored.get("collected") or {}), consumed=tuple(stored.get("consumed") or ()),
                           prompt_due=bool(stored.get("prompt_due")), retries=int(stored.get("retries") or 0),
                           reason=str(stored.get("reason") or ""))
        except (KeyError, TypeError, ValueError):
            log.warning("a stored question could not be read; the user's next message goes to the bot as text")
            return None
        return question if 0 <= question.step < len(question.steps) else None


def _step_json(step: _Step) -> dict[str, Any]:
    stored: dict[str, Any] = {"kind": step.kind.value, "prompt": step.prompt}
    if step.input_id:
        stored["input"] = step.input_id
    if step.options:
        stored["options"] = [{"title": o.title, **({"value": o.value} if o.answer is None else {"answer": o.answer})}
                             for o in step.options]
    for name, value, default in (("multiple", step.multiple, False), ("optional", step.optional, False),
                                 ("low", step.low, ""), ("high", step.high, ""), ("on", step.on, "true"),
                                 ("off", step.off, "false")):
        if value != default:
            stored[name] = value
    return stored


@dataclass(frozen=True)
class Rendering:
    """One bot activity for a channel: the message to send, and the question to remember once it is sent."""

    message: OutboundMessage
    question: PendingQuestion | None = None


@dataclass(frozen=True)
class Answer:
    """What one user message does to the pending question.

    `activity`: what to post to the bot (None: the message answered a step, or is asked again, and goes
    nowhere); `question`: what to remember afterwards (None: nothing)."""

    activity: dict[str, Any] | None
    question: PendingQuestion | None


# ------------------------------------------------------------------------------------- rendering


class _Card:
    """What the walk over one card found."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.media: list[Media] = []
        self.steps: list[_Step] = []
        self.submits: list[dict[str, Any]] = []
        self.left_out = False

    def text(self, value: Any) -> None:
        if isinstance(value, str) and value.strip():
            self.lines.append(value.strip())

    def link(self, title: Any, url: Any) -> None:
        if isinstance(url, str) and url:
            self.lines.append(f"{title}: {url}" if isinstance(title, str) and title and title != url else url)

    def image(self, url: Any, alt: Any = None) -> None:
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            self.media.append(Media(url=url, content_type=mimetypes.guess_type(url)[0] or "image/*"))
        elif isinstance(alt, str) and alt:
            self.text(f"[{alt}]")


def render_activity(activity: Mapping[str, Any]) -> Rendering | None:
    """The channel message for one bot activity and its question; None when there is nothing to deliver
    (not a message, or a message with nothing in it)."""
    if activity.get("type") != "message":
        return None
    activity_id = str(activity.get("id") or "")
    parts = [str(activity["text"])] if isinstance(activity.get("text"), str) and activity["text"].strip() else []
    media: list[Media] = []
    question: PendingQuestion | None = None
    choices: list[_Option] = []
    for attachment in _mappings(activity.get("attachments")):
        content_type = str(attachment.get("contentType") or "")
        content = attachment.get("content")
        content = content if isinstance(content, Mapping) else {}
        card = _Card()
        if content_type == ADAPTIVE:
            _adaptive(content, card)
            asked = _card_question(activity_id, card) if question is None else None
            if asked is not None:
                question = asked
                card.text(asked.current.prompt)
            elif card.submits or card.steps:
                card.left_out = True  # a second card's question (one at a time), or inputs nothing submits
        elif content_type in BUTTON_CARDS or content_type in MEDIA_CARDS:
            for key in ("title", "subtitle", "text"):
                card.text(content.get(key))
            for image in _mappings(content.get("images")):
                card.image(image.get("url"), image.get("alt"))
            for item in _mappings(content.get("media")):
                card.link(content.get("title") or "Media", item.get("url"))
            choices.extend(_buttons(content.get("buttons"), card))
        elif content_type == RECEIPT:
            _receipt(content, card)
        elif attachment.get("contentUrl"):
            url = str(attachment["contentUrl"])
            if url.startswith(("https://", "http://")):
                media.append(Media(url=url, content_type=content_type or None, name=attachment.get("name")))
            else:
                parts.append(f"[{attachment.get('name') or 'A file'} was sent here that this channel cannot show.]")
            continue
        else:
            card.left_out = True
        if not card.lines and not card.media and not card.steps and not card.submits:
            parts.append(str(content.get("fallbackText") or NOT_SHOWN))
            continue
        if card.left_out:
            card.lines.append(str(content.get("fallbackText") or PART_NOT_SHOWN))
        parts.append("\n".join(card.lines))
        media.extend(card.media)
    suggested = (activity.get("suggestedActions") or {}) if isinstance(activity.get("suggestedActions"),
                                                                       Mapping) else {}
    links = _Card()
    choices.extend(_buttons(suggested.get("actions"), links))
    parts.extend(links.lines)
    if question is None and choices:
        question = PendingQuestion(id=_question_id(activity_id), steps=(
            _Step(StepKind.CHOICE, "", options=tuple(_unique(choices))),))
    text = "\n\n".join(p for p in parts if p)
    if not text and not media and question is None:
        return None
    if question is not None and len(json.dumps(question.to_json())) > PENDING_LIMIT_BYTES:
        log.warning("a question of activity %s is too large to remember: its answer reaches the bot as text",
                    activity_id)
        return Rendering(OutboundMessage(text=text, media=tuple(media), choices=question.choices(),
                                         multiple=question.current.multiple))
    message = OutboundMessage(text=text, media=tuple(media),
                              choices=question.choices() if question else (),
                              multiple=bool(question and question.current.multiple))
    return Rendering(message, question)


def next_prompt(question: PendingQuestion) -> OutboundMessage:
    """The message asking the question's current step (a later input, or a bad answer asked again)."""
    step = question.current
    text = "\n".join(p for p in (question.reason, step.prompt or "Please answer.") if p)
    return OutboundMessage(text=text, choices=question.choices(), multiple=step.multiple,
                           idempotency_key=f"{question.id}-{question.step}-{question.retries}")


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _question_id(activity_id: str) -> str:
    return hashlib.sha256(activity_id.encode()).hexdigest()[:8]


def _unique(options: Iterable[_Option]) -> list[_Option]:
    seen, kept = set(), []
    for option in options:
        if option.title.casefold() not in seen:
            seen.add(option.title.casefold())
            kept.append(option)
    return kept


def _buttons(actions: Any, card: _Card) -> list[_Option]:
    """Bot Framework card actions (hero buttons, suggested actions): choices, and links shown as URLs."""
    options = []
    for action in _mappings(actions):
        kind, value, title = action.get("type"), action.get("value"), action.get("title")
        if kind in CHOICE_ACTIONS:
            if kind == "messageBack":
                answer = {k: action[k] for k in ("text", "value") if action.get(k) is not None}
                label = title or action.get("displayText") or action.get("text")
            elif kind == "postBack" and not isinstance(value, str):
                answer, label = ({"value": value} if value is not None else {}), title
            else:
                text = str(value) if value is not None else str(title or "")
                answer = {"text": text, **({"value": value} if kind == "postBack" else {})}
                label = title or text
            if label:
                options.append(_Option(str(label), answer=answer))
        elif kind in LINK_ACTIONS or kind == "call":
            card.link(title, value)
    return options


def _receipt(content: Mapping[str, Any], card: _Card) -> None:
    card.text(content.get("title"))
    for fact in _mappings(content.get("facts")):
        card.text(f"{fact.get('key', '')}: {fact.get('value', '')}")
    for item in _mappings(content.get("items")):
        card.text(" ".join(str(item[k]) for k in ("title", "price") if item.get(k)))
    for name in ("tax", "total"):
        if content.get(name):
            card.text(f"{name.title()}: {content[name]}")
    _buttons(content.get("buttons"), card)


# ------------------------------------------------------------------------------------ adaptive cards


def _adaptive(content: Mapping[str, Any], card: _Card) -> None:
    for element in _mappings(content.get("body")):
        _element(element, card)
    _actions(content.get("actions"), card)


def _element(element: Mapping[str, Any], card: _Card) -> None:
    """One body element: its text, images and inputs into `card`; an unknown one by its fallback, else left out."""
    if element.get("isVisible") is False:
        return
    kind = element.get("type")
    if kind == "TextBlock":
        card.text(element.get("text"))
    elif kind == "RichTextBlock":
        card.text("".join(_inline(i) for i in element.get("inlines") or []))
    elif kind == "FactSet":
        for fact in _mappings(element.get("facts")):
            card.text(f"{fact.get('title', '')}: {fact.get('value', '')}")
    elif kind == "Image":
        card.image(element.get("url"), element.get("altText"))
    elif kind == "ImageSet":
        for image in _mappings(element.get("images")):
            card.image(image.get("url"), image.get("altText"))
    elif kind in ("Container", "Column"):
        for item in _mappings(element.get("items")):
            _element(item, card)
    elif kind == "ColumnSet":
        for column in _mappings(element.get("columns")):
            _element({**column, "type": "Column"}, card)
    elif kind == "Table":
        for row in _mappings(element.get("rows")):
            for cell in _mappings(row.get("cells")):
                _element({**cell, "type": "Container"}, card)
    elif kind == "ActionSet":
        _actions(element.get("actions"), card)
    elif kind == "Media":
        for source in _mappings(element.get("sources")):
            card.link(element.get("altText") or "Media", source.get("url"))
    elif isinstance(kind, str) and kind.startswith("Input."):
        _input(element, card)
    elif isinstance(element.get("fallback"), Mapping):
        _element(element["fallback"], card)
    elif element.get("fallback") != "drop":
        card.left_out = True


def _inline(inline: Any) -> str:
    if isinstance(inline, str):
        return inline
    if not isinstance(inline, Mapping) or not isinstance(inline.get("text"), str):
        return ""
    action = inline.get("selectAction")
    if isinstance(action, Mapping) and action.get("type") == "Action.OpenUrl" and action.get("url"):
        return f"{inline['text']} ({action['url']})"
    return inline["text"]


def _actions(actions: Any, card: _Card) -> None:
    for action in _mappings(actions):
        kind = action.get("type")
        if kind == "Action.OpenUrl":
            card.link(action.get("title"), action.get("url"))
        elif kind in SUBMIT_ACTIONS:
            card.submits.append(dict(action))
        elif kind == "Action.ShowCard" and isinstance(action.get("card"), Mapping):
            card.text(action.get("title"))
            _adaptive(action["card"], card)
        elif kind != "Action.ToggleVisibility":
            card.left_out = True


def _input(element: Mapping[str, Any], card: _Card) -> None:
    kind, input_id = element.get("type"), element.get("id")
    if not isinstance(input_id, str) or not input_id:
        card.left_out = True
        return
    label = next((str(element[k]) for k in ("label", "placeholder") if isinstance(element.get(k), str)
                  and element[k].strip()), "")
    optional = not element.get("isRequired")
    skip = f' (or "{SKIP}" to skip)' if optional else ""
    if kind == "Input.ChoiceSet":
        options = tuple(_Option(str(c.get("title") or c.get("value")), str(c.get("value", "")))
                        for c in _mappings(element.get("choices")) if c.get("title") or c.get("value"))
        if not options:
            card.left_out = True
            return
        multiple = bool(element.get("isMultiSelect"))
        card.steps.append(_Step(StepKind.CHOICE, label, input_id, options, multiple=multiple, optional=optional))
    elif kind == "Input.Text":
        card.steps.append(_Step(StepKind.TEXT, f"{label or 'Your answer?'}\nReply with your answer{skip}.",
                                input_id, optional=optional))
    elif kind == "Input.Number":
        low, high = (_number_text(element.get(k)) for k in ("min", "max"))
        bounds = f" from {low} to {high}" if low and high else f" of at least {low}" if low else \
            f" of at most {high}" if high else ""
        card.steps.append(_Step(StepKind.NUMBER, f"{label or 'A number?'}\nReply with a number{bounds}{skip}.",
                                input_id, optional=optional, low=low, high=high))
    elif kind == "Input.Date":
        low, high = (str(element.get(k) or "") for k in ("min", "max"))
        card.steps.append(_Step(StepKind.DATE, f"{label or 'A date?'}\nReply with a date as YYYY-MM-DD{skip}.",
                                input_id, optional=optional, low=low, high=high))
    elif kind == "Input.Toggle":
        title = str(element.get("title") or label or "Yes or no?")
        card.steps.append(_Step(StepKind.TOGGLE, f"{title}\nReply with yes or no{skip}.", input_id,
                                optional=optional, on=str(element.get("valueOn", "true")),
                                off=str(element.get("valueOff", "false"))))
    else:
        card.left_out = True  # Input.Time and the like: not asked


def _number_text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f"{value:g}"


def _card_question(activity_id: str, card: _Card) -> PendingQuestion | None:
    """The card's question: its inputs in order, then a choice among its submit actions when it has several;
    None when nothing could send its inputs (no submit action)."""
    if not card.submits:
        return None
    steps = list(card.steps)
    data: Any = None
    if len(card.submits) == 1 and steps:
        data = card.submits[0].get("data")
    else:
        steps.append(_Step(StepKind.CHOICE, "", options=tuple(
            _Option(str(s.get("title") or f"Option {n}"), answer={"submit": s.get("data")})
            for n, s in enumerate(card.submits, start=1))))
    return PendingQuestion(id=_question_id(activity_id), steps=tuple(steps), data=data)


# -------------------------------------------------------------------------------------------- answers


def answer(question: PendingQuestion | None, activity: Mapping[str, Any], *, message_id: str) -> Answer:
    """What a user's message (its inbound `activity`) answers of the pending `question`.

    Pure: the same question and message give the same Answer, so a post retried later decides alike."""
    if question is None:
        return Answer(dict(activity), None)
    if message_id in question.consumed:
        return Answer(None, question)  # already taken as a step's answer (a retry after a crash)
    text = str(activity.get("text") or "").strip()
    reply_id = str(((activity.get("channelData") or {}).get("relay") or {}).get(REPLY_ID_KEY) or "")
    step = question.current
    if step.kind == StepKind.CHOICE:
        chosen = _chosen(question, text, reply_id)
        if chosen is None:
            return Answer(dict(activity), None)
        if len(chosen) == 1 and chosen[0].answer is not None:
            return Answer(_answered(activity, question, chosen[0].answer), None)
        return _advance(question, activity, message_id, ",".join(o.value for o in chosen))
    value, problem = _typed(step, text)
    if problem is None:
        return _advance(question, activity, message_id, value)
    if question.retries >= ASK_AGAIN or not text:
        return Answer(dict(activity), None)
    return Answer(None, replace(question, consumed=(*question.consumed, message_id), prompt_due=True,
                                retries=question.retries + 1, reason=problem))


def _chosen(question: PendingQuestion, text: str, reply_id: str) -> list[_Option] | None:
    """The options a message picks (empty: an optional choice skipped); None when it picks none."""
    step, choices = question.current, question.choices()
    if reply_id:  # a tap on a button or row: this question's, or an older one's (then it picks nothing here)
        index = next((n for n, c in enumerate(choices) if c.id == reply_id), None)
        return None if index is None else [step.options[index]]
    if step.optional and text == SKIP:
        return []
    picked = _pick(step, text)
    if picked is not None:
        return [picked]
    if step.multiple:
        pieces = [p.strip() for p in re.split(r"[,;]" if re.search(r"[,;]", text) else r"\s+", text) if p.strip()]
        picked_all = [_pick(step, p) for p in pieces]
        chosen = [c for c in picked_all if c is not None]
        if chosen and len(chosen) == len(picked_all):
            return [o for o in step.options if any(c is o for c in chosen)]  # each once, in the card's order
    return None


def _pick(step: _Step, text: str) -> _Option | None:
    wanted = text.strip().rstrip(".").casefold()
    if wanted.isdigit() and 1 <= int(wanted) <= len(step.options):
        return step.options[int(wanted) - 1]
    for option in step.options:
        if wanted and wanted in (option.title.casefold(), option.value.casefold(),
                                 str((option.answer or {}).get("text", "")).casefold()):
            return option
    return None


def _typed(step: _Step, text: str) -> tuple[str, str | None]:
    """(the input's value, None) for a good answer to a text-like step, else ("", why it is not one)."""
    if step.optional and text == SKIP:
        return "", None
    if not text:
        return "", "That was not an answer."
    if step.kind == StepKind.TEXT:
        return text, None
    if step.kind == StepKind.TOGGLE:
        word = text.casefold().rstrip(".!")
        if word in TRUE_WORDS or word == step.on.casefold():
            return step.on, None
        if word in FALSE_WORDS or word == step.off.casefold():
            return step.off, None
        return "", "Please answer yes or no."
    if step.kind == StepKind.NUMBER:
        typed = text.replace(",", ".") if text.count(",") == 1 and "." not in text else text
        if not _NUMBER.fullmatch(typed):
            return "", "That is not a number."
        if (step.low and float(typed) < float(step.low)) or (step.high and float(typed) > float(step.high)):
            return "", "That number is out of range."
        return typed, None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        return "", "That is not a date as YYYY-MM-DD."
    if (step.low and day.isoformat() < step.low[:10]) or (step.high and day.isoformat() > step.high[:10]):
        return "", "That date is out of range."
    return day.isoformat(), None


def _advance(question: PendingQuestion, activity: Mapping[str, Any], message_id: str, value: str) -> Answer:
    """The current step answered with `value`: the next step asked, or the card submitted after the last."""
    step = question.current
    collected = {**question.collected, **({step.input_id: value} if step.input_id else {})}
    if question.step + 1 < len(question.steps):
        return Answer(None, replace(question, step=question.step + 1, collected=collected,
                                    consumed=(*question.consumed, message_id), prompt_due=True, retries=0,
                                    reason=""))
    return Answer(_answered(activity, replace(question, collected=collected), {"submit": question.data}), None)


def _answered(activity: Mapping[str, Any], question: PendingQuestion, chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The user's activity carrying what the bot expects instead of what the user typed."""
    posted = {k: v for k, v in activity.items() if k not in ("text", "value")}
    if "submit" in chosen:  # an Adaptive Card's submit: its data merged with the inputs, as Web Chat sends it
        data = chosen["submit"]
        if isinstance(data, str) and not question.collected:
            posted["text"] = data
        else:
            posted["value"] = {**(data if isinstance(data, Mapping) else {}), **question.collected}
        return posted
    if chosen.get("text") is not None:
        posted["text"] = str(chosen["text"])
    if chosen.get("value") is not None:
        posted["value"] = chosen["value"]
    return posted
