"""Microsoft's own client, botframework-directlinejs, under Node against the emulator: polling, and the
WebSocket stream (its default, what Web Chat uses)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from devstack.procs import ROOT
from tests.conftest import subprocess_env

CLIENT = Path(__file__).with_name("directlinejs_client.js")
STREAM_CLIENT = Path(__file__).with_name("directlinejs_stream_client.js")


def test_directlinejs_gets_a_token_talks_to_the_echo_bot_and_refreshes_its_token(directline_emulator):
    before = directline_emulator.counters()["requests"].get("tokens/refresh", 0)
    run = subprocess.run(["node", str(CLIENT), directline_emulator.base_url], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=subprocess_env(DIRECTLINE_SECRET=directline_emulator.secret))
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["conversationId"] == result["generatedConversationId"]
    assert result["postedId"].startswith(result["conversationId"] + "|")
    assert "Online" in result["statuses"]
    assert result["firstEcho"] == "You said: hello from directlinejs"
    assert result["tokenChanged"] is True
    assert result["secondEcho"] == "You said: after refresh"
    echo = next(a for a in result["received"] if a["from"].get("role") == "bot")
    assert echo["replyToId"] == result["postedId"]
    assert directline_emulator.counters()["requests"]["tokens/refresh"] == before + 1


def test_directlinejs_over_the_websocket_receives_the_typing_and_the_echo(directline_emulator):
    run = subprocess.run(["node", str(STREAM_CLIENT), directline_emulator.base_url], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=subprocess_env(DIRECTLINE_SECRET=directline_emulator.secret))
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    cid = result["conversationId"]
    assert result["usesWebSocket"] is True and cid == result["generatedConversationId"]
    assert result["streamPaths"] == [f"/v3/directline/conversations/{cid}/stream"]
    assert [(a["type"], a["from"].get("role")) for a in result["received"]] == [
        ("message", None), ("typing", "bot"), ("message", "bot")]
    mine, typing, echo = result["received"]
    assert mine["id"] == result["postedId"] and mine["from"]["id"] == "dl_stream"
    assert typing["replyToId"] == echo["replyToId"] == result["postedId"]
    assert result["echo"] == "You said: hello over the stream"
    assert result["watermark"]
    after = directline_emulator.counters()["conversations"][cid]
    assert after["conversations/stream"] == 1 and "activities/get" not in after  # the stream, never a poll
