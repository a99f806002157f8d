"""Measurement 7: the design the project started from, beside ours.

Microsoft's custom channel sample (microsoft/Dynamics365-Apps-Samples, customer-service/omnichannel/
bring-your-own-channel, RelayProcessor.cs; /work/shared/seeds/004_*) keeps each active conversation in memory
and gives it a thread that GETs the conversation's activities from the last watermark, hands the bot's to the
channel, then waits PollingIntervalInMilliseconds (2000 in the sample's appsettings.json), until the bot ends
the conversation. SeedRelay does that and no more, against the emulator, with the secret on every call as the
sample's DirectLineClient(secret) does.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from benchmarks.hosted import percentile
from benchmarks.stack import SECRET, Stack
from devstack.procs import wait_until

BOT_ID = "relaybot"  # the sample's BotHandle: the emulator's echo bot


class SeedRelay:
    """The sample's relay processor: a conversation per user, started on the user's first message, each polled
    by a thread of its own every `interval` seconds after the previous GET returned."""

    def __init__(self, base_url: str, *, interval: float, secret: str = SECRET):
        self.base_url, self.interval = base_url, interval
        self._headers = {"Authorization": f"Bearer {secret}"}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.conversations: dict[str, str] = {}  # user -> Direct Line conversation id
        self.seen: dict[str, list[tuple[dict, float]]] = {}  # user -> [(bot activity, when its thread saw it)]

    def post(self, user: str, text: str) -> None:
        with self._lock:
            conversation_id = self.conversations.get(user)
        if conversation_id is None:
            response = requests.post(f"{self.base_url}/conversations", headers=self._headers, timeout=10)
            response.raise_for_status()
            conversation_id = response.json()["conversationId"]
            with self._lock:
                self.conversations[user], self.seen[user] = conversation_id, []
            thread = threading.Thread(target=self._poll, args=(user, conversation_id), daemon=True,
                                      name=f"seed-poll-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()
        response = requests.post(f"{self.base_url}/conversations/{conversation_id}/activities", timeout=10,
                                 headers=self._headers, json={"type": "message", "from": {"id": user}, "text": text})
        response.raise_for_status()

    def _poll(self, user: str, conversation_id: str) -> None:
        watermark = None
        try:
            with requests.Session() as session:
                while not self._stop.is_set():
                    response = session.get(f"{self.base_url}/conversations/{conversation_id}/activities",
                                           params={"watermark": watermark} if watermark else {},
                                           headers=self._headers, timeout=10)
                    response.raise_for_status()
                    seen_at = time.time()
                    page = response.json()
                    watermark = page.get("watermark")
                    mine = [a for a in page.get("activities", []) if (a.get("from") or {}).get("id") == BOT_ID]
                    with self._lock:
                        self.seen[user] += [(activity, seen_at) for activity in mine]
                    if any(a.get("type") == "endOfConversation" for a in mine):
                        return
                    self._stop.wait(self.interval)
        except Exception as error:  # the sample's thread dies with it; here the benchmark fails at close()
            with self._lock:
                self._errors.append(error)

    def seen_at(self, user: str, text: str) -> tuple[float, float] | None:
        """(the bot's timestamp, when the user's thread saw it) of the bot's message `text`, once seen."""
        with self._lock:
            for activity, seen_at in self.seen.get(user, []):
                if activity.get("text") == text:
                    sent = dt.datetime.fromisoformat(activity["timestamp"].replace("Z", "+00:00")).timestamp()
                    return sent, seen_at
        return None

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        if self._errors:
            raise RuntimeError(f"{len(self._errors)} polling thread(s) failed, the first with {self._errors[0]!r}")


def _sample(relay: SeedRelay, user: str, start: float, delay: float) -> tuple[float, float]:
    """The user's second message, "later", at a random moment of its thread's polling (the first starts the
    conversation and its thread, so it would always fall at the same moment of it)."""
    time.sleep(start)  # the threads' polls spread over the interval, as users' are (not synchronisation)
    relay.post(user, "hello")
    time.sleep(delay)  # so samples fall at every phase of the interval (not synchronisation)
    relay.post(user, "later")
    prompt, late = (_latency(relay, user, reply) for reply in ("You said: later", "Late reply: later"))
    return prompt, late


def _latency(relay: SeedRelay, user: str, reply: str) -> float:
    wait_until(lambda: relay.seen_at(user, reply) is not None, timeout=30, interval=0.02, what=f"{reply!r} for {user}")
    sent, seen = relay.seen_at(user, reply) or (0.0, 0.0)
    return seen - sent


def seed_benchmark(stack: Stack, *, intervals: tuple[float, ...] = (1.0, 3.0), conversations: int = 16,
                   window_seconds: float = 30.0, latency_ms: int = 50) -> list[dict]:
    """For each polling interval: `conversations` users each write "hello", then "later" at a random moment, which
    the echo bot answers at once and again 3 s later (reply latency: from the bot's timestamp to the thread seeing
    it); then
    the GETs of those conversations over `window_seconds`, scaled to a conversation-hour (the sample polls at
    the same rate whether or not anything happens, until the bot ends the conversation)."""
    results = []
    stack.emulator.set_faults(latency_ms=latency_ms)
    try:
        for interval in intervals:
            print(f"  polling every {interval:g} s: {conversations} conversations, then {window_seconds:g} s counted",
                  flush=True)
            relay = SeedRelay(stack.emulator.base_url, interval=interval)
            try:
                users = [f"+1999{random.randrange(10**7):07d}" for _ in range(conversations)]
                starts = [random.uniform(0, interval) for _ in users]
                delays = [random.uniform(0, 2 * interval) for _ in users]
                with ThreadPoolExecutor(conversations) as pool:
                    samples = list(pool.map(functools.partial(_sample, relay), users, starts, delays))
                ids = set(relay.conversations.values())
                before, started = _gets(stack, ids), time.monotonic()
                time.sleep(window_seconds)  # the measuring window (not synchronisation)
                gets, elapsed = _gets(stack, ids) - before, time.monotonic() - started
            finally:
                relay.close()
            prompt, late = [s[0] for s in samples], [s[1] for s in samples]
            results.append({
                "interval_seconds": interval, "conversations": conversations, "latency_ms": latency_ms,
                "window_seconds": elapsed, "directline_requests": gets,
                "directline_requests_per_conversation_hour": gets / conversations / elapsed * 3600,
                "prompt": {"p50": percentile(prompt, 50), "p95": percentile(prompt, 95), "max": max(prompt)},
                "late": {"p50": percentile(late, 50), "p95": percentile(late, 95), "max": max(late)},
            })
    finally:
        stack.emulator.set_faults(latency_ms=0)
    return results


def _gets(stack: Stack, conversation_ids: set[str]) -> int:
    """GET activities the emulator has counted on these conversations."""
    counted = stack.emulator.counters()["conversations"]
    return sum(counted.get(c, {}).get("activities/get", 0) for c in conversation_ids)
