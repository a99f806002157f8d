"""The token server's stack: a Direct Line emulator (built-in echo bot), Azurite, and the app on the local host."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from devstack.directline import DirectLineEmulator
from devstack.procs import ROOT, ManagedProcess, free_port, http_ok, python_module
from tests.conftest import subprocess_env

SHOP = "https://shop.example"  # the one origin the shared stack allows


@dataclass
class Stack:
    """The app (`url`, its `host` process and log) and the emulator behind it; `post` keeps every answer."""

    url: str
    host: ManagedProcess
    emulator: DirectLineEmulator
    table_prefix: str
    answers: list[requests.Response] = field(default_factory=list)

    def post(self, path: str, *, json=None, data=None, headers: dict[str, str] | None = None) -> requests.Response:
        response = requests.post(f"{self.url}/api/directline/{path}", json=json, data=data, headers=headers,
                                 timeout=30)
        self.answers.append(response)
        return response

    def token(self, **headers: str) -> dict:
        response = self.post("token", headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    def refresh(self, token: str) -> requests.Response:
        return self.post("refresh", headers={"Authorization": f"Bearer {token}"})

    def resume(self, conversation_id: str, resume_key: str, **extra) -> requests.Response:
        return self.post("resume", json={"conversationId": conversation_id, "resumeKey": resume_key, **extra})

    def log_text(self) -> str:
        return self.host.log_path.read_text(errors="replace")


def start_stack(tmp: Path, storage_connection_string: str, *, token_ttl: float = 1800,
                env: dict[str, str] | None = None, secret: str | None = None) -> Stack:
    """Emulator then host; the caller stops both (stop_stack)."""
    secret = secret or "dl-secret-" + uuid.uuid4().hex
    emulator = DirectLineEmulator(secret=secret, token_ttl=token_ttl, env=subprocess_env(),
                                  log_path=tmp / "directline.log").start()
    prefix = "w" + uuid.uuid4().hex[:12]
    port = free_port()
    values = {"AzureWebJobsStorage": storage_connection_string, "RELAY_TABLE_PREFIX": prefix,
              "DIRECTLINE_SECRET": secret, "DIRECTLINE_ENDPOINT": emulator.base_url, **(env or {})}
    host = ManagedProcess("host", python_module("devstack.host", "--port", str(port), "--settings",
                                                str(tmp / "absent.settings.json")),
                          env=subprocess_env(**values), ready=lambda: http_ok(f"http://127.0.0.1:{port}/"),
                          log_path=tmp / "host.log", cwd=ROOT)
    try:
        host.start()
    except BaseException:
        emulator.stop()
        raise
    return Stack(f"http://127.0.0.1:{port}", host, emulator, prefix)


def stop_stack(stack: Stack) -> None:
    stack.host.stop()
    stack.emulator.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, storage_connection_string) -> Iterator[Stack]:
    """One stack for a module: origin SHOP allowed, demo on, a rate limit no test reaches, DEBUG logs."""
    started = start_stack(tmp_path_factory.mktemp("webchat"), storage_connection_string,
                          env={"WEBCHAT_ALLOWED_ORIGINS": SHOP, "WEBCHAT_DEMO_ENABLED": "true",
                               "WEBCHAT_TOKEN_RATE_LIMIT": "1000", "DEVSTACK_LOG_LEVEL": "DEBUG"})
    yield started
    stop_stack(started)


@pytest.fixture
def new_stack(tmp_path, storage_connection_string) -> Iterator[Callable[..., Stack]]:
    """new_stack(token_ttl=..., env={...}) -> a Stack of this test's own."""
    started: list[Stack] = []

    def start(**options) -> Stack:
        started.append(start_stack(tmp_path / str(len(started)), storage_connection_string, **options))
        return started[-1]

    yield start
    for each in started:
        stop_stack(each)
