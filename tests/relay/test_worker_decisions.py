"""The conversation worker's decisions, a table for each, in milliseconds.

The worker and the poller run in this process on Azurite and on the real cores of the Direct Line
emulator and the provider simulator, mounted as `requests` transports (`inprocess_relay` in
conftest.py), with the relay's clock in the test's hand. tests/relay/test_relay.py checks the same
promises end to end, through every process.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from standardwebhooks import Webhook

from devstack.directline.echo import greeting
from relay.activities import directline_user_id
from relay.channels.base import InboundMessage, Media
from relay.conversations import ConversationWorker
from relay.errors import LeaseLost, TokenExpired
from relay.fanout import Chase
from relay.inbound import accept_all, relay_now
from relay.poller import work_chase
from relay.store.conversations import ConversationKey, ConversationRecord, ConversationState, partition_of
from tests.relay.conftest import EVENT_SECRET, EventReceiver, InProcessRelay

USER = "+15550200001"
OTHER_USER = "+15550200002"
LONG_TEXT = " ".join(f"word{n:03d}" for n in range(250))  # "You said: ..." is 2,009 characters: 2 Twilio messages


def settled(relay: InProcessRelay, text: str = "hello") -> ConversationKey:
    """A conversation whose message reached the bot and whose reply reached the user, counters zeroed."""
    key = relay.message("twilio", USER, text)
    relay.work(key)
    assert relay.replies(key) == [f"You said: {text}"]
    relay.emulator.reset_counters()
    return key


def seconds_until_next_poll(relay: InProcessRelay, key: ConversationKey) -> float | None:
    next_poll_at = relay.record(key).next_poll_at
    return None if next_poll_at is None else (next_poll_at - relay.time()).total_seconds()


# ------------------------------------------------------------------------------------------- leases


@pytest.mark.parametrize(("seconds_later", "taken_over"), [
    pytest.param(30, False, id="a lease another worker still holds leaves its message waiting and Direct Line alone"),
    pytest.param(61, True, id="a lease that ran out is taken over and the message reaches the bot once"),
])
def test_the_poller_works_a_conversation_only_under_a_lease_it_holds(inprocess_relay, seconds_later, taken_over):
    relay = inprocess_relay()
    key = relay.message("twilio", USER, "hello")
    lease = relay.ctx.settings.relay.lease_seconds
    assert relay.store.conversations.acquire_lease(key, owner="webhook:stalled", lease_seconds=lease,
                                                   now=relay.time(),
                                                   create_with_user_id=directline_user_id(
                                                       key.channel, key.user, key_for=relay.store.tables.key_for))
    relay.time.advance(seconds_later)

    tick = relay.tick()

    record = relay.record(key)
    waiting = relay.store.outbox.list_messages(key)
    if taken_over:
        assert (tick.worked, tick.posted) == (1, 1)
        assert relay.messages_at_bot(record.conversation_id) == ["hello"]
        assert relay.replies(key) == ["You said: hello"]
        assert waiting == [] and record.lease_owner is None
    else:
        assert (tick.worked, tick.posted) == (0, 0)
        assert relay.calls() == {}
        assert len(waiting) == 1 and record.lease_owner == "webhook:stalled"


@pytest.mark.parametrize(("meanwhile", "replies_after_resuming"), [
    pytest.param("taken over and given back", ["a late reply"],
                 id="another worker delivered the reply and gave the lease back: the stalled one sends nothing"),
    pytest.param("taken over and held", [],
                 id="another worker holds the lease now: the stalled one sends nothing, the holder will"),
    pytest.param("nobody", ["a late reply"],
                 id="nobody took the lapsed lease: the stalled worker renews it and sends the reply once"),
])
def test_a_worker_stalled_past_its_lease_never_sends_a_reply_the_next_holder_sends(inprocess_relay, meanwhile,
                                                                                   replies_after_resuming):
    relay = inprocess_relay()
    key = settled(relay)
    relay.bot_says(relay.record(key).conversation_id, "a late reply")
    lease = relay.ctx.settings.relay.lease_seconds
    stalled = relay.store.conversations.acquire_lease(key, owner="poller:stalled", lease_seconds=lease,
                                                      now=relay.time())
    assert stalled is not None
    worker = ConversationWorker(relay.ctx, stalled, owner="poller:stalled", peek=None, patient=False)
    relay.time.advance(lease + 1)  # e.g. a Direct Line call riding out its retries
    if meanwhile == "taken over and given back":
        relay.tick()
        assert relay.replies(key)[1:] == ["a late reply"]
    elif meanwhile == "taken over and held":
        assert relay.store.conversations.acquire_lease(key, owner="poller:next", lease_seconds=lease,
                                                       now=relay.time())

    try:
        worker.delivery.deliver()
    except LeaseLost:
        assert meanwhile != "nobody"
    else:
        assert meanwhile == "nobody"

    assert relay.replies(key)[1:] == replies_after_resuming


def test_a_conversation_keeps_the_user_id_it_began_with_and_new_users_get_keyed_ones(inprocess_relay):
    relay = inprocess_relay()
    # A conversation stored by an earlier version, whose ids were an unkeyed hash of the number.
    old_id = "dl_twilio_" + "0" * 32
    key = relay.message("twilio", USER, "hello")
    owner = "test:earlier-version"
    record = relay.store.conversations.acquire_lease(key, owner=owner, now=relay.time(), create_with_user_id=old_id,
                                                     lease_seconds=relay.ctx.settings.relay.lease_seconds)
    assert record is not None
    relay.store.conversations.release_lease(record, owner=owner)
    relay.tick()
    newcomer = relay.message("twilio", OTHER_USER, "hi")
    relay.tick()

    at_bot = relay.activities_at_bot(relay.record(key).conversation_id)
    assert [(a["text"], a["from"]["id"]) for a in at_bot] == [("hello", old_id)]  # the bot's user stays the same
    newcomers_id = relay.activities_at_bot(relay.record(newcomer).conversation_id)[0]["from"]["id"]
    assert newcomers_id == relay.record(newcomer).user_id == directline_user_id(
        "twilio", OTHER_USER, key_for=relay.store.tables.key_for)


# ------------------------------------------------------------------------------------------- peeks


def nothing(relay: InProcessRelay, key: ConversationKey) -> None:
    pass


def late_bot_reply(relay: InProcessRelay, key: ConversationKey) -> None:
    relay.bot_says(relay.record(key).conversation_id, "a late reply")


def new_user_message(relay: InProcessRelay, key: ConversationKey) -> None:
    relay.message(key.channel, key.user, "and another thing")


@pytest.mark.parametrize(("meanwhile", "seconds_later", "quiet", "worked", "calls", "replies"), [
    pytest.param(nothing, 2, 1, 0, {"activities/get": 1}, [],
                 id="nothing new: one read with the secret, and no lease, token call or write"),
    pytest.param(late_bot_reply, 2, 0, 1, {"activities/get": 1}, ["a late reply"],
                 id="a late bot reply is claimed and delivered from the page the peek read, not read twice"),
    pytest.param(new_user_message, 2, 0, 1, {"activities/post": 1, "activities/get": 1},
                 ["You said: and another thing"], id="a waiting user message is worked at once, never peeked"),
    pytest.param(nothing, 3601, 0, 1, {"activities/get": 1}, [],
                 id="after an hour without a tick the full poll runs under the lease, reading with the secret"),
])
def test_a_settled_conversation_is_peeked_and_claimed_only_when_there_is_work(
        inprocess_relay, meanwhile, seconds_later, quiet, worked, calls, replies):
    relay = inprocess_relay()
    key = settled(relay)
    before = relay.record(key)
    assert before.peekable
    meanwhile(relay, key)
    relay.time.advance(seconds_later)

    tick = relay.tick()

    assert (tick.quiet, tick.worked) == (quiet, worked)
    assert relay.calls() == calls
    assert relay.replies(key) == ["You said: hello", *replies]
    if quiet:
        after = relay.record(key)
        assert after.etag == before.etag and after.lease_owner is None


def test_an_idle_conversation_is_peeked_less_and_less_often_up_to_the_ceiling(inprocess_relay):
    relay = inprocess_relay(env={"RELAY_POLL_CEILING_SECONDS": "30"})
    key = settled(relay)
    relay.time.advance(3 * 60)  # a reply is no longer likely
    assert relay.tick().quiet == 1
    gaps = []
    for _ in range(5):
        [row] = relay.store.due_polls.list_due(now=relay.time() + timedelta(hours=1))
        gaps.append(row.poll_interval)
        relay.time.advance(row.poll_interval - 1)
        assert relay.tick().due == 0  # not a second early
        relay.time.advance(1)
        assert relay.tick().quiet == 1
    assert gaps == [5, 10, 20, 30, 30]
    assert relay.calls() == {"activities/get": 6}  # one read per peek, nothing else
    assert relay.record(key).lease_owner is None


# ------------------------------------------------------------------------------------- final text only


def test_a_streamed_answer_reaches_the_user_once_as_its_final_text(inprocess_relay):
    relay = inprocess_relay()
    key = settled(relay)
    conversation_id = relay.record(key).conversation_id
    steps = [
        {"type": "message", "text": "Searching the knowledge base...",
         "entities": [{"type": "streaminfo", "streamType": "informative", "streamSequence": 1}]},
        {"type": "message", "text": "The opening",
         "entities": [{"type": "streaminfo", "streamType": "streaming", "streamSequence": 2}]},
        {"type": "message", "text": "The opening hours are", "channelData": {"streamType": "streaming"}},
        {"type": "message", "text": "The opening hours are 9 to 5.",
         "entities": [{"type": "streaminfo", "streamType": "final"}]},
    ]
    for step in steps:
        relay.emulator.http.post(f"{relay.emulator.url}/v3/conversations/{conversation_id}/activities",
                                 json=step, timeout=5).raise_for_status()

    relay.work(key)

    assert relay.replies(key) == ["You said: hello", "The opening hours are 9 to 5."]


# ----------------------------------------------------------------------------------------- greeting

GREETED = {"RELAY_START_EVENT": "startConversation"}


def start_events(relay: InProcessRelay, conversation_id: str) -> list[dict]:
    """The greeting events the bot received in a conversation."""
    return [a for a in relay.emulator.conversation(conversation_id)["activities"]
            if a.get("type") == "event" and a.get("name") == "startConversation"]


@pytest.mark.parametrize(("fault", "runs"), [
    pytest.param(None, 1, id="the first message starts a conversation that greets the user before the answer"),
    pytest.param({"error_502_rate": 1.0, "phase": "after"}, 1,
                 id="the greeting's post failed after Direct Line took it: found, not posted twice"),
    pytest.param({"drop_rate": 1.0, "phase": "after"}, 1,
                 id="the connection dropped after Direct Line took the greeting: found, not posted twice"),
    pytest.param({"error_500_rate": 1.0}, 1,
                 id="Direct Line failed on the greeting without taking it: not found, so posted again, once"),
    pytest.param({"throttle_rate": 1.0, "retry_after": "3"}, 2,
                 id="Direct Line throttled the greeting: the message waits and a new conversation greets once"),
])
def test_a_new_conversation_greets_the_user_once_before_their_first_answer(inprocess_relay, fault, runs):
    relay = inprocess_relay(env=GREETED)
    if fault:
        relay.emulator.set_faults(**{"endpoints": ["activities/post"], **fault, "limit": 1})
    key = relay.message("twilio", USER, "hello")

    posted = []
    for _ in range(runs):
        posted.append(relay.work(key).posted)
        relay.time.advance(10)
    relay.message("twilio", USER, "again")
    relay.work(key)

    conversation_id = relay.record(key).conversation_id
    [event] = start_events(relay, conversation_id)
    assert event["locale"] == "en-US" and event["from"]["id"] == relay.record(key).user_id
    assert relay.messages_at_bot(conversation_id) == ["hello", "again"]
    assert relay.replies(key) == [greeting("en-US"), "You said: hello", "You said: again"]
    assert posted == [0] * (runs - 1) + [1]  # the message waited only while the greeting could not be posted


def test_the_greeting_carries_the_locale_the_provider_gave_else_the_default(inprocess_relay):
    relay = inprocess_relay(env={**GREETED, "RELAY_DEFAULT_LOCALE": "fr-FR"})
    told = InboundMessage("m-1", "u-de", "hallo", locale="de-DE", reply_context={"user_id": "u-de"})
    untold = InboundMessage("m-2", "u-fr", "salut", reply_context={"user_id": "u-fr"})
    for key, marks in accept_all(relay.ctx, "generic", [told, untold]).items():
        relay.arrivals[key] = marks
        relay.work(key)

    assert [r["text"] for r in relay.simulator.replies("generic", "u-de")] == [greeting("de-DE"), "You said: hallo"]
    assert [r["text"] for r in relay.simulator.replies("generic", "u-fr")] == [greeting("fr-FR"), "You said: salut"]


def test_with_the_start_event_set_empty_nobody_is_greeted(inprocess_relay):
    relay = inprocess_relay(env={"RELAY_START_EVENT": ""})
    key = relay.message("twilio", USER, "hello")

    relay.work(key)

    assert start_events(relay, relay.record(key).conversation_id) == []
    assert relay.replies(key) == ["You said: hello"]


# ------------------------------------------------------------------------------------------- events

HANDOFF = {"type": "event", "name": "handoff.initiate", "value": {"reason": "the user asked for a person"},
           "attachments": [{"contentType": "application/json", "name": "context", "content": {"topic": "billing"}}]}


def bot_sends(relay: InProcessRelay, key: ConversationKey, activity: dict) -> str:
    """The bot sends `activity` in the user's conversation; its activity id."""
    response = relay.emulator.http.post(
        f"{relay.emulator.url}/v3/conversations/{relay.record(key).conversation_id}/activities", json=activity,
        timeout=5)
    response.raise_for_status()
    return response.json()["id"]


