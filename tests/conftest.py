"""Shared fixtures: real processes on free loopback ports, started once and stopped afterwards."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devstack.directline import DirectLineEmulator
from devstack.procs import ROOT, Azurite, ManagedProcess, free_port, http_ok, python_module
from relay.settings import SETTINGS


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory) -> Iterator[None]:
    """The suite's whole log output is scanned when it ends: this process's records (INFO and up, DEBUG
    where a test asks) and every *.log its hosts, emulators and simulators wrote. A configured secret,
    an encoding of one, or a Direct Line token anywhere fails the run (tests/security/leaks.py)."""
    from tests.security.leaks import LogCapture, log_files, scan

    capture, root = LogCapture(), logging.getLogger()
    # As in function_app.py: the SDK's line per storage request (headers already redacted) is noise here too.
    sdk = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    previous, previous_sdk = root.level, sdk.level
    root.addHandler(capture)
    root.setLevel(min(previous, logging.INFO))
    sdk.setLevel(logging.WARNING)
    yield
    root.removeHandler(capture)
    root.setLevel(previous)
    sdk.setLevel(previous_sdk)
    leaks = scan([("this process's log records", capture.text()), *log_files(tmp_path_factory.getbasetemp()).items()])
    if leaks:
        pytest.fail("secrets in the test suite's logs: " + "; ".join(sorted(set(leaks))[:20]), pytrace=False)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[Azurite]:
    """An Azurite of our own (table, queue, blob; in memory), never one that was already running."""
    with Azurite(log_path=tmp_path_factory.mktemp("azurite") / "azurite.log") as server:
        yield server


@pytest.fixture(scope="session")
def storage_connection_string(azurite: Azurite) -> str:
    return azurite.connection_string


@pytest.fixture
def table_prefix() -> str:
    """A table-name prefix of this test's own, so tests sharing one Azurite never see each other's rows."""
    return "t" + uuid.uuid4().hex[:12]


def subprocess_env(**values: str) -> dict[str, str]:
    """The environment for a child process: ours, minus any app setting (or one of its family, as DIRECTLINE_*) that
    would leak in from the developer's shell (a connection string there would send the tests' telemetry), plus
    `values`."""
    families = tuple({name.split("_")[0] + "_" for name in SETTINGS} | {"AzureWebJobs"})
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith(families)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(values)
    return env


@pytest.fixture
def start_host(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """Start devstack.host on a free port: start_host(script=..., env={...}, host_json=...) -> process with .url."""
    started: list[ManagedProcess] = []

    def start(script: Path = ROOT / "function_app.py", env: dict[str, str] | None = None,
              settings_file: Path | None = None, port: int | None = None,
              host_json: Path | None = None) -> ManagedProcess:
        port = port or free_port()
        argv = python_module("devstack.host", "--port", str(port), "--script", str(script),
                             "--settings", str(settings_file or tmp_path / "absent.settings.json"))
        if host_json is not None:
            argv += ["--host-json", str(host_json)]
        process = ManagedProcess(
            "host", argv, env=subprocess_env(**(env or {})),
            ready=lambda: http_ok(f"http://127.0.0.1:{port}/"),
            log_path=tmp_path / f"host-{port}.log",
        )
        process.url = f"http://127.0.0.1:{port}"
        process.port = port
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()


DIRECTLINE_TEST_SECRET = "test-directline-secret"


@pytest.fixture
def start_emulator(tmp_path: Path) -> Iterator[Callable[..., DirectLineEmulator]]:
    """Start a Direct Line emulator of this test's own: start_emulator(**DirectLineEmulator options).

    Defaults: secret "test-directline-secret", built-in echo, a free port, its log in tmp_path.
    Use this (not the shared `directline_emulator`) to change faults or TTLs."""
    started: list[DirectLineEmulator] = []

    def start(**options) -> DirectLineEmulator:
        options.setdefault("secret", DIRECTLINE_TEST_SECRET)
        options.setdefault("env", subprocess_env())
        options.setdefault("log_path", tmp_path / f"directline-{len(started)}.log")
        emulator = DirectLineEmulator(**options)
        started.append(emulator.start())
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


@pytest.fixture(scope="session")
def directline_emulator(tmp_path_factory) -> Iterator[DirectLineEmulator]:
    """One emulator for the session: built-in echo (late reply after 1 s), secret "test-directline-secret".

    Shared: never change its faults; use start_emulator for that."""
    emulator = DirectLineEmulator(secret=DIRECTLINE_TEST_SECRET, env=subprocess_env(),
                                  extra_args=("--late-reply-seconds", "1"),
                                  log_path=tmp_path_factory.mktemp("directline") / "directline.log")
    with emulator:
        yield emulator


@pytest.fixture(scope="session")
def start_simulator(tmp_path_factory) -> Iterator[Callable[..., ManagedProcess]]:
    """Start the provider simulator (devstack.channels) on a free port:
    start_simulator(relay_url=..., values={...}) -> ProviderSimulator with .url, .replies(), .fail_next(), ..."""
    from devstack.channels import ProviderSimulator

    started: list[ManagedProcess] = []

    def start(relay_url: str = "http://127.0.0.1:7071", values: dict[str, str] | None = None) -> ManagedProcess:
        simulator = ProviderSimulator(relay_url=relay_url, values=values, env=subprocess_env(),
                                      log_path=tmp_path_factory.mktemp("simulator") / "simulator.log")
        started.append(simulator.start())
        return simulator

    yield start
    for process in started:
        process.stop()


@dataclass
class ForwardProxy:
    """A forward proxy named by the environment's HTTP_PROXY that answers every GET itself with `body` (JSON of
    `content_type`), remembering the URL it was asked for."""

    body: bytes = b"{}"
    content_type: str = "application/json"
    asked: list[str] = field(default_factory=list)


@pytest.fixture
def forward_proxy(monkeypatch) -> Iterator[ForwardProxy]:
    proxy = ForwardProxy()

    class Answering(BaseHTTPRequestHandler):
        def do_GET(self):
            proxy.asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", proxy.content_type)
            self.send_header("Content-Length", str(len(proxy.body)))
            self.end_headers()
            self.wfile.write(proxy.body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_port}")
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
