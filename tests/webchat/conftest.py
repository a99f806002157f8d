"""The token server's stack: a Direct Line emulator (built-in echo bot), Azurite, and the app on the local host."""

from __future__ import annotations

import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from devstack.directline import DirectLineEmulator
from devstack.package import build_package
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


def start_stack(tmp: Path, storage_connection_string: str, *, token_ttl: float = 1800, enhanced_auth: bool = True,
                env: dict[str, str] | None = None, secret: str | None = None, app: Path = ROOT) -> Stack:
    """Emulator (enhanced authentication on unless `enhanced_auth=False`) then host, serving the app in `app`
    (this checkout, or an unpacked `make package`); the caller stops both (stop_stack)."""
    secret = secret or "dl-secret-" + uuid.uuid4().hex
    emulator = DirectLineEmulator(secret=secret, token_ttl=token_ttl, enhanced_auth=enhanced_auth,
                                  env=subprocess_env(), log_path=tmp / "directline.log").start()
    prefix = "w" + uuid.uuid4().hex[:12]
    port = free_port()
    # The public base URL is the host's own, as in Azure (and under `make run`): its pages' origin.
    values = {"AzureWebJobsStorage": storage_connection_string, "RELAY_TABLE_PREFIX": prefix,
              "RELAY_POLL_QUEUE": f"poll-{prefix}",
              "DIRECTLINE_SECRET": secret, "DIRECTLINE_ENDPOINT": emulator.base_url,
              "RELAY_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}", **(env or {})}
    # The host runs in the app's folder, as in Azure; devstack comes from this checkout.
    host = ManagedProcess("host", python_module("devstack.host", "--port", str(port), "--script",
                                                str(app / "function_app.py"), "--settings",
                                                str(tmp / "absent.settings.json")),
                          env=subprocess_env(PYTHONPATH=str(ROOT), **values),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/"), log_path=tmp / "host.log", cwd=app)
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
    """new_stack(token_ttl=..., enhanced_auth=..., env={...}) -> a Stack of this test's own."""
    started: list[Stack] = []

    def start(**options) -> Stack:
        started.append(start_stack(tmp_path / str(len(started)), storage_connection_string, **options))
        return started[-1]

    yield start
    for each in started:
        stop_stack(each)


@pytest.fixture
def packaged_app(tmp_path) -> Path:
    """`make package` unpacked: the app as Azure runs it, with no node_modules beside it."""
    archive = tmp_path / "relay.zip"
    build_package(ROOT, archive)
    app = tmp_path / "wwwroot"
    with zipfile.ZipFile(archive) as package:
        package.extractall(app)
    return app


WEBCHAT_BUNDLE = ROOT / "node_modules/botframework-webchat/dist/webchat.js"


@dataclass
class BundleHost:
    """A stand-in for Microsoft's CDN: the npm Web Chat bundle at `url`; `requests` lists the paths asked for."""

    url: str
    requests: list[str]


@pytest.fixture
def bundle_host() -> Iterator[BundleHost]:
    content = WEBCHAT_BUNDLE.read_bytes()
    path = "/botframework-webchat/test/webchat.js"
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            found = self.path == path
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(content) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(content)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield BundleHost(f"http://127.0.0.1:{server.server_port}{path}", asked)
    server.shutdown()
    server.server_close()
