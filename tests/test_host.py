"""The local Functions host, against a sample app, over real HTTP."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from devstack.host import expand_settings, load_local_settings, route_pattern
from devstack.procs import wait_until

SAMPLE = Path(__file__).parent / "apps" / "sample_app.py"


@pytest.fixture
def sample(start_host, tmp_path):
    return start_host(script=SAMPLE, env={"SAMPLE_SCHEDULE": "0 0 0 1 1 *"})


def test_route_parameters_query_headers_and_body_reach_the_function(sample):
    response = requests.post(f"{sample.url}/api/items/42/widget?color=red&empty=", data=b"payload \xe2\x9c\x93",
                             headers={"X-Sample": "yes"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["X-Handled-By"] == "items"
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"method": "POST", "route": {"id": "42", "name": "widget"},
                               "query": {"color": "red", "empty": ""}, "body": "payload ✓", "header": "yes"}


def test_a_chunked_body_reaches_the_function_whole(sample):
    chunks = iter([b"pay", b"load ", "\u2713".encode()])
    response = requests.post(f"{sample.url}/api/items/42/widget", data=chunks, timeout=10)  # chunked: no length
    assert response.status_code == 200 and response.json()["body"] == "payload \u2713"


@pytest.mark.parametrize(("length", "status"), [("abc", 400), ("-5", 400), (str(100 * 2**20 + 1), 413),
                                                ("9" * 20, 413)])
def test_a_malformed_or_too_large_content_length_is_answered_before_any_body_is_read(sample, length, status):
    with socket.create_connection(("127.0.0.1", sample.port), timeout=10) as conn:
        conn.sendall(f"POST /api/items/1/x HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        answer = conn.recv(4096)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]


def test_optional_route_parameter_may_be_absent(sample):
    response = requests.get(f"{sample.url}/api/items/7", timeout=10)
    assert response.status_code == 200
    assert response.json()["route"] == {"id": "7"}


def test_int_constraint_rejects_text_as_unknown_route(sample):
    response = requests.get(f"{sample.url}/api/items/seven", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NotFound"


def test_unknown_route_and_missing_prefix_are_404(sample):
    assert requests.get(f"{sample.url}/api/nothing-here", timeout=10).status_code == 404
    assert requests.get(f"{sample.url}/anything", timeout=10).status_code == 404


def test_method_not_declared_is_405(sample):
    response = requests.delete(f"{sample.url}/api/items/1", timeout=10)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "MethodNotAllowed"


def test_no_declared_methods_means_every_method(sample):
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        response = requests.request(method, f"{sample.url}/api/anything", timeout=10)
        assert (response.status_code, response.text) == (202, method)


def test_unhandled_exception_is_500_with_traceback_logged(sample):
    response = requests.get(f"{sample.url}/api/boom", timeout=10)
    assert response.status_code == 500
    log = sample.log_path.read_text()
    assert "RuntimeError: deliberate failure" in log
    assert "Functions.boom" in log


def test_requests_are_served_concurrently(sample):
    results = []

    def call():
        results.append(requests.get(f"{sample.url}/api/rendezvous", timeout=60).text)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Served one after another, the first request would wait alone at the barrier and give up.
    assert results == ["together"] * 4


BURST = 100


def burst_while_paused(pid: int, port: int, path: str) -> tuple[int, list[bytes]]:
    """Open BURST connections to a server while its process is stopped (as a busy instance is), then let it
    run and send `GET path` on each: how many were established while it was stopped, and the raw answers.

    Connections the kernel queues for a server are established at once; once its listen backlog is
    full, the kernel drops the rest (the client retries later, or gives up: a reset or timeout)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(BURST)]
    established: set[socket.socket] = set()
    os.kill(pid, signal.SIGSTOP)
    try:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        deadline = time.monotonic() + 3
        while len(established) < BURST and time.monotonic() < deadline:
            _, writable, _ = select.select([], [s for s in sockets if s not in established], [], 0.1)
            established.update(s for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
    finally:
        os.kill(pid, signal.SIGCONT)
    answers = []
    for sock in sockets:
        with sock:
            if sock not in established:
                continue
            sock.settimeout(30)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            answers.append(answer)
    return len(established), answers


def test_a_burst_of_connections_waits_in_the_queue_and_every_one_is_answered(sample):
    """Azure's front end queues a burst; the local host must too, or concurrency tests through it test nothing."""
    established, answers = burst_while_paused(sample.process.pid, sample.port, "/api/anything")
    assert established == BURST
    assert [answer.split(b"\r\n", 1)[0] for answer in answers] == [b"HTTP/1.1 202 Accepted"] * BURST


def test_the_emulator_and_the_simulator_queue_a_burst_of_connections_too(start_emulator, start_simulator):
    emulator, simulator = start_emulator(), start_simulator()
    for server, path in ((emulator, "/_emulator/"), (simulator, "/_sim/health")):
        port = int(server.url.rsplit(":", 1)[1])
        established, answers = burst_while_paused(server.process.pid, port, path)
        assert established == BURST, server.name
        assert all(answer.split(b" ", 2)[1] == b"200" for answer in answers), server.name


def test_async_functions_are_awaited(sample):
    assert requests.get(f"{sample.url}/api/slow?seconds=0.1", timeout=20).text == "done"


def read_ticks(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_timer_fires_on_a_seconds_schedule(start_host, tmp_path):
    ticks = tmp_path / "ticks.jsonl"
    host = start_host(script=SAMPLE, env={"SAMPLE_SCHEDULE": "* * * * * *", "SAMPLE_TICKS_FILE": str(ticks)})
    wait_until(lambda: len(read_ticks(ticks)) >= 3, timeout=20, what="three timer ticks")
    runs = read_ticks(ticks)
    starts = [run["start"] for run in runs]
    # Every second, on the second: consecutive ticks about one second apart, not bunched.
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap > 0.5 for gap in gaps), gaps  # one run per second, never two for one tick
    assert "Functions.tick" in host.log_path.read_text()


def test_timer_runs_never_overlap_and_a_missed_tick_is_past_due(start_host, tmp_path):
    ticks = tmp_path / "ticks.jsonl"
    start_host(script=SAMPLE, env={"SAMPLE_SCHEDULE": "* * * * * *", "SAMPLE_TICKS_FILE": str(ticks),
                                   "SAMPLE_TICK_SECONDS": "2.2"})
    wait_until(lambda: len(read_ticks(ticks)) >= 3, timeout=30, what="three slow timer ticks")
    runs = read_ticks(ticks)
    assert not any(run["overlap"] for run in runs)
    for earlier, later in itertools.pairwise(runs):
        assert later["start"] >= earlier["end"] - 0.01
    # Each run outlasts the one-second schedule, so the following tick starts late: past due.
    assert all(run["past_due"] for run in runs[1:])


def test_route_templates():
    assert route_pattern("a/{id:int}").fullmatch("a/12")
    assert not route_pattern("a/{id:int}").fullmatch("a/x")
    assert route_pattern("a/{id?}").fullmatch("a")
    assert route_pattern("files/{*path}").fullmatch("files/x/y/z").group("path") == "x/y/z"
    assert route_pattern("channels/{channel:alpha}").fullmatch("channels/twilio")


def test_local_settings_fill_the_environment_but_the_environment_wins(tmp_path):
    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": {"A": "from-file", "B": "from-file"}}))
    environ = {"A": "from-env"}
    assert load_local_settings(settings, environ) == ["B"]
    assert environ == {"A": "from-env", "B": "from-file"}
    assert load_local_settings(tmp_path / "missing.json", environ) == []


def test_binding_expressions_use_app_settings():
    assert expand_settings("%SCHED%", {"SCHED": "*/5 * * * * *"}) == "*/5 * * * * *"
    with pytest.raises(KeyError, match="NOPE"):
        expand_settings("%NOPE%", {})
