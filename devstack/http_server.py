"""The one HTTP server class every local stand-in listens with (host, Direct Line emulator, provider simulator).

It promises what Azure's front end gives a function app: a burst of clients is queued, not refused.
The standard library's servers listen with a backlog of 5, so a sixth connection arriving while the
accept loop is busy is dropped by the kernel (a timeout or reset for the client), and concurrency
tests through such a server measure the backlog instead of the code.

And it answers without Nagle's algorithm (TCP_NODELAY on every accepted connection): the standard
handler writes the headers and the body separately, and Nagle's wait for the client's delayed
acknowledgement added about 40 ms to every request (a Direct Line GET took 45 ms instead of 2),
which no real service adds; the emulator's deliberate latency is its `latency_ms` fault.
"""

from __future__ import annotations

import socket
from http.server import ThreadingHTTPServer

__all__ = ["LISTEN_BACKLOG", "LocalHTTPServer"]

LISTEN_BACKLOG = 128
"""Connections the kernel queues for a server before it accepts them (capped by net.core.somaxconn)."""


class LocalHTTPServer(ThreadingHTTPServer):
    """A thread per request, daemon threads (stopping never waits for a slow client), a backlog of LISTEN_BACKLOG."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def get_request(self):
        connection, address = super().get_request()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address
