"""The demo page in headless Chromium survives a token that expired while the page was offline or asleep."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from devstack.directline.echo import greeting
from devstack.procs import ROOT
from tests.conftest import subprocess_env
from tests.webchat.conftest import Stack

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = Path(__file__).with_name("browser_chat.js")
TOKEN_TTL = 10  # seconds: the page refreshes at about 5 s and is away past expiry within the test's time
EVERY_SECOND = "* * * * * *"  # the timer refreshes the relay's token well within its short life
POLLING = "?polling"  # the demo page polls Direct Line instead of reading its WebSocket stream

pytestmark = pytest.mark.browser


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (`make browser`)")
    return CHROMIUM


def chat_in_browser(chromium: Path, demo_url: str, *options: str) -> dict:
    """Run browser_chat.js on the demo page; what the page showed, or a failure with its console."""
    run = subprocess.run(["node", str(SCRIPT), demo_url, str(chromium), *options], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=subprocess_env())
    lines = run.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    assert run.returncode == 0, f"{result.get('error')}\nsteps: {result.get('steps')}\nconsole: " + \
        "\n".join(result.get("console", [])) + f"\nstderr: {run.stderr[-2000:]}"
    return result


def test_the_deployed_demo_chats_with_web_chat_from_the_bundle_url(chromium, new_stack, packaged_app, bundle_host):
    """As in Azure: the app from `make package`, no node_modules, Web Chat from WEBCHAT_BUNDLE_URL."""
    stack = new_stack(app=packaged_app, env={"WEBCHAT_DEMO_ENABLED": "true", "WEBCHAT_BUNDLE_URL": bundle_host.url})
    result = chat_in_browser(chromium, f"{stack.url}/api/webchat/demo", "--chat-only")
    assert result["bubbles"] == [GREETING, "hello", "You said: hello"]
    assert stack.emulator.counters()["requests"].get("conversations/stream", 0) >= 1  # the WebSocket stream
    assert bundle_host.requests == ["/botframework-webchat/test/webchat.js"]


GREETING = greeting("de-DE")  # the echo bot's answer to the page's startConversation event, in the browser's locale
USER_SAID = ["hello", "refreshed", "after the break"]
TRANSCRIPT = [GREETING, "hello", "You said: hello", "refreshed", "You said: refreshed", "after the break",
              "You said: after the break"]


def assert_one_conversation(stack: Stack, result: dict, transcript: list[str]) -> None:
    """Back, the page went on in its conversation: its transcript exactly once, after a reload too, and
    Direct Line got each of its messages once, from the page's own dl_ user, and one start event (the
    greeting's): none on the resume or the reload."""
    assert result["conversationAfter"] == result["conversationBefore"]
    assert result["bubbles"] == transcript
    assert result["conversationAfterReload"] == result["conversationBefore"]
    assert result["bubblesAfterReload"] == transcript
    activities = stack.emulator.conversation(result["conversationBefore"])["activities"]
    user = result["userId"]
    assert user.startswith("dl_")
    assert [a["text"] for a in activities if a["type"] == "message"] == transcript
    said = [a for a in activities if a["type"] == "message" and a["from"].get("role") != "bot"]
    assert [(a["from"]["id"], a["text"]) for a in said] == [(user, text) for text in USER_SAID]
    assert [(a["name"], a["locale"], a["from"]["id"]) for a in activities if a["type"] == "event"] == [
        ("startConversation", "de-DE", user)]
    log = stack.log_text()
    assert "Executed 'Functions.directline_refresh' (Succeeded, Status=200" in log
    assert "Executed 'Functions.directline_resume' (Succeeded, Status=200" in log
    assert stack.emulator.secret not in log


def test_web_chat_polling_resumes_its_conversation_after_its_token_expired_offline(chromium, new_stack):
    stack = new_stack(token_ttl=TOKEN_TTL, env={"WEBCHAT_DEMO_ENABLED": "true", "RELAY_POLL_SCHEDULE": EVERY_SECOND})
    result = chat_in_browser(chromium, f"{stack.url}/api/webchat/demo{POLLING}")
    assert stack.emulator.counters()["requests"].get("conversations/stream", 0) == 0
    assert result["offlineSeen"] is True
    assert result["statusWhileOffline"] != "2"  # the page did not pretend to be online
    assert_one_conversation(stack, result, TRANSCRIPT)


@pytest.mark.parametrize("enhanced_auth", [True, False], ids=["enhanced-auth", "no-enhanced-auth"])
def test_a_streaming_page_asleep_past_its_tokens_expiry_wakes_into_its_conversation_with_what_it_missed(
        chromium, new_stack, enhanced_auth):
    stack = new_stack(token_ttl=TOKEN_TTL, enhanced_auth=enhanced_auth,
                      env={"WEBCHAT_DEMO_ENABLED": "true", "RELAY_POLL_SCHEDULE": EVERY_SECOND})
    result = chat_in_browser(chromium, f"{stack.url}/api/webchat/demo", "--sleep", stack.emulator.url)
    assert result["steps"][2:4] == ["asleep", "woke after its token expired"]
    requests_made = stack.emulator.counters()["requests"]
    assert requests_made.get("conversations/stream", 0) >= 2  # a stream before the sleep, another after
    assert requests_made.get("activities/get", 0) >= 1  # what it missed, read once awake
    transcript = [*TRANSCRIPT[:5], "while you slept", *TRANSCRIPT[5:]]
    assert_one_conversation(stack, result, transcript)
