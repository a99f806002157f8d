"""The provider simulator in this process: its core mounted on `requests` as a transport, no socket, no child.

    simulator = InProcessSimulator()
    adapter = get_adapter("twilio", settings_with(simulator.api_bases()), session=simulator.http)
    simulator.fail_next("twilio", 503, after=1)         # as on ProviderSimulator

Every request, the admin calls included, goes through `server.respond`, the function the HTTP server
calls for each request it reads: the same provider paths, auth checks, limits and injected failures.
Its credentials are DEV_VALUES with `values` over them (never the environment). Sending a webhook to
the relay (`send_inbound`) still goes over the network to `relay_url`, as from the server.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from devstack.channels import SimulatorAdmin, load_values
from devstack.channels.server import State, respond
from devstack.inprocess import InProcessServer

__all__ = ["DEFAULT_URL", "InProcessSimulator"]

DEFAULT_URL = "http://providers.invalid"
"""Where an in-process simulator answers: `.invalid` never resolves, so a request that misses it fails at once."""


class InProcessSimulator(InProcessServer, SimulatorAdmin):
    """A simulator core and the transport that serves it at `url`; `http` is a session with it mounted
    (give it to the adapters as their `session`)."""

    def __init__(self, *, values: Mapping[str, str] | None = None, url: str = DEFAULT_URL,
                 relay_url: str = "http://127.0.0.1:7071"):
        self.state = State(load_values(environ={}, overrides=values), relay_url.rstrip("/"))
        super().__init__(url, functools.partial(respond, self.state))
        self.state.base_url = self.url  # the media URLs it hands out point here

    def advance_clock(self, seconds: float) -> None:
        """Move the simulator's clock on (a Vonage JWT's exp is checked by it) with the relay's test clock."""
        with self.state.lock:
            self.state.clock_offset += seconds

    def __repr__(self) -> str:
        return f"InProcessSimulator(url={self.url!r})"

