"""Every app setting the relay reads, validated in one place.

The catalogue `SETTINGS` is the single list of names: the readers below may only ask for a
catalogued name, the README's settings table and infra/'s consistency test are built from it.
A missing or malformed value raises `relay.errors.SettingsError` with a message naming the setting, never
its value (several are secrets).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from relay.errors import SettingsError

__all__ = [
    "CHANNEL_SWITCHES",
    "MAX_CHASE_SECONDS",
    "SETTINGS",
    "DirectLineSettings",
    "RelaySettings",
    "Setting",
    "Settings",
    "SettingsError",
    "StorageSettings",
    "TelemetrySettings",
    "WebChatSettings",
    "get_settings",
]



@dataclass(frozen=True)
class Setting:
    name: str
    description: str
    default: str | None = None
    secret: bool = False
    group: str = "core"


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# Microsoft's published Web Chat bundle, the version package.json installs for the local demo and tests.
WEBCHAT_CDN_BUNDLE = "https://cdn.botframework.com/botframework-webchat/4.18.1/webchat.js"


def _catalogue(*settings: Setting) -> dict[str, Setting]:
    return {s.name: s for s in settings}


SETTINGS: dict[str, Setting] = _catalogue(
    # Direct Line
    Setting("DIRECTLINE_SECRET", "Direct Line channel secret of the bot (Key Vault reference in Azure). Exactly one "
            "of this and DIRECTLINE_TOKEN_ENDPOINT.", default="", secret=True, group="directline"),
    Setting("DIRECTLINE_TOKEN_ENDPOINT", "Token endpoint of a Copilot Studio agent without web channel security "
            "(its Mobile app channel page), instead of a secret: every conversation starts with a token from there. "
            "Exactly one of this and DIRECTLINE_SECRET.", default="", group="directline"),
    Setting("DIRECTLINE_ENDPOINT", "Direct Line 3.0 base URL; regional bots and the emulator set their own. With "
            "DIRECTLINE_TOKEN_ENDPOINT and no value here, it is discovered from the agent's environment "
            "(regionalchannelsettings).",
            default="https://directline.botframework.com/v3/directline", group="directline"),
    Setting("DIRECTLINE_TIMEOUT_SECONDS", "Read timeout for one Direct Line call.", default="20",
            group="directline"),
    Setting("DIRECTLINE_BOT_IDS", "Comma-separated bot handles; activities from these ids (or with "
            "from.role 'bot') are the bot's.", default="", group="directline"),
    # Storage
    Setting("AzureWebJobsStorage", "Storage connection string (locally Azurite). In Azure the "
            "identity-based AzureWebJobsStorage__* settings are used instead.", default="", secret=True,
            group="storage"),
    Setting("AzureWebJobsStorage__tableServiceUri", "Table service URI for identity-based storage.",
            default="", group="storage"),
    Setting("AzureWebJobsStorage__queueServiceUri", "Queue service URI for identity-based storage (the poll queue "
            "of RELAY_FANOUT_THRESHOLD; the host's queue trigger reads it too).", default="", group="storage"),
    Setting("AzureWebJobsStorage__accountName", "Storage account name for identity-based storage "
            "(public cloud shorthand for the service URIs).", default="", group="storage"),
    Setting("AzureWebJobsStorage__credential", "'managedidentity' for identity-based storage.",
            default="", group="storage"),
    Setting("AzureWebJobsStorage__clientId", "Client id of the user-assigned identity used for storage.",
            default="", group="storage"),
    Setting("RELAY_TABLE_PREFIX", "Prefix of the relay's table names (letters and digits).",
            default="relay", group="storage"),
    # Relay behaviour
    Setting("RELAY_PUBLIC_BASE_URL", "Scheme and host the providers call (e.g. https://myrelay.azurewebsites.net);"
            " signatures cover this plus the request path and query.", default="", group="relay"),
    Setting("RELAY_POLL_SCHEDULE", "Six-field NCRONTAB schedule of the poller timer (each execution is billed at "
            "least a second: every 5 s is a fifth of an instance's month).", default="*/5 * * * * *", group="relay"),
    Setting("RELAY_CHASE_SECONDS", "After a user's message, keep looking for the bot's replies every second until "
            "this many seconds after it, in the background (a message the webhook leaves on the chase queue, "
            "worked by the chase function), so a late reply does not wait for the timer. 0 (or no more than the "
            "burst) turns it off; at most 60.",
            default="10", group="relay"),
    Setting("RELAY_FANOUT_THRESHOLD", "More conversations due in one tick than this are fanned out over the poll "
            "queue (batches of 100 worked by the queue-triggered poll_batch function, on as many instances as "
            "the platform scales to); this many or fewer are worked in the timer's own execution. 0: never.",
            default="500", group="relay"),
    Setting("RELAY_POLL_QUEUE", "The storage queue of fanned-out poll batches; the chases go to its name + "
            "'-chase', and each has a poison queue (+ '-poison'). 3-50 lowercase letters, digits and single "
            "hyphens. The host resolves it in the queue triggers: it must be set.", default="relay-poll",
            group="relay"),
    Setting("RELAY_BURST_POLL_SECONDS", "How long a webhook waits for the bot's quick replies (0 turns it off).",
            default="2", group="relay"),
    Setting("RELAY_POLL_CEILING_SECONDS", "Longest gap between polls of an idle conversation.",
            default="60", group="relay"),
    Setting("RELAY_IDLE_TIMEOUT_MINUTES", "A conversation idle this long is ended.", default="1440",
            group="relay"),
    Setting("RELAY_LEASE_SECONDS", "How long one instance holds a conversation it works (renewed as it makes "
            "progress, and before a reply is sent when less than half is left); after a crash, others take the "
            "conversation over when this has passed.", default="60",
            group="relay"),
    Setting("RELAY_SIGNATURE_WINDOW_SECONDS", "Accepted age of a signed webhook's timestamp.",
            default="300", group="relay"),
    Setting("RELAY_MAX_BODY_BYTES", "Largest webhook body accepted (413 above).", default="1048576",
            group="relay"),
    Setting("RELAY_OMNICHANNEL_CONTEXT", "JSON per channel: {\"twilio\": {\"channeltype\": \"sms\", "
            "\"conversationcontext\": {...}, \"customercontext\": {\"phonenumber\": \"{user_id}\"}}} for the "
            "activity's channelData ({user_id}, {user_name} are filled in).", default="", group="relay"),
    Setting("RELAY_START_EVENT", "Name of the event activity posted (with the user's locale) when the relay starts "
            "a Direct Line conversation for a channel user, before their first message: a Copilot Studio agent "
            "greets on it. Set but empty: no event.", default="startConversation", group="relay"),
    Setting("RELAY_DEFAULT_LOCALE", "The user's locale in that event when the provider's webhook does not say "
            "(BCP 47, e.g. en-US, de-DE).", default="en-US", group="relay"),
    Setting("RELAY_EVENT_WEBHOOK_URL", "Where the bot's event activities (handoff.initiate and any other) are "
            "POSTed as Standard Webhooks-signed JSON with the conversation, the channel user and the recent "
            "transcript (https; http only on a loopback host). Empty: events are logged by name and skipped.",
            default="", group="relay"),
    Setting("RELAY_EVENT_WEBHOOK_SECRET", "Standard Webhooks secret ('whsec_' + base64) signing those POSTs; "
            "required with RELAY_EVENT_WEBHOOK_URL.", default="", secret=True, group="relay"),
    Setting("RELAY_EVENT_TRANSCRIPT_MESSAGES", "How many of the conversation's last messages an event's POST "
            "carries (0 to 100).", default="20", group="relay"),
    # Web Chat token server
    Setting("WEBCHAT_ALLOWED_ORIGINS", "Comma-separated origins allowed to call the token endpoints (CORS).",
            default="", group="webchat"),
    Setting("WEBCHAT_DEMO_ENABLED", "Serve the Web Chat demo page (true/false).", default="false",
            group="webchat"),
    Setting("WEBCHAT_BUNDLE_URL", "Where the demo page loads Bot Framework Web Chat from when the app has no "
            "bundle of its own (always in Azure: node_modules is not deployed).", default=WEBCHAT_CDN_BUNDLE,
            group="webchat"),
    Setting("WEBCHAT_TOKEN_RATE_LIMIT", "Tokens one client address may obtain per minute (and, separately, "
            "resume attempts it may make).", default="10",
            group="webchat"),
    Setting("WEBCHAT_PROXY_HOPS", "Proxies of your own (Front Door, API Management, Application Gateway) between "
            "browsers and the app: the client address for the rate limits is the X-Forwarded-For entry this many "
            "places left of the last one (which Azure's front end adds). 0 when browsers call the app directly.",
            default="0", group="webchat"),
    Setting("WEBCHAT_SESSION_HOURS", "How long a Web Chat page may be away (asleep, offline, closed) and still resume "
            "its conversation: its session lasts this long past its last token, refresh or resume, and the relay keeps "
            "a token of the conversation fresh meanwhile. More than 0, at most 336 (14 days).", default="24",
            group="webchat"),
    # Twilio
    Setting("TWILIO_ACCOUNT_SID", "Twilio account SID (enables the twilio channel).", default="", group="twilio"),
    Setting("TWILIO_AUTH_TOKEN", "Twilio auth token: verifies webhooks and authenticates replies.",
            default="", secret=True, group="twilio"),
    Setting("TWILIO_API_BASE", "Twilio REST API base URL.", default="https://api.twilio.com", group="twilio"),
    # WhatsApp Cloud API
    Setting("WHATSAPP_APP_SECRET", "Meta app secret (verifies X-Hub-Signature-256; enables the whatsapp channel).",
            default="", secret=True, group="whatsapp"),
    Setting("WHATSAPP_VERIFY_TOKEN", "Token Meta echoes in the webhook verification handshake.",
            default="", secret=True, group="whatsapp"),
    Setting("WHATSAPP_ACCESS_TOKEN", "Graph API access token for replies.", default="", secret=True,
            group="whatsapp"),
    Setting("WHATSAPP_PHONE_NUMBER_ID", "Phone number id the replies are sent from.", default="",
            group="whatsapp"),
    Setting("WHATSAPP_API_BASE", "Graph API base URL with version.", default="https://graph.facebook.com/v21.0",
            group="whatsapp"),
    # MessageBird (legacy Conversations API)
    Setting("MESSAGEBIRD_SIGNING_KEY", "MessageBird webhook signing key (enables the messagebird channel).",
            default="", secret=True, group="messagebird"),
    Setting("MESSAGEBIRD_ACCESS_KEY", "MessageBird access key for Conversations API replies.", default="",
            secret=True, group="messagebird"),
    Setting("MESSAGEBIRD_API_BASE", "Conversations API base URL.",
            default="https://conversations.messagebird.com", group="messagebird"),
    # LINE Messaging API
    Setting("LINE_CHANNEL_SECRET", "LINE channel secret (verifies X-Line-Signature; enables the line channel).",
            default="", secret=True, group="line"),
    Setting("LINE_CHANNEL_ACCESS_TOKEN", "LINE channel access token for replies, pushes and users' media.",
            default="", secret=True, group="line"),
    Setting("LINE_API_BASE", "LINE Messaging API base URL.", default="https://api.line.me", group="line"),
    Setting("LINE_DATA_API_BASE", "LINE content API base URL (users' images and files).",
            default="https://api-data.line.me", group="line"),
    # Bird (api.bird.com)
    Setting("BIRD_SIGNING_KEY", "Bird webhook signing key (enables the bird channel).", default="",
            secret=True, group="bird"),
    Setting("BIRD_ACCESS_KEY", "Bird access key for channel message replies.", default="", secret=True,
            group="bird"),
    Setting("BIRD_WORKSPACE_ID", "Bird workspace id.", default="", group="bird"),
    Setting("BIRD_CHANNEL_ID", "Bird channel id replies are sent on.", default="", group="bird"),
    Setting("BIRD_API_BASE", "Bird API base URL.", default="https://api.bird.com", group="bird"),
    # Telegram Bot API
    Setting("TELEGRAM_WEBHOOK_SECRET", "The secret_token the webhook is registered with (enables the Telegram "
            "channel): 1-256 of A-Z, a-z, 0-9, _ and -; Telegram echoes it in X-Telegram-Bot-Api-Secret-Token.",
            default="", secret=True, group="telegram"),
    Setting("TELEGRAM_BOT_TOKEN", "The bot's token from @BotFather, for replies, files and setWebhook.",
            default="", secret=True, group="telegram"),
    Setting("TELEGRAM_API_BASE", "Telegram Bot API base URL.", default="https://api.telegram.org",
            group="telegram"),
    # Generic HMAC webhook
    Setting("GENERIC_WEBHOOK_SECRET", "Secret of the generic webhook (enables the generic channel); "
            "'whsec_…' for Standard Webhooks.", default="", secret=True, group="generic"),
    Setting("GENERIC_SIGNATURE_SCHEME", "'hmac' (configurable header) or 'standard' (Standard Webhooks).",
            default="hmac", group="generic"),
    Setting("GENERIC_SIGNATURE_HEADER", "Header carrying the HMAC-SHA256 signature.", default="X-Signature",
            group="generic"),
    Setting("GENERIC_SIGNATURE_PREFIX", "Prefix before the signature in its header ('none' for no prefix).",
            default="sha256=",
            group="generic"),
    Setting("GENERIC_SIGNATURE_ENCODING", "'hex' or 'base64'.", default="hex", group="generic"),
    Setting("GENERIC_TIMESTAMP_HEADER", "Optional timestamp header folded into the signed bytes "
            "(timestamp + '.' + body).", default="", group="generic"),
    Setting("GENERIC_CALLBACK_URL", "URL the bot's replies are POSTed to as signed JSON.", default="",
            group="generic"),
    Setting("GENERIC_CALLBACK_SECRET", "Secret signing the replies (defaults to the webhook secret).",
            default="", secret=True, group="generic"),
    # Vonage Messages API (SMS, WhatsApp, Messenger, Viber)
    Setting("VONAGE_SIGNATURE_SECRET", "Vonage account signature secret, HS256 key of the signed webhooks' JWTs "
            "(enables the vonage channel).", default="", secret=True, group="vonage"),
    Setting("VONAGE_APPLICATION_ID", "Id of the Vonage application whose inbound URL is the relay: replies are "
            "sent as it, and webhooks signed for another application are refused.", default="", group="vonage"),
    Setting("VONAGE_PRIVATE_KEY", "The application's private key (PEM, as downloaded; escaped \\n line breaks "
            "accepted): signs the RS256 JWT of each reply and media download.", default="", secret=True,
            group="vonage"),
    Setting("VONAGE_API_BASE", "Messages API base URL (a regional one such as https://api-eu.vonage.com works "
            "too).", default="https://api.nexmo.com", group="vonage"),
    # Telemetry
    Setting("APPLICATIONINSIGHTS_CONNECTION_STRING", "Application Insights connection string: the relay's metrics, "
            "spans and log lines go there (relay/telemetry.py), and the Functions host's telemetry too. Empty: no "
            "telemetry, and nothing of OpenTelemetry is imported.", default="", group="telemetry"),
    Setting("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "'ClientId=<client id>;Authorization=AAD' (a user-assigned "
            "identity) or 'Authorization=AAD' (the system-assigned one): telemetry is sent with that managed "
            "identity (Entra ID) instead of the connection string's key.", default="", group="telemetry"),
)

KEY_VAULT_REFERENCE_PREFIX = "@Microsoft.KeyVault("
STANDARD_WEBHOOKS_PREFIX = "whsec_"


class _Environment:
    """Reads catalogued settings only, so the catalogue cannot fall behind the code."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ

    def text(self, name: str) -> str:
        spec = SETTINGS[name]
        value = self._environ.get(name, "").strip()
        if value.startswith(KEY_VAULT_REFERENCE_PREFIX):
            raise SettingsError(
                f"{name} is an unresolved Key Vault reference: grant the app's identity "
                "'Key Vault Secrets User' and check keyVaultReferenceIdentity"
            )
        return value or (spec.default or "")

    def as_set(self, name: str) -> str:
        """Like `text`, but a setting that is present and empty stays empty (it turns something off)."""
        if name in self._environ and not self._environ[name].strip():
            return ""
        return self.text(name)

    def given(self, name: str) -> bool:
        """True when the environment sets `name` to something other than blanks (its default does not count)."""
        return bool(self._environ.get(name, "").strip())

    def required(self, name: str, why: str = "") -> str:
        value = self.text(name)
        if not value:
            raise SettingsError(f"{name} is not set{': ' + why if why else ''}")
        return value

    def number(self, name: str, *, minimum: float = 0) -> float:
        raw = self.text(name)
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value):  # float() takes "nan" and "inf", which slip past every comparison below
            raise SettingsError(f"{name} must be a number, got {raw!r}")
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum:g}")
        return value

    def integer(self, name: str, *, minimum: int = 0) -> int:
        raw = self.text(name)
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}")
        return value

    def flag(self, name: str) -> bool:
        raw = self.text(name).lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")

    def url(self, name: str) -> str:
        value = self.text(name)
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise SettingsError(f"{name} must be an absolute http(s) URL")
        return value.rstrip("/")

    def listing(self, name: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.text(name).split(",") if item.strip())

    def group(self, group: str, *, enabled_by: str) -> dict[str, str] | None:
        """The group's values when `enabled_by` is set; None when the feature is off."""
        if not self.text(enabled_by) or self.text(enabled_by) == (SETTINGS[enabled_by].default or ""):
            return None
        return {n: self.text(n) for n, s in SETTINGS.items() if s.group == group}


