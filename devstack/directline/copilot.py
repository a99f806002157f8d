"""What the emulator's Copilot-like built-in bot (`--copilot`) says, and when.

It behaves as /work/shared/reference/copilot-studio.md describes a Copilot Studio agent over Direct
Line (sections named in brackets), so the relay can be tested against one without a tenant:

- Greeting only on request ["Conversation start and greeting"]: an `event` activity named
  `startConversation` gets GREETINGS in its `locale` (en, fr, de, es, nl; anything else English), and
  the greeting carries that locale ("en-US" without one). Starting the conversation, a
  conversationUpdate or any other event gets nothing.
- Late answers ["What the agent sends"]: every turn (a message, or the greeting event) is answered
  asynchronously: a `typing` activity first (Direct Line sends typing over the stream only), then
  the answer's messages `delay` seconds later, drawn per turn between the emulator's
  `--copilot-delay MIN MAX` (1-4 s by default; tests set it short). Turns of one conversation are
  answered in order, each after the one before it, so a greeting asked for before a message always
  comes first. The user's POST is answered at once: the replies are not in the activity set yet.
- Several messages per turn, in Markdown: any other text gets MARKDOWN_ANSWER (bold, italics, a
  list, a link, a citation `[1]` with its reference definition) and then FOLLOW_UP.
- "choice": a multiple-choice question as `suggestedActions` (imBack and postBack actions, each
  with its `value`): the next message whose text (or, without text, a string `value`) is one of the
  values (case-insensitive) gets "You chose <title>." and FOLLOW_UP; any other text gets "<text> is
  not one of the options." and the question again.
- "card": an Adaptive Card question ("Ask with adaptive card") with no fallbackText, as the agent
  sends it: an Input.ChoiceSet `size` (CARD_SIZES), an Input.Text `note` and an Action.Submit whose
  data is {"action": "order"}. The next message is checked: its `value` must be the submit data
  merged with the inputs ({"action": "order", "size": "S"|"M"|"L", "note": ...}); the answer says
  what it got ("You ordered size M (Medium) with the note: ..."), or that the value was wrong
  (CARD_WRONG_PREFIX, naming what came) and asks again.
- "agent" (even while a question waits): "Connecting you to a human agent." then an `event` named
  `handoff.initiate` ["What the agent sends": transfer to a human agent] whose `value` carries the
  context (va_* keys, as Omnichannel's context variables) and whose attachment "Transcript" carries
  the conversation's messages so far.
- "stream": a generative answer streamed ["What the agent sends"]: `typing` activities each
  carrying a `streaminfo` entity ({"type": "streaminfo", "streamType": "streaming",
  "streamSequence": n, "streamId": the first one's id, absent on the first}) and the text so far,
  then the final `message` with the whole text and {"streamType": "final", "streamId": ...}. Only
  that final message is in the activity set: the typing ones go to streams only.
- "bye": "Goodbye!" then endOfConversation.
Tokens last COPILOT_TOKEN_SECONDS (3,600 s, as seen from Copilot Studio) unless `--token-ttl` says.

`turn` is the pure part (what to say, with each step's time after the turn starts); `TurnPlayer`
plays turns on one thread, in order, each composed when it starts, once everything the turn before
it sends was sent: as the agent's dialog, a turn answers what the bot had asked by then.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CARD_SIZES",
    "CARD_WRONG_PREFIX",
    "COPILOT_TOKEN_SECONDS",
    "DEFAULT_DELAY",
    "FOLLOW_UP",
    "GOODBYE_TEXT",
    "GREETINGS",
    "HANDOFF_TEXT",
    "START_EVENT",
    "Step",
    "TurnPlayer",
    "turn",
]

COPILOT_TOKEN_SECONDS = 3600
DEFAULT_DELAY = (1.0, 4.0)
"""Seconds between the user's message and the answer, drawn per turn between these."""
START_EVENT = "startConversation"
DEFAULT_LOCALE = "en-US"
GREETINGS = {
    "en": "Hello, I'm Copilot, a virtual assistant. How can I help you today?",
    "fr": "Bonjour, je suis Copilot, un assistant virtuel. Comment puis-je vous aider ?",
    "de": "Hallo, ich bin Copilot, ein virtueller Assistent. Wie kann ich helfen?",
    "es": "Hola, soy Copilot, un asistente virtual. ¿En qué puedo ayudarte?",
    "nl": "Hallo, ik ben Copilot, een virtuele assistent. Waarmee kan ik helpen?",
}
MARKDOWN_ANSWER = (
    "**Here is what I found** about _{topic}_:\n\n"
    "- Direct Line carries the conversation\n"
    "- Replies come asynchronously\n\n"
    "Read more in [the documentation](https://learn.microsoft.com/microsoft-copilot-studio/) [1].\n\n"
    '[1]: https://learn.microsoft.com/microsoft-copilot-studio/publication-connect-bot-to-custom-application '
    '"Publish an agent to mobile or custom apps"'
)
FOLLOW_UP = "Is there anything else I can help with?"
CHOICE_QUESTION = "Which plan would you like?"
CHOICES = (("imBack", "Basic", "Basic"), ("imBack", "Standard", "Standard"), ("postBack", "Premium", "plan-premium"))
"""(action type, title, value) of the multiple-choice question's suggested actions."""
CARD_QUESTION = "Which size would you like?"
CARD_SIZES = {"S": "Small", "M": "Medium", "L": "Large"}
CARD_SUBMIT_DATA = {"action": "order"}
CARD_WRONG_PREFIX = "That answer was not valid"
HANDOFF_TEXT = "Connecting you to a human agent."
STREAM_TEXT = "Streaming answers arrive in pieces, and the final message holds the whole text."
GOODBYE_TEXT = "Goodbye!"
ADAPTIVE_CARD = "application/vnd.microsoft.card.adaptive"


