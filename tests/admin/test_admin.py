"""`python -m relay.admin`, run as an operator runs it, on the relay's real tables, bot and provider: dead letters
listed and replayed once, the counts of `stats`, conversations shown and ended, sessions revoked, and every
mistake an operator can make answered with a message and exit code 1 (2 for usage), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest

from devstack.procs import ROOT, free_port
from relay import operations
from relay.errors import RelayError
from relay.store.conversations import ConversationKey, ConversationRecord, ConversationState
from relay.store.dead_letters import DeadLetterKind
from relay.store.sessions import HeldToken
from tests.conftest import subprocess_env

LONG_TEXT = ("a user's long message " * 80).strip()  # over the emulator's activity limit in the inbound tests below


def new_user() -> str:
    return "+1555" + str(uuid.uuid4().int)[:7]


def refused_reply(relay, user: str) -> ConversationKey:
    """A conversation whose bot reply the provider refused with a 400: one reply dead letter."""
    relay.simulator.fail_next("twilio", 400)
    key = relay.message("twilio", user, "hello")
    relay.work(key)
    assert relay.replies(key) == []
    return key


def test_a_reply_the_provider_refused_is_listed_replayed_once_it_recovers_and_delivered_once(admin_relay):
    relay, admin = admin_relay()
    key = refused_reply(relay, new_user())

    [listed] = [letter for letter in admin.json("dead-letters", "list") if letter["user"] == key.user]
    assert (listed["kind"], listed["channel"]) == ("reply", "twilio") and "400" in listed["reason"]
    shown = admin.json("dead-letters", "show", listed["id"])
    assert shown["payload"]["activity"]["text"] == "You said: hello"

    relay.simulator.fail_next("twilio", 400)  # still refusing: the letter stays for the next try
    refused = admin.run("dead-letters", "replay", listed["id"])
    assert refused.returncode == 1 and "did not take it for good" in refused.stderr
    assert "Traceback" not in refused.stderr and relay.replies(key) == []

    replayed = admin.run("dead-letters", "replay", listed["id"])  # the provider recovered
    assert replayed.returncode == 0, replayed.stderr
    assert "delivered" in replayed.stdout
    assert relay.replies(key) == ["You said: hello"]

    again = admin.run("dead-letters", "replay", listed["id"])
    assert again.returncode == 1 and f"no dead letter {listed['id']}" in again.stderr
    assert relay.replies(key) == ["You said: hello"]
    assert [letter for letter in admin.json("dead-letters", "list") if letter["user"] == key.user] == []


def test_a_reply_replay_without_the_providers_settings_is_refused_and_sends_nothing(admin_relay):
    relay, admin = admin_relay()
    key = refused_reply(relay, new_user())
    [letter] = relay.store.dead_letters.list_letters(key)
    without_twilio = {name: value for name, value in admin.env.items() if not name.startswith("TWILIO_")}

    refused = admin.run("dead-letters", "replay", letter.letter_id, env=without_twilio)

    assert refused.returncode == 1 and "twilio" in refused.stderr and "Traceback" not in refused.stderr
    assert admin.run("dead-letters", "replay", letter.letter_id).returncode == 0  # not taken for a half-done replay
    assert relay.replies(key) == ["You said: hello"]


def test_two_replays_of_one_reply_at_once_deliver_it_once(admin_relay):
    relay, _ = admin_relay()
    key = refused_reply(relay, new_user())
    [letter] = relay.store.dead_letters.list_letters(key)
    outcomes: list[object] = []

    def replay() -> None:
        try:
            outcomes.append(operations.replay_letter(relay.store, letter.letter_id, context=lambda: relay.ctx))
        except RelayError as error:
            outcomes.append(type(error))

    threads = [threading.Thread(target=replay) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert relay.replies(key) == ["You said: hello"]
    assert operations.ReplayOutcome.DELIVERED in outcomes
    assert relay.store.dead_letters.list_letters(key) == []


@pytest.mark.parametrize(("channel", "user", "address", "once"), [
    ("line", "U" + "4" * 32, "to", {"reply_token": "a-fresh-reply-token", "reply_by": "32503680000"}),
    ("telegram", "5550017310", "chat_id", {"callback_query_id": "a-fresh-tap"}),
], ids=["LINE reply token", "Telegram tap"])
def test_a_replay_stores_what_it_spends_before_it_sends(admin_relay, channel, user, address, once):
    """The user's newest message brought what a send may use once (a LINE reply token: a second use is refused, then
    pushed against the month's quota; a Telegram tap, answered once). A replay that uses it stores it as used first,
    as the relay does, so the relay's next reply does not use it again."""
    relay, _ = admin_relay()
    key = ConversationKey(channel, user)
    relay.store.conversations.update_record(key, lambda _: ConversationRecord(
        key, conversation_id="", user_id=f"dl_{user}", reply_context={address: user, **once}))
    letter = relay.store.dead_letters.add_letter(key, kind=DeadLetterKind.REPLY, reason="BadRequest: refused", payload={
        "activity": {"type": "message", "id": f"{channel}-refused-1", "text": "You said: hello"}})

    assert operations.replay_letter(relay.store, letter.letter_id,
                                    context=lambda: relay.ctx) == operations.ReplayOutcome.DELIVERED

    assert relay.replies(key)[-1:] == ["You said: hello"]
    record = relay.record(key)
    assert dict(record.reply_context) == {address: user} and record.lease_owner is None


