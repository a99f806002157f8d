"""`GET /api/health`: is this instance able to do its job, and if not, which dependency is down.

Table Storage and valid settings are critical: without them no webhook can be accepted, so the
answer is 503 (and the platform may replace the instance). Direct Line is not: while it is down,
webhooks are still accepted into the outbox and flow when it returns, so the answer stays 200
with status "degraded" and names it; a 503 there would have the platform evict healthy instances
that are keeping messages safe. The Direct Line check is a bare HTTP request with a short timeout:
no secret is sent and no bot is called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from relay import __version__
from relay.errors import SettingsError
from relay.settings import Settings
from relay.store.tables import table_service_client

__all__ = ["get_health"]


@dataclass(frozen=True)
class _Check:
    name: str
    ok: bool
    detail: str
    critical: bool = True  # failing makes the instance unhealthy (503); else it is only degraded


def _check_table_storage(settings: Settings) -> _Check:
    try:
        client = table_service_client(settings.storage, retry_total=0, connection_timeout=3, read_timeout=5)
        next(iter(client.list_tables(results_per_page=1).by_page()), None)
    except Exception as error:  # any failure means "not reachable"; the type names the cause
        return _Check("table_storage", False, f"not reachable ({type(error).__name__})")
    return _Check("table_storage", True, "reachable")


def _check_directline(settings: Settings) -> _Check:
    """Reachable when Direct Line answers HTTP at all (any status): connection and name resolution work. When
    its base is to be discovered (token endpoint mode), the agent's environment host is tried instead."""
    endpoint = settings.directline.endpoint or settings.directline.token_endpoint.partition("?")[0]
    try:
        requests.get(endpoint.rstrip("/") + "/", timeout=(2, 3), allow_redirects=False).close()
    except requests.RequestException as error:
        return _Check("directline", False, f"not reachable at {endpoint} ({type(error).__name__}); messages wait "
                      "in the outbox", critical=False)
    return _Check("directline", True, f"reachable at {endpoint}", critical=False)


def get_health(load_settings: Callable[[], Settings] = Settings.from_environ) -> tuple[int, dict[str, Any]]:
    """(status, body): 503 naming the failing checks when a critical one fails; else 200, "degraded"
    naming the non-critical ones that fail."""
    try:
        settings = load_settings()
    except SettingsError as error:
        checks = [_Check("settings", False, str(error))]
    else:
        checks = [_Check("settings", True, "valid"), _check_directline(settings), _check_table_storage(settings)]
    failing = [c.name for c in checks if not c.ok and c.critical]
    degraded = [c.name for c in checks if not c.ok and not c.critical]
    body: dict[str, Any] = {
        "status": "unhealthy" if failing else "degraded" if degraded else "healthy",
        "version": __version__,
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    if failing:
        body["failing"] = failing
    if degraded:
        body["degraded"] = degraded
    return (503 if failing else 200), body