@dataclass(frozen=True)
class DirectLineSettings:
    """How the relay reaches the bot. `secret` is empty in token endpoint mode (`token_endpoint` set), and
    `endpoint` is empty when the Direct Line base is to be discovered from the agent's environment."""

    secret: str = field(repr=False)
    endpoint: str
    timeout_seconds: float
    bot_ids: tuple[str, ...]
    token_endpoint: str = ""

    @property
    def uses_token_endpoint(self) -> bool:
        """No secret: every token comes from the agent's token endpoint."""
        return bool(self.token_endpoint)


@dataclass(frozen=True)
class StorageSettings:
    connection_string: str = field(repr=False)
    table_service_uri: str
    credential: str
    client_id: str
    table_prefix: str
    queue_service_uri: str = ""

    @property
    def uses_identity(self) -> bool:
        return not self.connection_string

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> StorageSettings:
        """The storage settings alone (SettingsError names what is wrong), for a tool that needs nothing else."""
        return _storage(_Environment(os.environ if environ is None else environ))


@dataclass(frozen=True)
class RelaySettings:
    public_base_url: str
    poll_schedule: str
    burst_poll_seconds: float
    poll_ceiling_seconds: float
    idle_timeout_minutes: float
    signature_window_seconds: float
    max_body_bytes: int
    lease_seconds: float = 60.0
    omnichannel: dict[str, dict] = field(default_factory=dict)
    start_event: str = "startConversation"
    """The event posted first in every Direct Line conversation the relay starts; empty: none."""
    default_locale: str = "en-US"
    event_webhook_url: str = ""
    event_webhook_secret: str = field(default="", repr=False)
    event_transcript_messages: int = 20
    fanout_threshold: int = 500
    """More due conversations than this in one tick go over the poll queue; 0: never."""
    chase_seconds: float = 10.0
    """After a user's message, how long its reply is looked for every second in the background (0: never)."""
    poll_queue: str = "relay-poll"

    @property
    def poll_period_seconds(self) -> float | None:
        """Seconds between two timer executions when RELAY_POLL_SCHEDULE fires at an even pace ("*/N * * * * *"
        with N dividing 60, or every second); None for any other schedule."""
        seconds, *rest = self.poll_schedule.split()
        if any(part != "*" for part in rest):
            return None
        if seconds == "*":
            return 1.0
        step = seconds.removeprefix("*/")
        return float(step) if step != seconds and step.isdigit() and int(step) and 60 % int(step) == 0 else None