@dataclass(frozen=True)
class Step:
    """One activity of a turn, `after` seconds after the turn starts (without id, sender or conversation)."""

    after: float
    activity: dict[str, Any]


def turn(activity: dict[str, Any], history: Sequence[dict[str, Any]], *, delay: float) -> list[Step]:
    """What the bot sends for the client's `activity`, `history` being the conversation's activity set before it.

    Empty when it has nothing to say (conversationUpdate, other events, typing). Replies to a message
    carry replyToId."""
    if activity.get("type") == "event":
        if activity.get("name") != START_EVENT:
            return []
        locale = activity.get("locale") or DEFAULT_LOCALE
        greeting = GREETINGS.get(locale.split("-")[0].lower(), GREETINGS["en"])
        return _timed([{"type": "message", "text": greeting, "locale": locale}], delay)
    if activity.get("type") != "message":
        return []
    reply_to = {"replyToId": activity["id"]} if activity.get("id") else {}
    if (activity.get("text") or "").strip().lower() == "stream":
        return _streamed(reply_to, delay)
    return _timed([{**answer, **reply_to} for answer in _answers(activity, history)], delay)


def _timed(answers: list[dict[str, Any]], delay: float) -> list[Step]:
    return [Step(0.0, {"type": "typing"}), *(Step(delay, answer) for answer in answers)]