def test_a_replay_that_began_sending_and_did_not_finish_is_refused_unless_forced(admin_relay):
    relay, admin = admin_relay()
    key = refused_reply(relay, new_user())
    [letter] = relay.store.dead_letters.list_letters(key)
    relay.store.dead_letters.start_replay(letter)  # a replay that died between marking and sending

    refused = admin.run("dead-letters", "replay", letter.letter_id)
    assert refused.returncode == 1 and "did not finish" in refused.stderr and "--force" in refused.stderr
    assert relay.replies(key) == []

    forced = admin.run("dead-letters", "replay", letter.letter_id, "--force")
    assert forced.returncode == 0, forced.stderr
    assert relay.replies(key) == ["You said: hello"]


def test_a_user_message_direct_line_refused_reaches_the_bot_once_with_its_client_id_when_replayed(admin_relay):
    relay, admin = admin_relay(max_activity_chars=1500)
    key = relay.message("twilio", new_user(), LONG_TEXT)
    relay.work(key)
    [letter] = relay.store.dead_letters.list_letters(key)
    assert letter.kind == "inbound"
    conversation_id = relay.record(key).conversation_id
    assert relay.messages_at_bot(conversation_id) == []
    client_id = letter.payload["activity"]["channelData"]["clientActivityID"]
    relay.emulator.core.options = replace(relay.emulator.core.options, max_activity_chars=256 * 1024)  # recovered

    # Storage settings alone: the relay's own poller posts it.
    storage_only = {name: admin.env[name] for name in ("AzureWebJobsStorage", "RELAY_TABLE_PREFIX")}
    replayed = admin.run("dead-letters", "replay", letter.letter_id, env=storage_only)
    assert replayed.returncode == 0, replayed.stderr
    assert "queued" in replayed.stdout
    again = admin.run("dead-letters", "replay", letter.letter_id, env=storage_only)
    assert again.returncode == 1 and "no dead letter" in again.stderr

    relay.tick()
    relay.time.advance(30)
    relay.tick()

    at_bot = relay.activities_at_bot(relay.record(key).conversation_id)
    assert [(a["text"], a["channelData"]["clientActivityID"]) for a in at_bot] == [(LONG_TEXT, client_id)]
    assert " ".join(relay.replies(key)) == f"You said: {LONG_TEXT}"  # the bot answered it, once