@dataclass(frozen=True)
class WebChatSettings:
    allowed_origins: tuple[str, ...]
    demo_enabled: bool
    token_rate_limit: int
    bundle_url: str
    proxy_hops: int = 0
    session_hours: float = 24.0


@dataclass(frozen=True)
class TelemetrySettings:
    """Where telemetry goes (`connection_string`, empty: nowhere) and whether it is sent with a managed identity
    (`entra_id`; `client_id` names a user-assigned one, empty: the system-assigned one)."""

    connection_string: str = field(default="", repr=False)
    entra_id: bool = False
    client_id: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TelemetrySettings:
        """The telemetry settings alone: read at import (function_app.py), before anything else is needed."""
        return _telemetry(_Environment(os.environ if environ is None else environ))


@dataclass(frozen=True)
class Settings:
    directline: DirectLineSettings
    storage: StorageSettings
    relay: RelaySettings
    webchat: WebChatSettings
    channels: dict[str, dict[str, str]] = field(repr=False)
    """Raw values of each enabled channel provider, keyed by channel name; the adapters validate them."""
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Environment(os.environ if environ is None else environ)
        settings = cls(
            directline=_directline(env),
            storage=_storage(env),
            relay=_relay(env),
            webchat=_webchat(env),
            channels=_channels(env),
            telemetry=_telemetry(env),
        )
        storage = settings.storage
        if settings.relay.fanout_threshold and storage.uses_identity and not storage.queue_service_uri:
            raise SettingsError("AzureWebJobsStorage__queueServiceUri is not set: the poll queue "
                                "(RELAY_FANOUT_THRESHOLD) needs it with identity-based storage (or set "
                                "RELAY_FANOUT_THRESHOLD to 0)")
        return settings


