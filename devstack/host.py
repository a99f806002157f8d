"""A local stand-in for the Azure Functions host, because Core Tools cannot be installed here.

    python -m devstack.host [--port 7071] [--script function_app.py]

It imports the script, indexes its functions once through `FunctionApp.get_functions()` (the
metadata the real Python worker reports to the host), and then:
- serves each HTTP function at /<routePrefix>/<route> (prefix from host.json), with route
  parameters `{name}`, `{name?}`, `{name:int}` (and the other documented constraints), the
  declared methods (none declared = all), 404 for an unknown route, 405 for a method not allowed,
  and 500 with a logged traceback for an unhandled exception, as the real host does;
- runs each timer function on its six-field NCRONTAB schedule with `%SETTING%` substitution,
  `runOnStartup` and `past_due`; a tick never overlaps the previous run of the same function
  (the real host holds a singleton lock per timer function);
- logs one line per invocation and stops cleanly on Ctrl-C (SIGINT) or SIGTERM.

Like Core Tools it loads `local.settings.json` `Values` into the environment before importing the
app; a variable already set in the environment wins. Auth levels are ignored, as Core Tools does.
"""

from __future__ import annotations

import argparse
import asyncio
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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
from azure.functions.timer import TimerRequest
from croniter import croniter

from devstack.http_server import LocalHTTPServer

log = logging.getLogger("devstack.host")

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


@dataclass
class HttpFunction:
    name: str
    trigger_arg: str
    route: str
    methods: frozenset[str] | None
    user_function: Any
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


def index_functions(app: func.FunctionApp) -> tuple[list[HttpFunction], list[TimerFunction]]:
    """Read the functions' metadata once (get_functions() cannot be called twice)."""
    http, timers = [], []
    for function in app.get_functions():
        metadata = json.loads(function.get_function_json())
        trigger = next(b for b in metadata["bindings"] if b["direction"] == "IN" and b["type"].endswith("Trigger"))
        name = function.get_function_name() or function.get_user_function().__name__
        if trigger["type"] == "httpTrigger":
            methods = trigger.get("methods")
            http.append(HttpFunction(
                name=name,
                trigger_arg=trigger["name"],
                route=trigger.get("route") or name,
                methods=frozenset(m.upper() for m in methods) if methods else None,
                user_function=function.get_user_function(),
            ))
        elif trigger["type"] == "timerTrigger":
            timers.append(TimerFunction(
                name=name,
                trigger_arg=trigger["name"],
                schedule=trigger["schedule"],
                run_on_startup=bool(trigger.get("runOnStartup")),
                user_function=function.get_user_function(),
            ))
        else:
            log.warning("function %s: trigger %s is not supported by the local host; skipped", name, trigger["type"])
    return http, timers


class _Context:
    """The subset of func.Context that a function may ask for by declaring a `context` parameter."""

    def __init__(self, function_name: str):
        self.invocation_id = str(uuid.uuid4())
        self.function_name = function_name
        self.function_directory = os.getcwd()
        self.trace_context = None
        self.retry_context = None


def invoke(user_function, function_name: str, arguments: dict[str, Any]):
    """Call a user function as the worker does: async functions on an event loop, `context` injected."""
    if "context" in inspect.signature(user_function).parameters:
        arguments = {**arguments, "context": _Context(function_name)}
    result = user_function(**arguments)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result


async def _await(awaitable):
    return await awaitable


class FunctionsHost:
    def __init__(self, app: func.FunctionApp, *, route_prefix: str = "api", environ=os.environ):
        self.http, self.timers = index_functions(app)
        self.route_prefix = route_prefix.strip("/")
        self.environ = environ
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: LocalHTTPServer | None = None

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
        try:
            response = invoke(function.user_function, function.name, {function.trigger_arg: request})
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

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def read_route_prefix(host_json: Path) -> str:
    if not host_json.exists():
        return "api"
    prefix = json.loads(host_json.read_text()).get("extensions", {}).get("http", {}).get("routePrefix")
    return "api" if prefix is None else prefix


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
    app = import_app(args.script)
    host_json = args.host_json or args.script.resolve().parent / "host.json"
    host = FunctionsHost(app, route_prefix=read_route_prefix(host_json))
    host.serve(args.host, args.port)
    for function in host.http:
        methods = ",".join(sorted(function.methods)) if function.methods else "all"
        prefix = f"/{host.route_prefix}" if host.route_prefix else ""
        log.info("%s: [%s] http://%s:%d%s/%s", function.name, methods, args.host, args.port, prefix, function.route)
    host.start_timers()
    for timer in host.timers:
        log.info("%s: timerTrigger %s", timer.name, timer.schedule)
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