def test_a_user_message_replay_that_died_before_removing_its_letter_is_not_posted_twice(admin_relay):
    relay, admin = admin_relay(max_activity_chars=1500)
    key = relay.message("twilio", new_user(), LONG_TEXT)
    relay.work(key)
    [letter] = relay.store.dead_letters.list_letters(key)
    relay.emulator.core.options = replace(relay.emulator.core.options, max_activity_chars=256 * 1024)
    # The first replay queued the message, and the relay posted it; then the replay died before deleting the letter.
    relay.store.due_polls.mark_inbound(key, letter.payload["message_id"])
    relay.store.outbox.requeue_message(key, letter.payload["message_id"], letter.payload["activity"])
    relay.tick()

    replayed = admin.run("--json", "dead-letters", "replay", letter.letter_id)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["outcome"] == "already_posted"
    relay.time.advance(30)
    relay.tick()

    assert [a["text"] for a in relay.activities_at_bot(relay.record(key).conversation_id)] == [LONG_TEXT]
    assert relay.store.dead_letters.list_letters(key) == []


def test_an_event_the_endpoint_refused_is_posted_again_once_under_its_first_webhook_id(admin_relay, event_receiver):
    event_receiver.answers.append(400)
    relay, _ = admin_relay(env=event_receiver.env)
    key = relay.message("twilio", new_user(), "hello")
    relay.work(key)
    relay.bot_sends(relay.record(key).conversation_id, {"type": "event", "name": "handoff.initiate"})
    relay.work(key)
    [letter] = relay.store.dead_letters.list_letters(key)
    assert letter.kind == "event"

    outcome = operations.replay_letter(relay.store, letter.letter_id, context=lambda: relay.ctx)
    with pytest.raises(operations.NotFound):
        operations.replay_letter(relay.store, letter.letter_id, context=lambda: relay.ctx)

    assert outcome == operations.ReplayOutcome.DELIVERED
    first, replayed = (json.loads(body) for _, body in event_receiver.received)
    assert len({headers["webhook-id"] for headers, _ in event_receiver.received}) == 1
    assert replayed["data"]["event"] == first["data"]["event"]
    assert [m["text"] for m in replayed["data"]["transcript"]] == ["hello", "You said: hello"]