def _answers(activity: dict[str, Any], history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    text = (activity.get("text") or "").strip()
    command = text.lower()
    if command == "agent":
        return [{"type": "message", "text": HANDOFF_TEXT}, _handoff(history, text)]
    asked = _last_question(history)
    if asked == "card":
        return _card_answer(activity.get("value"))
    if asked == "choice":
        value = activity.get("value")
        return _choice_answer(text or (value if isinstance(value, str) else ""))
    if command == "choice":
        return [_choice_question()]
    if command == "card":
        return [_card_question()]
    if command == "bye":
        return [{"type": "message", "text": GOODBYE_TEXT},
                {"type": "endOfConversation", "code": "completedSuccessfully"}]
    return [{"type": "message", "text": MARKDOWN_ANSWER.format(topic=text or "your message"),
             "textFormat": "markdown"},
            {"type": "message", "text": FOLLOW_UP}]


def _last_question(history: Sequence[dict[str, Any]]) -> str:
    """"choice" or "card" when the bot's last message asked that question, else ""."""
    for earlier in reversed(history):
        if earlier.get("type") != "message" or (earlier.get("from") or {}).get("role") != "bot":
            continue
        if earlier.get("suggestedActions"):
            return "choice"
        if any(a.get("contentType") == ADAPTIVE_CARD for a in earlier.get("attachments") or []):
            return "card"
        return ""
    return ""


def _choice_question() -> dict[str, Any]:
    return {"type": "message", "text": CHOICE_QUESTION, "suggestedActions": {"actions": [
        {"type": kind, "title": title, "value": value} for kind, title, value in CHOICES]}}


def _choice_answer(text: str) -> list[dict[str, Any]]:
    for _, title, value in CHOICES:
        if text.lower() == value.lower():
            return [{"type": "message", "text": f"You chose {title}."}, {"type": "message", "text": FOLLOW_UP}]
    return [{"type": "message", "text": f"{text or 'That'} is not one of the options."}, _choice_question()]


def _card_question() -> dict[str, Any]:
    card = {
        "type": "AdaptiveCard", "$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "version": "1.5",
        "body": [
            {"type": "TextBlock", "text": CARD_QUESTION, "wrap": True, "weight": "Bolder"},
            {"type": "Input.ChoiceSet", "id": "size", "style": "expanded", "isRequired": True,
             "choices": [{"title": title, "value": value} for value, title in CARD_SIZES.items()]},
            {"type": "Input.Text", "id": "note", "placeholder": "Anything we should know?", "isMultiline": False},
        ],
        "actions": [{"type": "Action.Submit", "title": "Order", "data": dict(CARD_SUBMIT_DATA)}],
    }
    return {"type": "message", "attachments": [{"contentType": ADAPTIVE_CARD, "content": card}]}


def _card_answer(value: Any) -> list[dict[str, Any]]:
    """What the bot says to the message after its card: what it got, or that it was not a valid answer."""
    if (isinstance(value, dict) and value.get("action") == CARD_SUBMIT_DATA["action"]
            and value.get("size") in CARD_SIZES and isinstance(value.get("note", ""), str)):
        size, note = value["size"], value.get("note") or ""
        text = f"You ordered size {size} ({CARD_SIZES[size]})" + (f" with the note: {note}" if note else ".")
        return [{"type": "message", "text": text}, {"type": "message", "text": FOLLOW_UP}]
    got = json.dumps(value, sort_keys=True) if value is not None else "no value"
    return [{"type": "message", "text": f"{CARD_WRONG_PREFIX}: I got {got}."}, _card_question()]


def _handoff(history: Sequence[dict[str, Any]], text: str) -> dict[str, Any]:
    transcript = [{"type": a["type"], "from": a.get("from"), "text": a.get("text", ""), "timestamp": a.get("timestamp")}
                  for a in history if a.get("type") == "message"]
    return {
        "type": "event", "name": "handoff.initiate",
        "value": {"va_Scope": "bot", "va_LastPhrases": text, "va_Topic": "Escalate",
                  "va_AgentMessage": "The customer asked for a human agent.", "va_Language": DEFAULT_LOCALE},
        "attachments": [{"contentType": "application/json", "name": "Transcript",
                         "content": {"transcript": transcript}}],
    }


def _streamed(reply_to: dict[str, Any], delay: float) -> list[Step]:
    words = STREAM_TEXT.split(" ")
    chunks = [" ".join(words[:end]) for end in range(3, len(words), 3)]
    gap = delay / (len(chunks) + 1)
    steps = [Step(0.0, {"type": "typing"})]
    for sequence, chunk in enumerate(chunks, start=1):
        steps.append(Step(gap * sequence, {"type": "typing", "text": chunk, **reply_to, "entities": [
            {"type": "streaminfo", "streamType": "streaming", "streamSequence": sequence}]}))
    steps.append(Step(delay, {"type": "message", "text": STREAM_TEXT, **reply_to, "entities": [
        {"type": "streaminfo", "streamType": "final"}]}))
    return steps


@dataclass(order=True)
class _Due:
    at: float
    order: int
    conversation_id: str = field(compare=False)
    activity: dict[str, Any] | None = field(compare=False)  # None: the turn starts (compose it now)
    turn: _Turn = field(compare=False)
    last: bool = field(default=False, compare=False)  # the turn's last step: the next turn may start


@dataclass
class _Turn:
    compose: Callable[[], Sequence[Step]]
    stream_id: str = ""  # the id of the turn's first streamed activity, once sent


class TurnPlayer:
    """Plays every conversation's turns on one thread: a conversation's turns one after the other, each
    composed when it starts (so it sees what the turns before it sent), its steps in time order.

    `send(conversation_id, activity)` appends an activity as the bot's and returns its id (None when the
    conversation is gone). Each streamed activity after the first of its turn gets that first one's id
    as `streamId`. Time is the monotonic clock: the emulator's clock moves tokens, not the bot."""

    def __init__(self, send: Callable[[str, dict[str, Any]], str | None], *,
                 monotonic: Callable[[], float] = time.monotonic):
        self._send = send
        self._monotonic = monotonic
        self._due: list[_Due] = []
        self._playing: set[str] = set()  # conversations with a turn under way
        self._waiting: dict[str, deque[_Turn]] = defaultdict(deque)
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="copilot-bot", daemon=True)
        self._thread.start()

    def play(self, conversation_id: str, compose: Callable[[], Sequence[Step]]) -> None:
        """Queue a turn: `compose` is called once the conversation's previous turn was sent, and its steps
        follow, each `after` seconds after that."""
        with self._changed:
            if conversation_id in self._playing:
                self._waiting[conversation_id].append(_Turn(compose))
                return
            self._playing.add(conversation_id)
            self._push(conversation_id, None, _Turn(compose), at=self._monotonic())

    def close(self) -> None:
        """Stop: what is still due is never sent."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(5)

    def _push(self, conversation_id: str, activity: dict[str, Any] | None, turn: _Turn, *, at: float,
              last: bool = False) -> None:
        heapq.heappush(self._due, _Due(at, next(self._order), conversation_id, activity, turn, last))
        self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and (not self._due or self._due[0].at > self._monotonic()):
                    self._changed.wait(self._due[0].at - self._monotonic() if self._due else None)
                if self._closed:
                    return
                due = heapq.heappop(self._due)
            if due.activity is None:
                self._start(due)
            else:
                self._send_one(due)
                if due.last:
                    self._finish(due.conversation_id)

    def _start(self, due: _Due) -> None:
        steps = list(due.turn.compose())
        with self._changed:
            for index, step in enumerate(steps):
                self._push(due.conversation_id, json.loads(json.dumps(step.activity)), due.turn,
                           at=due.at + step.after, last=index == len(steps) - 1)
        if not steps:
            self._finish(due.conversation_id)

    def _finish(self, conversation_id: str) -> None:
        """The conversation's turn is over: its next one starts now, if one waits."""
        with self._changed:
            waiting = self._waiting.get(conversation_id)
            if waiting:
                self._push(conversation_id, None, waiting.popleft(), at=self._monotonic())
            else:
                self._waiting.pop(conversation_id, None)
                self._playing.discard(conversation_id)

    def _send_one(self, due: _Due) -> None:
        assert due.activity is not None
        info = next((e for e in due.activity.get("entities") or [] if e.get("type") == "streaminfo"), None)
        if info is not None and due.turn.stream_id:
            info["streamId"] = due.turn.stream_id
        sent = self._send(due.conversation_id, due.activity)
        if info is not None and sent and not due.turn.stream_id:
            due.turn.stream_id = sent
