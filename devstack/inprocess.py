"""A devstack server's core served to `requests` without a socket, as httpx's `MockTransport` serves a function.

Each server (the Direct Line emulator, the provider simulator) answers every request it reads with
one function, `respond(method, target, headers, body) -> Answer`. `InProcessTransport` mounts that
same function on a `requests.Session`, so a test runs the real routing, auth checks, injected faults
and counters in its own thread, in microseconds, with nothing listening:

    session.mount("http://directline.invalid/", InProcessTransport(functools.partial(respond, emulator)))

What belongs to a socket alone is translated as `requests` would see it over one: a `ConnectionDropped`
from `respond` (the injected dropped connection) becomes the `requests.ConnectionError` of a server that
closed without answering, an answer slower than the read timeout becomes `requests.ReadTimeout` (the
work was done, as a server finishes what it started), and every answer carries its Content-Length.
There is no connection to refuse: a URL the session has not mounted goes to the network as usual,
which is why in-process hosts end in `.invalid` (never resolvable).
"""

from __future__ import annotations

import http
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.client import RemoteDisconnected
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from urllib3 import HTTPResponse
from urllib3.exceptions import ProtocolError

__all__ = ["Answer", "ConnectionDropped", "Headers", "InProcessServer", "InProcessTransport", "Responder"]


class Headers(Protocol):
    """A request's headers, looked up case-insensitively (http.server's message and requests' dict both are)."""

    def get(self, name: str, /) -> Any: ...

    def items(self) -> Iterable[tuple[str, Any]]: ...


@dataclass(frozen=True)
class Answer:
    """One complete HTTP answer; the server adds only what belongs to the connection (Content-Length, Date)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class ConnectionDropped(Exception):
    """Raised by a `respond` function: close the connection without answering (an injected fault)."""


Responder = Callable[[str, str, Headers, bytes], Answer]
"""respond(method, target, headers, body): `target` is the path and query as on the request line."""


class InProcessTransport(BaseAdapter):
    """A `requests` transport adapter that hands each request to a `Responder` instead of a socket."""

    def __init__(self, respond: Responder):
        super().__init__()
        self._respond = respond

    def __repr__(self) -> str:
        return f"InProcessTransport({self._respond!r})"

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: float | tuple[float | None, float | None] | None = None, verify: bool | str = True,
             cert: Any = None, proxies: Any = None) -> requests.Response:
        """The responder's answer as a `requests.Response`; ConnectionError or ReadTimeout as described above."""
        parts = urlsplit(request.url or "")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        started = time.monotonic()
        try:
            answer = self._respond(request.method or "GET", target, request.headers, _body_bytes(request.body))
        except ConnectionDropped:
            closed = RemoteDisconnected("Remote end closed connection without response")
            raise requests.ConnectionError(ProtocolError("Connection aborted.", closed), request=request) from None
        read_timeout = timeout[1] if isinstance(timeout, tuple) else timeout
        if read_timeout is not None and time.monotonic() - started > read_timeout:
            raise requests.ReadTimeout(f"no answer within the read timeout ({read_timeout:g} s)", request=request)
        return self._response(request, answer, stream=stream)

    def close(self) -> None:
        """Nothing to close: there is no connection pool."""

    def _response(self, request: requests.PreparedRequest, answer: Answer, *, stream: bool) -> requests.Response:
        headers = {**answer.headers, "Content-Length": str(len(answer.body))}
        reason = _reason(answer.status)
        response = requests.Response()
        response.status_code = answer.status
        response.reason = reason
        response.headers = CaseInsensitiveDict(headers)
        response.raw = HTTPResponse(body=io.BytesIO(answer.body), headers=headers, status=answer.status,
                                    reason=reason, preload_content=False, decode_content=False)
        response.encoding = get_encoding_from_headers(response.headers)
        response.url = request.url or ""
        response.request = request
        # The stubs say HTTPAdapter; requests only needs an adapter's send() here (digest auth re-sends through it).
        response.connection = self  # type: ignore[assignment]
        if not stream:
            _ = response.content  # read now, as requests does for a response that is not streamed
        return response


class InProcessServer:
    """A server's core answering at `url` in this process: `transport` is what a `requests.Session` mounts,
    `http` a session with it mounted. The admin helpers of the emulator and the simulator call through `http`."""

    def __init__(self, url: str, responder: Responder):
        self.url = url.rstrip("/")
        self.transport = InProcessTransport(responder)
        self.http = requests.Session()
        self.http.mount(f"{self.url}/", self.transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, *, timeout: float, **options: Any) -> requests.Response:
        return self.http.request(method, url, timeout=timeout, **options)

    def close(self) -> None:
        self.http.close()


def _body_bytes(body: object) -> bytes:
    """The request body as the server would read it off the wire (a str goes out as ISO-8859-1, as http.client)."""
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("iso-8859-1")
    read = getattr(body, "read", None)
    if read is not None:
        return _body_bytes(read())
    if isinstance(body, Iterable):
        return b"".join(_body_bytes(chunk) for chunk in body)
    raise TypeError(f"cannot send a body of type {type(body).__name__}")


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
