"""The function app's table of contents: each function hands its request or tick to `relay/`."""

import logging

import azure.functions as func

from relay.conversations import get_context
from relay.health import get_health
from relay.http import (
    answer_response,
    bearer_token,
    guarded,
    json_response,
    serve_webchat_file,
    token_server_call,
    webhook_request,
)
from relay.inbound import handle_webhook
from relay.poller import poll_tick, sweep, work_poll_message
from relay.telemetry import configure_from_settings

# The Azure SDK logs every storage request at INFO; keep the app's log about the relay.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
configure_from_settings()  # Application Insights when APPLICATIONINSIGHTS_CONNECTION_STRING is set; else nothing

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.function_name("health")
@app.route(route="health", methods=["GET"])
def health(req: func.HttpRequest) -> func.HttpResponse:
    status, body = get_health()
    return json_response(body, status)


@app.function_name("channel_webhook")
@app.route(route="channels/{channel}", methods=["GET", "POST"])
def channel_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """A provider's webhook (the signature is the auth); GET answers handshakes."""

    def handle() -> func.HttpResponse:
        ctx = get_context()
        request = webhook_request(req, ctx.settings.relay.public_base_url)
        return answer_response(handle_webhook(ctx, req.route_params["channel"], request))

    return guarded(handle)


@app.function_name("directline_token")
@app.route(route="directline/token", methods=["POST", "OPTIONS"])
def directline_token(req: func.HttpRequest) -> func.HttpResponse:
    """A Web Chat page's first token, with the resume key that proves the conversation is its own."""
    return token_server_call(req, lambda tokens, caller, body: tokens.issue_token(caller))


@app.function_name("directline_refresh")
@app.route(route="directline/refresh", methods=["POST", "OPTIONS"])
def directline_refresh(req: func.HttpRequest) -> func.HttpResponse:
    return token_server_call(req, lambda tokens, caller, body: tokens.refresh_token(bearer_token(req),
                                                                                    caller=caller))


@app.function_name("directline_resume")
@app.route(route="directline/resume", methods=["POST", "OPTIONS"])
def directline_resume(req: func.HttpRequest) -> func.HttpResponse:
    """A new token for the page's conversation after its token expired: {conversationId, resumeKey, watermark?}."""
    return token_server_call(req, lambda tokens, caller, body: tokens.resume(body, caller=caller))


@app.function_name("webchat_file")
@app.route(route="webchat/{name}", methods=["GET"])
def webchat_file(req: func.HttpRequest) -> func.HttpResponse:
    """relay-webchat.js; with WEBCHAT_DEMO_ENABLED also the demo page (`demo`) and Web Chat's bundle."""
    return serve_webchat_file(req.route_params["name"])


@app.function_name("poller")
@app.timer_trigger(schedule="%RELAY_POLL_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=False)
def poller(timer: func.TimerRequest) -> None:
    """The due conversations, worked here or handed to the poll queue (a missed tick needs no catching up, so
    no schedule monitor and its storage writes)."""
    poll_tick(get_context())


@app.function_name("poll_batch")
@app.queue_trigger(arg_name="batch", queue_name="%RELAY_POLL_QUEUE%", connection="AzureWebJobsStorage")
def poll_batch(batch: func.QueueMessage) -> None:
    """A batch of due conversations the poller handed out (relay/fanout.py); raising makes the host retry it."""
    work_poll_message(get_context(), batch.get_body())


@app.function_name("chase")
@app.queue_trigger(arg_name="chase", queue_name="%RELAY_POLL_QUEUE%-chase", connection="AzureWebJobsStorage")
def chase(chase: func.QueueMessage) -> None:
    """A webhook's chase of the bot's late replies to one user (relay/fanout.py)."""
    work_poll_message(get_context(), chase.get_body())


@app.function_name("sweeper")
@app.timer_trigger(schedule="0 17 * * * *", arg_name="timer", run_on_startup=False, use_monitor=True)
def sweeper(timer: func.TimerRequest) -> None:
    sweep(get_context())
