"""The one settings module: defaults, validation messages, secrets kept out of reprs."""

import json
from pathlib import Path

import pytest

from relay.errors import SettingsError
from relay.settings import SETTINGS, Settings

BASE = {"DIRECTLINE_SECRET": "dl-secret-value", "AzureWebJobsStorage": "UseDevelopmentStorage=true"}


def test_defaults():
    settings = Settings.from_environ(BASE)
    assert settings.directline.endpoint == "https://directline.botframework.com/v3/directline"
    assert settings.relay.poll_schedule == "*/5 * * * * *" and settings.relay.chase_seconds == 10
    assert settings.relay.fanout_threshold == 500 and settings.relay.poll_queue == "relay-poll"
    assert settings.relay.burst_poll_seconds == 2
    assert settings.channels == {}
    assert settings.webchat.demo_enabled is False
    assert settings.webchat.session_hours == 24


def test_missing_secret_is_named():
    with pytest.raises(SettingsError, match="DIRECTLINE_SECRET"):
        Settings.from_environ({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})


AGENT_TOKEN_ENDPOINT = ("https://contoso.environment.api.powerplatform.com/powervirtualagents/botsbyschema/"
                        "cr_agent/directline/token?api-version=2022-03-01-preview")
AGENT = {"DIRECTLINE_TOKEN_ENDPOINT": AGENT_TOKEN_ENDPOINT, "AzureWebJobsStorage": "UseDevelopmentStorage=true"}


def test_a_token_endpoint_replaces_the_secret_and_leaves_the_direct_line_host_to_discovery():
    directline = Settings.from_environ(AGENT).directline
    assert directline.uses_token_endpoint and directline.secret == ""
    assert directline.token_endpoint == AGENT_TOKEN_ENDPOINT
    assert directline.endpoint == ""  # discovered from the agent's environment, not the global default


def test_an_explicit_direct_line_endpoint_wins_over_discovery():
    europe = "https://europe.directline.botframework.com/v3/directline"
    assert Settings.from_environ({**AGENT, "DIRECTLINE_ENDPOINT": europe}).directline.endpoint == europe
    assert Settings.from_environ({**AGENT, "DIRECTLINE_ENDPOINT": "  "}).directline.endpoint == ""


@pytest.mark.parametrize(("environ", "says"), [
    ({**BASE, "DIRECTLINE_TOKEN_ENDPOINT": AGENT_TOKEN_ENDPOINT}, "both"),
    ({"AzureWebJobsStorage": "UseDevelopmentStorage=true"}, "neither"),
    ({**AGENT, "DIRECTLINE_SECRET": "   "}, None),
], ids=["both", "neither", "blank-secret-is-none"])
def test_exactly_one_of_the_secret_and_the_token_endpoint_is_required(environ, says):
    if says is None:
        assert Settings.from_environ(environ).directline.uses_token_endpoint
        return
    with pytest.raises(SettingsError, match="exactly one") as raised:
        Settings.from_environ(environ)
    message = str(raised.value)
    assert says in message and "DIRECTLINE_SECRET" in message and "DIRECTLINE_TOKEN_ENDPOINT" in message
    assert "dl-secret-value" not in message and "contoso" not in message


def test_a_malformed_token_endpoint_is_named():
    with pytest.raises(SettingsError, match="DIRECTLINE_TOKEN_ENDPOINT must be an absolute http"):
        Settings.from_environ({**AGENT, "DIRECTLINE_TOKEN_ENDPOINT": "contoso.example/token"})


@pytest.mark.parametrize(("name", "value", "message"), [
    ("DIRECTLINE_ENDPOINT", "directline.example", "absolute http"),
    ("RELAY_BURST_POLL_SECONDS", "soon", "must be a number"),
    ("RELAY_POLL_SCHEDULE", "*/5 * * * *", "six-field"),
    ("WEBCHAT_DEMO_ENABLED", "maybe", "true or false"),
    ("WEBCHAT_ALLOWED_ORIGINS", "https://a.example/path", "https://host"),
    ("RELAY_TABLE_PREFIX", "bad-prefix", "letters and digits"),
    ("WEBCHAT_SESSION_HOURS", "a day", "must be a number"),
    ("WEBCHAT_SESSION_HOURS", "0", "more than 0"),
    ("WEBCHAT_SESSION_HOURS", "337", "at most 336"),
    ("WEBCHAT_SESSION_HOURS", "nan", "must be a number"),
    ("WEBCHAT_BUNDLE_URL", "cdn.example/webchat.js", "absolute http"),
    ("WEBCHAT_BUNDLE_URL", "http://cdn.example/webchat.js", "https URL"),
    ("DIRECTLINE_SECRET", "@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/secrets/x/)", "Key Vault"),
    ("RELAY_DEFAULT_LOCALE", "english please", "BCP 47"),
    ("RELAY_EVENT_WEBHOOK_URL", "http://desk.example/events", "https URL"),
    ("RELAY_EVENT_TRANSCRIPT_MESSAGES", "101", "at most 100"),
    ("RELAY_CHASE_SECONDS", "nan", "must be a number"),  # else every comparison is false: the chase silently off
    ("RELAY_LEASE_SECONDS", "inf", "must be a number"),
    ("RELAY_CHASE_SECONDS", "61", "at most 60"),
    ("RELAY_FANOUT_THRESHOLD", "-1", "at least 0"),
    ("RELAY_POLL_QUEUE", "Relay_Poll", "lowercase"),
])
def test_malformed_values_are_named(name, value, message):
    with pytest.raises(SettingsError, match=message) as raised:
        Settings.from_environ({**BASE, name: value})
    assert name in str(raised.value)