def verified_events(receiver: EventReceiver) -> list[dict]:
    """What the receiver got, each POST's Standard Webhooks signature checked by the reference library."""
    return [Webhook(EVENT_SECRET).verify(body, headers) for headers, body in receiver.received]


def test_a_handoff_reaches_the_event_webhook_once_signed_with_the_user_and_the_transcript(inprocess_relay,
                                                                                         event_receiver):
    relay = inprocess_relay(env={**event_receiver.env, **GREETED})  # the relay's own start event is not the bot's
    key = relay.message("twilio", USER, "hello")
    relay.work(key)
    event_id = bot_sends(relay, key, HANDOFF)

    relay.work(key)
    relay.time.advance(5)
    relay.tick()

    [event] = verified_events(event_receiver)
    record = relay.record(key)
    assert event["type"] == "bot.event"
    data = event["data"]
    assert data["conversation"] == {"id": record.conversation_id}
    assert (data["channel"], data["user"]) == ("twilio", {"id": USER, "directLineId": record.user_id})
    assert data["event"] == {"id": event_id, **{k: HANDOFF[k] for k in ("name", "value", "attachments")}}
    assert [(m["from"], m["text"]) for m in data["transcript"]] == [
        ("bot", greeting("en-US")), ("user", "hello"), ("bot", "You said: hello")]
    assert relay.replies(key) == [greeting("en-US"), "You said: hello"]  # nothing of the event reaches the phone


