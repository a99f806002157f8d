"""Shared fixtures: real processes on free loopback ports, started once and stopped afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.procs import ROOT, Azurite, ManagedProcess, free_port, http_ok, python_module


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
    """The environment for a child process: ours, minus settings that would leak in, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIRECTLINE_", "RELAY_", "TWILIO_",
                                                                       "WHATSAPP_", "MESSAGEBIRD_", "BIRD_",
                                                                       "GENERIC_", "WEBCHAT_", "AzureWebJobs"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(values)
    return env


@pytest.fixture
def start_host(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """Start devstack.host on a free port: start_host(script=..., env={...}) -> process with .url."""
    started: list[ManagedProcess] = []

    def start(script: Path = ROOT / "function_app.py", env: dict[str, str] | None = None,
              settings_file: Path | None = None) -> ManagedProcess:
        port = free_port()
        argv = python_module("devstack.host", "--port", str(port), "--script", str(script),
                             "--settings", str(settings_file or tmp_path / "absent.settings.json"))
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
