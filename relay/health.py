"""`GET /api/health`: is this instance able to do its job, and if not, which dependency is down."""

from __future__ import annotations

from dataclasses import dataclass

from relay import __version__
from relay.settings import Settings, SettingsError
from relay.store import table_service_client


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_table_storage(settings: Settings) -> Check:
    try:
        client = table_service_client(settings.storage, retry_total=0, connection_timeout=3, read_timeout=5)
        next(iter(client.list_tables(results_per_page=1).by_page()), None)
    except Exception as error:  # any failure means "not reachable"; the type names the cause
        return Check("table_storage", False, f"not reachable ({type(error).__name__})")
    return Check("table_storage", True, "reachable")


def check_directline(settings: Settings) -> Check:
    return Check("directline", True, f"endpoint {settings.directline.endpoint}")


def get_health(load_settings=Settings.from_environ) -> tuple[int, dict]:
    """(status, body): 200 when every check passes, else 503 naming the failing checks."""
    try:
        settings = load_settings()
    except SettingsError as error:
        checks = [Check("settings", False, str(error))]
    else:
        checks = [Check("settings", True, "valid"), check_directline(settings), check_table_storage(settings)]
    healthy = all(c.ok for c in checks)
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "version": __version__,
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    if not healthy:
        body["failing"] = [c.name for c in checks if not c.ok]
    return (200 if healthy else 503), body
