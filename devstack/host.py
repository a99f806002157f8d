"""A local stand-in for the Azure Functions host, because Core Tools cannot be installed here.

    python -m devstack.host [--port 7071] [--script function_app.py] [--host-json host.json]

It imports the script, indexes its functions once through `FunctionApp.get_functions()` (the
metadata the real Python worker reports to the host), and then:
- serves each HTTP function at /<routePrefix>/<route> (prefix from host.json), with route
  parameters `{name}`, `{name?}`, `{name:int}` (and the other documented constraints), the
  declared methods (none declared = all), 404 for an unknown route, 405 for a method not allowed,
  and 500 with a logged traceback for an unhandled exception, as the real host does;
- runs each timer function on its six-field NCRONTAB schedule with `%SETTING%` substitution,
  `runOnStartup` and `past_due`; a tick never overlaps the previous run of the same function
  (the real host holds a singleton lock per timer function);
- runs each queue function on its Azure Storage queue (Azurite locally) as the real host's
  Storage Queues extension 5.x does, with host.json `extensions.queues` (batchSize,
  newBatchThreshold, maxPollingInterval, visibilityTimeout, maxDequeueCount, messageEncoding),
  the poison queue and the polling back-off: devstack/queues.py says how, and where that is documented;
- writes what an HTTP function set on a queue output binding (`func.Out`: a string, bytes or a list
  of them, one message each) to its queue once the function returned, encoded per messageEncoding,
  creating the queue when missing; a failed write fails the invocation (500), as the host's does; a
  function whose output names an unset app setting is left out, as the host fails to index it;
- leaves out any function whose app setting `AzureWebJobs.<name>.Disabled` is "true" or "1" (an
  HTTP route then answers 404), as the real host does: several hosts can share one queue while
  only one runs the timers;
- logs one line per invocation and stops cleanly on Ctrl-C (SIGINT) or SIGTERM: no new fetch from
  a queue, and a few seconds for the invocations still running.

Like Core Tools it loads `local.settings.json` `Values` into the environment before importing the
app; a variable already set in the environment wins. Auth levels are ignored, as Core Tools does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import importlib.util
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueClient
from croniter import croniter

from devstack.http_server import LocalHTTPServer
from devstack.queues import (
    MessageEncoding,
    QueueFunction,
    QueueListener,
    QueuesOptions,
    poison_queue_name,
    queue_service,
    validate_queue_name,
)

log = logging.getLogger("devstack.host")

STOP_GRACE_SECONDS = 5.0
"""How long stopping waits for queue invocations still running (their messages reappear after the lease)."""

MAX_REQUEST_BODY_BYTES = 104_857_600
"""The Functions host's request body limit (100 MB, FUNCTIONS_REQUEST_BODY_SIZE_LIMIT's default): 413 above."""


class _Refused(Exception):
    """A request the host answers itself, before any function runs."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "float": r"-?\d+(?:\.\d+)?",
    "double": r"-?\d+(?:\.\d+)?",
    "decimal": r"-?\d+(?:\.\d+)?",
    "bool": r"(?i:true|false)",
    "guid": r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}",
    "alpha": r"[A-Za-z]+",
    "datetime": r"[^/]+",
}
_PARAMETER = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?(\?)?\}")