def _directline(env: _Environment) -> DirectLineSettings:
    """Exactly one of the secret and the token endpoint; the explicit DIRECTLINE_ENDPOINT, else (token endpoint
    mode) none: it is discovered from the agent's environment (relay/directline.py)."""
    secret = env.text("DIRECTLINE_SECRET")
    token_endpoint = env.url("DIRECTLINE_TOKEN_ENDPOINT")
    if bool(secret) == bool(token_endpoint):
        raise SettingsError(
            f"{'both' if secret else 'neither of'} DIRECTLINE_SECRET and DIRECTLINE_TOKEN_ENDPOINT "
            f"{'are' if secret else 'is'} set: set exactly one, the bot's Direct Line secret or a Copilot Studio "
            "agent's token endpoint"
        )
    discover = bool(token_endpoint) and not env.given("DIRECTLINE_ENDPOINT")
    return DirectLineSettings(
        secret=secret,
        endpoint="" if discover else env.url("DIRECTLINE_ENDPOINT"),
        timeout_seconds=env.number("DIRECTLINE_TIMEOUT_SECONDS", minimum=1),
        bot_ids=env.listing("DIRECTLINE_BOT_IDS"),
        token_endpoint=token_endpoint,
    )


def _storage(env: _Environment) -> StorageSettings:
    connection_string = env.text("AzureWebJobsStorage")
    table_uri = env.url("AzureWebJobsStorage__tableServiceUri")
    account = env.text("AzureWebJobsStorage__accountName")
    queue_uri = env.url("AzureWebJobsStorage__queueServiceUri")
    if not connection_string and not table_uri and account:
        table_uri = f"https://{account}.table.core.windows.net"
    if not connection_string and not queue_uri and account:
        queue_uri = f"https://{account}.queue.core.windows.net"
    if not connection_string and not queue_uri and ".table." in table_uri:  # the account's queues, in any cloud
        queue_uri = table_uri.replace(".table.", ".queue.", 1)
    if not connection_string and not table_uri:
        raise SettingsError(
            "AzureWebJobsStorage is not set: give a connection string, or AzureWebJobsStorage__tableServiceUri "
            "(or __accountName) for identity-based access"
        )
    credential = env.text("AzureWebJobsStorage__credential").lower()
    if credential not in ("", "managedidentity"):
        raise SettingsError("AzureWebJobsStorage__credential must be 'managedidentity' when set")
    prefix = env.text("RELAY_TABLE_PREFIX")
    if not (prefix.isascii() and prefix.isalnum() and prefix[0].isalpha() and len(prefix) <= 40):
        raise SettingsError("RELAY_TABLE_PREFIX must be 1-40 letters and digits, starting with a letter")
    return StorageSettings(
        connection_string=connection_string,
        table_service_uri=table_uri,
        credential=credential,
        client_id=env.text("AzureWebJobsStorage__clientId"),
        table_prefix=prefix,
        queue_service_uri=queue_uri,
    )


