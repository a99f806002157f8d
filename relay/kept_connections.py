"""GETs on http.client connections kept open between calls: the Direct Line client's cheap path for reads.

The poller peeks every due conversation with one GET, so the CPU of a GET is most of a tick's: through
`requests` a GET costs about three times the CPU it costs on http.client (session settings merged,
the request prepared, urllib3's pool and response wrapped, each time), and a thousand of them on 64
threads of one process spend most of the tick on that (docs/benchmarks.md, section 1). Here a GET is
written and read on a kept connection and nothing more.

What requests did for us and this keeps: keep-alive with a pool per origin (LIFO, at most `size`
idle connections), a connect timeout apart from the read timeout, TLS verified against the same CA
bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's, as requests reads them), and a
connection the server closed while idle never handed out again (checked before reuse, as urllib3
does; one closed while the GET was on its way fails the GET, as it did through requests, and the
caller's retry policy decides). What it leaves to the requests session (relay/directline.py sends
those there): proxies, redirects, bodies; and it asks for no compression.
"""

from __future__ import annotations

import http.client
import os
import select
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from urllib.parse import SplitResult

from relay.http_environment import ca_bundle

__all__ = ["ConnectFailed", "HttpAnswer", "KeptConnections"]


@dataclass(frozen=True)
class HttpAnswer:
    """A server's answer: its status line, headers (looked up case-insensitively) and whole body."""

    status: int
    reason: str
    headers: Mapping[str, str] | Message = field(repr=False)
    content: bytes = field(repr=False)


class ConnectFailed(OSError):
    """No connection could be made (refused, unresolved, timed out connecting): the request never left."""


class KeptConnections:
    """GETs to one origin (http or https) on connections kept open; thread-safe."""

    def __init__(self, origin: SplitResult, *, size: int, connect_timeout: float):
        self._host = origin.hostname or ""
        self._port = origin.port
        self._size = size
        self._connect_timeout = connect_timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._tls: ssl.SSLContext | None = _tls_context() if origin.scheme == "https" else None

    def get(self, target: str, headers: Mapping[str, str], *, read_timeout: float) -> HttpAnswer:
        """The answer to GET `target` (path and query). ConnectFailed when no connection could be made;
        OSError or http.client.HTTPException when it was lost or timed out after that."""
        return self._exchange(self._take() or self._connect(), target, headers, read_timeout)

    def close(self) -> None:
        """Close the idle connections now, and those in use when their GET is done."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _exchange(self, connection: http.client.HTTPConnection, target: str, headers: Mapping[str, str],
                  read_timeout: float) -> HttpAnswer:
        try:
            assert connection.sock is not None
            connection.sock.settimeout(read_timeout)
            connection.request("GET", target, headers=dict(headers))
            response = connection.getresponse()
            answer = HttpAnswer(response.status, response.reason, response.headers, response.read())
        except BaseException:
            connection.close()
            raise
        if response.will_close:
            connection.close()
        else:
            self._give_back(connection)
        return answer

    def _connect(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self._tls is not None:
            connection = http.client.HTTPSConnection(self._host, self._port, timeout=self._connect_timeout,
                                                     context=self._tls)
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)
        try:
            connection.connect()
        except OSError as error:
            connection.close()
            if isinstance(error, ssl.SSLError):
                raise  # connected, then refused the server's certificate: not a connect failure
            raise ConnectFailed(f"{type(error).__name__} connecting to {self._host}") from error
        return connection

    def _take(self) -> http.client.HTTPConnection | None:
        """An idle connection the server has not closed, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                connection = self._idle.pop()
            if connection.sock is not None and not _readable(connection.sock):
                return connection
            connection.close()  # at EOF (closed by the server) or with bytes nobody asked for

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._size:
                self._idle.append(connection)
                return
        connection.close()


def _readable(sock) -> bool:
    """True when an idle socket has something to read: the server closed it (EOF) or broke the protocol."""
    try:
        if hasattr(select, "poll"):  # any descriptor number; select() stops at 1024
            poll = select.poll()
            poll.register(sock, select.POLLIN)
            return bool(poll.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _tls_context() -> ssl.SSLContext:
    """Verifies certificates and host names against the CA bundle requests would use."""
    bundle = ca_bundle()
    if not bundle:
        from requests.certs import where

        bundle = where()
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)