def test_two_replays_of_one_user_message_at_once_queue_it_once(admin_relay):
    relay, _ = admin_relay(max_activity_chars=1500)
    key = relay.message("twilio", new_user(), LONG_TEXT)
    relay.work(key)
    [letter] = relay.store.dead_letters.list_letters(key)
    relay.emulator.core.options = replace(relay.emulator.core.options, max_activity_chars=256 * 1024)
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def replay() -> None:
        barrier.wait()
        try:
            outcomes.append(operations.replay_letter(relay.store, letter.letter_id, context=lambda: relay.ctx))
        except operations.NotFound:  # the other one was done before this one read the letter
            outcomes.append("not found")

    threads = [threading.Thread(target=replay) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    relay.tick()

    assert outcomes.count("queued") == 1 and len(outcomes) == 2
    assert [a["text"] for a in relay.activities_at_bot(relay.record(key).conversation_id)] == [LONG_TEXT]


def test_a_media_letter_is_refused_for_replay_with_the_reason(admin_relay):
    relay, admin = admin_relay()
    key = ConversationKey("twilio", new_user())
    letter = relay.store.dead_letters.add_letter(key, kind="media", reason="gone: 404",
                                                 payload={"message_id": "m1", "media": []})

    refused = admin.run("dead-letters", "replay", letter.letter_id)

    assert refused.returncode == 1 and "cannot be fetched again" in refused.stderr
    assert admin.run("dead-letters", "discard", letter.letter_id).returncode == 0
    assert relay.store.dead_letters.list_letters(key) == []


def test_stats_count_what_was_created(admin_relay):
    relay, admin = admin_relay()
    answered = relay.message("twilio", new_user(), "hi")
    relay.work(answered)
    refused = refused_reply(relay, new_user())
    ended = relay.message("twilio", new_user(), "bye")
    relay.work(ended)
    waiting = relay.message("whatsapp", new_user(), "still waiting")  # accepted, not yet worked
    later = relay.time.now() + timedelta(hours=1)
    for key in (answered, refused):  # idle for now: not due (the CLI runs on the wall clock)
        relay.store.conversations.update_record(key, lambda r: replace(r, next_poll_at=later, peekable=False))
    expires = relay.time.now() + timedelta(hours=2)
    held = HeldToken("a-session-token", expires, expires)
    for name in ("webchat-live", "webchat-revoked"):
        relay.store.sessions.create_session(name, user_id="dl_web", resume_key=name * 2, expires_at=expires, held=held)
    assert admin.run("sessions", "revoke", "webchat-revoked").returncode == 0

    stats = admin.json("stats")

    assert stats["open_conversations"] == 2  # "bye" ended the third: the echo bot ends it
    assert relay.record(ended).state == ConversationState.ENDED
    assert stats["due_now"] == 1 and stats["outbox_depth"] == 1 and stats["oldest_waiting_seconds"] is not None
    assert stats["dead_letters"] == {"reply": 1, "media": 0, "inbound": 0, "event": 0}
    assert stats["live_sessions"] == 1
    assert [m.message_id for m in relay.store.outbox.list_messages(waiting)] != []
    text = admin.run("stats").stdout
    assert "open conversations      2" in text and "dead letters            1 (reply 1" in text


def test_a_conversation_is_shown_without_its_token_and_listed(admin_relay):
    relay, admin = admin_relay()
    key = relay.message("whatsapp", new_user(), "hi")
    relay.work(key)
    record = relay.record(key)
    assert record.token

    shown = admin.run("conversations", "show", "whatsapp", key.user)
    as_json = admin.json("conversations", "show", "whatsapp", key.user)

    assert shown.returncode == 0 and record.conversation_id in shown.stdout
    assert record.token not in shown.stdout + json.dumps(as_json)
    assert as_json["state"] == "active" and as_json["conversation_id"] == record.conversation_id
    assert key.user in [c["user"] for c in admin.json("conversations", "list", "--channel", "whatsapp", "--limit",
                                                       "1000")]


def test_ending_a_conversation_tells_the_bot_and_the_next_message_starts_a_new_one(admin_relay):
    relay, _ = admin_relay()
    key = relay.message("twilio", new_user(), "hi")
    relay.work(key)
    first = relay.record(key).conversation_id

    assert operations.end_conversation(relay.ctx, key) is True
    assert operations.end_conversation(relay.ctx, key) is False  # already ended

    ends = [a for a in relay.emulator.conversation(first)["activities"] if a["type"] == "endOfConversation"]
    assert [a.get("text") for a in ends] == ["An operator ended the conversation."]
    record = relay.record(key)
    assert record.state == ConversationState.ENDED and record.lease_owner is None and record.next_poll_at is None
    relay.message("twilio", key.user, "again")
    relay.work(key)
    assert relay.record(key).conversation_id not in ("", first)
    assert relay.replies(key)[-1] == "You said: again"


def test_a_revoked_session_can_no_longer_be_resumed(admin_relay):
    relay, admin = admin_relay()
    expires = relay.time.now() + timedelta(hours=2)
    relay.store.sessions.create_session("webchat-1", user_id="dl_web", resume_key="key-1", expires_at=expires)

    assert admin.run("sessions", "revoke", "webchat-1").returncode == 0

    result = relay.store.sessions.resume_session("webchat-1", resume_key="key-1", new_resume_key="key-2",
                                                 expires_at=expires)
    assert result.outcome == "revoked"


@pytest.mark.parametrize("args", [
    pytest.param(("dead-letters", "show", "not-a-letter"), id="a malformed letter id"),
    pytest.param(("dead-letters", "replay", "000000000000001-0123456789ab-" + "0" * 32), id="an unknown letter id"),
    pytest.param(("dead-letters", "discard", "nonsense"), id="discard of an unknown letter"),
    pytest.param(("conversations", "show", "twilio", "+15550000000"), id="no such conversation"),
    pytest.param(("conversations", "end", "twilio", "+15550000000"), id="no such conversation to end"),
    pytest.param(("sessions", "revoke", "no-such-conversation"), id="no such session"),
])
def test_an_unknown_id_exits_1_with_a_message(admin_relay, args):
    _, admin = admin_relay()
    done = admin.run(*args)
    assert done.returncode == 1
    assert done.stderr.startswith("error: no ") and "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("args", [("conversations", "show", "line", "\udcff"), ("sessions", "revoke", "\udcff"),
                                  ("conversations", "list", "--channel", "tw\udcffilio")],
                         ids=["a user", "a session", "a channel"])