def test_the_transcript_is_the_last_messages_the_setting_allows(inprocess_relay, event_receiver):
    relay = inprocess_relay(env={**event_receiver.env, "RELAY_EVENT_TRANSCRIPT_MESSAGES": "3"})
    key = settled(relay, "one")
    relay.message("twilio", USER, "two")
    relay.work(key)
    bot_sends(relay, key, {"type": "event", "name": "escalate"})

    relay.work(key)

    [event] = verified_events(event_receiver)
    assert [m["text"] for m in event["data"]["transcript"]] == ["You said: one", "two", "You said: two"]


@pytest.mark.parametrize(("answers", "posts", "dead_letters"), [
    pytest.param([503], 2, 0, id="an endpoint that cannot take it now gets it again later, with the same webhook-id"),
    pytest.param([400], 1, 1, id="an endpoint that refuses it for good leaves a dead letter, and it is not sent again"),
])
def test_an_event_the_endpoint_does_not_take_is_retried_or_dead_lettered(inprocess_relay, event_receiver,
                                                                         answers, posts, dead_letters):
    event_receiver.answers.extend(answers)
    relay = inprocess_relay(env=event_receiver.env)
    key = settled(relay)
    bot_sends(relay, key, HANDOFF)

    relay.work(key)
    relay.time.advance(30)
    relay.tick()
    relay.time.advance(30)
    relay.tick()

    assert len(event_receiver.received) == posts
    assert len({headers["webhook-id"] for headers, _ in event_receiver.received}) == 1
    letters = relay.store.dead_letters.list_letters(key)
    assert [(letter.kind, letter.payload["activity"]["name"]) for letter in letters] == [("event", "handoff.initiate")
                                                                                          ] * dead_letters


def test_without_an_event_webhook_an_event_is_logged_by_name_and_skipped(inprocess_relay, caplog):
    relay = inprocess_relay()
    key = settled(relay)
    event_id = bot_sends(relay, key, HANDOFF)

    with caplog.at_level("INFO", logger="relay.delivery"):
        relay.work(key)

    assert any("handoff.initiate" in r.getMessage() and "RELAY_EVENT_WEBHOOK_URL" in r.getMessage()
               for r in caplog.records)
    assert "the user asked for a person" not in caplog.text
    assert relay.record(key).is_delivered(event_id)
    assert relay.replies(key) == ["You said: hello"]


# --------------------------------------------------------------------------------- multi-part replies


@pytest.mark.parametrize("parts_taken", [
    pytest.param(0, id="the provider cannot take the first part now: the retry sends both parts, each once"),
    pytest.param(1, id="the provider cannot take the second part now: the retry sends only the second part"),
])
def test_a_reply_that_failed_part_way_resumes_at_the_first_part_not_taken(inprocess_relay, parts_taken):
    relay = inprocess_relay()
    relay.simulator.fail_next("twilio", 503, after=parts_taken, retry_after=3)
    key = relay.message("twilio", USER, LONG_TEXT)

    first = relay.work(key)

    assert first.delivered == 0
    assert len(relay.replies(key)) == parts_taken
    assert seconds_until_next_poll(relay, key) == 3  # the provider's Retry-After
    relay.time.advance(3)
    assert relay.tick().delivered == 1
    replies = relay.replies(key)
    assert len(replies) == 2 and " ".join(replies) == f"You said: {LONG_TEXT}"
    relay.time.advance(60)
    relay.tick()
    assert len(relay.replies(key)) == 2  # and never again


def test_a_reply_refused_part_way_for_good_is_dead_lettered_naming_the_part_and_not_sent_again(inprocess_relay):
    relay = inprocess_relay()
    relay.simulator.fail_next("twilio", 400, after=1)
    key = relay.message("twilio", USER, LONG_TEXT)

    relay.work(key)

    [dead] = relay.store.dead_letters.list_letters(key)
    assert dead.kind == "reply" and "part 2 of 2" in dead.reason
    assert len(relay.replies(key)) == 1
    relay.time.advance(60)
    relay.tick()
    assert len(relay.replies(key)) == 1


# ------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize(("quiet_for", "interval", "bot_reply", "fault", "next_poll", "next_interval", "peekable"), [
    pytest.param(30, 0, True, None, 1, 0, True, id="a reply delivered: polled again a second later"),
    pytest.param(5, 0, False, None, 1, 0, True,
                 id="nothing new 5 s after the user wrote: polled again a second later while a reply is imminent"),
    pytest.param(60, 0, False, None, 5, 0, True,
                 id="nothing new a minute after the last message: polled every 5 s while a reply is likely"),
    pytest.param(600, 0, False, None, 5, 5, True, id="nothing new for ten minutes: polled again in 5 seconds"),
    pytest.param(600, 20, False, None, 40, 40, True, id="nothing new again: the gap doubles"),
    pytest.param(600, 40, False, None, 60, 60, True, id="the gap never passes the ceiling"),
    pytest.param(30, 0, False, {"throttle_rate": 1.0, "retry_after": "7"}, 7, 0, False,
                 id="Direct Line throttles: polled again after its Retry-After, under the lease"),
    pytest.param(30, 0, False, {"error_500_rate": 1.0}, 10, 0, False,
                 id="Direct Line fails: polled again after a backoff, under the lease"),
])
def test_the_next_poll_is_scheduled_from_what_the_run_found(inprocess_relay, quiet_for, interval, bot_reply, fault,
                                                           next_poll, next_interval, peekable):
    relay = inprocess_relay()
    key = settled(relay)
    relay.store.conversations.update_record(key, lambda r: replace(r, poll_interval=float(interval)))
    if bot_reply:
        late_bot_reply(relay, key)
    if fault:
        relay.emulator.set_faults(**fault, endpoints=["activities/get"])
    relay.time.advance(quiet_for)

    relay.work(key)

    record = relay.record(key)
    assert seconds_until_next_poll(relay, key) == next_poll
    assert (record.poll_interval, record.peekable) == (next_interval, peekable)
    assert record.lease_owner is None


def test_a_conversation_without_direct_line_or_recent_messages_is_not_polled(inprocess_relay):
    relay = inprocess_relay()
    key = settled(relay)
    relay.emulator.forget(relay.record(key).conversation_id)
    relay.time.advance(10 * 60)

    relay.work(key)

    assert relay.record(key).conversation_id == ""
    assert seconds_until_next_poll(relay, key) is None  # until the user writes again


