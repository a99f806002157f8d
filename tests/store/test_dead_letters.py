"""Dead letters against Azurite."""

from __future__ import annotations

from relay.store.conversations import ConversationKey
from relay.store.dead_letters import DeadLetterKind


def test_reply_dead_letters(store):
    key = ConversationKey("whatsapp", "4915")
    store.dead_letters.add_letter(key, kind=DeadLetterKind.REPLY, reason="131026 undeliverable",
                                  payload={"id": "conv|3"})
    [letter] = store.dead_letters.list_letters()
    assert (letter.key, letter.kind, letter.payload) == (key, "reply", {"id": "conv|3"})  # the stored string
    assert letter.kind is DeadLetterKind.REPLY