EVENT_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="  # 26 bytes


def test_the_greeting_event_is_on_by_default_and_off_when_set_empty():
    assert (Settings.from_environ(BASE).relay.start_event, Settings.from_environ(BASE).relay.default_locale) == (
        "startConversation", "en-US")
    assert Settings.from_environ({**BASE, "RELAY_START_EVENT": " "}).relay.start_event == ""
    assert Settings.from_environ({**BASE, "RELAY_START_EVENT": "hello"}).relay.start_event == "hello"


@pytest.mark.parametrize(("secret", "message"), [
    pytest.param("", "must be signed", id="missing"),
    pytest.param("plain-secret-of-enough-length-here", "whsec_", id="not whsec_"),
    pytest.param("whsec_not base64!", "whsec_", id="not base64"),
    pytest.param("whsec_c2hvcnQ=", "24 bytes", id="too short"),
])
def test_an_event_webhook_needs_a_standard_webhooks_secret(secret, message):
    with pytest.raises(SettingsError, match=message) as raised:
        Settings.from_environ({**BASE, "RELAY_EVENT_WEBHOOK_URL": "https://desk.example/events",
                               "RELAY_EVENT_WEBHOOK_SECRET": secret})
    assert "RELAY_EVENT_WEBHOOK_SECRET" in str(raised.value) and (not secret or secret not in str(raised.value))


def test_an_event_webhook_on_https_or_loopback_with_its_secret_is_accepted():
    for url in ("https://desk.example/events", "http://127.0.0.1:8080/events"):
        relay = Settings.from_environ({**BASE, "RELAY_EVENT_WEBHOOK_URL": url,
                                       "RELAY_EVENT_WEBHOOK_SECRET": EVENT_SECRET}).relay
        assert (relay.event_webhook_url, relay.event_transcript_messages) == (url, 20)
        assert EVENT_SECRET not in repr(relay)


def test_identity_based_storage_from_account_name():
    storage = Settings.from_environ({
        "DIRECTLINE_SECRET": "x",
        "AzureWebJobsStorage__accountName": "relaystore",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-000000000001",
    }).storage
    assert storage.uses_identity
    assert storage.table_service_uri == "https://relaystore.table.core.windows.net"
    assert storage.client_id == "00000000-0000-0000-0000-000000000001"


def test_identity_based_storage_prefers_explicit_uri():
    storage = Settings.from_environ({
        "DIRECTLINE_SECRET": "x",
        "AzureWebJobsStorage__tableServiceUri": "https://relaystore.table.core.usgovcloudapi.net",
        "AzureWebJobsStorage__accountName": "relaystore",
    }).storage
    assert storage.table_service_uri == "https://relaystore.table.core.usgovcloudapi.net"


def test_storage_is_required():
    with pytest.raises(SettingsError, match="AzureWebJobsStorage"):
        Settings.from_environ({"DIRECTLINE_SECRET": "x"})


def test_channel_needs_public_base_url():
    with pytest.raises(SettingsError, match="RELAY_PUBLIC_BASE_URL"):
        Settings.from_environ({**BASE, "TWILIO_AUTH_TOKEN": "t"})
    settings = Settings.from_environ({**BASE, "TWILIO_AUTH_TOKEN": "t", "RELAY_PUBLIC_BASE_URL": "https://r.example/"})
    assert set(settings.channels) == {"twilio"}
    assert settings.relay.public_base_url == "https://r.example"


def test_secrets_stay_out_of_repr():
    settings = Settings.from_environ({**BASE, "TWILIO_AUTH_TOKEN": "twilio-token-value",
                                      "RELAY_PUBLIC_BASE_URL": "https://r.example"})
    assert "dl-secret-value" not in repr(settings)
    assert "twilio-token-value" not in repr(settings)


