"""A reply that takes several provider calls resumes where it stopped: against the running simulator,
the 2nd call fails, and sending again from the failure's `parts_sent` gives the user each part once, in order."""

from __future__ import annotations

import pytest

from relay.channels.base import Media, OutboundMessage
from relay.errors import ProviderRejected, ProviderUnavailable
from tests.channels.test_sending import CONTEXTS, adapter_for

LONG_TEXT = " ".join(f"word{n}" for n in range(600))  # about 4,600 characters: 3 Twilio messages
PICTURES = tuple(Media(f"https://cdn.example/cat-{n}.png", "image/png") for n in range(12))
REPORT = Media("https://cdn.example/report.pdf", "application/pdf", "report.pdf")

# (provider, a message that takes 3 provider calls, what the user sees of each call)
MULTIPART = [
    ("twilio", OutboundMessage(text=LONG_TEXT), None),
    ("twilio", OutboundMessage(text="twelve cats", media=PICTURES[:12]),
     [("twelve cats", [m.url for m in PICTURES[:10]]), ("", [m.url for m in PICTURES[10:12]])]),
    ("whatsapp", OutboundMessage(text="two cats", media=PICTURES[:2]),
     [("", [PICTURES[0].url]), ("", [PICTURES[1].url]), ("two cats", [])]),
    ("messagebird", OutboundMessage(text="two cats", media=PICTURES[:2]),
     [("", [PICTURES[0].url]), ("", [PICTURES[1].url]), ("two cats", [])]),
    ("bird", OutboundMessage(text="a cat and a report", media=(PICTURES[0], REPORT)),
     [("", [PICTURES[0].url]), ("", [REPORT.url]), ("a cat and a report", [])]),
]


def seen(sim, provider: str, user: str) -> list[tuple[str, list[str]]]:
    return [(r["text"], [m["url"] for m in r["media"]]) for r in sim.replies(provider, user)]


def expected_parts(sim, provider: str, message: OutboundMessage, parts) -> list[tuple[str, list[str]]]:
    """The parts as one undisturbed send delivers them (for long text: the split the adapter makes)."""
    if parts is not None:
        return parts
    user, context = CONTEXTS[provider]
    adapter_for(sim, provider).send(context, message)
    whole = seen(sim, provider, user)
    sim.clear()
    return whole


@pytest.mark.parametrize(("provider", "message", "parts"), MULTIPART,
                         ids=["twilio-long-text", "twilio-12-media", "whatsapp", "messagebird", "bird"])
def test_a_transient_failure_part_way_resumes_at_the_first_part_not_taken(sim, provider, message, parts):
    user, context = CONTEXTS[provider]
    parts = expected_parts(sim, provider, message, parts)
    assert len(parts) >= 2
    adapter = adapter_for(sim, provider)
    sim.fail_next(provider, 503, after=1)  # the first call goes through, the second fails

    with pytest.raises(ProviderUnavailable) as failed:
        adapter.send(context, message)
    assert (failed.value.parts_sent, failed.value.parts_total) == (1, len(parts))
    assert seen(sim, provider, user) == parts[:1]

    ids = adapter.send(context, message, first_part=failed.value.parts_sent)
    assert seen(sim, provider, user) == parts  # each part once, in order
    assert ids == [r["id"] for r in sim.replies(provider, user)[1:]]


def test_a_resume_after_a_second_failure_continues_from_the_later_part(sim):
    user, context = CONTEXTS["twilio"]
    adapter = adapter_for(sim, "twilio")
    message = OutboundMessage(text=LONG_TEXT)
    sim.fail_next("twilio", 500, after=1)
    with pytest.raises(ProviderUnavailable) as first:
        adapter.send(context, message)
    sim.fail_next("twilio", 429, after=1, retry_after=3)
    with pytest.raises(ProviderUnavailable) as second:
        adapter.send(context, message, first_part=first.value.parts_sent)
    assert (first.value.parts_sent, second.value.parts_sent, second.value.retry_after) == (1, 2, 3)
    adapter.send(context, message, first_part=second.value.parts_sent)
    assert " ".join(text for text, _ in seen(sim, "twilio", user)) == LONG_TEXT


def test_a_permanent_refusal_part_way_says_which_part(sim):
    user, context = CONTEXTS["whatsapp"]
    sim.fail_next("whatsapp", 400, after=2)
    with pytest.raises(ProviderRejected) as refused:
        adapter_for(sim, "whatsapp").send(context, OutboundMessage(text="two cats", media=PICTURES[:2]))
    assert (refused.value.parts_sent, refused.value.parts_total) == (2, 3)
    assert seen(sim, "whatsapp", user) == [("", [PICTURES[0].url]), ("", [PICTURES[1].url])]


def test_a_failure_before_any_part_was_taken_reports_none_sent(sim):
    sim.fail_next("messagebird", 503)
    with pytest.raises(ProviderUnavailable) as failed:
        adapter_for(sim, "messagebird").send(CONTEXTS["messagebird"][1], OutboundMessage(text="x", media=PICTURES[:1]))
    assert (failed.value.parts_sent, failed.value.parts_total) == (0, 2)


def test_generic_sends_one_callback_with_a_stable_webhook_id_and_none_once_it_was_taken(sim):
    user, context = CONTEXTS["generic"]
    adapter = adapter_for(sim, "generic")
    message = OutboundMessage(text="a cat", media=PICTURES[:3], idempotency_key="conv|0000042")
    sim.fail_next("generic", 503)
    with pytest.raises(ProviderUnavailable) as failed:
        adapter.send(context, message)
    assert (failed.value.parts_sent, failed.value.parts_total) == (0, 1)
    [message_id] = adapter.send(context, message, first_part=failed.value.parts_sent)
    assert adapter.send(context, message, first_part=1) == []  # the whole reply was taken: nothing more to send
    [reply] = sim.replies("generic", user)
    assert reply["id"] == message_id == adapter.send(context, message)[0]  # the same webhook-id every attempt
