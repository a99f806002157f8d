"""The chaos run: many users on every provider while everything that can fail does, then an audit.

    python -m tests.chaos.soak [--conversations 200] [--messages 2000] [--seed 1] [--token-ttl 60] [--workdir DIR]
    (defaults also from SOAK_CONVERSATIONS, SOAK_MESSAGES, SOAK_SEED, SOAK_TOKEN_TTL; `make soak` runs the full size)

The whole relay runs on real parts: TWO local Functions hosts (two instances, both running the
poller timer every second on the same tables), an Azurite of the run's own with a `--location`
(so it can be restarted without losing its data), the Direct Line emulator with its built-in echo
bot (which greets each conversation the relay starts: RELAY_START_EVENT), in enhanced
authentication mode (no reconnect with the secret) and with tokens that live only `--token-ttl`
seconds (60: every conversation's token is refreshed many times during the run), and the provider
simulator receiving the replies. The users write as providers do: each
user's messages one after another (a provider waits for the answer before the next), retried
until they are answered 200, on either host. At the same time:

- 20% of the webhooks are delivered twice, half of them at the same moment as the original,
  half a few seconds later, to either host;
- Direct Line fails: 5% 500 and 5% 502 (first before, then after the request was processed: the
  ambiguous failure), 5% 429 (always a refusal before processing), 2%
  dropped connections, two latency spikes, watermark resets;
- the providers refuse a few replies with 503 (transient);
- host A is killed with SIGKILL during a poller tick and started again;
- Azurite is stopped and started again (webhooks meanwhile must answer 503 and be retried);
- every token of some conversations expires at once, as after an outage longer than a token's life
  (the relay must carry on in a new conversation for those users).

The audit, from the emulator's activity sets and the simulator's records: every user message
reached the bot exactly once and in order, every bot reply reached the provider exactly once and
in order (a reply the provider took in the killed instance's last 2 s and a survivor sent again is
listed apart: the documented at-least-once window, see SECURITY.md), nothing waits in an outbox,
no lease is held past its expiry, no dead letter, no 500, and no secret or token in any log the
run wrote.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

from devstack.channels import DEV_VALUES, ProviderSimulator, webhooks
from devstack.directline import DirectLineEmulator
from devstack.directline.echo import GREETING_PREFIX
from devstack.procs import ROOT, Azurite, ManagedProcess, free_port, http_ok, python_module, wait_until
from relay.activities import directline_user_id
from relay.settings import StorageSettings
from relay.store import RelayStore
from relay.store.conversations import ConversationKey
from tests.conftest import subprocess_env
from tests.security.leaks import log_files, scan

PROVIDERS = ("twilio", "whatsapp", "messagebird", "bird", "generic", "vonage", "line", "telegram")
SECRET = "chaos-directline-secret"
ECHO = "You said: "
KILL_WINDOW = (2.0, 1.0)
"""Seconds before and after the SIGKILL in which the provider may have taken a reply from the killed host: its
delivered id not saved yet, or its request still in the provider's socket when the kill was recorded."""
STALE_LEASE_AFTER = timedelta(seconds=15)  # past expiry, with pollers ticking every second: nobody takes it over


@dataclasses.dataclass(frozen=True)
class ChaosOptions:
    conversations: int = 200
    messages: int = 2000
    seed: int = 1
    duplicate_rate: float = 0.2
    senders: int = 16
    workdir: Path | None = None
    token_ttl: float = 60.0  # seconds a Direct Line token lives: short, so tokens are refreshed all along the run
    settle_timeout: float = 300.0  # after the last webhook: how long everything may take to arrive


