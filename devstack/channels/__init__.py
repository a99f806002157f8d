"""A simulator of the channel providers' APIs for local runs and tests (see server.py for its routes).

    python -m devstack.channels [--port 3001] [--relay-url http://127.0.0.1:7071] [--set NAME=VALUE ...]
    python -m devstack.channels send twilio --from +15550001 "hello"

It knows each provider's credentials by the relay's own setting names (TWILIO_AUTH_TOKEN, ...), read
from the environment, so `make run` hands both the same local.settings.json values; `--set` wins,
and DEV_VALUES fill what is unset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import requests

from devstack.procs import ManagedProcess, free_port, http_ok, python_module
from relay.settings import SETTINGS

PROVIDER_GROUPS = ("twilio", "whatsapp", "messagebird", "bird", "generic", "vonage", "line", "telegram")
DEFAULT_PORT = 3001

DEV_VALUES: dict[str, str] = {
    "TWILIO_ACCOUNT_SID": "AC00000000000000000000000000000dev",
    "TWILIO_AUTH_TOKEN": "dev-only-twilio-auth-token",
    "TWILIO_API_BASE": "http://127.0.0.1:3001",
    "WHATSAPP_APP_SECRET": "dev-only-whatsapp-app-secret",
    "WHATSAPP_VERIFY_TOKEN": "dev-only-whatsapp-verify-token",
    "WHATSAPP_ACCESS_TOKEN": "dev-only-whatsapp-access-token",
    "WHATSAPP_PHONE_NUMBER_ID": "100000000000001",
    "WHATSAPP_API_BASE": "http://127.0.0.1:3001/v21.0",
    "MESSAGEBIRD_SIGNING_KEY": "dev-only-messagebird-signing-key",
    "MESSAGEBIRD_ACCESS_KEY": "dev-only-messagebird-access-key",
    "MESSAGEBIRD_API_BASE": "http://127.0.0.1:3001",
    "LINE_CHANNEL_SECRET": "dev-only-line-channel-secret",
    "LINE_CHANNEL_ACCESS_TOKEN": "dev-only-line-channel-access-token",
    "LINE_API_BASE": "http://127.0.0.1:3001",
    "LINE_DATA_API_BASE": "http://127.0.0.1:3001",
    "BIRD_SIGNING_KEY": "dev-only-bird-signing-key",
    "BIRD_ACCESS_KEY": "dev-only-bird-access-key",
    "BIRD_WORKSPACE_ID": "dev-workspace",
    "BIRD_CHANNEL_ID": "dev-channel",
    "BIRD_API_BASE": "http://127.0.0.1:3001",
    "TELEGRAM_WEBHOOK_SECRET": "dev-only-telegram-webhook-secret",
    "TELEGRAM_BOT_TOKEN": "100000001:dev-only-telegram-bot-token",
    "TELEGRAM_API_BASE": "http://127.0.0.1:3001",
    "GENERIC_WEBHOOK_SECRET": "whsec_ZGV2LW9ubHktZ2VuZXJpYy13ZWJob29rLXNlY3JldA==",
    "GENERIC_SIGNATURE_SCHEME": "standard",
    "GENERIC_CALLBACK_URL": "http://127.0.0.1:3001/generic/callback",
    "VONAGE_SIGNATURE_SECRET": "dev-only-vonage-signature-secret",
    "VONAGE_APPLICATION_ID": "00000000-0000-4000-8000-000000000dev",
    # A throwaway RSA key made for the simulator; it signs nothing outside it.
    "VONAGE_PRIVATE_KEY": (
        "-----BEGIN PRIVATE KEY-----\n"
        "MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCq7yWBGKyx/4PW\n"
        "gmZj6lNiscapt/GlCNpLmuEZJzAzxdkk0i6ZJJxc6RbmfzlKOOO9nKpAtciYIuxg\n"
        "5MhdLTuzxm1YIz9Bp4xR03Dd9AJN1J5PFLi8NC1rTFqHbzt9LHjXoKvBwLQmoUxG\n"
        "gDGiEsolP4/f2tXuxRLdn+CS/wbcisd9JFrtBRHgCjETxyjIaluyieCzPKap3ky1\n"
        "i6bnKz3KZnRN1/K9y8ZmZK0VqFpTZuUDChgloUtihKP7ycg2Vf74tWbcSES+NLG0\n"
        "0QaHFxqVULq0GO9+6PuMnEAD2s5yFvX9WJ+m7YBdF9tl7QBOCIluWOUxX0I2lWFw\n"
        "qt/hFWkHAgMBAAECggEAJjZ+QOT+PnCrzXmrYCzTZV3u1qQ7jjRzcLF4HwJmwTw6\n"
        "tgOSzUOk/RRSvUa1zQT4zLvIR90bsf8kruiWblYdYaw7Z5fBnXDSaryFH+lb1oBw\n"
        "v6cXQWO8v577IgnY17voa/QMUa092OD4R06DSgM/U6JpDJdEejNua0NBljsTEpxK\n"
        "CYqrIf6Bg98tQIPaIxlaKo4h1jULYz+HUoS6jAZuxoOHHqdSzSxj/MLTydLY/jPQ\n"
        "iGOD4FxFmbK4EgFVVM2IKADWq5gfMyoODC3GknRGEc0TFmlwTJHFC+zbiSB8NeJA\n"
        "D/n0jJfjaUdMA6r3eugs+V3E6JbEcaEvf8gXKGlKYQKBgQDgKn1lPngUgpEbOWPd\n"
        "XhK9Muho4abB8xvzrDQ4iAoUL8dAp4sJbbhwJVjr4vMt81FMJyBLItXTV9hpr3Un\n"
        "AhA24A4jNcUQ1xPhUPFRewfAOiJky4h7pkuTnKHQlQ1D9MRzHpiDz6j0EgnJ2Vzk\n"
        "bOtrgjqYWfAzIKo4TrPNWbg5NwKBgQDDNWy1rvED0tiOi8Gw4hhYEM932QOCi1b3\n"
        "B0dfQvaMgNf2DaoJH3G5cmS8c5MakbqnVz0FZi4JNaszayVyN2Kc9ou290/woECc\n"
        "j311r2tx8ZZ+zgNldy7cFlDv5WkiTszyakYREVvJjSTLy/BHY81Iq3jS9asLPA02\n"
        "tb5EnZ32sQKBgFwwHTGt5yRILfTMPU2kioBUl0/KvRG2MSCdCTzWdY6nt4HXZU6T\n"
        "WO6F7XPU+b1D+4Md9CHySY2I6u9LwRoxtwlaS3YfftPWH87hwtyHhECBp/Nb4N05\n"
        "HouuNr3ZDoOL/d56Dq7mj80QPgZM5e7q/EZSYFaXZjkgjeBqPXeOFj0xAoGAP8HK\n"
        "QMjjpSkPW/dfisM9yj2rVWyGzfNusv4onH+FgTxvzMiHubUQcs5fAoIJEMt6GD/R\n"
        "CVtnO9DQmtmrAFQAnF2WImtCK8hbcgcXpgFmaW/LhJ0K1PAJWQ7c3o2iOfdczuxQ\n"
        "+DAgN4Mm+n0gfGCnYs3Gh7h/Zgr2EeFoRIbqWfECgYAtsKo4pDeE/vm/SIc5tAiy\n"
        "hjWR2E9hS00TmeFT783mEnlS95o+xN8yN8VkVh6skwukf3MkUwsHdP8ZPe8kc5rY\n"
        "iK0jTPQrMd7iLERrQP+X5hWpuFrXD5uZeXOGrv9ZPJHKD0SBC0Yl7VyO0i9lfQDZ\n"
        "rlU/jm/kEBhP652x8ZRQ2A==\n"
        "-----END PRIVATE KEY-----\n"
    ),
    "VONAGE_API_BASE": "http://127.0.0.1:3001",
}
"""Obviously dev-only credentials; local.settings.sample.json carries the same values."""

PROVIDER_SETTINGS = tuple(name for name, spec in SETTINGS.items() if spec.group in PROVIDER_GROUPS)


def load_values(environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Provider values: the catalogue's defaults < DEV_VALUES < the environment < overrides."""
    environ = os.environ if environ is None else environ
    values = {name: SETTINGS[name].default or "" for name in PROVIDER_SETTINGS}
    values |= DEV_VALUES
    values |= {name: environ[name] for name in PROVIDER_SETTINGS if environ.get(name)}
    values |= dict(overrides or {})
    return values