def _relay(env: _Environment) -> RelaySettings:
    schedule = env.text("RELAY_POLL_SCHEDULE")
    if len(schedule.split()) != 6:
        raise SettingsError("RELAY_POLL_SCHEDULE must be a six-field NCRONTAB expression (seconds first)")
    return RelaySettings(
        public_base_url=env.url("RELAY_PUBLIC_BASE_URL"),
        poll_schedule=schedule,
        burst_poll_seconds=env.number("RELAY_BURST_POLL_SECONDS"),
        poll_ceiling_seconds=env.number("RELAY_POLL_CEILING_SECONDS", minimum=1),
        idle_timeout_minutes=env.number("RELAY_IDLE_TIMEOUT_MINUTES", minimum=0.1),
        signature_window_seconds=env.number("RELAY_SIGNATURE_WINDOW_SECONDS", minimum=1),
        max_body_bytes=env.integer("RELAY_MAX_BODY_BYTES", minimum=1024),
        lease_seconds=env.number("RELAY_LEASE_SECONDS", minimum=5),
        omnichannel=_omnichannel(env),
        start_event=env.as_set("RELAY_START_EVENT"),
        default_locale=_locale(env),
        event_webhook_url=_event_webhook_url(env),
        event_webhook_secret=_event_webhook_secret(env),
        event_transcript_messages=_transcript_messages(env),
        fanout_threshold=env.integer("RELAY_FANOUT_THRESHOLD"),
        chase_seconds=_chase_seconds(env),
        poll_queue=_poll_queue(env),
    )