def test_catalogue_marks_every_secret():
    secrets = {name for name, s in SETTINGS.items() if s.secret}
    assert {"DIRECTLINE_SECRET", "TWILIO_AUTH_TOKEN", "WHATSAPP_APP_SECRET", "MESSAGEBIRD_SIGNING_KEY",
            "BIRD_SIGNING_KEY", "GENERIC_WEBHOOK_SECRET"} <= secrets


def test_omnichannel_context_is_json_per_channel():
    settings = Settings.from_environ({**BASE, "RELAY_OMNICHANNEL_CONTEXT": '{"twilio": {"channeltype": "sms"}}'})
    assert settings.relay.omnichannel == {"twilio": {"channeltype": "sms"}}
    with pytest.raises(SettingsError, match="RELAY_OMNICHANNEL_CONTEXT must be JSON"):
        Settings.from_environ({**BASE, "RELAY_OMNICHANNEL_CONTEXT": "{twilio"})
    with pytest.raises(SettingsError, match="channel name to object"):
        Settings.from_environ({**BASE, "RELAY_OMNICHANNEL_CONTEXT": '{"twilio": 1}'})


def test_the_web_chat_bundle_defaults_to_microsofts_cdn_at_the_version_the_demo_is_tested_with():
    tested = json.loads((Path(__file__).resolve().parent.parent / "package.json").read_text())
    version = tested["devDependencies"]["botframework-webchat"]
    assert Settings.from_environ(BASE).webchat.bundle_url == (
        f"https://cdn.botframework.com/botframework-webchat/{version}/webchat.js")


APP_INSIGHTS = "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=https://example.invalid/"


@pytest.mark.parametrize(("authentication", "entra_id", "client_id"), [
    pytest.param("", False, "", id="none: the connection string's key"),
    pytest.param("Authorization=AAD", True, "", id="the system-assigned identity"),
    pytest.param("ClientId=abc-123;Authorization=AAD", True, "abc-123", id="a user-assigned identity"),
    pytest.param(" authorization=AAD ; clientid=abc-123 ", True, "abc-123", id="keys in any order and case"),
])
def test_telemetry_is_sent_with_the_identity_the_authentication_string_names(authentication, entra_id, client_id):
    telemetry = Settings.from_environ({**BASE, "APPLICATIONINSIGHTS_CONNECTION_STRING": APP_INSIGHTS,
                                       "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": authentication}).telemetry
    assert (telemetry.connection_string, telemetry.entra_id, telemetry.client_id) == (APP_INSIGHTS, entra_id,
                                                                                      client_id)


@pytest.mark.parametrize("authentication", ["ClientId=abc-123", "ClientId=abc-123;Authorization=aad",
                                            "Authorization=AAD;ClientId=", "Authorization=AAD;Secret=x",
                                            "ClientId=a;ClientId=b;Authorization=AAD", "AAD"])
def test_a_malformed_authentication_string_is_named_without_its_value(authentication):
    environ = {**BASE, "APPLICATIONINSIGHTS_CONNECTION_STRING": APP_INSIGHTS,
               "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": authentication}
    with pytest.raises(SettingsError, match="APPLICATIONINSIGHTS_AUTHENTICATION_STRING must be") as raised:
        Settings.from_environ(environ)
    assert "abc-123" not in str(raised.value)


def test_a_connection_string_without_an_instrumentation_key_is_named_and_telemetry_is_off_by_default():
    with pytest.raises(SettingsError, match="APPLICATIONINSIGHTS_CONNECTION_STRING must be"):
        Settings.from_environ({**BASE, "APPLICATIONINSIGHTS_CONNECTION_STRING": "https://example.invalid/"})
    assert Settings.from_environ(BASE).telemetry.connection_string == ""
    assert APP_INSIGHTS not in repr(Settings.from_environ({**BASE, "APPLICATIONINSIGHTS_CONNECTION_STRING":
                                                           APP_INSIGHTS}))


@pytest.mark.parametrize(("schedule", "period"), [
    ("*/5 * * * * *", 5.0), ("* * * * * *", 1.0), ("*/30 * * * * *", 30.0),
    ("*/7 * * * * *", None),  # 56 s, then 0 s: 4 s apart at each minute
    ("0 */5 * * * *", None), ("0,30 * * * * *", None), ("*/0 * * * * *", None),
])
def test_the_timer_period_is_known_only_for_an_even_pace(schedule, period):
    settings = Settings.from_environ({**BASE, "RELAY_POLL_SCHEDULE": schedule})
    assert settings.relay.poll_period_seconds == period