# ---------------------------------------------------------------------------------------------- tokens


def expire_its_tokens(relay: InProcessRelay, key: ConversationKey) -> None:
    relay.emulator.expire_tokens(relay.record(key).conversation_id)


def forget_the_token(relay: InProcessRelay, key: ConversationKey) -> None:
    """As after Direct Line restarted: a token it no longer knows (403 other than expiry)."""
    relay.store.conversations.update_record(key, lambda r: replace(r, token="not-a-token-any-more"))


KEPT, REFRESHED, LET_GO = "kept", "refreshed", "let go"


@pytest.mark.parametrize(("minutes_left", "direct_line", "calls", "token"), [
    pytest.param(25, nothing, {"activities/get": 1}, KEPT, id="a token with 25 minutes left is used as it is"),
    pytest.param(10, nothing, {"tokens/refresh": 1, "activities/get": 1}, REFRESHED,
                 id="a token past half its life is refreshed"),
    pytest.param(0.5, nothing, {"tokens/refresh": 1, "activities/get": 1}, REFRESHED,
                 id="a token about to lapse is still refreshed"),
    pytest.param(-5, nothing, {"activities/get": 1}, LET_GO,
                 id="a lapsed token is let go without a call and the replies read with the secret"),
    pytest.param(10, expire_its_tokens, {"tokens/refresh": 1, "activities/get": 1}, LET_GO,
                 id="a token Direct Line expired early fails its refresh, is let go, and the replies read"),
    pytest.param(25, expire_its_tokens, {"activities/get": 2}, LET_GO,
                 id="a token Direct Line says expired is let go and the read made again with the secret"),
    pytest.param(25, forget_the_token, {"activities/get": 2}, LET_GO,
                 id="a token Direct Line no longer knows is let go and the read made again with the secret"),
])
def test_the_token_is_refreshed_by_how_long_it_has_left_and_never_renewed_with_the_secret(
        inprocess_relay, minutes_left, direct_line, calls, token):
    relay = inprocess_relay()
    key = settled(relay)
    late_bot_reply(relay, key)
    direct_line(relay, key)
    before = relay.record(key)
    relay.time.advance((before.token_expires_at - relay.time()).total_seconds() - minutes_left * 60)

    relay.work(key)

    after = relay.record(key)
    assert relay.calls() == calls  # never conversations/reconnect: it fails under enhanced authentication
    assert relay.replies(key) == ["You said: hello", "a late reply"]
    assert after.conversation_id == before.conversation_id
    if token == KEPT:
        assert (after.token, after.token_expires_at, after.token_refresh_at) == \
            (before.token, before.token_expires_at, before.token_refresh_at)
    elif token == REFRESHED:
        assert after.token not in ("", before.token)
        assert after.token_expires_at - relay.time() == timedelta(seconds=1800)
        assert timedelta(seconds=0.45 * 1800) <= after.token_refresh_at - relay.time() <= timedelta(seconds=0.55 * 1800)
        assert seconds_until_next_poll(relay, key) <= 0.55 * 1800
    else:
        assert (after.token, after.token_expires_at, after.token_refresh_at) == ("", None, None)


def test_a_conversation_in_an_exchange_has_its_token_refreshed_only_once_its_refresh_time_is_near(inprocess_relay):
    """The worker refreshes at its last look before the token wants it, by the idle schedule: a conversation whose
    user just wrote is looked at again within seconds, so a token wanting refreshing in 30 s is not refreshed yet
    (with 60 s tokens, as in the soak, refreshing at every run would multiply the refreshes)."""
    relay = inprocess_relay()
    key = settled(relay)
    now = relay.time()
    relay.store.conversations.update_record(key, lambda r: replace(r, last_user_activity_at=now,
                                                                   token_refresh_at=now + timedelta(seconds=30)))

    relay.work(key)

    assert "tokens/refresh" not in relay.calls()
    relay.time.advance(31)
    relay.work(key)
    assert relay.calls()["tokens/refresh"] == 1


def until_its_token_wants_refreshing(relay: InProcessRelay, key: ConversationKey) -> None:
    relay.time.advance((relay.record(key).token_refresh_at - relay.time()).total_seconds() + 1)


def with_newest_token(relay: InProcessRelay, key: ConversationKey) -> ConversationRecord:
    """The record with the token its next lease works with: its due row's, when a quiet refresh left a newer one."""
    record = relay.store.conversations.get_record(key, newest_token=True)
    assert record is not None
    return record


def test_a_quiet_conversation_whose_token_wants_refreshing_has_it_refreshed_in_its_row_alone(inprocess_relay):
    relay = inprocess_relay()
    key = settled(relay)
    before = relay.record(key)
    until_its_token_wants_refreshing(relay, key)

    tick = relay.tick()

    assert (tick.quiet, tick.worked) == (1, 0)
    assert relay.calls() == {"activities/get": 1, "tokens/refresh": 1}
    assert relay.record(key) == before  # not written: no lease, its due time kept (the hourly full poll still comes)
    [row] = relay.store.due_polls.list_due(now=relay.time() + timedelta(hours=2))
    assert row.index_key == before.due_index_key and row.token not in ("", before.token)  # what the next peek uses
    assert row.token_expires_at > row.token_refresh_at > relay.time()
    assert relay.tick().due == 0  # its next peek moved on as a quiet peek's does
    late_bot_reply(relay, key)
    relay.time.advance(relay.ctx.settings.relay.poll_ceiling_seconds)
    assert relay.tick().delivered == 1
    assert relay.replies(key) == ["You said: hello", "a late reply"]
    assert relay.record(key).token == row.token  # the worker's lease brought the row's token into the record
    assert relay.calls()["tokens/refresh"] == 1


def idle_past_the_records_token(inprocess_relay) -> tuple[InProcessRelay, ConversationKey, ConversationRecord]:
    """A settled conversation on tokens that live a minute, left quiet (ticks every 5 s) until three minutes past
    its record's token's expiry: (relay, key, the record as it was settled)."""
    relay = inprocess_relay(token_ttl=60, env={"RELAY_POLL_CEILING_SECONDS": "20"})
    key = settled(relay)
    before = relay.record(key)
    while relay.time() < before.token_expires_at + timedelta(minutes=3):
        relay.time.advance(5)
        relay.tick()
    return relay, key, before


def test_a_user_writing_after_quiet_refreshes_outlived_the_records_token_reaches_the_same_conversation(
        inprocess_relay):
    """Tokens that live a minute: the record's own is long expired when the user writes; the message goes with the
    token the row was kept alive with, into the conversation the user was in, not a new one."""
    relay, key, before = idle_past_the_records_token(inprocess_relay)
    assert relay.record(key).token == before.token  # quiet all along: only its row was given the new tokens
    assert relay.calls()["tokens/refresh"] >= 5

    relay.message(key.channel, key.user, "still there?")
    relay_now(relay.ctx, key, relay.arrivals.pop(key), burst_until=relay.time(), poll=True)  # as the webhook does

    assert relay.record(key).conversation_id == before.conversation_id
    assert relay.messages_at_bot(before.conversation_id)[-1] == "still there?"
    assert relay.replies(key)[-1] == "You said: still there?"
    assert "conversations/start" not in relay.calls()