MAX_CHASE_SECONDS = 60


def _chase_seconds(env: _Environment) -> float:
    """At most a minute: a chase looks every second (an execution each), and a reply later than that is the
    timer's."""
    seconds = env.number("RELAY_CHASE_SECONDS")
    if seconds > MAX_CHASE_SECONDS:
        raise SettingsError(f"RELAY_CHASE_SECONDS must be at most {MAX_CHASE_SECONDS}")
    return seconds


_QUEUE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]")
_SUFFIXES = "-chase-poison"  # the chase queue's poison queue


def _poll_queue(env: _Environment) -> str:
    """A queue name Azure accepts, with room for the chase queue's and the poison queue's suffixes (names are at
    most 63 characters)."""
    name = env.text("RELAY_POLL_QUEUE")
    if not (3 <= len(name) <= 63 - len(_SUFFIXES) and _QUEUE_NAME.fullmatch(name)):
        raise SettingsError(f"RELAY_POLL_QUEUE must be 3-{63 - len(_SUFFIXES)} lowercase letters, digits and single "
                            "hyphens, starting and ending with a letter or digit")
    return name


_LOCALE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*")
MAX_TRANSCRIPT_MESSAGES = 100


def _locale(env: _Environment) -> str:
    locale = env.text("RELAY_DEFAULT_LOCALE")
    if not _LOCALE.fullmatch(locale):
        raise SettingsError("RELAY_DEFAULT_LOCALE must be a BCP 47 language tag such as en-US")
    return locale