@dataclasses.dataclass
class ChaosReport:
    """What the audit found; `ok` only with nothing lost, doubled, reordered, stuck or failed."""

    sent: int = 0
    webhook_posts: int = 0
    duplicate_posts: int = 0
    answers: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    at_bot: int = 0
    bot_duplicates: int = 0
    bot_lost: int = 0
    bot_out_of_order: int = 0
    replies: int = 0
    reply_duplicates: int = 0
    crash_resends: list = dataclasses.field(default_factory=list)
    doubled_replies: list = dataclasses.field(default_factory=list)  # each one outside that window, with its trail
    lost_replies: list = dataclasses.field(default_factory=list)  # "<provider> <user>: <text> ..." of each
    reply_lost: int = 0
    reply_out_of_order: int = 0
    dead_letters: int = 0
    outbox_left: int = 0
    stale_leases: int = 0
    directline_faults: dict = dataclasses.field(default_factory=dict)
    directline_calls: dict = dataclasses.field(default_factory=dict)  # requests per Direct Line endpoint
    events: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    problems: list = dataclasses.field(default_factory=list)
    logs: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(self.answers.items(), key=lambda kv: str(kv[0])))
        lines = [
            f"chaos run: {self.sent} user messages in {self.seconds:.0f} s "
            f"({self.webhook_posts} webhook posts incl. retries, {self.duplicate_posts} duplicate deliveries)",
            f"  webhook answers: {answers}",
            f"  at the bot:      delivered {self.at_bot}, duplicates {self.bot_duplicates}, lost {self.bot_lost}, "
            f"out of order {self.bot_out_of_order}",
            f"  at the provider: delivered {self.replies}, duplicates {self.reply_duplicates}, "
            f"lost {self.reply_lost}, out of order {self.reply_out_of_order}",
            f"  replies sent again across the SIGKILL (the at-least-once window): {len(self.crash_resends)}"
            + "".join(f"\n    {r}" for r in self.crash_resends),
            *[f"  doubled reply: {r}" for r in self.doubled_replies],
            *[f"  lost reply: {r}" for r in self.lost_replies],
            f"  dead letters {self.dead_letters}, outbox rows left {self.outbox_left}, "
            f"leases held past expiry {self.stale_leases}",
            f"  Direct Line faults injected: {self.directline_faults}",
            f"  Direct Line requests: {self.directline_calls}",
            "  events: " + "; ".join(self.events),
            f"  logs: {self.logs}",
        ]
        lines += [f"  PROBLEM: {p}" for p in self.problems] or ["  result: nothing lost, nothing doubled"]
        return "\n".join(lines)


def user_address(provider: str, index: int) -> str:
    return {"twilio": f"+1555{index:07d}", "whatsapp": f"4477{index:08d}", "messagebird": f"+3161{index:07d}",
            "bird": f"+4915{index:08d}", "generic": f"chaos-user-{index}",
            "vonage": f"whatsapp:4478{index:08d}",
            "line": webhooks.line_user(f"chaos-user-{index}"),
            "telegram": f"7007{index:08d}"}[provider]


@dataclasses.dataclass
class User:
    provider: str
    address: str
    texts: list[str]
    sent: int = 0

    @property
    def key(self) -> ConversationKey:
        return ConversationKey(self.provider, self.address)


class ChaosStack:
    """Azurite (persistent), the emulator, the simulator and hosts A and B on the same tables."""

    def __init__(self, workdir: Path, seed: int, *, token_ttl: float):
        self.workdir = workdir
        self.azurite = Azurite(location=workdir / "azurite", log_path=workdir / "azurite.log")
        self.emulator = DirectLineEmulator(secret=SECRET, env=subprocess_env(), log_path=workdir / "directline.log",
                                           token_ttl=token_ttl, enhanced_auth=True,
                                           extra_args=("--late-reply-seconds", "1", "--seed", str(seed)))
        self.ports = {"a": free_port(), "b": free_port()}
        self.public_url = f"http://127.0.0.1:{self.ports['a']}"
        self.simulator = ProviderSimulator(relay_url=self.public_url, env=subprocess_env(),
                                           log_path=workdir / "simulator.log")
        self.hosts: dict[str, ManagedProcess] = {}
        self.prefix = "chaos" + format(seed, "x")
        self.started: list[ManagedProcess] = []
        self.lock = threading.Lock()

    def __enter__(self) -> ChaosStack:
        try:
            for process in (self.azurite, self.emulator, self.simulator):
                self.started.append(process.start())
            for name in self.ports:
                self.start_host(name)
        except BaseException:
            self.stop()
            raise
        self.store = RelayStore.from_settings(StorageSettings(
            connection_string=self.azurite.connection_string, table_service_uri="", credential="", client_id="",
            table_prefix=self.prefix))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for process in [*self.hosts.values(), *reversed(self.started)]:
            process.stop()

    def host_env(self) -> dict[str, str]:
        return subprocess_env(**{
            **DEV_VALUES, **self.simulator.api_bases(),
            "AzureWebJobsStorage": self.azurite.connection_string,
            "RELAY_TABLE_PREFIX": self.prefix,
            "RELAY_POLL_QUEUE": f"poll-{self.prefix.lower()}",
            "DIRECTLINE_SECRET": SECRET,
            "DIRECTLINE_ENDPOINT": self.emulator.base_url,
            "DIRECTLINE_TIMEOUT_SECONDS": "5",
            "RELAY_PUBLIC_BASE_URL": self.public_url,  # both instances sit behind one public address
            "RELAY_POLL_SCHEDULE": "* * * * * *",
            "RELAY_BURST_POLL_SECONDS": "2",
            # Longer than the slowest step between two saves (a Direct Line call with its retries, ~30 s at a
            # 5 s timeout), shorter than the default so the killed host's conversations come back sooner.
            "RELAY_LEASE_SECONDS": "30",
        })

    def start_host(self, name: str) -> ManagedProcess:
        port = self.ports[name]
        argv = python_module("devstack.host", "--port", str(port), "--script", str(ROOT / "function_app.py"),
                             "--settings", str(self.workdir / "absent.settings.json"))
        process = ManagedProcess(f"host {name}", argv, env=self.host_env(),
                                 ready=lambda: http_ok(f"http://127.0.0.1:{port}/"),
                                 log_path=self.workdir / f"host-{name}.log")
        process.start()
        with self.lock:
            self.hosts[name] = process
        return process

    def host_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports.values()]


