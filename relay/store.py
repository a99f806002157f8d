"""Table Storage: the relay's only state between invocations.

The connection comes from the `AzureWebJobsStorage` settings, read the way the Functions host
reads them: a connection string (Azurite locally), or identity-based access in Azure
(`__tableServiceUri` or `__accountName`, `__credential=managedidentity`, `__clientId`).
"""

from __future__ import annotations

from azure.data.tables import TableServiceClient

from relay.settings import StorageSettings

# Short timeouts: a function invocation must fail fast and answer, not hang on storage.
CLIENT_OPTIONS = {"connection_timeout": 5, "read_timeout": 10, "retry_total": 2}


def storage_credential(storage: StorageSettings):
    """The token credential for identity-based storage (imported lazily: azure-identity is slow to load)."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if storage.credential == "managedidentity":
        return ManagedIdentityCredential(client_id=storage.client_id or None)
    return DefaultAzureCredential(managed_identity_client_id=storage.client_id or None)


# What `UseDevelopmentStorage=true` means: Azurite's well-known account on its default ports.
DEVELOPMENT_STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)


def table_service_client(storage: StorageSettings, **options) -> TableServiceClient:
    options = {**CLIENT_OPTIONS, **options}
    if storage.connection_string:
        connection_string = storage.connection_string
        if connection_string.replace(" ", "").lower() == "usedevelopmentstorage=true":
            connection_string = DEVELOPMENT_STORAGE
        return TableServiceClient.from_connection_string(connection_string, **options)
    return TableServiceClient(endpoint=storage.table_service_uri, credential=storage_credential(storage), **options)
