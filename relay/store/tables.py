"""The connection to Table Storage and what every table of the relay shares.

The connection comes from the `AzureWebJobsStorage` settings, read the way the Functions host
reads them: a connection string (Azurite locally), or identity-based access in Azure
(`__tableServiceUri` or `__accountName`, `__credential=managedidentity`, `__clientId`).

Each table name starts with `RELAY_TABLE_PREFIX`; a table is created on first use, once per
process. Every failure of the SDK becomes a StoreError here, in `storage_errors`, and nowhere else.
Keys are escaped with `escape` and long JSON is split over properties with `put_json`: these shapes
are the stored format, so they never change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceModifiedError, ResourceNotFoundError
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import TableClient, TableEntity, TableServiceClient, TableTransactionError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from relay.clock import Clock
from relay.errors import StoreError
from relay.settings import StorageSettings

__all__ = [
    "BATCH_LIMIT",
    "UPDATE_ATTEMPTS",
    "Table",
    "Tables",
    "escape",
    "get_json",
    "millis",
    "pause_after_conflict",
    "put_json",
    "storage_errors",
    "table_service_client",
    "transaction_error_code",
]

log = logging.getLogger(__name__)

# Short timeouts: a function invocation must fail fast and answer, not hang on storage.
_CLIENT_OPTIONS = {"retry_total": 2}
_TRANSPORT_OPTIONS = {"connection_timeout": 5, "read_timeout": 10}
_CONNECTION_POOL_SIZE = 64  # as many as the poller's workers (requests keeps only 10 by default)

UPDATE_ATTEMPTS = 5
"""Conditional writes tried before an update gives up with ConcurrencyConflict."""
BATCH_LIMIT = 100  # operations in one entity-group transaction
_MAX_STRING = 30_000  # characters per string property (Table Storage allows 64 KiB of UTF-16)

# What `UseDevelopmentStorage=true` means: Azurite's well-known account on its default ports.
_DEVELOPMENT_STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)


class _PooledTransport(RequestsTransport):
    """azure-core's requests transport with a connection pool as large as the poller's worker pool.

    With the default pool of 10, concurrent workers open and drop a TCP connection per request."""

    def __init__(self, *, pool_size: int = _CONNECTION_POOL_SIZE, **kwargs):
        super().__init__(**{**_TRANSPORT_OPTIONS, **kwargs})
        self._pool_size = pool_size

    def _init_session(self, session) -> None:
        super()._init_session(session)
        adapter = HTTPAdapter(pool_maxsize=self._pool_size, max_retries=Retry(total=False, redirect=False,
                                                                               raise_on_status=False))
        for prefix in self._protocols:
            session.mount(prefix, adapter)


def _storage_credential(storage: StorageSettings):
    """The token credential for identity-based storage (imported lazily: azure-identity is slow to load)."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if storage.credential == "managedidentity":
        return ManagedIdentityCredential(client_id=storage.client_id or None)
    return DefaultAzureCredential(managed_identity_client_id=storage.client_id or None)


def table_service_client(storage: StorageSettings, **options) -> TableServiceClient:
    """A client for the storage account of `storage`; `options` go to the SDK (a `transport`, timeouts)."""
    options = {**_CLIENT_OPTIONS, **options}
    options.setdefault("transport", _PooledTransport())
    if storage.connection_string:
        connection_string = storage.connection_string
        if connection_string.replace(" ", "").lower() == "usedevelopmentstorage=true":
            connection_string = _DEVELOPMENT_STORAGE
        return TableServiceClient.from_connection_string(connection_string, **options)
    return TableServiceClient(endpoint=storage.table_service_uri, credential=_storage_credential(storage), **options)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Raises StoreError("cannot <what>: <the service's error code, or the SDK error type>") for any Azure
    failure inside the block."""
    try:
        yield
    except AzureError as error:
        raise StoreError(f"cannot {what}: {getattr(error, 'error_code', None) or type(error).__name__}") from error


def transaction_error_code(error: TableTransactionError) -> str | None:
    """The Table Storage error code of a failed transaction ("EntityAlreadyExists", ...; a TableErrorCode
    when the SDK knows it), None when the service sent none."""
    # The SDK documents `error_code` (`:ivar error_code:`) and sets it on every error it raises, but
    # only by assignment in azure/data/tables/_error.py, so the class's types do not declare it.
    return error.error_code  # type: ignore[attr-defined]


_created_tables: set[tuple[str, str]] = set()
_created_lock = threading.Lock()


class Tables:
    """The relay's tables on one account, their names starting with `prefix`."""

    def __init__(self, service: TableServiceClient, *, prefix: str):
        self.service = service
        self.prefix = prefix
        self._clients: dict[str, TableClient] = {}

    def client(self, name: str) -> TableClient:
        """The SDK client of table `prefix + name`, which is created first if this process has not yet.

        Raises StoreError when the table cannot be created."""
        client = self._clients.get(name)
        if client is None:
            full = f"{self.prefix}{name}"
            marker = (self.service.url, full)
            if marker not in _created_tables:
                with _created_lock:
                    if marker not in _created_tables:
                        with storage_errors(f"create table {full}"):
                            self.service.create_table_if_not_exists(full)
                        _created_tables.add(marker)
            client = self._clients[name] = self.service.get_table_client(full)
        return client

    def table(self, name: str) -> Table:
        return Table(self, name)


