"""GET /api/health through the local host, with real Azurite."""

from __future__ import annotations

import requests

from devstack.procs import free_port


def test_health_is_200_with_version_and_checks(start_host, storage_connection_string, directline_emulator):
    host = start_host(env={"AzureWebJobsStorage": storage_connection_string, "DIRECTLINE_SECRET": "s3cret-value",
                           "DIRECTLINE_ENDPOINT": directline_emulator.base_url})
    response = requests.get(f"{host.url}/api/health", timeout=20)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "healthy"
    assert body["version"]
    assert set(body["checks"]) == {"settings", "directline", "table_storage"}
    assert "s3cret-value" not in response.text


def test_health_names_unreachable_table_storage(start_host):
    dead = f"http://127.0.0.1:{free_port()}/devstoreaccount1"
    host = start_host(env={
        "AzureWebJobsStorage": f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
                               f"TableEndpoint={dead};",
        "DIRECTLINE_SECRET": "x",
    })
    response = requests.get(f"{host.url}/api/health", timeout=30)
    assert response.status_code == 503
    assert response.json()["failing"] == ["table_storage"]


def test_health_names_a_missing_setting(start_host, storage_connection_string):
    host = start_host(env={"AzureWebJobsStorage": storage_connection_string})
    response = requests.get(f"{host.url}/api/health", timeout=20)
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["settings"]
    assert "DIRECTLINE_SECRET" in body["checks"]["settings"]["detail"]
