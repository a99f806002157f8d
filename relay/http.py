"""Translation between azure.functions HTTP objects and the relay's plain results."""

from __future__ import annotations

import json

import azure.functions as func


def json_response(body: dict | list, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
        mimetype="application/json",
    )


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> func.HttpResponse:
    """The one error shape every function answers with: {"error": {"code", "message"}}."""
    return json_response({"error": {"code": code, "message": message}}, status, headers)
