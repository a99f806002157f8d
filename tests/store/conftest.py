"""What the store tests share: a store of the test's own on Azurite, a second writer, and records."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.settings import Settings
from relay.store import RelayStore
from relay.store.conversations import ConversationKey, ConversationRecord
from relay.store.tables import StorageTransport

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


class CountingTransport(StorageTransport):
    """The relay's storage transport, counting the HTTP requests (= billed table transactions) a store makes."""

    def __init__(self):
        super().__init__()
        self.requests: list[str] = []

    def send(self, request, **kwargs):
        self.requests.append(f"{request.method} {request.url}")
        return super().send(request, **kwargs)


def make_store(connection_string: str, prefix: str, **options) -> RelayStore:
    storage = Settings.from_environ({"DIRECTLINE_SECRET": "x", "AzureWebJobsStorage": connection_string,
                                     "RELAY_TABLE_PREFIX": prefix}).storage
    return RelayStore.from_settings(storage, **options)


@pytest.fixture
def store(storage_connection_string, table_prefix) -> RelayStore:
    return make_store(storage_connection_string, table_prefix)


@pytest.fixture
def other_store(storage_connection_string, table_prefix) -> RelayStore:
    """A second writer: its own client and connection, as another instance would have."""
    return make_store(storage_connection_string, table_prefix)


def new_record(key: ConversationKey, **fields) -> ConversationRecord:
    return ConversationRecord(key=key, conversation_id=f"conv-{key.user}", user_id=f"dl_{key.user}", **fields)


def create(store: RelayStore, key: ConversationKey, now: datetime = T0, **fields) -> ConversationRecord:
    return store.conversations.update_record(key, lambda stored: stored or new_record(key, **fields), now=now)
