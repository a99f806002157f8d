"""The Direct Line client's GETs on kept connections (relay/kept_connections.py), against real local servers:
connections reused, one the server closed never reused, failures as TransientError, TLS verified."""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack.procs import free_port, wait_until
from relay.clock import ManualClock
from relay.directline import ActivitySet, DirectLineClient, RetryPolicy
from relay.errors import TransientError
from relay.settings import DirectLineSettings

PAGE = b'{"activities": [], "watermark": "7"}'


class _Counting(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; counts the connections it was given and the requests on them, and records what
    each request asked."""

    protocol_version = "HTTP/1.1"
    connections: list[int]  # requests answered, one entry per connection
    closed: list[int]  # connections closed by the server
    asked: list[tuple[str, str | None, str | None]]  # path, Authorization, User-Agent of each request
    close_after_answer = False  # close the connection after answering, without saying so (an idle timeout)
    drop = False  # close the connection instead of answering
    stall = 0.0  # seconds to wait before answering

    def setup(self):
        super().setup()
        self.connections.append(0)
        self.number = len(self.connections) - 1

    def finish(self):
        super().finish()
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_RDWR)  # closed now, not after this handler returns
        self.closed.append(self.number)

    def do_GET(self):
        self.asked.append((self.path, self.headers.get("Authorization"), self.headers.get("User-Agent")))
        if self.drop:
            self.close_connection = True
            return
        if self.stall:
            threading.Event().wait(self.stall)
        self.connections[self.number] += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)
        self.close_connection = self.close_after_answer

    def log_message(self, *args):
        pass


@dataclass
class Served:
    endpoint: str  # the Direct Line base URL it answers on
    connections: list[int]  # requests answered, one entry per connection
    closed: list[int]  # connections closed by the server
    asked: list[tuple[str, str | None, str | None]]  # path, Authorization, User-Agent of each request


@contextmanager
def serving(tls: ssl.SSLContext | None = None, handler: type[_Counting] = _Counting,
            **behaviour) -> Iterator[Served]:
    """A local server answering every GET with PAGE."""
    served = Served("", [], [], [])
    handler = type("Handler", (handler,), {"connections": served.connections, "closed": served.closed,
                                           "asked": served.asked, **behaviour})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    served.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}/v3/directline"
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


def closed_all(served: Served, count: int) -> bool:
    return len(served.closed) == count


def client_for(endpoint: str, *, timeout: float = 10) -> DirectLineClient:
    settings = DirectLineSettings(secret="s", endpoint=endpoint, timeout_seconds=timeout, bot_ids=())
    return DirectLineClient(settings, retry=RetryPolicy(attempts=1), clock=ManualClock())


def test_reads_share_one_kept_connection():
    with serving() as served:
        client = client_for(served.endpoint)
        for n in range(5):
            assert client.get_activities(f"c{n}", watermark="3") == ActivitySet((), "7")
        client.close()
    assert served.connections == [5]


def test_a_connection_the_server_closed_while_idle_is_not_used_again():
    """Direct Line's front end closes idle connections; the next read must not fail on one of them."""
    with serving(close_after_answer=True) as served:
        client = client_for(served.endpoint)  # one attempt: a read on a dead connection would raise
        for n in range(3):
            assert client.get_activities(f"c{n}").watermark == "7"
            wait_until(functools.partial(closed_all, served, n + 1), timeout=5, what="the server's close")
        client.close()
    assert served.connections == [1, 1, 1]


def test_a_dropped_read_is_a_transient_error_that_is_not_ambiguous():
    with serving(drop=True) as served, pytest.raises(TransientError, match="lost its connection") as raised:
        client_for(served.endpoint).get_activities("c1")
    assert not raised.value.ambiguous and raised.value.upstream_status is None


def test_a_read_that_outlasts_the_timeout_is_a_transient_error():
    with serving(stall=2.0) as served, pytest.raises(TransientError, match="timed out"):
        client_for(served.endpoint, timeout=0.2).get_activities("c1")


def test_nobody_listening_is_a_transient_error_saying_no_connection_was_made():
    with pytest.raises(TransientError, match="could not connect"):
        client_for(f"http://127.0.0.1:{free_port()}/v3/directline").get_activities("c1")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """(certificate, key) files of a self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_https_reads_verify_the_certificate_against_the_ca_bundle_requests_would_use(certificate, monkeypatch):
    cert, key = certificate
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with serving(tls=tls) as served:
        with pytest.raises(TransientError):  # certifi's bundle does not know this certificate
            client_for(served.endpoint).get_activities("c1")
        assert sum(served.connections) == 0  # nothing was asked of a server that could not prove who it is

        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        client = client_for(served.endpoint)
        assert client.get_activities("c1").watermark == "7"
        assert client.get_activities("c2").watermark == "7"
        client.close()
    assert served.connections[-1] == 2  # kept over TLS too


def test_a_clone_with_another_timeout_reads_on_the_same_connections():
    with serving() as served:
        client = client_for(served.endpoint)
        client.get_activities("c1")
        client.with_options(timeout_seconds=3).get_activities("c2")
        client.close()
    assert served.connections == [2]


def test_the_server_sees_the_credential_and_the_watermark_as_through_requests():
    with serving() as served:
        client_for(served.endpoint).get_activities("a b/c", watermark="12&x", token="tok")
    assert served.asked == [("/v3/directline/conversations/a%20b%2Fc/activities?watermark=12%26x", "Bearer tok",
                     "directline-relay/0.1")]


class _Redirecting(_Counting):
    """Sends every GET under /v3/directline/ to /moved/... (302), and answers there."""

    def do_GET(self):
        if self.path.startswith("/v3/"):
            self.send_response(302)
            self.send_header("Location", "/moved" + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


def test_a_redirected_read_is_followed_as_requests_did():
    with serving(handler=_Redirecting) as served:
        assert client_for(served.endpoint).get_activities("c1").watermark == "7"


def test_a_token_http_client_refuses_to_send_is_a_transient_error_that_does_not_show_it():
    with serving() as served, pytest.raises(TransientError, match="could not be sent") as raised:
        client_for(served.endpoint).get_activities("c1", token="SECRET-TOKEN\r\nX-Injected: 1")
    assert "SECRET" not in str(raised.value) and raised.value.__cause__ is None
    assert sum(served.connections) == 0


def test_an_endpoint_path_with_a_space_is_quoted_as_requests_quoted_it():
    with serving() as served:
        assert client_for(served.endpoint.replace("/directline", "/direct line")).get_activities("c1").watermark == "7"
    assert [path for path, _, _ in served.asked] == ["/v3/direct%20line/conversations/c1/activities"]


def test_a_closed_client_reads_again_on_new_connections_and_its_clone_with_it():
    with serving() as served:
        client = client_for(served.endpoint)
        clone = client.with_options(timeout_seconds=3)
        client.get_activities("c1")
        client.close()
        client.get_activities("c2")
        clone.get_activities("c3")
        client.close()
    assert served.connections == [1, 2]