def test_a_chase_looks_with_the_token_the_row_was_kept_alive_with(inprocess_relay):
    """A chase looks without the lease, so it takes the row's newer token itself: no webhook took the lease since
    the record's own expired (a user left for the timer in a crowded webhook), and the reply still goes at once."""
    relay, key, before = idle_past_the_records_token(inprocess_relay)
    late_bot_reply(relay, key)
    now = relay.time()

    delivered = work_chase(relay.ctx, Chase(partition_of(relay.store.tables, key), now + timedelta(seconds=10), now,
                                            look_at=now))

    assert delivered == 1
    assert relay.replies(key) == ["You said: hello", "a late reply"]
    assert relay.record(key).conversation_id == before.conversation_id


def test_a_token_refreshed_while_a_worker_holds_the_conversation_reaches_the_workers_successor(inprocess_relay):
    """The peek does not read the record, so it refreshes the row's token even while a worker holds the
    conversation: the holder works on with its own token (good until it expires), and the next lease takes the
    row's."""
    relay = inprocess_relay()
    key = settled(relay)
    before = relay.record(key)
    until_its_token_wants_refreshing(relay, key)
    holder = relay.store.conversations.acquire_lease(key, owner="the-timer", lease_seconds=60, now=relay.time())
    assert holder is not None

    assert relay.tick().worked == 0

    assert relay.calls() == {"activities/get": 1, "tokens/refresh": 1}
    assert (relay.record(key).token, relay.record(key).lease_owner) == (before.token, "the-timer")
    relay.store.conversations.release_lease(holder, owner="the-timer")  # its run ends, its own token unchanged
    refreshed = with_newest_token(relay, key)
    assert refreshed.token not in ("", before.token)
    late_bot_reply(relay, key)
    relay.time.advance(relay.ctx.settings.relay.poll_ceiling_seconds)
    assert relay.tick().delivered == 1
    assert relay.record(key).token == refreshed.token
    assert relay.calls()["tokens/refresh"] == 1


def test_a_leftover_row_at_its_tokens_refresh_does_not_keep_the_token_from_being_refreshed(inprocess_relay):
    """A worker moved the conversation to a new row and could not delete the old one (best effort): the old row,
    due first, must not keep the token from being refreshed (a finding of the review of the quiet refresh), and it
    goes once its peek finds news."""
    relay = inprocess_relay()
    key = settled(relay)
    before = relay.record(key)
    due = relay.store.tables.table("duepolls")
    leftover = due.get("due", before.due_index_key)
    relay.store.conversations.update_record(key, lambda r: replace(r, next_poll_at=r.next_poll_at + timedelta(
        seconds=1)))
    due.create(dict(leftover))  # as if its delete had failed
    until_its_token_wants_refreshing(relay, key)

    relay.tick()
    relay.tick()

    kept = with_newest_token(relay, key)
    assert kept.token not in ("", before.token) and kept.token_expires_at > relay.time()
    late_bot_reply(relay, key)
    relay.time.advance(relay.ctx.settings.relay.poll_ceiling_seconds)
    relay.tick()
    assert relay.replies(key) == ["You said: hello", "a late reply"]
    after = relay.record(key)
    assert after.token == kept.token
    rows = relay.store.due_polls.list_due(now=relay.time() + timedelta(hours=2))
    assert [row.index_key for row in rows] == [after.due_index_key]


def test_a_refresh_direct_line_cannot_do_on_the_peek_is_left_to_the_full_path(inprocess_relay):
    relay = inprocess_relay()
    key = settled(relay)
    before = relay.record(key)
    until_its_token_wants_refreshing(relay, key)
    relay.emulator.set_faults(error_500_rate=1.0, limit=1, endpoints=["tokens/refresh"])

    assert relay.tick().worked == 1

    assert relay.calls() == {"activities/get": 1, "tokens/refresh": 2}  # the peek's failed, the worker's went
    after = relay.record(key)
    assert after.token not in ("", before.token) and after.lease_owner is None


def test_a_refresh_direct_line_cannot_do_now_keeps_the_token_and_is_tried_again_after_a_backoff(inprocess_relay):
    relay = inprocess_relay()
    key = settled(relay)
    relay.emulator.set_faults(error_500_rate=1.0, limit=1, endpoints=["tokens/refresh"])
    before = relay.record(key)
    relay.time.advance((before.token_refresh_at - relay.time()).total_seconds())

    relay.work(key)

    assert relay.calls() == {"tokens/refresh": 1, "activities/get": 1}  # tried once in the run, the read went on
    assert relay.record(key).token == before.token
    assert seconds_until_next_poll(relay, key) == 10
    relay.time.advance(10)
    assert relay.tick().worked == 1
    after = relay.record(key)
    assert after.token not in ("", before.token) and after.token_refresh_at > relay.time()


def test_an_idle_conversation_keeps_a_live_token_by_refreshing_it_at_about_half_its_life(inprocess_relay):
    """Tokens that live a minute (as in the soak); the conversation idles for ten, only peeked in between."""
    ceiling = 20
    relay = inprocess_relay(token_ttl=60, env={"RELAY_POLL_CEILING_SECONDS": str(ceiling)})
    key = settled(relay)
    refreshes = 0
    first = token = relay.record(key).token
    for _ in range(120):
        wanted_at = with_newest_token(relay, key).token_refresh_at  # about half its life after it was granted
        relay.time.advance(5)
        relay.tick()
        record = with_newest_token(relay, key)
        assert record.token and record.token_expires_at > relay.time()  # never a moment without a live token
        if record.token != token:
            refreshes += 1
            token = record.token
            # at the last peek before the token wants it (at most one idle interval early), or the tick after
            assert wanted_at - timedelta(seconds=ceiling) <= relay.time() <= wanted_at + timedelta(seconds=5)
    calls = relay.calls()
    assert refreshes >= 600 / 60 and calls["tokens/refresh"] == refreshes
    assert "conversations/reconnect" not in calls and "conversations/start" not in calls
    assert calls["activities/get"] > refreshes  # peeked in between: the refresh is the only extra cost
    conversation_id = relay.record(key).conversation_id
    with pytest.raises(TokenExpired):  # Direct Line's clock followed the relay's: the first token is long gone
        relay.ctx.directline.get_activities(conversation_id, token=first)
    assert relay.ctx.directline.get_activities(conversation_id, token=token).activities  # the current one works


def messages_wait_past_the_tokens_life(relay: InProcessRelay, key: ConversationKey) -> None:
    """An outage longer than a token's life: the relay's own clock says it lapsed, nothing refreshed it."""
    late_bot_reply(relay, key)  # the bot said something the relay had no chance to deliver
    relay.time.advance(2 * 3600)


