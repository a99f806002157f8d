"""A small function app that exercises the local host: routes, methods, errors, timers."""

import json
import os
import threading
import time
from pathlib import Path

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
TICKS = Path(os.environ["SAMPLE_TICKS_FILE"]) if "SAMPLE_TICKS_FILE" in os.environ else None
_running = threading.Lock()


@app.route(route="items/{id:int}/{name?}", methods=["GET", "POST"])
def items(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps({
            "method": req.method,
            "route": dict(req.route_params),
            "query": dict(req.params),
            "body": req.get_body().decode(),
            "header": req.headers.get("x-sample"),
        }),
        mimetype="application/json",
        headers={"X-Handled-By": "items"},
    )


@app.route(route="anything")
def anything(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(req.method, status_code=202)


@app.route(route="boom", methods=["GET"])
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("deliberate failure")


_rendezvous = threading.Barrier(4)


@app.route(route="rendezvous", methods=["GET"])
def rendezvous(req: func.HttpRequest) -> func.HttpResponse:
    """Answers only once four requests are inside the function together: proof they run concurrently."""
    try:
        _rendezvous.wait(timeout=float(req.params.get("timeout", "20")))
    except threading.BrokenBarrierError:
        return func.HttpResponse("alone", status_code=503)
    return func.HttpResponse("together")


@app.route(route="slow", methods=["GET"])
async def slow(req: func.HttpRequest) -> func.HttpResponse:
    import asyncio

    await asyncio.sleep(float(req.params.get("seconds", "0.5")))
    return func.HttpResponse("done")


@app.timer_trigger(schedule="%SAMPLE_SCHEDULE%", arg_name="timer", run_on_startup=False)
def tick(timer: func.TimerRequest) -> None:
    """Records each run's start and end; a run that overlaps another records 'overlap'."""
    if TICKS is None:
        return
    overlapped = not _running.acquire(blocking=False)
    started = time.time()
    time.sleep(float(os.environ.get("SAMPLE_TICK_SECONDS", "0")))
    with TICKS.open("a") as out:
        out.write(json.dumps({"start": started, "end": time.time(), "past_due": timer.past_due,
                              "overlap": overlapped}) + "\n")
    if not overlapped:
        _running.release()
