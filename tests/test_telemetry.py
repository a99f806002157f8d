"""Turning telemetry on (relay/telemetry.py `configure_from_settings`, run once when function_app.py is imported):
nothing of OpenTelemetry at a cold start without Application Insights; with it, the Azure Monitor distro sends
with the app's managed identity and none of its automatic instrumentations."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.identity import ManagedIdentityCredential
from azure.monitor.opentelemetry import _constants as distro_constants

from devstack.channels import DEV_VALUES
from relay import telemetry
from relay.settings import TelemetrySettings
from tests.conftest import DIRECTLINE_TEST_SECRET, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
CONNECTION_STRING = ("InstrumentationKey=00000000-0000-0000-0000-000000000000;"
                     "IngestionEndpoint=https://example.invalid/;LiveEndpoint=https://example.invalid/")
CLIENT_ID = "11111111-2222-3333-4444-555555555555"


def test_an_app_without_application_insights_imports_nothing_of_opentelemetry():
    env = {name: value for name, value in subprocess_env(
        **DEV_VALUES, DIRECTLINE_SECRET=DIRECTLINE_TEST_SECRET, DIRECTLINE_ENDPOINT="http://127.0.0.1:9/v3/directline",
        AzureWebJobsStorage="UseDevelopmentStorage=true", RELAY_PUBLIC_BASE_URL="https://relay.example").items()
        if not name.startswith("APPLICATIONINSIGHTS_")}
    found = subprocess.run(
        [sys.executable, "-c", "import function_app, sys; "
                               "print([m for m in sys.modules if m.startswith(('opentelemetry', 'azure.monitor'))])"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert ast.literal_eval(found.stdout.strip().splitlines()[-1]) == []


@pytest.fixture
def distro(monkeypatch) -> Iterator[list[dict[str, Any]]]:
    """The Azure Monitor distro's configure_azure_monitor, recording how it was called instead of configuring the
    process's providers and exporting to Azure over the internet: the one stand-in of these tests, because the
    real call would send telemetry to the connection string's endpoint."""
    import azure.monitor.opentelemetry

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(azure.monitor.opentelemetry, "configure_azure_monitor",
                        lambda **options: calls.append({**options, "logs": os.environ.get("OTEL_LOGS_EXPORTER")}))
    logs_exporter = os.environ.pop("OTEL_LOGS_EXPORTER", None)
    yield calls
    telemetry.use()
    os.environ.pop("OTEL_LOGS_EXPORTER", None)
    if logs_exporter is not None:
        os.environ["OTEL_LOGS_EXPORTER"] = logs_exporter


def test_a_connection_string_configures_the_distro_with_the_managed_identity_and_no_auto_instrumentation(distro):
    settings = TelemetrySettings.from_environ({
        "APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION_STRING,
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": f"ClientId={CLIENT_ID};Authorization=AAD"})
    assert telemetry.configure_from_settings(lambda: settings)
    [options] = distro
    assert options["connection_string"] == CONNECTION_STRING
    assert isinstance(options["credential"], ManagedIdentityCredential)
    assert settings.client_id == CLIENT_ID
    off = {name for name, option in options["instrumentation_options"].items() if not option["enabled"]}
    assert off >= {"requests", "urllib", "urllib3", "azure_sdk", "httpx"}
    # Every instrumentation this version of the distro would turn on by itself (a newer one may add some).
    assert off >= set(distro_constants._ALL_SUPPORTED_INSTRUMENTED_LIBRARIES)
    assert options["logs"] == "none"  # the host sends the worker's log lines already
    assert telemetry.carry_context(len) is not len  # the facade records now, to the providers the distro set


def test_without_an_authentication_string_the_connection_strings_key_is_used(distro):
    settings = TelemetrySettings.from_environ({"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION_STRING})
    assert telemetry.configure_from_settings(lambda: settings)
    assert distro[0]["credential"] is None


def test_without_a_connection_string_the_distro_is_not_called(distro):
    assert not telemetry.configure_from_settings(lambda: TelemetrySettings.from_environ({}))
    assert distro == []


def test_a_malformed_authentication_string_turns_telemetry_off_with_a_clear_message_not_the_app(distro, caplog):
    environ = {"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION_STRING,
               "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": f"ClientId={CLIENT_ID};Authorization=Key"}
    with caplog.at_level(logging.ERROR, logger="relay.telemetry"):
        assert not telemetry.configure_from_settings(lambda: TelemetrySettings.from_environ(environ))
    assert distro == []
    assert "APPLICATIONINSIGHTS_AUTHENTICATION_STRING must be" in caplog.text
    assert CLIENT_ID not in caplog.text
