"""One relay host for the security tests, with every channel and the token server switched on."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from devstack.channels import DEV_VALUES, ProviderSimulator, webhooks
from devstack.directline import DirectLineEmulator
from devstack.procs import ROOT, ManagedProcess, free_port, http_ok, python_module
from relay.channels import bird, generic, line, telegram, twilio, vonage, whatsapp
from relay.settings import StorageSettings
from relay.store import RelayStore
from tests.conftest import subprocess_env

PROVIDERS = webhooks.PROVIDERS
BODY_SIGNED = tuple(p for p in PROVIDERS if p != "telegram")
"""The providers whose signature covers the body: Telegram's secret token vouches for the sender alone."""
ALLOWED_ORIGIN = "https://shop.example"


@dataclass
class ExposedRelay:
    """The relay as an attacker sees it: a public URL. Tests also get its store, log and the fakes behind it."""

    url: str
    public_url: str
    emulator: DirectLineEmulator
    simulator: ProviderSimulator
    store: RelayStore
    log_path: Path
    session: requests.Session

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, self.url + path, timeout=30, **kwargs)

    def webhook(self, provider: str, sender: str, text: str, *, now: float | None = None) -> webhooks.Webhook:
        """A genuine signed webhook (as the provider would send it) for the relay's public URL."""
        return webhooks.build(provider, DEV_VALUES, self.public_url, sender=sender, text=text, now=now)

    def deliver(self, hook: webhooks.Webhook, *, channel: str | None = None) -> requests.Response:
        path = f"/api/channels/{channel}" if channel else hook.url.removeprefix(self.public_url)
        return self.request("POST", path, data=hook.body, headers=hook.headers)


def sign(provider: str, body: bytes, url: str, *, now: float | None = None) -> dict[str, str]:
    """Headers carrying a valid signature of `body` as `provider` signs it (what only the key holder can do)."""
    now = time.time() if now is None else now
    if provider == "whatsapp":
        return {"X-Hub-Signature-256": whatsapp.compute_signature(DEV_VALUES["WHATSAPP_APP_SECRET"], body)}
    if provider == "line":
        return {"X-Line-Signature": line.compute_signature(DEV_VALUES["LINE_CHANNEL_SECRET"], body)}
    if provider == "bird":
        stamp = str(int(now))
        return {"messagebird-request-timestamp": stamp,
                "messagebird-signature": bird.compute_signature(DEV_VALUES["BIRD_SIGNING_KEY"], stamp, url, body)}
    if provider == "generic":
        key = generic.secret_key(DEV_VALUES["GENERIC_WEBHOOK_SECRET"])
        return generic.standard_headers(key, f"msg_{uuid.uuid4().hex}", body, timestamp=int(now))
    if provider == "messagebird":
        claims = {"iss": "MessageBird", "nbf": int(now), "exp": int(now) + 60, "jti": str(uuid.uuid4()),
                  "url_hash": hashlib.sha256(url.encode()).hexdigest(),
                  **({"payload_hash": hashlib.sha256(body).hexdigest()} if body else {})}
        return {"MessageBird-Signature-JWT": webhooks.encode_jwt(claims, DEV_VALUES["MESSAGEBIRD_SIGNING_KEY"])}
    if provider == "telegram":  # no signature: the secret token itself, as Telegram sends it
        return {telegram.WEBHOOK_HEADER: DEV_VALUES["TELEGRAM_WEBHOOK_SECRET"]}
    if provider == "twilio":
        from urllib.parse import parse_qsl

        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        return {"X-Twilio-Signature": twilio.compute_signature(DEV_VALUES["TWILIO_AUTH_TOKEN"], url, params)}
    if provider == "vonage":
        claims = {"iat": int(now), "jti": str(uuid.uuid4()), "iss": "Vonage", "api_key": webhooks.VONAGE_API_KEY,
                  "payload_hash": hashlib.sha256(body).hexdigest(),
                  "application_id": DEV_VALUES["VONAGE_APPLICATION_ID"]}
        return {"Authorization": "Bearer " + vonage.signed_webhook_jwt(claims, DEV_VALUES["VONAGE_SIGNATURE_SECRET"])}
    raise ValueError(provider)


@pytest.fixture(scope="module")
def exposed_relay(storage_connection_string, directline_emulator, start_simulator,
                  tmp_path_factory) -> Iterator[ExposedRelay]:
    workdir = tmp_path_factory.mktemp("exposed")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    simulator = start_simulator(relay_url=url)
    prefix = "s" + uuid.uuid4().hex[:12]
    env = subprocess_env(**{
        **DEV_VALUES, **simulator.api_bases(),
        "AzureWebJobsStorage": storage_connection_string,
        "RELAY_TABLE_PREFIX": prefix,
        "RELAY_POLL_QUEUE": f"poll-{prefix.lower()}",
        "DIRECTLINE_SECRET": directline_emulator.secret,
        "DIRECTLINE_ENDPOINT": directline_emulator.base_url,
        "DIRECTLINE_TIMEOUT_SECONDS": "5",
        "RELAY_PUBLIC_BASE_URL": url,
        "RELAY_POLL_SCHEDULE": "* * * * * *",
        "RELAY_BURST_POLL_SECONDS": "1",
        "RELAY_START_EVENT": "",  # no greeting: the bot's first reply is the echo
        "WEBCHAT_ALLOWED_ORIGINS": ALLOWED_ORIGIN,
        "WEBCHAT_TOKEN_RATE_LIMIT": "3",
        "DEVSTACK_LOG_LEVEL": "DEBUG",  # the most talkative logs: the secret scan reads them
    })
    log_path = workdir / "host.log"
    host = ManagedProcess("host", python_module("devstack.host", "--port", str(port), "--script",
                                                str(ROOT / "function_app.py"), "--settings",
                                                str(workdir / "absent.settings.json")),
                          env=env, ready=lambda: http_ok(f"{url}/"), log_path=log_path)
    store = RelayStore.from_settings(StorageSettings(connection_string=storage_connection_string,
                                                     table_service_uri="", credential="", client_id="",
                                                     table_prefix=prefix))
    with host, requests.Session() as session:
        yield ExposedRelay(url, url, directline_emulator, simulator, store, log_path, session)
