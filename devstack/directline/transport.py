"""The Direct Line emulator in this process: its core mounted on `requests` as a transport, no socket, no child.

    emulator = InProcessEmulator(secret="s")
    client = DirectLineClient(settings_for(emulator.base_url), transport=emulator.transport)
    emulator.set_faults(error_500_rate=1.0, endpoints=["activities/post"])    # as on DirectLineEmulator

Every request, the admin calls included, goes through `server.respond`, the function the HTTP server
calls for each request it reads: the same routing, token checks, watermarks, faults and counters, so
the emulator is no kinder in-process than behind a socket (devstack/inprocess.py says what differs:
only what belongs to the socket). Time is the emulator's clock, as in the server: the wall clock,
moved forward by `advance_clock`; `expire_tokens` expires tokens now. The built-in echo bot answers
within the user's POST; its late replies come on a timer thread, as over HTTP, and so do the
Copilot-like bot's answers (`copilot=True`).

There is no WebSocket stream in-process: a streamUrl request passes the same checks as over HTTP
(its token, conversation and watermark) and is then answered 426 Upgrade Required, which is also
what the HTTP server answers a plain GET on it. Clients here poll; stream tests use DirectLineEmulator.
"""

from __future__ import annotations

import functools
from typing import Any

from devstack.directline import EmulatorAdmin
from devstack.directline.copilot import COPILOT_TOKEN_SECONDS
from devstack.directline.server import ADMIN, AGENT_TOKEN_PATH, API, Emulator, Faults, Options, respond
from devstack.inprocess import InProcessServer

__all__ = ["DEFAULT_URL", "InProcessEmulator"]

DEFAULT_URL = "http://directline.invalid"
"""Where an in-process emulator answers: `.invalid` never resolves, so a request that misses it fails at once."""


class InProcessEmulator(InProcessServer, EmulatorAdmin):
    """An emulator core and the transport that serves it at `url` (base_url, admin_url as on DirectLineEmulator).

    `options` are `server.Options` fields (token_ttl, echo, copilot, copilot_delay, page_size, seed...);
    enhanced authentication is on unless `enhanced_auth=False`, as on DirectLineEmulator; with
    `copilot=True` tokens last 3,600 s unless `token_ttl` says. `token_endpoint` is the agent token
    endpoint URL. `transport` is what a `requests.Session` mounts (DirectLineClient takes it as `transport=`)."""

    def __init__(self, *, secret: str, url: str = DEFAULT_URL, faults: Faults | None = None,
                 enhanced_auth: bool = True, **options: Any):
        self.secret = secret
        if options.get("copilot"):
            options = {"token_ttl": COPILOT_TOKEN_SECONDS, "echo": False, **options}
        self.core = Emulator(Options(secret=secret, port=0, enhanced_auth=enhanced_auth, **options), faults)
        super().__init__(url, functools.partial(respond, self.core))
        self.base_url = f"{self.url}{API}"
        self.admin_url = f"{self.url}{ADMIN}"
        self.token_endpoint = f"{self.url}{AGENT_TOKEN_PATH}"
        self.core.root_url = self.url  # contentUrls and stream URLs point here

    def __repr__(self) -> str:
        return f"InProcessEmulator(base_url={self.base_url!r})"

    def close(self) -> None:
        """Cancel the built-in bots' pending late replies and close the session."""
        self.core.close()
        super().close()
