"""`make run`'s launcher brings the stack up, serves health, and stops everything on Ctrl-C."""

import requests

from devstack.procs import ManagedProcess, free_port, http_ok, port_open, python_module
from tests.conftest import subprocess_env


def test_launcher_serves_health_and_stops_everything(tmp_path):
    host_port, ports = free_port(), [free_port() for _ in range(3)]
    launcher = ManagedProcess(
        "make run", python_module("devstack.run", "--host-port", str(host_port),
                                  "--azurite-ports", ",".join(map(str, ports)), "--data-dir", str(tmp_path / "data")),
        env=subprocess_env(), ready=lambda: http_ok(f"http://127.0.0.1:{host_port}/api/health"),
        log_path=tmp_path / "run.log", startup_timeout=90,
    )
    with launcher:
        response = requests.get(f"http://127.0.0.1:{host_port}/api/health", timeout=20)
        assert response.status_code == 200, response.text
        assert response.json()["checks"]["table_storage"]["ok"]
    assert launcher.process.returncode == 0
    assert not port_open(host_port)
    assert not any(port_open(p) for p in ports)
    assert f"http://127.0.0.1:{host_port}/api/health" in (tmp_path / "run.log").read_text()