def load_local_settings(path: Path, environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """Copy `Values` from local.settings.json into the environment (the environment wins).

    Returns the names it set."""
    if not path.exists():
        return []
    values = json.loads(path.read_text()).get("Values", {})
    loaded = []
    for name, value in values.items():
        if name not in environ:
            environ[name] = str(value)
            loaded.append(name)
    return loaded


def expand_settings(text: str, environ=os.environ) -> str:
    """Replace %NAME% with the app setting NAME, as the host does in binding expressions."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            raise KeyError(f"binding expression %{name}% names an app setting that is not set")
        return environ[name]

    return re.sub(r"%([A-Za-z0-9_.:-]+)%", replace, text)


def route_pattern(route: str) -> re.Pattern:
    """Compile an Azure Functions route template into a regex with named groups."""
    pattern, position = "", 0
    for match in _PARAMETER.finditer(route):
        literal = route[position:match.start()]
        catch_all, name, constraint, optional = match.groups()
        if constraint and constraint not in _CONSTRAINTS:
            raise ValueError(f"route {route!r}: unknown constraint {constraint!r}")
        body = ".+" if catch_all else _CONSTRAINTS.get(constraint, r"[^/]+")
        if optional or catch_all:
            # An optional trailing segment takes its leading slash with it.
            if literal.endswith("/"):
                pattern += re.escape(literal[:-1]) + f"(?:/(?P<{name}>{body}))?"
            else:
                pattern += re.escape(literal) + f"(?P<{name}>{body})?"
        else:
            pattern += re.escape(literal) + f"(?P<{name}>{body})"
        position = match.end()
    pattern += re.escape(route[position:])
    return re.compile(pattern + r"/?", re.IGNORECASE)


@dataclass(frozen=True)
class QueueOutput:
    """A queue output binding: what the function sets on its `arg` the host writes to `queue_name` afterwards."""

    arg: str
    queue_name: str
    connection: str


class Out:
    """What the Python worker passes for an output binding (azure.functions.Out): the function `set`s a value."""

    def __init__(self) -> None:
        self._value: Any = None

    def set(self, value: Any) -> None:
        self._value = value

    def get(self) -> Any:
        return self._value


@dataclass
class HttpFunction:
    name: str
    trigger_arg: str
    route: str
    methods: frozenset[str] | None
    user_function: Any
    outputs: tuple[QueueOutput, ...] = ()
    pattern: re.Pattern = field(init=False)

    def __post_init__(self):
        self.pattern = route_pattern(self.route.strip("/"))


@dataclass
class TimerFunction:
    name: str
    trigger_arg: str
    schedule: str
    run_on_startup: bool
    user_function: Any


def import_app(script: Path) -> func.FunctionApp:
    """Import the script as the worker does and return its one FunctionApp."""
    sys.path.insert(0, str(script.parent.resolve()))
    spec = importlib.util.spec_from_file_location(script.stem, script)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{script} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[script.stem] = module
    spec.loader.exec_module(module)
    apps = [value for value in vars(module).values() if isinstance(value, func.FunctionApp)]
    if len(apps) != 1:
        raise RuntimeError(f"{script} must define exactly one FunctionApp, found {len(apps)}")
    return apps[0]


def is_disabled(function_name: str, environ: Mapping[str, str] | os._Environ = os.environ) -> bool:
    """`AzureWebJobs.<name>.Disabled` is "true" or "1" (setting names are case-insensitive to the host)."""
    wanted = f"AzureWebJobs.{function_name}.Disabled".lower()
    return any(key.lower() == wanted and value.strip().lower() in ("true", "1") for key, value in environ.items())


@dataclass
class FunctionIndex:
    http: list[HttpFunction] = field(default_factory=list)
    timers: list[TimerFunction] = field(default_factory=list)
    queues: list[QueueFunction] = field(default_factory=list)


def index_functions(app: func.FunctionApp, environ: Mapping[str, str] | os._Environ = os.environ) -> FunctionIndex:
    """Read the functions' metadata once (get_functions() cannot be called twice), leaving out disabled ones."""
    index = FunctionIndex()
    for function in app.get_functions():
        metadata = json.loads(function.get_function_json())
        trigger = next(b for b in metadata["bindings"] if b["direction"] == "IN" and b["type"].endswith("Trigger"))
        name = function.get_function_name() or function.get_user_function().__name__
        if is_disabled(name, environ):
            log.info("Function 'Functions.%s' is disabled (AzureWebJobs.%s.Disabled)", name, name)
        elif trigger["type"] == "httpTrigger":
            methods = trigger.get("methods")
            index.http.append(HttpFunction(
                name=name,
                trigger_arg=trigger["name"],
                route=trigger.get("route") or name,
                methods=frozenset(m.upper() for m in methods) if methods else None,
                user_function=function.get_user_function(),
                outputs=tuple(QueueOutput(b["name"], b["queueName"], b.get("connection") or "")
                              for b in metadata["bindings"] if b["direction"] == "OUT" and b["type"] == "queue"),
            ))
        elif trigger["type"] == "timerTrigger":
            index.timers.append(TimerFunction(
                name=name,
                trigger_arg=trigger["name"],
                schedule=trigger["schedule"],
                run_on_startup=bool(trigger.get("runOnStartup")),
                user_function=function.get_user_function(),
            ))
        elif trigger["type"] == "queueTrigger":
            index.queues.append(QueueFunction(
                name=name,
                trigger_arg=trigger["name"],
                queue_name=trigger["queueName"],
                connection=trigger.get("connection") or "",
                user_function=function.get_user_function(),
            ))
        else:
            log.warning("function %s: trigger %s is not supported by the local host; skipped", name, trigger["type"])
    return index


class _Context:
    """The subset of func.Context that a function may ask for by declaring a `context` parameter."""

    def __init__(self, function_name: str, invocation_id: str):
        self.invocation_id = invocation_id
        self.function_name = function_name
        self.function_directory = os.getcwd()
        self.trace_context = None
        self.retry_context = None


def invoke(user_function, function_name: str, arguments: dict[str, Any], *, invocation_id: str | None = None):
    """Call a user function as the worker does: async functions on an event loop, `context` injected."""
    if "context" in inspect.signature(user_function).parameters:
        arguments = {**arguments, "context": _Context(function_name, invocation_id or str(uuid.uuid4()))}
    result = user_function(**arguments)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result


async def _await(awaitable):
    return await awaitable


def _queue_caller(function: QueueFunction) -> Callable[[func.QueueMessage, str], object]:
    def call(message: func.QueueMessage, invocation_id: str) -> object:
        return invoke(function.user_function, function.name, {function.trigger_arg: message},
                      invocation_id=invocation_id)

    return call


class FunctionsHost:
    def __init__(self, app: func.FunctionApp, *, route_prefix: str = "api",
                 queues_options: QueuesOptions | None = None, environ=os.environ):
        index = index_functions(app, environ)
        self.route_prefix = route_prefix.strip("/")
        self.queues_options = queues_options or QueuesOptions.from_host_json({}, environ)
        self.environ = environ
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listeners: list[tuple[QueueListener, threading.Thread]] = []
        self._output_queues: dict[tuple[str, str], QueueClient] = {}
        self._lock = threading.Lock()
        self._server: LocalHTTPServer | None = None
        self.http = [function for function in index.http if self._outputs_resolve(function)]
        self.timers, self.queues = index.timers, index.queues

    # HTTP -----------------------------------------------------------------------------------------
    def match(self, method: str, path: str) -> tuple[int, HttpFunction | None, dict[str, str]]:
        prefix = f"/{self.route_prefix}" if self.route_prefix else ""
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return 404, None, {}
        relative = path[len(prefix):].strip("/")
        allowed_elsewhere = False
        for function in self.http:
            found = function.pattern.fullmatch(relative)
            if not found:
                continue
            if function.methods is not None and method not in function.methods:
                allowed_elsewhere = True
                continue
            params = {k: v for k, v in found.groupdict().items() if v is not None}
            return 200, function, params
        return (405 if allowed_elsewhere else 404), None, {}

    def handle_http(self, method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        parts = urlsplit(url)
        status, function, route_params = self.match(method, parts.path)
        if function is None:
            return status, {"Content-Type": "application/json"}, json.dumps(
                {"error": {"code": "NotFound" if status == 404 else "MethodNotAllowed",
                           "message": f"{method} {parts.path}: " + ("no function has this route" if status == 404
                                                                    else "method not allowed")}}).encode()
        request = func.HttpRequest(
            method=method, url=url, headers=headers,
            params=dict(parse_qsl(parts.query, keep_blank_values=True)),
            route_params=route_params, body=body,
        )
        started = time.perf_counter()
        outputs = {output.arg: Out() for output in function.outputs}
        try:
            response = invoke(function.user_function, function.name, {function.trigger_arg: request, **outputs})
            self._write_outputs(function, outputs)
        except Exception:
            log.error("Executed 'Functions.%s' (Failed, Duration=%dms)\n%s", function.name,
                      (time.perf_counter() - started) * 1000, traceback.format_exc())
            return 500, {}, b""
        if isinstance(response, str):
            response = func.HttpResponse(response)
        elif response is None:
            response = func.HttpResponse(status_code=204)
        log.info("Executed 'Functions.%s' (Succeeded, Status=%d, Duration=%dms)", function.name,
                 response.status_code, (time.perf_counter() - started) * 1000)
        out_headers = dict(response.headers)
        if response.mimetype and not any(k.lower() == "content-type" for k in out_headers):
            charset = f"; charset={response.charset}" if response.charset else ""
            out_headers["Content-Type"] = f"{response.mimetype}{charset}"
        return response.status_code, out_headers, response.get_body() or b""

    def _write_outputs(self, function: HttpFunction, outputs: dict[str, Out]) -> None:
        """Write what the function set on its queue outputs, as the host does once it returned (the queue is
        created when missing; each item of a list is a message, encoded per messageEncoding). A failure fails
        the invocation."""
        for output in function.outputs:
            value = outputs[output.arg].get()
            if value is None:
                continue
            items = [value] if isinstance(value, str | bytes) else list(value)
            queue = self._output_queue(output)
            for item in items:
                data = item if isinstance(item, bytes) else str(item).encode("utf-8")
                text = (base64.b64encode(data).decode("ascii")
                        if self.queues_options.message_encoding is MessageEncoding.BASE64 else data.decode("utf-8"))
                try:
                    queue.send_message(text)
                except ResourceNotFoundError:
                    with contextlib.suppress(ResourceExistsError):
                        queue.create_queue()
                    queue.send_message(text)

    def _outputs_resolve(self, function: HttpFunction) -> bool:
        """Whether every queue output's name and connection resolve. The real host fails to index a function whose
        binding names an app setting that is not set ("Error indexing method", "does not resolve to a value") and
        runs the others: such a function is left out here too (its route answers 404), never run and failed after
        its work was done."""
        try:
            for output in function.outputs:
                self._output_queue(output)
        except (KeyError, ValueError) as error:
            log.error("function %s is in error and not loaded: %s", function.name, error.args[0])
            return False
        return True

    def _output_queue(self, output: QueueOutput) -> QueueClient:
        key = (output.connection, output.queue_name)
        with self._lock:
            if key not in self._output_queues:
                name = validate_queue_name(expand_settings(output.queue_name, self.environ))
                self._output_queues[key] = queue_service(output.connection, self.environ).get_queue_client(name)
            return self._output_queues[key]

    def serve(self, host: str, port: int) -> LocalHTTPServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                try:
                    body = self._body()
                except _Refused as refusal:
                    status, headers, payload = refusal.status, {"Content-Type": "text/plain"}, refusal.reason.encode()
                    self.close_connection = True
                else:
                    url = f"http://{self.headers.get('Host') or f'{host}:{port}'}{self.path}"
                    status, headers, payload = owner.handle_http(self.command, url, dict(self.headers.items()), body)
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _body(self) -> bytes:
                """The request body, as the Functions host reads it: by Content-Length or chunked, at most
                MAX_REQUEST_BODY_BYTES (413), a malformed length 400."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks: list[bytes] = []
                    size = 0
                    while True:
                        line = self.rfile.readline(1024).split(b";")[0].strip()
                        try:
                            length = int(line, 16)
                        except ValueError:
                            raise _Refused(400, "malformed chunk size") from None
                        if length == 0:
                            self.rfile.readline(1024)
                            return b"".join(chunks)
                        size += length
                        if size > MAX_REQUEST_BODY_BYTES:
                            raise _Refused(413, "request body too large")
                        chunks.append(self.rfile.read(length))
                        self.rfile.readline(1024)
                declared = (self.headers.get("Content-Length") or "0").strip()
                if not declared.isdigit():
                    raise _Refused(400, "malformed Content-Length")
                if int(declared) > MAX_REQUEST_BODY_BYTES:
                    raise _Refused(413, "request body too large")
                return self.rfile.read(int(declared)) if int(declared) else b""

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _any

            def log_message(self, fmt, *args):
                log.debug("%s %s", self.address_string(), fmt % args)

        self._server = LocalHTTPServer((host, port), Handler)
        thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self._server

    # Timers ---------------------------------------------------------------------------------------
    def start_timers(self) -> None:
        for timer in self.timers:
            thread = threading.Thread(target=self._run_timer, args=(timer,), name=f"timer:{timer.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _fire(self, timer: TimerFunction, past_due: bool) -> None:
        started = time.perf_counter()
        try:
            invoke(timer.user_function, timer.name, {timer.trigger_arg: TimerRequest(past_due=past_due)})
            log.info("Executed 'Functions.%s' (Succeeded, PastDue=%s, Duration=%dms)", timer.name, past_due,
                     (time.perf_counter() - started) * 1000)
        except Exception:
            log.error("Executed 'Functions.%s' (Failed, Duration=%dms)\n%s", timer.name,
                      (time.perf_counter() - started) * 1000, traceback.format_exc())

    def _run_timer(self, timer: TimerFunction) -> None:
        try:
            schedule = expand_settings(timer.schedule, self.environ)
        except KeyError as error:
            log.error("function %s is not scheduled: %s", timer.name, error.args[0])
            return
        if not croniter.is_valid(schedule, second_at_beginning=True) or len(schedule.split()) != 6:
            log.error("function %s: schedule %r is not a six-field NCRONTAB expression", timer.name, schedule)
            return
        log.info("function %s: schedule %s", timer.name, schedule)
        if timer.run_on_startup:
            self._fire(timer, past_due=False)
        cron = croniter(schedule, dt.datetime.now(dt.UTC), second_at_beginning=True)
        due, missed = cron.get_next(dt.datetime), False
        # One thread per timer: a run always finishes before the next starts (no overlap).
        while not self._stop.is_set():
            wait = (due - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0 and self._stop.wait(wait):
                return
            lateness = (dt.datetime.now(dt.UTC) - due).total_seconds()
            self._fire(timer, past_due=missed or lateness > 1.0)
            now = dt.datetime.now(dt.UTC)
            due, missed = cron.get_next(dt.datetime), False
            if due <= now:
                # Ticks fell due while the function ran: fire once, past due, then resume the schedule.
                due, missed = now, True
                cron = croniter(schedule, now, second_at_beginning=True)

    # Queues ---------------------------------------------------------------------------------------
    def start_queues(self) -> None:
        """Start a listener per queue function; one whose queue or connection is not resolved is logged, skipped."""
        for function in self.queues:
            try:
                queue_name = validate_queue_name(expand_settings(function.queue_name, self.environ))
                service = queue_service(function.connection, self.environ)
            except (KeyError, ValueError) as error:
                log.error("function %s is not listening: %s", function.name, error.args[0])
                continue
            poison_name = poison_queue_name(queue_name)
            listener = QueueListener(
                function,
                queue=service.get_queue_client(queue_name),
                poison_queue=service.get_queue_client(poison_name) if poison_name else None,
                options=self.queues_options,
                call=_queue_caller(function),
            )
            thread = threading.Thread(target=listener.run, name=f"queue:{function.name}", daemon=True)
            thread.start()
            self._listeners.append((listener, thread))
            log.info("%s: queueTrigger %s", function.name, queue_name)

    def stop(self, *, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop serving and fetching; wait up to `grace` seconds for queue invocations still running."""
        self._stop.set()
        for listener, _ in self._listeners:
            listener.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        deadline = time.monotonic() + grace
        for listener, thread in self._listeners:
            thread.join(max(0.0, deadline - time.monotonic()))  # a fetch under way releases what it got
            still_running = listener.drain(max(0.0, deadline - time.monotonic()))
            if still_running:
                log.warning("function %s: %d invocations still running at stop; their messages reappear after "
                            "the lease", listener.function.name, still_running)


def read_extensions(host_json: Path) -> dict[str, Any]:
    """host.json's `extensions` section; empty when there is no host.json."""
    if not host_json.exists():
        return {}
    return json.loads(host_json.read_text()).get("extensions", {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("FUNCTIONS_HTTPWORKER_PORT", 7071)))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--script", type=Path, default=Path("function_app.py"),
                        help="the app's script (PYTHON_SCRIPT_FILE_NAME); default function_app.py")
    parser.add_argument("--settings", type=Path, default=Path("local.settings.json"))
    parser.add_argument("--host-json", type=Path, default=None, help="default: host.json beside the script")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("DEVSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)

    loaded = load_local_settings(args.settings)
    if loaded:
        log.info("loaded %d settings from %s", len(loaded), args.settings)
    # Every fetch from an empty queue would be a line at INFO, as function_app.py says of the table requests.
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
    extensions = read_extensions(args.host_json or args.script.resolve().parent / "host.json")
    try:
        queues_options = QueuesOptions.from_host_json(extensions.get("queues", {}))
    except ValueError as error:
        log.error("%s", error)
        return 2
    route_prefix = extensions.get("http", {}).get("routePrefix")
    app = import_app(args.script)
    host = FunctionsHost(app, route_prefix="api" if route_prefix is None else route_prefix,
                         queues_options=queues_options)
    host.serve(args.host, args.port)
    for function in host.http:
        methods = ",".join(sorted(function.methods)) if function.methods else "all"
        prefix = f"/{host.route_prefix}" if host.route_prefix else ""
        log.info("%s: [%s] http://%s:%d%s/%s", function.name, methods, args.host, args.port, prefix, function.route)
    host.start_timers()
    for timer in host.timers:
        log.info("%s: timerTrigger %s", timer.name, timer.schedule)
    host.start_queues()
    log.info("host listening on http://%s:%d", args.host, args.port)
    sys.stdout.flush()

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    log.info("stopping")
    host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