class SimulatorAdmin:
    """The admin API's calls (see server.py), on a simulator behind a socket or in-process (transport.py)."""

    url: str

    def _request(self, method: str, url: str, *, timeout: float, **options: Any) -> requests.Response:
        """Where the calls go: over the network here; InProcessSimulator sends them through its transport."""
        return requests.request(method, url, timeout=timeout, **options)

    @property
    def page_url(self) -> str:
        return self.url + "/"

    def api_bases(self) -> dict[str, str]:
        """The *_API_BASE values that point the relay's adapters at this simulator."""
        return {"TWILIO_API_BASE": self.url, "WHATSAPP_API_BASE": f"{self.url}/v21.0",
                "MESSAGEBIRD_API_BASE": self.url, "BIRD_API_BASE": self.url,
                "GENERIC_CALLBACK_URL": f"{self.url}/generic/callback",
                "VONAGE_API_BASE": self.url,
                "LINE_API_BASE": self.url, "LINE_DATA_API_BASE": self.url,
                "TELEGRAM_API_BASE": self.url}

    def _call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        response = self._request(method, self.url + path, json=body, params=params, timeout=60)
        response.raise_for_status()
        return response.json()

    def replies(self, provider: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("provider", provider), ("user", user)) if v}
        return self._call("GET", "/_sim/replies", params=params)["replies"]

    def clear(self) -> None:
        self._call("DELETE", "/_sim/replies")

    def fail_next(self, provider: str, status: int, *, count: int = 1, retry_after: float | None = None,
                  after: int = 0) -> None:
        """Fail `provider`'s next `count` sends with `status`, once `after` more sends went through."""
        self._call("POST", "/_sim/failures", {"provider": provider, "status": status, "count": count,
                                              "retry_after": retry_after, "after": after})

    def pending_failures(self, provider: str) -> int:
        """How many of the failures given to fail_next (with their `after` pass-throughs) no send has met yet."""
        return self._call("GET", "/_sim/failures", params={"provider": provider})["pending"]

    def send_inbound(self, provider: str, sender: str, text: str = "", *, name: str = "",
                     media: list[dict[str, str]] | None = None, reply_id: str = "") -> dict[str, Any]:
        """Sign and POST a user's message to the relay; the relay's answer as {status, body, message_id}.
        `reply_id` (whatsapp, line, telegram): the user taps that button, list row, quick reply button or inline
        keyboard button of the newest message offering it."""
        return self._call("POST", "/_sim/inbound",
                          {"provider": provider, "from": sender, "text": text, "name": name, "media": media or [],
                           **({"reply_id": reply_id} if reply_id else {})})

    def telegram(self) -> dict[str, Any]:
        """What the Telegram bot was told: its webhook ({url, secret_token, allowed_updates}, or None) as setWebhook
        left it, and the ids of the callback queries answered (answerCallbackQuery), oldest first."""
        return self._call("GET", "/_sim/telegram")


class ProviderSimulator(SimulatorAdmin, ManagedProcess):
    """`python -m devstack.channels` as a child process on a free (or given) loopback port.

    `values` are the provider settings it signs and checks with (by the relay's names); the rest
    comes from DEV_VALUES. The helpers of SimulatorAdmin wrap the admin API for tests."""

    def __init__(self, *, port: int | None = None, relay_url: str = "http://127.0.0.1:7071",
                 values: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
                 log_path=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.relay_url = relay_url
        base_env = {k: v for k, v in (os.environ if env is None else env).items() if k not in PROVIDER_SETTINGS}
        child_env = {**base_env, **(values or {}), "PYTHONUNBUFFERED": "1"}
        super().__init__(
            "provider simulator",
            python_module("devstack.channels", "--port", str(self.port), "--relay-url", relay_url),
            env=child_env, ready=lambda: http_ok(f"{self.url}/_sim/health"), log_path=log_path,
        )