@pytest.mark.parametrize(("lapse", "replies"), [
    pytest.param(expire_its_tokens, [],
                 id="Direct Line expired every token: the message goes to a new conversation"),
    pytest.param(messages_wait_past_the_tokens_life, ["a late reply"],
                 id="an outage outlived the token: the old conversation's reply first, then a new conversation"),
])
def test_a_message_for_a_conversation_whose_tokens_lapsed_goes_to_a_new_conversation(inprocess_relay, lapse,
                                                                                    replies):
    relay = inprocess_relay()
    key = settled(relay)
    lapsed = relay.record(key).conversation_id
    lapse(relay, key)

    relay.message("twilio", USER, "after")
    result = relay.work(key)

    record = relay.record(key)
    assert record.conversation_id not in ("", lapsed) and record.token
    assert relay.messages_at_bot(record.conversation_id) == ["after"]
    assert relay.messages_at_bot(lapsed) == ["hello"]
    assert relay.replies(key) == ["You said: hello", *replies, "You said: after"]
    assert (result.posted, result.dead_letters) == (1, 0) and relay.store.dead_letters.list_letters(key) == []
    assert relay.store.outbox.list_messages(key) == []
    calls = relay.calls()
    assert calls["conversations/start"] == 1 and "conversations/reconnect" not in calls
    relay.time.advance(60)
    relay.tick()
    assert len(relay.replies(key)) == len(replies) + 2  # and nothing twice


def died_after_posting(relay: InProcessRelay, key: ConversationKey) -> None:
    """The worker posted the message and died before it could mark it done: it stays in doubt."""
    [message] = relay.store.outbox.list_messages(key)
    relay.store.outbox.mark_post_attempt(message)
    record = relay.record(key)
    relay.ctx.directline.post_activity(record.conversation_id, message.activity, token=record.token)


def died_before_delivering(relay: InProcessRelay, key: ConversationKey) -> None:
    """The worker posted the message and marked it done, then died before the bot's reply was delivered."""
    [message] = relay.store.outbox.list_messages(key)
    record = relay.record(key)
    posted = relay.ctx.directline.post_activity(record.conversation_id, message.activity, token=record.token)
    relay.store.outbox.complete_message(relay.store.outbox.mark_post_attempt(message), activity_id=posted)


@pytest.mark.parametrize("died", [
    pytest.param(died_after_posting, id="it died after posting: the message is found, not posted again"),
    pytest.param(died_before_delivering, id="it died before delivering: the reply still reaches the user"),
])
def test_tokens_that_lapse_while_a_dead_worker_holds_the_lease_lose_no_message_and_no_reply(inprocess_relay,
                                                                                            died):
    """As in the chaos run: an instance is killed holding a conversation's lease, every token of the
    conversation expires before the lease runs out, and the user writes on meanwhile."""
    relay = inprocess_relay(token_ttl=60, env={"RELAY_LEASE_SECONDS": "30"})
    key = settled(relay)
    lapsed = relay.record(key).conversation_id
    relay.message("twilio", USER, "before the crash")
    lease = relay.ctx.settings.relay.lease_seconds
    assert relay.store.conversations.acquire_lease(key, owner="poller:killed", lease_seconds=lease, now=relay.time())
    died(relay, key)
    relay.time.advance(20)
    relay.emulator.expire_tokens(lapsed)
    relay.message("twilio", USER, "while it was held")
    relay.message("twilio", USER, "and again")

    relay.time.advance(lease)
    for _ in range(5):
        relay.tick()
        relay.time.advance(1)

    record = relay.record(key)
    assert record.conversation_id != lapsed and record.lease_owner is None
    assert relay.messages_at_bot(lapsed) == ["hello", "before the crash"]
    assert relay.messages_at_bot(record.conversation_id) == ["while it was held", "and again"]
    assert relay.replies(key) == ["You said: hello", "You said: before the crash", "You said: while it was held",
                                  "You said: and again"]
    assert relay.store.outbox.list_messages(key) == [] and relay.store.dead_letters.list_letters(key) == []


# ------------------------------------------------------------------------------------------ watermarks


def invalidate_its_watermarks(relay: InProcessRelay, key: ConversationKey) -> None:
    """As after a change at Direct Line: every watermark it issued so far for the conversation is refused."""
    relay.emulator.invalidate_watermarks(relay.record(key).conversation_id)


def store_a_foreign_watermark(relay: InProcessRelay, key: ConversationKey) -> None:
    relay.store.conversations.update_record(key, lambda r: replace(r, watermark="zzzz-99"))


@pytest.mark.parametrize("refusal", [
    pytest.param(invalidate_its_watermarks, id="Direct Line invalidated the watermarks it issued"),
    pytest.param(store_a_foreign_watermark, id="a watermark that is not the conversation's"),
])
def test_a_watermark_direct_line_refuses_is_dropped_and_no_reply_goes_out_twice(inprocess_relay, refusal):
    relay = inprocess_relay()
    key = settled(relay)
    late_bot_reply(relay, key)
    refused = relay.record(key).watermark
    refusal(relay, key)

    first = relay.work(key)

    assert first.error == "" and relay.record(key).watermark is None  # no failure to retry: read from the start
    assert relay.calls() == {"activities/get": 1}
    for _ in range(3):
        relay.time.advance(60)
        assert relay.tick().failed == 0
    assert relay.replies(key) == ["You said: hello", "a late reply"]  # the late reply once, the first not again
    assert relay.record(key).watermark not in (None, refused, "zzzz-99")


# ------------------------------------------------------------------------- forgotten and ended conversations


@pytest.mark.parametrize("message_waiting", [
    pytest.param(True, id="forgotten while a message waits: the message goes to a new conversation, once"),
    pytest.param(False, id="forgotten while only polled: let go, and the next message starts a new conversation"),
])
def test_a_conversation_direct_line_forgot_is_replaced_and_no_message_lost(inprocess_relay, message_waiting):
    relay = inprocess_relay()
    key = settled(relay)
    forgotten = relay.record(key).conversation_id
    relay.emulator.forget(forgotten)
    if not message_waiting:
        relay.time.advance(2)
        relay.work(key)
        assert relay.record(key).conversation_id == ""

    relay.message("twilio", USER, "after")
    relay.work(key)

    record = relay.record(key)
    assert record.conversation_id not in ("", forgotten)
    assert relay.messages_at_bot(record.conversation_id) == ["after"]
    assert relay.replies(key) == ["You said: hello", "You said: after"]
    assert relay.store.outbox.list_messages(key) == []


def test_a_message_in_doubt_in_a_conversation_direct_line_then_forgot_goes_to_a_new_one(inprocess_relay):
    relay = inprocess_relay()
    key = settled(relay)
    relay.emulator.set_faults(drop_rate=1.0, phase="after", limit=1, endpoints=["activities/post"])
    relay.message("twilio", USER, "in doubt")
    relay.work(key)  # posted, but the answer was lost: the message waits, in doubt
    [waiting] = relay.store.outbox.list_messages(key)
    assert waiting.in_doubt
    forgotten = relay.record(key).conversation_id
    relay.emulator.forget(forgotten)  # and then Direct Line forgot the conversation it may be in

    relay.time.advance(6)
    relay.work(key)

    record = relay.record(key)
    assert record.conversation_id not in ("", forgotten)
    assert relay.messages_at_bot(record.conversation_id) == ["in doubt"]
    assert relay.replies(key)[-1] == "You said: in doubt"
    assert relay.store.outbox.list_messages(key) == []


def bot_says_goodbye(relay: InProcessRelay) -> ConversationKey:
    return relay.message("twilio", USER, "bye")  # the echo bot answers "Goodbye." and ends the conversation


def idle_past_the_timeout(relay: InProcessRelay) -> ConversationKey:
    key = settled(relay)
    relay.time.advance(10 * 60 + 1)
    return key


