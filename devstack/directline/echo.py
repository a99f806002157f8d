"""What the echo bots say: one script shared by the emulator's built-in `--echo` and devstack/bot.py.

Both bots answer the same words the same way, so a relay test can run against either:
- every message is answered first with a `typing` activity (Direct Line sends it over the stream only);
- any message: "You said: <text>" (an upload: "You sent: <file names>");
- "later": that echo, then LATE_PREFIX + text about `late_reply_seconds` after the turn (a proactive message);
- "card": a hero card with buttons plus suggested actions;
- "bye": "Goodbye." and then an endOfConversation activity;
- a `startConversation` event (what the relay and relay-webchat.js send first in a new conversation,
  as a Copilot Studio agent expects): the greeting, GREETING_PREFIX + the event's locale.
Other activity types (conversationUpdate, other events, endOfConversation, typing) get no answer.
"""

from __future__ import annotations

from typing import Any

ECHO_PREFIX = "You said: "
LATE_PREFIX = "Late reply: "
CARD_TEXT = "Here is a card."
GOODBYE_TEXT = "Goodbye."
START_EVENT = "startConversation"
GREETING_PREFIX = "Hello, I am the echo bot. Your locale: "
DEFAULT_LATE_REPLY_SECONDS = 3.0


def command_of(activity: dict[str, Any]) -> str:
    return (activity.get("text") or "").strip().lower()


TYPING: dict[str, Any] = {"type": "typing"}


def replies_to(activity: dict[str, Any]) -> list[dict[str, Any]]:
    """The activities the bot sends during the turn, TYPING first (without ids, sender or conversation)."""
    if activity.get("type") == "event" and activity.get("name") == START_EVENT:
        return [{"type": "message", "text": greeting(activity.get("locale"))}]
    if activity.get("type") != "message":
        return []
    return [dict(TYPING), *_answers_to(activity)]


def _answers_to(activity: dict[str, Any]) -> list[dict[str, Any]]:
    text = activity.get("text") or ""
    command = command_of(activity)
    if command == "card":
        return [hero_card()]
    if command == "bye":
        return [{"type": "message", "text": GOODBYE_TEXT},
                {"type": "endOfConversation", "code": "completedSuccessfully"}]
    files = [a.get("name") or a.get("contentType", "file") for a in activity.get("attachments") or []]
    if files and not text:
        return [{"type": "message", "text": "You sent: " + ", ".join(files)}]
    return [{"type": "message", "text": ECHO_PREFIX + text}]


def greeting(locale: str | None) -> str:
    """What the bot says on a `startConversation` event with `locale` (none given: "unknown")."""
    return GREETING_PREFIX + (locale or "unknown")


def late_reply_to(activity: dict[str, Any]) -> dict[str, Any] | None:
    """The proactive message sent some seconds after the turn, or None."""
    if activity.get("type") == "message" and command_of(activity) == "later":
        return {"type": "message", "text": LATE_PREFIX + (activity.get("text") or "").strip()}
    return None


def hero_card() -> dict[str, Any]:
    return {
        "type": "message",
        "text": CARD_TEXT,
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.hero",
            "content": {
                "title": "Echo card",
                "subtitle": "A hero card from the echo bot",
                "text": "Pick one.",
                "buttons": [
                    {"type": "imBack", "title": "Yes", "value": "yes"},
                    {"type": "openUrl", "title": "Docs", "value": "https://learn.microsoft.com/azure/bot-service/"},
                ],
            },
        }],
        "suggestedActions": {"actions": [
            {"type": "imBack", "title": "Yes", "value": "yes"},
            {"type": "imBack", "title": "No", "value": "no"},
        ]},
    }
