"""Helpers for the emulator's contract tests: plain HTTP calls, as any Direct Line client makes them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from websockets.sync.client import ClientConnection

from devstack.directline.transport import InProcessEmulator
from devstack.procs import wait_until
from tests.conftest import DIRECTLINE_TEST_SECRET


class DirectLineCalls:
    """Direct Line 3.0 calls against one emulator, with any credential (the secret by default)."""

    def __init__(self, base_url: str, secret: str = DIRECTLINE_TEST_SECRET):
        self.base_url = base_url
        self.secret = secret
        self.http = requests.Session()

    def call(self, method: str, path: str, *, auth: str | None = "secret", **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if auth is not None:
            headers.setdefault("Authorization", f"Bearer {self.secret if auth == 'secret' else auth}")
        return self.http.request(method, f"{self.base_url}{path}", headers=headers, timeout=20, **kwargs)

    def start(self, auth: str = "secret", **body: Any) -> dict[str, Any]:
        response = self.call("POST", "/conversations", auth=auth, json=body or None)
        assert response.status_code == 201, response.text
        return response.json()

    def post(self, conversation_id: str, activity: dict[str, Any], auth: str = "secret") -> requests.Response:
        return self.call("POST", f"/conversations/{conversation_id}/activities", auth=auth, json=activity)

    def say(self, conversation_id: str, text: str, user: str = "dl_user1", auth: str = "secret") -> str:
        response = self.post(conversation_id, {"type": "message", "from": {"id": user}, "text": text}, auth=auth)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def get(self, conversation_id: str, watermark: str | None = None, auth: str = "secret") -> requests.Response:
        return self.call("GET", f"/conversations/{conversation_id}/activities", auth=auth,
                         params={"watermark": watermark} if watermark is not None else None)

    def all_activities(self, conversation_id: str, auth: str = "secret") -> list[dict[str, Any]]:
        """Every activity, paging with the watermark until a page comes back empty."""
        activities: list[dict[str, Any]] = []
        watermark = None
        while True:
            response = self.get(conversation_id, watermark, auth=auth)
            assert response.status_code == 200, response.text
            page = response.json()
            if not page["activities"]:
                return activities
            activities += page["activities"]
            watermark = page.get("watermark", watermark)

    def wait_for_bot(self, conversation_id: str, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        """Poll until the bot has sent at least `count` activities; returns the bot's activities."""
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            found[:] = [a for a in self.all_activities(conversation_id) if a["from"].get("role") == "bot"]
            return len(found) >= count

        wait_until(enough, timeout=timeout, interval=0.2, what=f"{count} bot activities")
        return found


def calls_through(emulator: InProcessEmulator) -> DirectLineCalls:
    """Direct Line calls (and contentUrl fetches on `.http`) that go through an in-process emulator's transport."""
    calls = DirectLineCalls(emulator.base_url, emulator.secret)
    calls.http.mount(f"{emulator.url}/", emulator.transport)
    return calls


def next_sets(stream: ClientConnection, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The next `count` ActivitySets off an open stream, each checked to be {"activities": [...], "watermark"};
    keep-alive frames are skipped. TimeoutError when they do not all come within `timeout` seconds each."""
    sets: list[dict[str, Any]] = []
    while len(sets) < count:
        frame = stream.recv(timeout=timeout)
        if frame == "":
            continue
        activity_set = json.loads(frame)
        assert set(activity_set) == {"activities", "watermark"}, activity_set
        assert activity_set["activities"] and activity_set["watermark"], activity_set
        sets.append(activity_set)
    return sets


def error_of(response: requests.Response) -> tuple[int, str]:
    """(status, error code), after checking the body is Direct Line's error shape."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    return response.status_code, body["error"]["code"]


@pytest.fixture
def dl(directline_emulator) -> DirectLineCalls:
    """Calls against the shared session emulator (built-in echo)."""
    return DirectLineCalls(directline_emulator.base_url)


@pytest.fixture
def in_process() -> Iterator[Callable[..., InProcessEmulator]]:
    """in_process(**InProcessEmulator options): an emulator of this test's own, no socket (see calls_through)."""
    started: list[InProcessEmulator] = []

    def start(**options: Any) -> InProcessEmulator:
        started.append(InProcessEmulator(secret=DIRECTLINE_TEST_SECRET, **options))
        return started[-1]

    yield start
    for emulator in started:
        emulator.close()