@pytest.mark.parametrize(("how", "user_sent_end", "replies"), [
    pytest.param(bot_says_goodbye, False, ["Goodbye."],
                 id="the bot says goodbye: its last words delivered, the conversation ended"),
    pytest.param(idle_past_the_timeout, True, ["You said: hello"],
                 id="idle past the timeout: the bot is told and the conversation ended"),
])
def test_an_ended_conversation_is_no_longer_polled_and_the_next_message_starts_anew(inprocess_relay, how,
                                                                                    user_sent_end, replies):
    relay = inprocess_relay(env={"RELAY_IDLE_TIMEOUT_MINUTES": "10"})
    key = how(relay)

    result = relay.work(key)

    ended = relay.record(key)
    assert result.ended and ended.state == ConversationState.ENDED
    assert seconds_until_next_poll(relay, key) is None
    assert relay.replies(key) == replies
    told = [a for a in relay.emulator.conversation(ended.conversation_id)["activities"]
            if a["type"] == "endOfConversation" and a["from"].get("role") != "bot"]
    assert bool(told) == user_sent_end
    relay.time.advance(60)
    assert relay.tick().due == 0

    relay.message("twilio", USER, "hello again")
    relay.work(key)

    record = relay.record(key)
    assert record.conversation_id != ended.conversation_id
    assert relay.messages_at_bot(record.conversation_id) == ["hello again"]
    assert relay.replies(key) == [*replies, "You said: hello again"]


# ---------------------------------------------------------------------------------------------- posting


@pytest.mark.parametrize(("fault", "retry_in"), [
    pytest.param({"error_500_rate": 1.0, "endpoints": ["conversations/start", "activities/post"]}, 10,
                 id="Direct Line cannot start a conversation: the message waits and is posted once"),
    pytest.param({"error_500_rate": 1.0}, 5,
                 id="Direct Line fails before taking the message: it waits and is posted once"),
    pytest.param({"error_502_rate": 1.0, "phase": "after"}, 5,
                 id="Direct Line took the message but the answer failed: it is found, not posted twice"),
    pytest.param({"drop_rate": 1.0, "phase": "after"}, 5,
                 id="the connection dropped after Direct Line took the message: it is found, not posted twice"),
    pytest.param({"throttle_rate": 1.0, "retry_after": "3"}, 3,
                 id="Direct Line throttles the post: it waits out the Retry-After and is posted once"),
])
def test_a_message_direct_line_did_not_confirm_reaches_the_bot_exactly_once(inprocess_relay, fault, retry_in):
    relay = inprocess_relay()
    relay.emulator.set_faults(**{"endpoints": ["activities/post"], **fault, "limit": 1})
    key = relay.message("twilio", USER, "hello")

    first = relay.work(key)

    assert first.posted == 0
    assert len(relay.store.outbox.list_messages(key)) == 1
    assert relay.replies(key) == []
    assert seconds_until_next_poll(relay, key) == retry_in
    relay.time.advance(retry_in)
    assert relay.tick().worked == 1
    record = relay.record(key)
    assert relay.messages_at_bot(record.conversation_id) == ["hello"]
    assert relay.replies(key) == ["You said: hello"]
    assert relay.store.outbox.list_messages(key) == []


def test_a_message_direct_line_took_without_an_answer_body_is_posted_once_and_answered(inprocess_relay):
    """Some deployments answer POST activities 204 with no body: the message was taken, it has no id."""
    relay = inprocess_relay()
    relay.emulator.set_faults(no_content_rate=1.0, endpoints=["activities/post"])
    key = relay.message("twilio", USER, "hello")

    result = relay.work(key)

    assert (result.posted, result.dead_letters, result.error) == (1, 0, "")
    assert relay.messages_at_bot(relay.record(key).conversation_id) == ["hello"]
    assert relay.replies(key) == ["You said: hello"]
    assert relay.store.outbox.list_messages(key) == []
    relay.time.advance(60)
    relay.tick()
    assert relay.messages_at_bot(relay.record(key).conversation_id) == ["hello"]  # never posted again
    assert relay.replies(key) == ["You said: hello"]


# --------------------------------------------------------------------------------- one webhook, many


def test_the_messages_of_one_user_in_one_webhook_wait_and_reach_the_bot_in_their_order(inprocess_relay):
    """The clock stands still, as when a webhook's messages are stored within one millisecond: each still
    goes into the outbox after the one before it (it orders by time of receipt, then by a key's hash)."""
    relay = inprocess_relay()
    texts = [f"part {n}" for n in range(8)]
    messages = [InboundMessage(f"msg_{n}", "user-order", text, reply_context={"user": "user-order"})
                for n, text in enumerate(texts)]
    [(key, marks)] = accept_all(relay.ctx, "generic", messages).items()
    assert [m.activity["text"] for m in relay.store.outbox.list_messages(key)] == texts
    relay.arrivals[key] = marks
    relay.work(key)
    record = relay.record(key)
    assert relay.messages_at_bot(record.conversation_id) == texts


def test_a_retried_webhook_of_a_message_already_posted_keeps_the_conversation_due_until_a_worker_looks(
        inprocess_relay):
    """The retry may come because the first delivery died after posting, before the bot's reply was sent and
    the conversation scheduled: its inbound row stays, and the next worker clears it once it has scheduled."""
    relay = inprocess_relay()
    message = InboundMessage("SM" + "a" * 32, USER, "hello", reply_context={"to": USER, "from": "+15005550006"})
    [(key, marks)] = accept_all(relay.ctx, "twilio", [message]).items()
    relay.arrivals[key] = marks
    relay.work(key)
    assert relay.messages_at_bot(relay.record(key).conversation_id) == ["hello"]

    assert accept_all(relay.ctx, "twilio", [message]) == {}  # a duplicate: nothing to post
    [due] = relay.store.due_polls.list_due(now=relay.time() + timedelta(days=1))
    assert [m.message_id for m in due.inbound] == [message.message_id]
    relay.arrivals[key] = list(due.inbound)
    relay.work(key)
    [due] = relay.store.due_polls.list_due(now=relay.time() + timedelta(days=1))
    assert due.inbound == ()
    assert relay.messages_at_bot(relay.record(key).conversation_id) == ["hello"]  # still once


def test_messages_past_the_first_outbox_page_wait_on_the_backoff_not_on_every_tick(inprocess_relay):
    """Direct Line cannot start the conversation: 60 messages wait (the outbox is read 50 at a time). The
    conversation comes back on the retry schedule, not at every tick for the messages of the second page."""
    relay = inprocess_relay()
    relay.emulator.set_faults(error_500_rate=1.0, endpoints=["conversations/start"])
    messages = [InboundMessage(f"SM{n:032x}", USER, f"m{n}", reply_context={"to": USER, "from": "+15005550006"})
                for n in range(60)]
    [(key, marks)] = accept_all(relay.ctx, "twilio", messages).items()
    relay.arrivals[key] = marks
    assert relay.work(key).posted == 0

    assert relay.store.due_polls.list_due(now=relay.time()) == []  # not due again at once
    [due] = relay.store.due_polls.list_due(now=relay.time() + timedelta(minutes=10))
    assert due.inbound == ()  # the schedule brings it back, with the whole outbox
    relay.emulator.clear_faults()
    relay.time.advance((due.due_at - relay.time()).total_seconds())
    assert relay.tick().posted == 60
    assert relay.messages_at_bot(relay.record(key).conversation_id) == [m.text for m in messages]


