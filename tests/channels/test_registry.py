"""Finding adapters: enabled by their signing secret, 404 when absent, a clear error naming a missing setting."""

from __future__ import annotations

import pytest

from devstack.channels import DEV_VALUES
from relay.channels import get_adapter, list_enabled, public_url
from relay.errors import ChannelDisabled, SettingsError
from relay.settings import Settings

BASE = {"DIRECTLINE_SECRET": "s", "AzureWebJobsStorage": "UseDevelopmentStorage=true",
        "RELAY_PUBLIC_BASE_URL": "https://relay.example.net"}


def settings(**values: str) -> Settings:
    return Settings.from_environ({**BASE, **values})


def test_every_provider_with_its_dev_values_is_enabled_and_built():
    configured = settings(**DEV_VALUES)
    assert list_enabled(configured) == ["twilio", "whatsapp", "messagebird", "bird", "generic",
                                        "vonage", "line", "telegram"]
    for name in list_enabled(configured):
        adapter = get_adapter(name, configured)
        assert adapter.name == name
        assert "dev-only" not in repr(adapter)


def test_unknown_and_unconfigured_providers_are_disabled():
    configured = settings(TWILIO_AUTH_TOKEN="t", TWILIO_ACCOUNT_SID="AC1")
    assert list_enabled(configured) == ["twilio"]
    for name in ("whatsapp", "telegram"):
        with pytest.raises(ChannelDisabled) as caught:
            get_adapter(name, configured)
        assert name in str(caught.value)


@pytest.mark.parametrize(("values", "missing"), [
    ({"TWILIO_AUTH_TOKEN": "t"}, "TWILIO_ACCOUNT_SID"),
    ({"WHATSAPP_APP_SECRET": "s", "WHATSAPP_ACCESS_TOKEN": "a", "WHATSAPP_PHONE_NUMBER_ID": "1"},
     "WHATSAPP_VERIFY_TOKEN"),
    ({"MESSAGEBIRD_SIGNING_KEY": "k"}, "MESSAGEBIRD_ACCESS_KEY"),
    ({"BIRD_SIGNING_KEY": "k", "BIRD_ACCESS_KEY": "a", "BIRD_WORKSPACE_ID": "w"}, "BIRD_CHANNEL_ID"),
    ({"GENERIC_WEBHOOK_SECRET": "s"}, "GENERIC_CALLBACK_URL"),
    ({"VONAGE_SIGNATURE_SECRET": "s", "VONAGE_PRIVATE_KEY": "k"}, "VONAGE_APPLICATION_ID"),
    ({"LINE_CHANNEL_SECRET": "s"}, "LINE_CHANNEL_ACCESS_TOKEN"),
])
def test_incomplete_provider_settings_name_the_missing_one(values, missing):
    configured = settings(**values)
    [name] = list_enabled(configured)
    with pytest.raises(SettingsError, match=missing) as caught:
        get_adapter(name, configured)
    assert all(secret not in str(caught.value) for secret in values.values() if len(secret) > 1)


def test_generic_scheme_settings_are_validated():
    with pytest.raises(SettingsError, match="GENERIC_SIGNATURE_SCHEME"):
        get_adapter("generic", settings(**{**DEV_VALUES, "GENERIC_SIGNATURE_SCHEME": "rot13"}))
    with pytest.raises(SettingsError, match="whsec_"):
        get_adapter("generic", settings(**{**DEV_VALUES, "GENERIC_WEBHOOK_SECRET": "plain"}))


@pytest.mark.parametrize(("base", "request_url", "expected"), [
    ("https://relay.example.net", "http://10.0.0.4:7071/api/channels/twilio?a=1&b=%20",
     "https://relay.example.net/api/channels/twilio?a=1&b=%20"),
    ("https://relay.example.net/", "/api/channels/whatsapp", "https://relay.example.net/api/channels/whatsapp"),
    ("", "http://127.0.0.1:7071/api/channels/bird", "http://127.0.0.1:7071/api/channels/bird"),
])
def test_public_url_is_the_configured_base_plus_path_and_query(base, request_url, expected):
    assert public_url(base, request_url) == expected


def test_the_sample_settings_and_the_simulator_share_the_dev_credentials():
    """`make run` gives both the same local.settings.json values; these defaults must not drift apart."""
    import json

    from devstack.procs import ROOT
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    assert {k: sample.get(k) for k in DEV_VALUES} == DEV_VALUES
    assert list_enabled(settings(**sample)) == ["twilio", "whatsapp", "messagebird", "bird", "generic",
                                                "vonage", "line", "telegram"]


@pytest.mark.parametrize(("values", "named"), [
    ({"TELEGRAM_WEBHOOK_SECRET": "s3cret"}, "TELEGRAM_BOT_TOKEN is not set"),
    ({"TELEGRAM_WEBHOOK_SECRET": "not allowed!", "TELEGRAM_BOT_TOKEN": "1:t"}, "TELEGRAM_WEBHOOK_SECRET must be"),
    ({"TELEGRAM_WEBHOOK_SECRET": "x" * 257, "TELEGRAM_BOT_TOKEN": "1:t"}, "TELEGRAM_WEBHOOK_SECRET must be"),
])
def test_telegram_settings_name_what_is_wrong_and_never_the_value(values, named):
    """A secret_token Telegram would refuse at setWebhook is refused at start, naming the setting, not its value."""
    configured = settings(**values)
    assert list_enabled(configured) == ["telegram"]
    with pytest.raises(SettingsError, match=named) as caught:
        get_adapter("telegram", configured)
    assert all(value not in str(caught.value) for value in values.values())