def _event_webhook_url(env: _Environment) -> str:
    url = env.url("RELAY_EVENT_WEBHOOK_URL")
    if url and urlsplit(url).scheme != "https" and urlsplit(url).hostname not in LOOPBACK_HOSTS:
        # The POSTs carry the user's address and messages: never in clear over a network.
        raise SettingsError("RELAY_EVENT_WEBHOOK_URL must be an https URL (http only on a loopback host)")
    return url


def _event_webhook_secret(env: _Environment) -> str:
    secret = env.text("RELAY_EVENT_WEBHOOK_SECRET")
    if not env.text("RELAY_EVENT_WEBHOOK_URL"):
        return secret
    if not secret:
        raise SettingsError("RELAY_EVENT_WEBHOOK_SECRET is not set: the events sent to RELAY_EVENT_WEBHOOK_URL "
                            "must be signed")
    try:
        key = base64.b64decode(secret.removeprefix(STANDARD_WEBHOOKS_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not secret.startswith(STANDARD_WEBHOOKS_PREFIX) or len(key) < 24:
        raise SettingsError("RELAY_EVENT_WEBHOOK_SECRET must be 'whsec_' followed by at least 24 bytes in base64, "
                            "as Standard Webhooks secrets are")
    return secret


def _transcript_messages(env: _Environment) -> int:
    count = env.integer("RELAY_EVENT_TRANSCRIPT_MESSAGES")
    if count > MAX_TRANSCRIPT_MESSAGES:
        raise SettingsError(f"RELAY_EVENT_TRANSCRIPT_MESSAGES must be at most {MAX_TRANSCRIPT_MESSAGES}")
    return count


def _omnichannel(env: _Environment) -> dict[str, dict]:
    raw = env.text("RELAY_OMNICHANNEL_CONTEXT")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise SettingsError(f"RELAY_OMNICHANNEL_CONTEXT must be JSON: {error.msg} at position {error.pos}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise SettingsError("RELAY_OMNICHANNEL_CONTEXT must be a JSON object of channel name to object")
    return value


def _webchat(env: _Environment) -> WebChatSettings:
    origins = env.listing("WEBCHAT_ALLOWED_ORIGINS")
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
            raise SettingsError(f"WEBCHAT_ALLOWED_ORIGINS entries must look like https://host[:port], got {origin!r}")
    bundle_url = env.url("WEBCHAT_BUNDLE_URL")
    bundle = urlsplit(bundle_url)
    if bundle.scheme != "https" and bundle.hostname not in LOOPBACK_HOSTS:
        # An https page may not load an http script (mixed content): the demo would break without a word.
        raise SettingsError("WEBCHAT_BUNDLE_URL must be an https URL (http only on a loopback host)")
    return WebChatSettings(
        allowed_origins=origins,
        demo_enabled=env.flag("WEBCHAT_DEMO_ENABLED"),
        token_rate_limit=env.integer("WEBCHAT_TOKEN_RATE_LIMIT", minimum=1),
        proxy_hops=env.integer("WEBCHAT_PROXY_HOPS"),
        bundle_url=bundle_url,
        session_hours=_session_hours(env),
    )


MAX_SESSION_HOURS = 14 * 24
"""Direct Line forgets a conversation idle for about 15 days: no session may outlive that."""


def _session_hours(env: _Environment) -> float:
    hours = env.number("WEBCHAT_SESSION_HOURS")
    if not 0 < hours <= MAX_SESSION_HOURS:
        raise SettingsError(f"WEBCHAT_SESSION_HOURS must be more than 0 and at most {MAX_SESSION_HOURS} "
                            "(Direct Line forgets an idle conversation after about 15 days)")
    return hours


def _telemetry(env: _Environment) -> TelemetrySettings:
    """The connection string (its instrumentation key checked for, never shown) and the authentication string's
    two accepted forms, keys in any order and case, as the exporter and the host read it."""
    connection_string = env.text("APPLICATIONINSIGHTS_CONNECTION_STRING")
    if connection_string and "instrumentationkey=" not in connection_string.lower():
        raise SettingsError("APPLICATIONINSIGHTS_CONNECTION_STRING must be an Application Insights connection string "
                            "(InstrumentationKey=...;IngestionEndpoint=...)")
    raw = env.text("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")
    if not raw:
        return TelemetrySettings(connection_string=connection_string)
    pairs = [part.partition("=") for part in raw.split(";") if part.strip()]
    fields = {name.strip().lower(): value.strip() for name, _, value in pairs}
    if any(not sep or not value.strip() for _, sep, value in pairs) or len(fields) != len(pairs) \
            or fields.get("authorization") != "AAD" or not set(fields) <= {"authorization", "clientid"}:
        raise SettingsError("APPLICATIONINSIGHTS_AUTHENTICATION_STRING must be 'ClientId=<client id of the "
                            "user-assigned identity>;Authorization=AAD' or 'Authorization=AAD'")
    return TelemetrySettings(connection_string=connection_string, entra_id=True, client_id=fields.get("clientid", ""))


# The setting whose presence turns each channel provider on.
CHANNEL_SWITCHES = {
    "twilio": "TWILIO_AUTH_TOKEN",
    "whatsapp": "WHATSAPP_APP_SECRET",
    "messagebird": "MESSAGEBIRD_SIGNING_KEY",
    "line": "LINE_CHANNEL_SECRET",
    "bird": "BIRD_SIGNING_KEY",
    "telegram": "TELEGRAM_WEBHOOK_SECRET",
    "generic": "GENERIC_WEBHOOK_SECRET",
    "vonage": "VONAGE_SIGNATURE_SECRET",
}


def _channels(env: _Environment) -> dict[str, dict[str, str]]:
    enabled = {}
    for channel, switch in CHANNEL_SWITCHES.items():
        values = env.group(channel, enabled_by=switch)
        if values is not None:
            enabled[channel] = values
    if enabled and not env.text("RELAY_PUBLIC_BASE_URL"):
        raise SettingsError(
            "RELAY_PUBLIC_BASE_URL is not set: channel webhooks are signed over the public URL the provider calls"
        )
    return enabled


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; app settings change only with a restart in Azure too."""
    return Settings.from_environ()
