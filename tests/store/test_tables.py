"""The connection and the tables: names carry the prefix; keys fit any id and show none; connection strings and
identity-based settings."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from relay.errors import StoreError
from relay.settings import Settings
from relay.store import RelayStore
from relay.store.conversations import ConversationKey
from relay.store.dead_letters import DeadLetterKind
from relay.store.tables import storage_errors, table_service_client
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
                                                    "webchatsessions", "ratelimits", "keys")}


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


def test_ids_of_any_length_or_character_fit_every_table_and_no_key_shows_them(store):
    phone = "+15550100"
    ids = [phone, "+1555" + "9" * 1_995, "/" * 500, "a|b#c?d%e\\f\u0007"]
    for user in ids:
        key = ConversationKey("generic", user)
        create(store, key, next_poll_at=T0)
        store.due_polls.mark_inbound(key, f"{user}-message", now=T0)
        store.outbox.add_message(key, f"{user}-message", {"text": "hi"}, reply_context={"user_id": user}, now=T0)
        store.dead_letters.add_letter(key, kind="reply", reason="r", payload={})
        store.sessions.create_session(user, user_id="dl_u", resume_key="k", expires_at=T0 + timedelta(hours=1))
        store.rate_limits.count_request(user, limit=5, now=T0)

        assert store.conversations.get_record(key).key == key
        assert [m.reply_context for m in store.outbox.list_messages(key)] == [{"user_id": user}]
        assert store.outbox.add_message(key, f"{user}-message", {"text": "hi"}).is_new is False
        assert [letter.key for letter in store.dead_letters.list_letters(key)] == [key]
        assert store.sessions.get_session(user).conversation_id == user
    assert {d.key.user for d in store.due_polls.list_due(now=T0)} == set(ids)

    service = store.tables.service
    keys = [f"{row['PartitionKey']} {row['RowKey']}" for table in service.list_tables()
            if table.name.startswith(store.tables.prefix)
            for row in service.get_table_client(table.name).list_entities()]
    assert max(len(k) for k in keys) <= 100
    assert not [k for k in keys if phone.lstrip("+") in k or "9" * 50 in k]


def test_every_instance_derives_the_same_keys_and_another_prefix_other_ones(storage_connection_string, table_prefix):
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(6)]
    barrier = threading.Barrier(len(stores))

    def derive(store: RelayStore) -> str:
        barrier.wait()  # all at once: every instance but one loses the race to create the secret
        return store.tables.key_for("conversation", "twilio", "+1555")

    with ThreadPoolExecutor(len(stores)) as pool:
        derived = set(pool.map(derive, stores))
    assert len(derived) == 1
    elsewhere = make_store(storage_connection_string, table_prefix + "x")
    assert elsewhere.tables.key_for("conversation", "twilio", "+1555") not in derived  # a secret of its own


def test_the_environments_proxy_is_used_unless_no_proxy_names_the_storage_host(forward_proxy, monkeypatch):
    """The storage transport reads the environment once per origin, not at every request, and still honours it."""
    forward_proxy.body, forward_proxy.content_type = b'{"value": []}', "application/json;odata=minimalmetadata"
    storage = Settings.from_environ({
        "DIRECTLINE_SECRET": "x",
        "AzureWebJobsStorage": "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
                               "TableEndpoint=http://storage.invalid/devstoreaccount1;"}).storage
    service = table_service_client(storage, retry_total=0)
    assert list(service.list_tables()) == []
    assert list(service.list_tables()) == []
    tables_url = "http://storage.invalid/devstoreaccount1/Tables"
    assert [url.split("?")[0] for url in forward_proxy.asked] == [tables_url, tables_url]

    monkeypatch.setenv("NO_PROXY", "storage.invalid")
    with pytest.raises(StoreError), storage_errors("list tables"):  # straight to a host that never resolves
        list(table_service_client(storage, retry_total=0).list_tables())
    assert len(forward_proxy.asked) == 2
