"""The connection to Table Storage and what every table of the relay shares.

The connection comes from the `AzureWebJobsStorage` settings, read the way the Functions host
reads them: a connection string (Azurite locally), or identity-based access in Azure
(`__tableServiceUri` or `__accountName`, `__credential=managedidentity`, `__clientId`).

Each table name starts with `RELAY_TABLE_PREFIX`; a table is created on first use, once per
process. Every failure of the SDK becomes a StoreError here, in `storage_errors`, and nowhere else.
Keys made from ids the relay does not choose (a user's phone number, a provider's message id, a
client's address) come from `Tables.key_for`: fixed-length keyed hashes, so no id is too long for
a key and none appears in a storage URL (which the SDK and urllib3 log at DEBUG). Long JSON is
split over properties with `put_json`. These shapes are the stored format, so they never change.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import TableClient, TableEntity, TableServiceClient, TableTransactionError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from relay.clock import Clock
from relay.errors import StoreError
from relay.http_environment import OriginProxies, ca_bundle
from relay.settings import StorageSettings

if TYPE_CHECKING:
    from azure.storage.queue import QueueClient

__all__ = [
    "BATCH_LIMIT",
    "UPDATE_ATTEMPTS",
    "Budget",
    "StorageTransport",
    "Table",
    "Tables",
    "get_json",
    "millis",
    "pause_after_conflict",
    "put_json",
    "queue_client",
    "storage_errors",
    "table_service_client",
    "transaction_error_code",
]

log = logging.getLogger(__name__)

# Short timeouts: a function invocation must fail fast and answer, not hang on storage.
_CLIENT_OPTIONS = {"retry_total": 2}
_TRANSPORT_OPTIONS = {"connection_timeout": 5, "read_timeout": 10}
_CONNECTION_POOL_SIZE = 64  # as many as the poller's workers (requests keeps only 10 by default)

UPDATE_ATTEMPTS = 8
"""Conditional writes tried before an update gives up with ConcurrencyConflict: enough for a handful of
writers of one row (the worker, a webhook's burst, the sweep) on a slow machine; at most about 2.5 s of
pauses in all (pause_after_conflict)."""
BATCH_LIMIT = 100  # operations in one entity-group transaction
_PAGE = 1000  # entities in one query page (the service's maximum)
_MAX_STRING = 30_000  # characters per string property (Table Storage allows 64 KiB of UTF-16)

# What `UseDevelopmentStorage=true` means: Azurite's well-known account on its default ports.
_DEVELOPMENT_STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
)


class StorageTransport(RequestsTransport):
    """azure-core's requests transport with a connection pool as large as the poller's worker pool, and the
    environment read once instead of at every request (relay/http_environment.py: about a third of a table
    read's CPU in a Functions app).

    With the default pool of 10, concurrent workers open and drop a TCP connection per request."""

    def __init__(self, *, pool_size: int = _CONNECTION_POOL_SIZE, **kwargs):
        bundle = ca_bundle()
        super().__init__(**{**_TRANSPORT_OPTIONS, "use_env_settings": False,
                            **({"connection_verify": bundle} if bundle else {}), **kwargs})
        self._pool_size = pool_size
        self._proxies = OriginProxies()

    def send(self, request, **kwargs):
        if not kwargs.get("proxies"):  # none set on the client (its ProxyPolicy): the environment's
            kwargs["proxies"] = self._proxies(request.url)
        return super().send(request, **kwargs)

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
    options.setdefault("transport", StorageTransport())
    if storage.connection_string:
        return TableServiceClient.from_connection_string(_connection_string(storage), **options)
    return TableServiceClient(endpoint=storage.table_service_uri, credential=_storage_credential(storage), **options)


def queue_client(storage: StorageSettings, queue_name: str, **options) -> QueueClient:
    """A client for queue `queue_name` of the account of `storage`, its messages base64-encoded as the Functions
    host's queue trigger reads them (host.json extensions.queues.messageEncoding, "base64" by default).

    The SDK is imported here, not with the module: it takes about half a second to load (cryptography), which
    only a tick that fans out pays, never a webhook's cold start."""
    from azure.storage.queue import ExponentialRetry, QueueClient, TextBase64EncodePolicy

    # The storage SDK's own retry waits 15 s, then 45 s: a tick must fail fast and work on without the queue.
    options = {"retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=1),
               "message_encode_policy": TextBase64EncodePolicy(), **options}
    options.setdefault("transport", StorageTransport(pool_size=4))
    if storage.connection_string:
        return QueueClient.from_connection_string(_connection_string(storage), queue_name, **options)
    return QueueClient(storage.queue_service_uri, queue_name, credential=_storage_credential(storage), **options)


def _connection_string(storage: StorageSettings) -> str:
    if storage.connection_string.replace(" ", "").lower() == "usedevelopmentstorage=true":
        return _DEVELOPMENT_STORAGE
    return storage.connection_string


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


_Row = TypeVar("_Row", bound=Mapping[str, Any])

_KEYS_TABLE = "keys"
_KEY_SECRET_ROW = ("key-derivation", "hmac-sha256")


class Tables:
    """The relay's tables on one account, their names starting with `prefix`."""

    def __init__(self, service: TableServiceClient, *, prefix: str):
        self.service = service
        self.prefix = prefix
        self._clients: dict[str, TableClient] = {}
        self._key_secret: bytes | None = None
        self._key_secret_lock = threading.Lock()

    def key_for(self, purpose: str, *ids: str) -> str:
        """A table key for `ids` under `purpose`: 32 hex digits of an HMAC-SHA256 with the account's secret.

        Fixed length whatever the ids (a 2,000-character user id fits in any key), only characters
        keys allow, and no id readable in a key or a storage URL. Keyed, because phone numbers are
        too few to hide behind a plain hash: without the secret a key cannot be traced back to its
        number. Raises StoreError when the secret cannot be read (or, the first time, created)."""
        message = json.dumps([purpose, *ids], ensure_ascii=False).encode()
        return hmac.new(self._secret(), message, hashlib.sha256).hexdigest()[:32]

    def _secret(self) -> bytes:
        """The key-derivation secret: 256 random bits made once per account and prefix, read once per process.

        Stored in `{prefix}keys` (no setting to configure, and it works with identity-based access:
        no storage key involved). The first instances to need it race to insert it; every loser reads
        the winner's, so all instances derive the same keys. Losing the row would orphan every
        keyed row: nothing here or in the sweep ever deletes it."""
        if self._key_secret is None:
            with self._key_secret_lock:
                if self._key_secret is None:
                    self._key_secret = self._read_or_create_secret()
        return self._key_secret

    def _read_or_create_secret(self) -> bytes:
        table = self.table(_KEYS_TABLE)
        pk, rk = _KEY_SECRET_ROW
        entity = table.get(pk, rk)
        if entity is None:
            created = base64.b64encode(secrets.token_bytes(32)).decode()
            # Another instance may be first (ResourceExistsError): then its secret is the one read back.
            with storage_errors(f"create the key-derivation secret in {table.name}"), \
                    contextlib.suppress(ResourceExistsError):
                table.client.create_entity({"PartitionKey": pk, "RowKey": rk, "secret": created})
            entity = table.get(pk, rk)
            if entity is None:
                raise StoreError(f"cannot read the key-derivation secret in {table.name}: it vanished")
        return base64.b64decode(entity["secret"])

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

    def scan(self, query: str, parameters: dict[str, Any], *, select: Sequence[str]) -> list[TableEntity]:
        """Every entity matching the OData filter `query` (every entity when it is empty), with only the
        properties in `select`: one request per 1000 entities, for an operator's counts, never the relay's path."""
        with storage_errors(f"query {self.name}"):
            if query:
                pages = self.client.query_entities(query, parameters=parameters, select=list(select),
                                                   results_per_page=_PAGE)
            else:
                pages = self.client.list_entities(select=list(select), results_per_page=_PAGE)
            return list(pages)

    def delete_matching(self, query: str, parameters: dict[str, Any], *, budget: Budget) -> int:
        """Delete every entity matching `query`, each only if unchanged since read; how many went.

        Page after page while `budget` has time left: what is left over is found again by the next
        run's query, so a backlog of any size goes in the end."""
        return len(self.delete_pages(query, parameters, budget=budget))

    def delete_pages(self, query: str, parameters: dict[str, Any], *, budget: Budget,
                     keep: Callable[[TableEntity], bool] | None = None) -> list[TableEntity]:
        """delete_matching's work, sparing the entities `keep` says to: the entities that went (the caller may
        have rows of its own to remove)."""
        deleted: list[TableEntity] = []
        with storage_errors(f"query {self.name}"):
            pages = self.client.query_entities(query, parameters=parameters, results_per_page=_PAGE).by_page()
            # Until the service has no continuation: a page may come short, even empty, with more behind it
            # (a scan stops at 5 s or a partition-server boundary).
            while budget.left():
                page = next(pages, None)
                if page is None:
                    break
                deleted += self.delete_unchanged(e for e in page if keep is None or not keep(e))
        return deleted

    def delete_unchanged(self, entities: Iterable[TableEntity]) -> list[TableEntity]:
        """Delete `entities`, each under the ETag it was read with, up to 100 of a partition per transaction;
        those that went. One that changed or went meanwhile is left out and the rest of its batch tried again."""
        by_partition: dict[str, list[TableEntity]] = {}
        for entity in entities:
            by_partition.setdefault(entity["PartitionKey"], []).append(entity)
        deleted: list[TableEntity] = []
        for rows in by_partition.values():
            for start in range(0, len(rows), BATCH_LIMIT):
                batch = rows[start:start + BATCH_LIMIT]
                deleted += self.delete_batch(batch, etags=[row.metadata["etag"] for row in batch])
        return deleted

    def delete_batch(self, rows: Sequence[_Row], *, etags: Sequence[str | None]) -> list[_Row]:
        """Delete up to 100 `rows` of one partition in one transaction, each only if unchanged since its entry
        in `etags` (None: whatever it holds now). A row that changed or went meanwhile is left out and the
        rest tried again; the rows that went. StoreError for any other failure."""
        pending = list(zip(rows, etags, strict=True))
        while pending:
            operations = [("delete", row, {"etag": etag, "match_condition": MatchConditions.IfNotModified}
                           if etag else {}) for row, etag in pending]
            with storage_errors(f"delete rows of {self.name}"):
                try:
                    self.client.submit_transaction(operations)
                except TableTransactionError as error:
                    code = transaction_error_code(error)
                    if code not in ("UpdateConditionNotSatisfied", "ResourceNotFound") \
                            or not 0 <= (error.index or 0) < len(pending):
                        raise  # storage_errors translates it
                    del pending[error.index or 0]
                    continue
            return [row for row, _ in pending]
        return []

    def delete_quietly(self, pk: str, rk: str) -> None:
        """Best-effort clean-up of a row whose leftover is harmless: a failure is only logged."""
        try:
            self.client.delete_entity(pk, rk)
        except AzureError as error:
            log.warning("could not delete a %s row: %s", self.name, type(error).__name__)


def pause_after_conflict(clock: Clock, attempt: int) -> None:
    """A short random pause on `clock` so writers that collided do not collide again in lockstep."""
    clock.sleep(clock.uniform(0, min(1.0, 0.01 * 2**attempt)))


class Budget:
    """The time a long clean-up may take: `left()` while there is some; `ran_out` once it said there was none."""

    def __init__(self, seconds: float, *, clock: Clock):
        self._clock = clock
        self._until = clock.monotonic() + seconds
        self.ran_out = False

    def left(self) -> bool:
        if self._clock.monotonic() >= self._until:
            self.ran_out = True
        return not self.ran_out


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