def test_an_argument_that_is_not_utf8_is_a_usage_mistake(admin_relay, args):
    """What a shell passes for `$'\\xff'`: Python's surrogate escape of bytes that are no text."""
    _, admin = admin_relay()
    done = admin.run(*args)
    assert done.returncode == 2 and "error: argument" in done.stderr and "not valid UTF-8" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_reader_that_goes_early_leaves_no_traceback(admin_relay):
    """`python -m relay.admin stats | head -1`: the pipe is closed before the output is written."""
    _, admin = admin_relay()
    reader, writer = os.pipe()
    os.close(reader)  # the reader went: every write gets EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "relay.admin", "stats"], cwd=ROOT, stdout=writer,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=subprocess_env(**admin.env))
    finally:
        os.close(writer)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr and "Exception ignored" not in done.stderr


def test_settings_missing_or_storage_out_of_reach_exit_1_with_a_message(admin_relay, tmp_path):
    _, admin = admin_relay()
    missing = admin.run("stats", env={})
    assert missing.returncode == 1 and "AzureWebJobsStorage is not set" in missing.stderr

    closed = f"http://127.0.0.1:{free_port()}/devstoreaccount1"
    unreachable = admin.run("stats", env={**admin.env, "AzureWebJobsStorage": admin.env["AzureWebJobsStorage"].replace(
        admin.env["AzureWebJobsStorage"].split("TableEndpoint=")[1].split(";")[0], closed)})
    assert unreachable.returncode == 1 and "error: storage: cannot" in unreachable.stderr
    assert "Traceback" not in missing.stderr + unreachable.stderr

    no_file = admin.run("--settings", str(tmp_path / "absent.json"), "stats", env={})
    assert no_file.returncode == 1 and "make run" in no_file.stderr
    assert admin.run("dead-letters", "list", "--limit", "0").returncode == 2


def test_a_settings_file_is_read_under_the_environment_as_under_core_tools(admin_relay, tmp_path):
    """What `make admin` does: the file `make run` writes (devstack.run.write_stack_settings) gives the settings."""
    from devstack.run import write_stack_settings

    relay, admin = admin_relay()
    key = refused_reply(relay, new_user())
    settings_file = tmp_path / "stack.settings.json"
    write_stack_settings(settings_file, {**admin.env, "PATH": "/usr/bin"})
    assert "PATH" not in json.loads(settings_file.read_text())["Values"]

    from_file = admin.run("--settings", str(settings_file), "--json", "dead-letters", "list", env={})
    assert from_file.returncode == 0, from_file.stderr
    assert key.user in [letter["user"] for letter in json.loads(from_file.stdout)]
    elsewhere = admin.run("--settings", str(settings_file), "--json", "dead-letters", "list",
                          env={"RELAY_TABLE_PREFIX": "tsomewhereelse"})
    assert json.loads(elsewhere.stdout) == []

