"""The connection and the tables: names carry the prefix; connection strings and identity-based settings."""

from __future__ import annotations

from relay.settings import Settings
from relay.store import RelayStore
from relay.store.conversations import ConversationKey
from relay.store.dead_letters import DeadLetterKind
from relay.store.tables import table_service_client
from tests.store.conftest import T0, create, make_store


def test_every_table_carries_the_prefix(store, storage_connection_string, table_prefix):
    key = ConversationKey("twilio", "+1555")
    create(store, key, next_poll_at=T0)
    store.outbox.add_message(key, "SM1", {})
    store.dead_letters.add_letter(key, kind=DeadLetterKind.REPLY, reason="r", payload={})
    store.sessions.create_session("c", user_id="u", resume_key="k", expires_at=T0)
    store.rate_limits.count_request("a", limit=1)
    service = make_store(storage_connection_string, table_prefix).tables.service
    names = {t.name for t in service.list_tables()}
    ours = {n for n in names if n.startswith(table_prefix)}
    assert ours == {f"{table_prefix}{n}" for n in ("conversations", "duepolls", "inbound", "deadletters",
                                                    "webchatsessions", "ratelimits")}


def test_identity_based_settings_build_a_managed_identity_client():
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    storage = Settings.from_environ({
        "DIRECTLINE_SECRET": "x", "AzureWebJobsStorage__accountName": "relaystore",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-000000000001",
    }).storage
    service = table_service_client(storage)
    assert service.url.startswith("https://relaystore.table.core.windows.net")
    assert isinstance(service.credential, ManagedIdentityCredential)

    default = Settings.from_environ({
        "DIRECTLINE_SECRET": "x", "AzureWebJobsStorage__tableServiceUri": "https://s.table.core.usgovcloudapi.net",
    }).storage
    service = table_service_client(default)
    assert service.url.startswith("https://s.table.core.usgovcloudapi.net")
    assert isinstance(service.credential, DefaultAzureCredential)
    assert "relaystore" in repr(RelayStore.from_settings(storage))


def test_development_storage_shorthand():
    storage = Settings.from_environ({"DIRECTLINE_SECRET": "x", "AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    service = table_service_client(storage.storage)
    assert service.url.startswith("http://127.0.0.1:10002/devstoreaccount1")
    assert service.account_name == "devstoreaccount1"
