"""Microsoft's own client, botframework-directlinejs, in polling mode under Node, against the emulator."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from devstack.procs import ROOT
from tests.conftest import subprocess_env

CLIENT = Path(__file__).with_name("directlinejs_client.js")


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
