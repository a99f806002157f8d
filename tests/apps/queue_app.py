"""A small function app for the local host's queue trigger and disabled functions.

`work` and `other` listen on the queues QUEUE_APP_QUEUE and QUEUE_APP_OTHER_QUEUE and record each
delivery as a JSON line in QUEUE_APP_RECORDS; a body starting with "fail" raises after recording,
"sleep:<seconds>[:anything]" sleeps first. `beat` and `beat_too` run on QUEUE_APP_BEAT and record their ticks.
"""

import json
import os
import threading
import time
from pathlib import Path

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
RECORDS = Path(os.environ["QUEUE_APP_RECORDS"])
_writing = threading.Lock()


def _record(**fields) -> None:
    with _writing, RECORDS.open("a") as out:
        out.write(json.dumps({"host": os.environ.get("QUEUE_APP_LABEL", ""), **fields}) + "\n")


def _deliver(function: str, message: func.QueueMessage) -> None:
    started = time.time()
    body = message.get_body()
    text = body.decode("utf-8", "replace")
    if text.startswith("sleep:"):
        time.sleep(float(text.split(":")[1]))
    _record(function=function, id=message.id, body=body.hex(), dequeue_count=message.dequeue_count,
            inserted=message.insertion_time is not None, expires=message.expiration_time is not None,
            pop_receipt=bool(message.pop_receipt), start=started, end=time.time())
    if text.startswith("fail"):
        raise RuntimeError("deliberate failure")


@app.queue_trigger(arg_name="message", queue_name="%QUEUE_APP_QUEUE%", connection="AzureWebJobsStorage")
def work(message: func.QueueMessage) -> None:
    _deliver("work", message)


@app.queue_trigger(arg_name="message", queue_name="%QUEUE_APP_OTHER_QUEUE%", connection="AzureWebJobsStorage")
def other(message: func.QueueMessage) -> None:
    _deliver("other", message)


@app.timer_trigger(schedule="%QUEUE_APP_BEAT%", arg_name="timer")
def beat(timer: func.TimerRequest) -> None:
    _record(function="beat", start=time.time())


@app.timer_trigger(schedule="%QUEUE_APP_BEAT%", arg_name="timer")
def beat_too(timer: func.TimerRequest) -> None:
    _record(function="beat_too", start=time.time())


@app.route(route="ping", methods=["GET"])
def ping(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("pong")


@app.route(route="pong", methods=["GET"])
def pong(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("ping")


@app.route(route="enqueue", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%QUEUE_APP_QUEUE%", connection="AzureWebJobsStorage")
def enqueue(req: func.HttpRequest, out: func.Out[list[str]]) -> func.HttpResponse:
    """Each line of the body becomes a message of QUEUE_APP_QUEUE (none for an empty body)."""
    lines = req.get_body().decode().splitlines()
    if lines:
        out.set(lines)
    return func.HttpResponse(f"{len(lines)} queued", status_code=202)
