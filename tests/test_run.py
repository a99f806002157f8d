"""`make run`'s launcher brings the stack up, serves health, lets `make admin` look into it, and stops everything on
Ctrl-C."""

import json
import subprocess
import sys
from pathlib import Path

import requests

from devstack.procs import ManagedProcess, free_port, http_ok, port_open, python_module, wait_until
from tests.conftest import subprocess_env


def test_launcher_serves_health_and_stops_everything(tmp_path):
    host_port, ports = free_port(), [free_port() for _ in range(3)]
    directline_port, bot_port, simulator_port = free_port(), free_port(), free_port()
    launcher = ManagedProcess(
        "make run", python_module("devstack.run", "--host-port", str(host_port),
                                  "--azurite-ports", ",".join(map(str, ports)), "--data-dir", str(tmp_path / "data"),
                                  "--directline-port", str(directline_port), "--bot-port", str(bot_port),
                                  "--simulator-port", str(simulator_port),
                                  "--settings", str(tmp_path / "local.settings.json")),
        env=subprocess_env(), ready=lambda: http_ok(f"http://127.0.0.1:{host_port}/api/health"),
        log_path=tmp_path / "run.log", startup_timeout=90,
    )
    with launcher:
        response = requests.get(f"http://127.0.0.1:{host_port}/api/health", timeout=20)
        assert response.status_code == 200, response.text
        assert response.json()["checks"]["table_storage"]["ok"]
        settings = json.loads((tmp_path / "local.settings.json").read_text())["Values"]
        assert_emulator_answers_through_the_bot(f"http://127.0.0.1:{directline_port}/v3/directline",
                                                settings["DIRECTLINE_SECRET"])
        assert_phone_gets_the_bots_answer(f"http://127.0.0.1:{simulator_port}")
        assert_admin_sees_the_conversation(tmp_path / "data" / "stack.settings.json")
    assert launcher.process.returncode == 0
    assert not (tmp_path / "data" / "stack.settings.json").exists()
    assert not port_open(host_port)
    assert not any(port_open(p) for p in ports)
    assert not port_open(directline_port) and not port_open(bot_port) and not port_open(simulator_port)
    log = (tmp_path / "run.log").read_text()
    assert f"http://127.0.0.1:{host_port}/api/health" in log
    assert f"http://127.0.0.1:{directline_port}/v3/directline" in log
    assert f"http://127.0.0.1:{bot_port}/api/messages" in log
    assert f"http://127.0.0.1:{simulator_port}/" in log


def assert_phone_gets_the_bots_answer(simulator_url: str) -> None:
    """What a person does with `make run`: type on a simulated phone, see the bot answer there."""
    sent = requests.post(f"{simulator_url}/_sim/inbound", timeout=60,
                         json={"provider": "twilio", "from": "+15550123456", "text": "hello from make run"}).json()
    assert sent["status"] == 200, sent

    def answered() -> bool:
        replies = requests.get(f"{simulator_url}/_sim/replies", params={"provider": "twilio", "user": "+15550123456"},
                               timeout=10).json()["replies"]
        return "You said: hello from make run" in [r["text"] for r in replies]

    wait_until(answered, timeout=30, what="the bot's answer on the simulated phone")


def assert_admin_sees_the_conversation(stack_settings: Path) -> None:
    """What `make admin` does while the stack is up: the operator's command line on the stack's own settings."""
    wait_until(stack_settings.exists, timeout=10, what="the stack's settings for make admin")
    done = subprocess.run([sys.executable, "-m", "relay.admin", "--settings", str(stack_settings), "--json",
                           "conversations", "list", "--channel", "twilio"], capture_output=True, text=True,
                          timeout=60, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "+15550123456" in [c["user"] for c in json.loads(done.stdout)]


def assert_emulator_answers_through_the_bot(base_url: str, secret: str) -> None:
    """The emulator takes the settings file's secret and the botbuilder bot answers through it."""
    auth = {"Authorization": f"Bearer {secret}"}
    conversation = requests.post(f"{base_url}/conversations", headers=auth, timeout=20).json()["conversationId"]
    posted = requests.post(f"{base_url}/conversations/{conversation}/activities", headers=auth, timeout=20,
                           json={"type": "message", "from": {"id": "dl_run"}, "text": "ping"})
    assert posted.status_code == 200, posted.text
    activities = requests.get(f"{base_url}/conversations/{conversation}/activities", headers=auth,
                              timeout=20).json()["activities"]
    assert "You said: ping" in [a.get("text") for a in activities if a["from"].get("role") == "bot"]


def test_make_run_bot_copilot_wires_the_relay_to_the_agent_token_endpoint_with_no_secret(tmp_path):
    """`make run BOT=copilot`: the emulator's Copilot-like agent, no botbuilder bot, and the host in token endpoint
    mode (the settings file's secret and endpoint overridden: the Direct Line base is discovered)."""
    from devstack.run import Ports, build_stack, ensure_local_settings

    settings_file = ensure_local_settings(tmp_path / "local.settings.json")
    stack = build_stack(Ports(), settings_file, tmp_path / "data", "copilot")
    names = [process.name for process, _ in stack]
    assert names == ["azurite", "directline emulator", "provider simulator", "functions host"], names
    emulator, host = stack[1][0], stack[3][0]
    assert "--copilot" in emulator.argv
    assert host.env["DIRECTLINE_TOKEN_ENDPOINT"] == emulator.token_endpoint
    assert host.env["DIRECTLINE_SECRET"] == host.env["DIRECTLINE_ENDPOINT"] == ""
    assert emulator.env["DIRECTLINE_SECRET"] != json.loads(settings_file.read_text())["Values"]["DIRECTLINE_SECRET"]