class Table:
    """One table: the reads and deletes every table makes, their failures raised as StoreError."""

    def __init__(self, tables: Tables, name: str):
        self._tables = tables
        self.name = name

    @property
    def client(self) -> TableClient:
        return self._tables.client(self.name)

    def get(self, pk: str, rk: str) -> TableEntity | None:
        """The entity, or None when there is none."""
        with storage_errors(f"read from {self.name}"):
            try:
                return self.client.get_entity(pk, rk)
            except ResourceNotFoundError:
                return None

    def create(self, entity: Mapping[str, Any]) -> None:
        with storage_errors(f"write to {self.name}"):
            self.client.create_entity(entity)

    def query(self, query: str, parameters: dict[str, Any], *, limit: int) -> list[TableEntity]:
        """Up to `limit` entities matching the OData filter `query` (every entity when it is empty)."""
        with storage_errors(f"query {self.name}"):
            if query:
                pages = self.client.query_entities(query, parameters=parameters, results_per_page=min(limit, 1000))
            else:
                pages = self.client.list_entities(results_per_page=min(limit, 1000))
            return [e for _, e in zip(range(limit), pages, strict=False)]

    def delete_matching(self, query: str, parameters: dict[str, Any], *, limit: int) -> int:
        """Delete up to `limit` entities matching `query`, each only if unchanged since read; how many went."""
        return sum(self.delete_if_unchanged(e) for e in self.query(query, parameters, limit=limit))

    def delete_if_unchanged(self, entity: TableEntity) -> bool:
        """Delete `entity` under its ETag; False when it changed or went meanwhile."""
        with storage_errors(f"delete a row of {self.name}"):
            try:
                self.client.delete_entity(entity["PartitionKey"], entity["RowKey"], etag=entity.metadata["etag"],
                                          match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                return False
        return True

    def delete_quietly(self, pk: str, rk: str) -> None:
        """Best-effort clean-up of a row whose leftover is harmless: a failure is only logged."""
        try:
            self.client.delete_entity(pk, rk)
        except AzureError as error:
            log.warning("could not delete a %s row: %s", self.name, type(error).__name__)


def pause_after_conflict(clock: Clock, attempt: int) -> None:
    """A short random pause on `clock` so writers that collided do not collide again in lockstep."""
    clock.sleep(clock.uniform(0, 0.01 * 2**attempt))


_UNSAFE_KEY_CHARS = set("/\\#?%|")


def escape(value: str) -> str:
    """A value made safe for PartitionKey/RowKey (no / \\ # ? or control characters; | separates parts)."""
    return "".join(f"%{ord(c):02X}" if c in _UNSAFE_KEY_CHARS or ord(c) < 32 or 127 <= ord(c) < 160 else c
                   for c in value)


def millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def put_json(entity: dict[str, Any], name: str, value: Any) -> None:
    """JSON in one string property, or split over name_1, name_2... when longer than a property may be."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    parts = [text[i:i + _MAX_STRING] for i in range(0, len(text), _MAX_STRING)] or [""]
    entity[name] = parts[0]
    for number, part in enumerate(parts[1:], start=1):
        entity[f"{name}_{number}"] = part


def get_json(entity: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """What put_json stored under `name`; `default` when the property is absent."""
    if entity.get(name) is None:
        return default
    parts, number = [entity[name]], 1
    while f"{name}_{number}" in entity:
        parts.append(entity[f"{name}_{number}"])
        number += 1
    return json.loads("".join(parts))
