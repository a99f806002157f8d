"""The function app's table of contents: each function hands its request or tick to `relay/`."""

import logging

import azure.functions as func

from relay.health import get_health
from relay.http import json_response

# The Azure SDK logs every storage request at INFO; keep the app's log about the relay.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.function_name("health")
@app.route(route="health", methods=["GET"])
def health(req: func.HttpRequest) -> func.HttpResponse:
    status, body = get_health()
    return json_response(body, status)