# -------------------------------------------------------------------------------------- card questions

ORDER_CARD = {"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": {
    "type": "AdaptiveCard", "version": "1.5", "body": [
        {"type": "TextBlock", "text": "Your order"},
        {"type": "Input.ChoiceSet", "id": "size", "label": "Which size?", "isRequired": True,
         "choices": [{"title": "Small", "value": "S"}, {"title": "Medium", "value": "M"}]}],
    "actions": [{"type": "Action.Submit", "title": "Send", "data": {"action": "order"}}]}}]}
NOTE = {"type": "Input.Text", "id": "note", "label": "Anything else?", "isRequired": True}
ORDER_CARD_WITH_NOTE = {**ORDER_CARD, "attachments": [{**ORDER_CARD["attachments"][0], "content": {
    **ORDER_CARD["attachments"][0]["content"], "body": [*ORDER_CARD["attachments"][0]["content"]["body"], NOTE]}}]}
WHATSAPP_USER = "15550200002"


def the_bot_asked(relay: InProcessRelay, card: dict, *, channel: str = "twilio",
                  user: str = USER) -> tuple[ConversationKey, str]:
    """The user wrote, and the bot (the test, through the connector) answered with `card`, delivered:
    (the conversation's key, its Direct Line conversation id)."""
    key = relay.message(channel, user, "I want a shirt")
    relay.work(key)
    conversation_id = relay.record(key).conversation_id
    relay.bot_sends(conversation_id, card)
    relay.work(key)
    return key, conversation_id


def tap_the_second_button(relay: InProcessRelay, key: ConversationKey) -> list[str]:
    [question] = [r for r in relay.simulator.replies(key.channel, key.user) if r["choices"]]
    assert [c["title"] for c in question["choices"]] == ["Small", "Medium"]
    relay.message(key.channel, key.user, "", reply_id=question["choices"][1]["id"])
    return []


def type_two(relay: InProcessRelay, key: ConversationKey) -> list[str]:
    [question] = relay.replies(key)
    assert question.splitlines()[-4:] == ["1. Small", "2. Medium", "", "Reply with the number of your choice."]
    relay.message(key.channel, key.user, "2")
    return []


def type_two_then_a_note(relay: InProcessRelay, key: ConversationKey) -> list[str]:
    type_two(relay, key)
    relay.work(key)  # the first input answered: nothing goes to the bot, the relay asks the next
    relay.message(key.channel, key.user, "Gift wrap")
    return ["Anything else?\nReply with your answer."]


@pytest.mark.parametrize(("channel", "user", "card", "answer", "value"), [
    ("whatsapp", WHATSAPP_USER, ORDER_CARD, tap_the_second_button, {"action": "order", "size": "M"}),
    ("twilio", USER, ORDER_CARD, type_two, {"action": "order", "size": "M"}),
    ("twilio", USER, ORDER_CARD_WITH_NOTE, type_two_then_a_note,
     {"action": "order", "size": "M", "note": "Gift wrap"}),
], ids=["a WhatsApp button", "2 on SMS", "2 then a note on SMS"])
def test_a_card_question_answered_on_the_phone_reaches_the_bot_as_the_value_it_expects(
        inprocess_relay, channel, user, card, answer, value):
    relay = inprocess_relay(echo=False)
    key, conversation_id = the_bot_asked(relay, card, channel=channel, user=user)
    assert relay.record(key).pending_question is not None
    prompts = answer(relay, key)
    relay.work(key)

    *_, posted = relay.activities_at_bot(conversation_id)
    assert posted["value"] == value and "text" not in posted
    assert relay.replies(key)[1:] == prompts  # the relay asked only what the card still needed
    assert relay.record(key).pending_question is None


def test_a_message_that_answers_nothing_reaches_the_bot_as_text_and_the_question_is_forgotten(inprocess_relay):
    relay = inprocess_relay(echo=False)
    key, conversation_id = the_bot_asked(relay, ORDER_CARD)
    relay.message("twilio", USER, "do you have it in red?")
    relay.work(key)
    *_, posted = relay.activities_at_bot(conversation_id)
    assert (posted["text"], posted.get("value")) == ("do you have it in red?", None)
    assert relay.record(key).pending_question is None


def test_an_answer_whose_post_failed_is_posted_later_with_the_same_value(inprocess_relay):
    relay = inprocess_relay(echo=False)
    key, conversation_id = the_bot_asked(relay, ORDER_CARD)
    relay.message("twilio", USER, "medium")
    relay.emulator.set_faults(error_500_rate=1.0, endpoints=["activities/post"])
    assert relay.work(key).posted == 0
    assert relay.record(key).pending_question is not None  # kept until the answer is posted
    relay.emulator.clear_faults()
    relay.time.advance(60)
    relay.work(key)
    values = [a.get("value") for a in relay.activities_at_bot(conversation_id)]
    assert values == [None, {"action": "order", "size": "M"}]


def test_the_relays_prompt_for_a_cards_next_input_waits_out_a_provider_outage_and_goes_once(inprocess_relay):
    relay = inprocess_relay(echo=False)
    key, conversation_id = the_bot_asked(relay, ORDER_CARD_WITH_NOTE)
    relay.message("twilio", USER, "small")
    relay.simulator.fail_next("twilio", 503)
    relay.work(key)
    assert len(relay.replies(key)) == 1  # the card only: the prompt waits
    relay.time.advance(60)
    relay.work(key)
    relay.work(key)
    assert relay.replies(key)[1:] == ["Anything else?\nReply with your answer."]
    relay.message("twilio", USER, "No thanks")
    relay.work(key)
    *_, posted = relay.activities_at_bot(conversation_id)
    assert posted["value"] == {"action": "order", "size": "S", "note": "No thanks"}


def test_a_medium_whose_fetch_breaks_unexpectedly_is_left_out_and_the_users_next_message_follows(
        inprocess_relay, monkeypatch):
    """Any exception out of fetch_media (once a ValueError from urlsplit) is that medium not fetched: a message
    that raised it stayed first in its outbox and every later one of its user waited behind it."""
    relay = inprocess_relay()

    def broken(self, media, *, max_bytes):
        raise ValueError("netloc contains invalid characters under NFKC normalization")

    monkeypatch.setattr(type(relay.ctx.adapter("generic")), "fetch_media", broken)
    photo = Media("https://media.example/1.png", content_type="image/png", protected=True)
    messages = [InboundMessage("m-photo", "u-media", "look", media=(photo,), reply_context={"user_id": "u-media"}),
                InboundMessage("m-next", "u-media", "and then", reply_context={"user_id": "u-media"})]
    [(key, marks)] = accept_all(relay.ctx, "generic", messages).items()
    relay.arrivals[key] = marks
    relay.work(key)

    assert relay.messages_at_bot(relay.record(key).conversation_id) == ["look", "and then"]
    [letter] = relay.store.dead_letters.list_letters(key)
    assert letter.kind == "media" and "MediaNotFetched" in letter.reason and "ValueError" in letter.reason
