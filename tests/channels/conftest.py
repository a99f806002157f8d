"""One provider simulator for the channel tests, and a stand-in relay endpoint it sends webhooks to.

The stand-in is a real HTTP server on loopback that does what the relay's webhook function does with
an adapter (handshake, verify, parse, acknowledge) and remembers what it parsed, so a test can see
the simulator's signed webhooks go through our verification.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devstack.channels import DEV_VALUES
from devstack.procs import free_port
from relay.channels import ADAPTERS, public_url
from relay.channels.base import WebhookRequest
from relay.channels.common import new_session
from relay.errors import RelayError
from relay.http import error_answer


def make_adapter(name: str, values: dict[str, str] | None = None, **options):
    return ADAPTERS[name]({**DEV_VALUES, **(values or {})}, session=new_session(), **options)


@dataclass
class FakeRelay:
    url: str
    values: dict[str, str]
    received: list = field(default_factory=list)  # (provider, WebhookRequest, [InboundMessage])


@pytest.fixture(scope="session")
def fake_relay() -> Iterator[FakeRelay]:
    port = free_port()
    relay = FakeRelay(url=f"http://127.0.0.1:{port}", values=dict(DEV_VALUES))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def handle_one(self):
            provider = self.path.split("?")[0].rsplit("/", 1)[-1]
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = WebhookRequest(self.command, public_url(relay.url, self.path), dict(self.headers.items()), body)
            try:
                adapter = make_adapter(provider, relay.values)
                answer = adapter.handshake(request)
                if answer is None:
                    adapter.verify(request)
                    relay.received.append((provider, request, adapter.parse(request)))
                    answer = adapter.acknowledgement()
                status, data, content_type = answer.status, answer.body, answer.content_type
            except RelayError as error:
                status, code = error_answer(error)
                data, content_type = code.encode(), "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = handle_one

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield relay
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def simulator(start_simulator, fake_relay):
    return start_simulator(relay_url=fake_relay.url)


@pytest.fixture
def sim(simulator, fake_relay):
    """The shared simulator with nothing recorded and no failure pending."""
    simulator.clear()
    fake_relay.received.clear()
    return simulator