class ChaosRun:
    def __init__(self, options: ChaosOptions, stack: ChaosStack):
        self.options = options
        self.stack = stack
        self.random = random.Random(options.seed)
        self.report = ChaosReport(logs=stack.workdir)
        self.users = self._users()
        self.accepted = 0
        self.lock = threading.Lock()
        self.late: list[tuple[float, webhooks.Webhook]] = []
        self.sending_done = threading.Event()
        self.replays: list[threading.Thread] = []
        self.killed_at: float | None = None

    def _users(self) -> list[User]:
        count, total = self.options.conversations, self.options.messages
        users = []
        for index in range(count):
            provider = PROVIDERS[index % len(PROVIDERS)]
            share = total // count + (1 if index < total % count else 0)
            texts = [f"chaos {index}.{n} ✓" for n in range(share)]
            users.append(User(provider, user_address(provider, index), texts))
        return users

    def event(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.report.events.append(f"{stamp} {text}")
        print(f"[chaos {stamp}] {text}", flush=True)

    # ----------------------------------------------------------------------------------- webhooks
    def post(self, hook: webhooks.Webhook, *, duplicate: bool = False) -> int | None:
        """Deliver a webhook's exact bytes to one of the hosts; its status, or None when no answer came."""
        base = self.random.choice(self.stack.host_urls())
        url = base + hook.url.removeprefix(self.stack.public_url)
        try:
            status = requests.post(url, data=hook.body, headers=hook.headers, timeout=30).status_code
        except requests.RequestException as error:
            status = None
            label = f"no answer ({type(error).__name__})"
        else:
            label = status
        with self.lock:
            self.report.answers[label] += 1
            if duplicate:
                self.report.duplicate_posts += 1
            else:
                self.report.webhook_posts += 1
        return status

    def send(self, user: User, text: str) -> None:
        """One user message, as the provider delivers it: retried until it is answered 200."""
        hook = webhooks.build(user.provider, DEV_VALUES, self.stack.public_url, sender=user.address, text=text)
        twice = self.random.random() < self.options.duplicate_rate
        if twice and self.random.random() < 0.5:  # the provider's retry races the original
            thread = threading.Thread(target=self.post, args=(hook,), kwargs={"duplicate": True}, daemon=True)
            thread.start()
            self.replays.append(thread)
        elif twice:
            with self.lock:
                self.late.append((time.monotonic() + self.random.uniform(0.5, 8), hook))
        deadline = time.monotonic() + 120
        while self.post(hook) != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"a {user.provider} webhook was not accepted within 120 s")
            time.sleep(self.random.uniform(0.2, 0.8))  # the provider's retry back-off
        with self.lock:
            self.accepted += 1

    def senders(self) -> None:
        queue = collections.deque(self.random.sample(self.users, len(self.users)))
        queue_lock = threading.Lock()
        errors: list[BaseException] = []

        def work() -> None:
            while True:
                with queue_lock:
                    if not queue or errors:
                        return
                    user = queue.popleft()  # out of the queue while in flight: one message per user at a time
                try:
                    self.send(user, user.texts[user.sent])
                except BaseException as error:
                    errors.append(error)
                    return
                user.sent += 1
                if user.sent < len(user.texts):
                    with queue_lock:
                        queue.append(user)

        threads = [threading.Thread(target=work, name=f"sender-{n}", daemon=True)
                   for n in range(min(self.options.senders, len(self.users)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def late_replays(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                due = [hook for at, hook in self.late if at <= now]
                self.late = [(at, hook) for at, hook in self.late if at > now]
                finished = self.sending_done.is_set() and not self.late
            for hook in due:
                self.post(hook, duplicate=True)
            if finished and not due:
                return
            time.sleep(0.1)

    # -------------------------------------------------------------------------------------- chaos
    def progress(self) -> float:
        return self.accepted / max(1, self.options.messages)

    def wait_progress(self, share: float) -> bool:
        while self.progress() < share:
            if self.sending_done.is_set():
                return False
            time.sleep(0.05)
        return True

    def chaos(self) -> None:
        emulator = self.stack.emulator
        base_faults = {"error_500_rate": 0.05, "error_502_rate": 0.05, "throttle_rate": 0.05, "drop_rate": 0.02,
                       "retry_after": "1", "phase": "before"}
        self.set_faults(base_faults, "Direct Line faults on: 5% 500, 5% 502, 5% 429, 2% dropped (before processing)")
        steps: list[tuple[float, str, Callable[[], None]]] = [
            (0.10, "latency spike", lambda: self.latency_spike(2000, 2.0)),
            (0.20, "watermark resets", self.reset_watermarks),
            (0.30, "provider outage", self.provider_outage),
            (0.40, "SIGKILL host a", self.kill_host),
            (0.50, "ambiguous faults", self.ambiguous_faults),
            (0.60, "Azurite restart", self.restart_azurite),
            (0.70, "latency spike", lambda: self.latency_spike(1500, 2.0)),
            (0.75, "faults before processing", lambda: self.set_faults(base_faults, "back to faults before "
                                                                              "processing, 429 included")),
            (0.80, "watermark resets", self.reset_watermarks),
            (0.85, "tokens lapsed", self.expire_tokens),
        ]
        for share, name, action in steps:
            if not self.wait_progress(share):
                self.event(f"{name}: skipped (the run ended first)")
                continue
            action()
        self.sending_done.wait()
        emulator.clear_faults()
        self.event("Direct Line faults off")

    def set_faults(self, faults: dict, what: str) -> None:
        self.stack.emulator.set_faults(**faults)
        self.event(what)

    def ambiguous_faults(self) -> None:
        # Processed, then failed: the activity reached the bot although the answer says otherwise. A 429
        # stays a refusal before any processing (the emulator throttles first, as the service does).
        self.set_faults({"phase": "after"}, "Direct Line 5xx and drops now AFTER processing (ambiguous)")

    def latency_spike(self, milliseconds: int, seconds: float) -> None:
        self.stack.emulator.set_faults(latency_ms=milliseconds)
        self.event(f"Direct Line latency {milliseconds} ms for {seconds:g} s")
        time.sleep(seconds)  # the length of the spike
        self.stack.emulator.set_faults(latency_ms=0)

    def reset_watermarks(self) -> None:
        done = self.on_some_conversations(self.stack.emulator.reset_watermark)
        self.event(f"watermark reset on {done} conversations")

    def expire_tokens(self) -> None:
        """Every token of some conversations expires now: the relay can neither refresh nor reconnect (enhanced
        authentication), so those users' next messages must go to new conversations, lost by none."""
        done = self.on_some_conversations(self.stack.emulator.expire_tokens)
        self.event(f"every token of {done} conversations expired")

    def on_some_conversations(self, action: Callable[[str], None]) -> int:
        """`action` on the Direct Line conversation of a tenth of the users who wrote (at least 2); how many it
        reached (a conversation the emulator does not know yet is skipped)."""
        started = [u for u in self.users if u.sent]
        chosen = self.random.sample(started, min(len(started), max(2, len(self.users) // 10)))
        done = 0
        for user in chosen:
            record = self.stack.store.conversations.get_record(user.key)
            if record is not None and record.conversation_id:
                try:
                    action(record.conversation_id)
                    done += 1
                except requests.HTTPError:
                    pass
        return done

    def provider_outage(self) -> None:
        for provider in PROVIDERS:
            self.stack.simulator.fail_next(provider, 503, count=2, retry_after=1)
        self.event("each provider refuses its next 2 replies with 503")

    def kill_host(self) -> None:
        # The timer fires on every whole second: a moment just after one falls inside a tick.
        now = time.time()
        time.sleep((1 - now % 1) + self.random.uniform(0.05, 0.3))
        self.stack.hosts["a"].kill()
        self.killed_at = time.time()
        self.event("host a killed (SIGKILL) during a poller tick")
        self.stack.start_host("a")
        self.event("host a started again")

    def restart_azurite(self) -> None:
        self.stack.azurite.stop()
        self.event("Azurite stopped")
        self.stack.azurite.start()
        self.event("Azurite started again (same data, same ports)")

    # -------------------------------------------------------------------------------------- audit
    def settle(self) -> None:
        """Wait until every expected reply arrived, no outbox row is left and no lease is stale (or the deadline).

        Each user's replies are looked for by their texts, not counted: a reply the provider got twice (the
        documented resend after the SIGKILL) must not stand in for one still on its way, or the audit would
        find that one lost although it arrives a moment later."""

        def done() -> bool:
            return not missing_replies(self.users, self.stack.simulator.replies()) and self.nothing_pending()

        try:
            wait_until(done, timeout=self.options.settle_timeout, interval=1.0, what="every reply")
        except TimeoutError as error:
            self.report.problems.append(str(error))

    def nothing_pending(self) -> bool:
        return not any(self.stack.store.outbox.list_messages(u.key, limit=1) or self.stale_lease(u) for u in self.users)

    def stale_lease(self, user: User) -> bool:
        """A lease still recorded long after it expired: its holder died and nobody took the conversation over.

        (Live leases are normal: both pollers keep polling active conversations.)"""
        record = self.stack.store.conversations.get_record(user.key)
        return bool(record is not None and record.lease_owner and record.lease_expires_at
                    and record.lease_expires_at < datetime.now(UTC) - STALE_LEASE_AFTER)

    def crash_resent(self, user: User, replies: list[dict]) -> int:
        """How many of this user's doubled replies are the documented window, not a bug: the provider took
        the reply in the killed instance's last moments (its delivered id not saved yet) and a survivor,
        finding it undelivered, sent it again after the lease expired. Each one is described in the report."""
        if self.killed_at is None:
            return 0
        resent = 0
        for text, sent in copies_by_text(replies).items():
            first, *again = sorted(sent, key=lambda r: r["at"])
            if len(again) == 1 and (self.killed_at - KILL_WINDOW[0] <= first["at"] <= self.killed_at + KILL_WINDOW[1]
                                    < again[0]["at"]):
                resent += 1
                same_id = first["id"] == again[0]["id"]
                self.report.crash_resends.append(
                    f"{user.provider} {text!r}: taken {first['at'] - self.killed_at:+.2f} s from the kill, sent "
                    f"again {again[0]['at'] - self.killed_at:.0f} s after it"
                    + (" with the same webhook-id (a Standard Webhooks receiver keeps one)" if same_id else ""))
        return resent

    def doubled_trail(self, user: User, replies: list[dict], said_as: dict[str, str]) -> list[str]:
        """Each reply this user got more than once, told with when each copy came (against the SIGKILL) and the
        hosts' log lines naming its activity: a failed run says which path sent it twice."""
        logs = {path.name: path.read_text(errors="replace").splitlines()
                for path in sorted(self.stack.workdir.glob("host-*.log"))}
        trails = []
        for text, sent in copies_by_text(replies).items():
            if len(sent) < 2:
                continue
            activity_id = said_as.get(text, "")
            kill = self.killed_at
            when = ", ".join(f"{time.strftime('%H:%M:%S', time.localtime(r['at']))}.{int(r['at'] % 1 * 1000):03d}"
                             + (f" ({r['at'] - kill:+.2f} s from the kill)" if kill is not None else "")
                             + f" id {r['id']}" for r in sent)
            lines = [f"{name}: {line}" for name, content in logs.items() for line in content
                     if activity_id and activity_id in line]
            trails.append(f"{user.provider} {text!r} (activity {activity_id or 'unknown'}) taken at {when}"
                          + "".join(f"\n    {line}" for line in lines[:12]))
        return trails

    def audit(self) -> None:
        report, store = self.report, self.stack.store
        report.sent = sum(len(u.texts) for u in self.users)
        # --- at the bot: every user activity in every conversation the emulator has seen
        counters = self.stack.emulator.counters()
        report.directline_faults = counters.get("faults", {})
        report.directline_calls = counters.get("requests", {})
        at_bot: dict[str, list[str]] = collections.defaultdict(list)
        said_in: dict[str, str] = {}  # the bot's reply text -> the Direct Line conversation it is in (texts are unique)
        said_as: dict[str, str] = {}  # the bot's reply text -> its activity id
        for conversation_id in counters.get("conversations", {}):
            try:
                activities = self.stack.emulator.conversation(conversation_id)["activities"]
            except requests.HTTPError:
                continue
            for activity in activities:
                if activity.get("type") != "message":
                    continue
                if (activity.get("from") or {}).get("role") == "bot":
                    said_in[activity.get("text", "")] = conversation_id
                    said_as[activity.get("text", "")] = activity.get("id", "")
                else:
                    at_bot[activity["from"]["id"]].append(activity.get("text", ""))
        # --- at the provider
        at_provider = replies_by_user(self.users, self.stack.simulator.replies())
        for user in self.users:
            got = at_bot.pop(directline_user_id(user.provider, user.address, key_for=store.tables.key_for), [])
            lost, doubled, disordered = compare(user.texts, got)
            report.at_bot += len(got) - doubled
            report.bot_lost += lost
            report.bot_duplicates += doubled
            report.bot_out_of_order += disordered
            replies = at_provider.pop((user.provider, user.address), [])
            lost, doubled, disordered = compare([ECHO + t for t in user.texts], [r["text"] for r in replies])
            report.replies += len(replies) - doubled
            report.reply_lost += lost
            if lost:  # which ones, and where: the run's texts are made up, so each names its conversation
                record = store.conversations.get_record(user.key)
                got_texts = {r["text"] for r in replies}
                report.lost_replies += [f"{user.provider} {user.address}: {text!r} (the bot said it in "
                                        f"{said_in.get(text, 'no conversation')}; the user's conversation now "
                                        f"{record.conversation_id if record else None})"
                                        for text in (ECHO + t for t in user.texts) if text not in got_texts]
            resent = self.crash_resent(user, replies)
            report.reply_duplicates += doubled - min(doubled, resent)
            if doubled > resent:
                report.doubled_replies += self.doubled_trail(user, replies, said_as)
            report.reply_out_of_order += disordered
            report.outbox_left += len(store.outbox.list_messages(user.key, limit=100))
            report.stale_leases += self.stale_lease(user)
        stray = sum(len(v) for v in at_bot.values()) + sum(len(v) for v in at_provider.values())
        report.dead_letters = len(store.dead_letters.list_letters(limit=1000))
        checks = [("messages lost before the bot", report.bot_lost), ("messages doubled at the bot",
                  report.bot_duplicates), ("users whose messages reached the bot out of order",
                  report.bot_out_of_order), ("replies lost", report.reply_lost), ("replies doubled",
                  report.reply_duplicates), ("users whose replies arrived out of order", report.reply_out_of_order),
                  ("dead letters", report.dead_letters), ("outbox rows left", report.outbox_left),
                  ("leases held past expiry", report.stale_leases), ("messages from unknown users", stray),
                  ("webhooks answered 500", report.answers.get(500, 0)),
                  # With enhanced authentication a reconnect with the secret fails: the relay must never try one.
                  ("reconnects", report.directline_calls.get("conversations/reconnect", 0))]
        report.problems += [f"{name}: {count}" for name, count in checks if count]
        report.problems += [f"secret in the logs: {leak}" for leak in scan(log_files(self.stack.workdir).items())]


def replies_by_user(users: Sequence[User], replies: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    """The provider's answers to the users' messages by (provider, user address), in the order they came (a
    MessageBird reply names the user's MessageBird conversation, not the user). Greetings are left out: the
    bot greets each new Direct Line conversation once, and a user whose tokens lapsed gets a second one."""
    by_conversation = {webhooks.conversation_id(u.address): u.address for u in users if u.provider == "messagebird"}
    found: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for reply in replies:
        if reply["text"].startswith(GREETING_PREFIX):
            continue
        user = by_conversation.get(reply["user"], reply["user"]) if reply["provider"] == "messagebird" \
            else reply["user"]
        found[(reply["provider"], user)].append(reply)
    return found


def copies_by_text(replies: Iterable[dict]) -> dict[str, list[dict]]:
    """The provider's replies grouped by their text (the run's texts are unique: more than one is a copy)."""
    copies: dict[str, list[dict]] = collections.defaultdict(list)
    for reply in replies:
        copies[reply["text"]].append(reply)
    return copies


def missing_replies(users: Sequence[User], replies: Iterable[dict]) -> list[tuple[User, str]]:
    """Each (user, reply text) the provider has not received yet; a reply it received twice counts once."""
    found = replies_by_user(users, replies)
    missing = []
    for user in users:
        got = {r["text"] for r in found.get((user.provider, user.address), [])}
        missing += [(user, ECHO + text) for text in user.texts if ECHO + text not in got]
    return missing


def compare(expected: list[str], got: list[str]) -> tuple[int, int, int]:
    """(lost, duplicates, 1 if the first arrivals are out of order else 0) of `got` against `expected`."""
    counts = collections.Counter(got)
    lost = sum(1 for text in expected if counts[text] == 0)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    first = list(dict.fromkeys(t for t in got if t in set(expected)))
    in_order = first == [t for t in expected if t in counts]
    return lost, duplicates, 0 if in_order else 1


def run_chaos(options: ChaosOptions) -> ChaosReport:
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="relay-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ChaosStack(workdir, options.seed, token_ttl=options.token_ttl) as stack:
        run = ChaosRun(options, stack)
        run.event(f"stack up: hosts {', '.join(stack.host_urls())}, Azurite on {stack.azurite.table_port}, "
                  f"{options.conversations} users, {options.messages} messages")
        chaos = threading.Thread(target=run.chaos, name="chaos", daemon=True)
        late = threading.Thread(target=run.late_replays, name="late-replays", daemon=True)
        chaos.start()
        late.start()
        try:
            run.senders()
        finally:
            run.sending_done.set()
            chaos.join()
            late.join()
            for thread in run.replays:
                thread.join(timeout=60)
        run.event(f"all {run.accepted} messages accepted; waiting for the replies")
        run.settle()
        run.audit()
    run.report.seconds = time.monotonic() - started
    return run.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=int(os.environ.get("SOAK_CONVERSATIONS", 200)))
    parser.add_argument("--messages", type=int, default=int(os.environ.get("SOAK_MESSAGES", 2000)))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", 1)))
    parser.add_argument("--senders", type=int, default=16, help="users writing at the same time")
    parser.add_argument("--token-ttl", type=float, default=float(os.environ.get("SOAK_TOKEN_TTL", 60)),
                        help="seconds a Direct Line token lives")
    parser.add_argument("--workdir", type=Path, help="logs and Azurite's data (default: a new temporary directory)")
    args = parser.parse_args(argv)
    if args.messages < args.conversations:
        parser.error("--messages must be at least --conversations (every user writes)")
    report = run_chaos(ChaosOptions(conversations=args.conversations, messages=args.messages, seed=args.seed,
                                    senders=args.senders, workdir=args.workdir, token_ttl=args.token_ttl))
    print(report.summary())
    print(json.dumps({"ok": report.ok, "sent": report.sent, "delivered": report.at_bot, "replies": report.replies,
                      "duplicates": report.bot_duplicates + report.reply_duplicates,
                      "lost": report.bot_lost + report.reply_lost, "dead_letters": report.dead_letters}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
