"""The emulator in front of real bots: the botbuilder echo bot, and bots that fail or stall."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from websockets.sync.client import connect

from devstack.bot import EchoBot
from devstack.procs import wait_until
from tests.conftest import subprocess_env
from tests.emulator.conftest import DirectLineCalls, error_of, next_sets


@pytest.fixture(scope="module")
def echo_bot(tmp_path_factory) -> Iterator[EchoBot]:
    bot = EchoBot(late_reply_seconds=1, env=subprocess_env(),
                  log_path=tmp_path_factory.mktemp("bot") / "bot.log")
    with bot:
        yield bot


@pytest.fixture(scope="module")
def bot_emulator(echo_bot, tmp_path_factory):
    from devstack.directline import DirectLineEmulator

    emulator = DirectLineEmulator(secret="bot-test-secret", bot_url=echo_bot.url, env=subprocess_env(),
                                  log_path=tmp_path_factory.mktemp("dl") / "directline.log")
    with emulator:
        yield emulator


@pytest.fixture
def via_bot(bot_emulator) -> DirectLineCalls:
    return DirectLineCalls(bot_emulator.base_url, secret="bot-test-secret")


def test_botbuilder_echo_answers_through_the_connector_api(via_bot, bot_emulator):
    cid = via_bot.start(user={"id": "dl_alice"})["conversationId"]
    sent = via_bot.say(cid, "hello bot", user="dl_alice")
    replies = [a for a in via_bot.all_activities(cid) if a["from"].get("role") == "bot"]
    assert [r["text"] for r in replies] == ["You said: hello bot"]  # in the set before the POST returned
    assert replies[0]["replyToId"] == sent and replies[0]["from"]["id"] == "relaybot"
    assert bot_emulator.counters()["conversations"][cid].get("connector/reply", 0) >= 1


def test_both_echo_bots_greet_on_a_start_conversation_event_in_its_locale(via_bot, directline_emulator):
    builtin = DirectLineCalls(directline_emulator.base_url, secret=directline_emulator.secret)
    for calls in (via_bot, builtin):
        cid = calls.start(user={"id": "dl_alice"})["conversationId"]
        for event in ({"name": "somethingElse"}, {"name": "startConversation", "locale": "de-DE"}):
            response = calls.post(cid, {"type": "event", "from": {"id": "dl_alice"}, **event})
            assert response.status_code == 200, response.text
        replies = [a["text"] for a in calls.all_activities(cid) if a["from"].get("role") == "bot"]
        assert replies == ["Hello, I am the echo bot. Your locale: de-DE"]


def test_botbuilder_echo_types_before_it_answers_over_the_stream(via_bot):
    conversation = via_bot.start(user={"id": "dl_alice"})
    with connect(conversation["streamUrl"], open_timeout=10) as stream:
        via_bot.say(conversation["conversationId"], "type first", user="dl_alice", auth=conversation["token"])
        sets = next_sets(stream, 3)
    assert [(s["activities"][0]["type"], s["activities"][0]["from"].get("role")) for s in sets] == [
        ("message", None), ("typing", "bot"), ("message", "bot")]
    assert sets[2]["activities"][0]["text"] == "You said: type first"


def test_botbuilder_late_reply_arrives_after_the_turn(via_bot):
    cid = via_bot.start()["conversationId"]
    via_bot.say(cid, "later")
    replies = via_bot.wait_for_bot(cid, 2)
    assert [r["text"] for r in replies] == ["You said: later", "Late reply: later"]


def test_botbuilder_card_and_bye(via_bot):
    cid = via_bot.start()["conversationId"]
    via_bot.say(cid, "card")
    via_bot.say(cid, "bye")
    replies = via_bot.wait_for_bot(cid, 3)
    assert replies[0]["attachments"][0]["contentType"] == "application/vnd.microsoft.card.hero"
    assert [a["value"] for a in replies[0]["suggestedActions"]["actions"]] == ["yes", "no"]
    assert [r["type"] for r in replies[1:]] == ["message", "endOfConversation"]


class FakeBot:
    """A messaging endpoint that records what it receives and answers `status`, or waits for `release`."""

    def __init__(self, status: int = 200, stall: bool = False):
        self.received: list[dict] = []
        self.release = threading.Event()
        bot = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                bot.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                if stall and bot.received[-1]["type"] == "message":
                    bot.release.wait(timeout=30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/messages"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_bot_factory():
    bots: list[FakeBot] = []

    def make(**kwargs) -> FakeBot:
        bots.append(FakeBot(**kwargs))
        return bots[-1]

    yield make
    for bot in bots:
        bot.close()


def test_start_greets_the_bot_and_activities_reach_it_with_a_service_url(start_emulator, fake_bot_factory):
    bot = fake_bot_factory()
    emulator = start_emulator(bot_url=bot.url)
    calls = DirectLineCalls(emulator.base_url)
    cid = calls.start(user={"id": "dl_carol"})["conversationId"]
    calls.say(cid, "hi", user="dl_carol")
    wait_until(lambda: len(bot.received) >= 2, timeout=10, what="the bot to receive two activities")
    update = next(a for a in bot.received if a["type"] == "conversationUpdate")
    assert {m["id"] for m in update["membersAdded"]} == {"relaybot", "dl_carol"}
    message = next(a for a in bot.received if a["type"] == "message")
    assert message["serviceUrl"] == emulator.url
    assert message["conversation"]["id"] == cid and message["recipient"]["id"] == "relaybot"
    assert message["channelId"] == "directline" and message["id"].startswith(cid + "|")


def test_end_of_conversation_is_forwarded_unless_told_not_to(start_emulator, fake_bot_factory):
    forwarding, silent = fake_bot_factory(), fake_bot_factory()
    for bot, extra in ((forwarding, ()), (silent, ("--no-forward-end-of-conversation",))):
        calls = DirectLineCalls(start_emulator(bot_url=bot.url, extra_args=extra).base_url)
        cid = calls.start()["conversationId"]
        assert calls.post(cid, {"type": "endOfConversation", "from": {"id": "dl_u"}}).status_code == 200
        calls.say(cid, "after")
        wait_until(lambda bot=bot: any(a["type"] == "message" for a in bot.received), timeout=10)
    assert "endOfConversation" in [a["type"] for a in forwarding.received]
    assert "endOfConversation" not in [a["type"] for a in silent.received]


def test_bot_error_is_502_bot_rejected_activity_and_the_activity_is_kept(start_emulator, fake_bot_factory):
    calls = DirectLineCalls(start_emulator(bot_url=fake_bot_factory(status=500).url).base_url)
    cid = calls.start()["conversationId"]
    response = calls.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "boom"})
    assert error_of(response) == (502, "BotRejectedActivity")
    assert [a["text"] for a in calls.all_activities(cid)] == ["boom"]


def test_unreachable_bot_is_502(start_emulator):
    from devstack.procs import free_port

    calls = DirectLineCalls(start_emulator(bot_url=f"http://127.0.0.1:{free_port()}/api/messages").base_url)
    cid = calls.start()["conversationId"]
    response = calls.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "anyone?"})
    assert error_of(response) == (502, "BotRejectedActivity")


def test_silent_bot_is_504_bot_error_after_the_bot_timeout(start_emulator, fake_bot_factory):
    bot = fake_bot_factory(stall=True)
    calls = DirectLineCalls(start_emulator(bot_url=bot.url, extra_args=("--bot-timeout", "1")).base_url)
    cid = calls.start()["conversationId"]
    response = calls.post(cid, {"type": "message", "from": {"id": "dl_u"}, "text": "slow"})
    bot.release.set()
    assert error_of(response) == (504, "BotError")
    assert [a["text"] for a in calls.all_activities(cid)] == ["slow"]
