"""A real Bot Framework bot (botbuilder-core + botbuilder-integration-aiohttp) for the local stack.

    python -m devstack.bot [--port 3978] [--late-reply-seconds 3]

Its messaging endpoint is http://127.0.0.1:PORT/api/messages; it runs without an app id or password,
as a bot does locally, and answers through the Bot Connector API at each activity's serviceUrl
(the Direct Line emulator's). It says what the emulator's built-in echo says
(devstack/directline/echo.py): a typing activity, then the echo, "later" (plus a proactive reply after
the turn), "card", "bye", and a greeting on a `startConversation` event. `EchoBot` starts it from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

from aiohttp import web
from botbuilder.core import ActivityHandler, TurnContext
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from botbuilder.schema import Activity

from devstack.directline import echo
from devstack.procs import ManagedProcess, free_port, port_open, python_module

log = logging.getLogger("devstack.bot")
APP_ID = ""  # no Microsoft app id locally: the connector calls go out anonymous


class EchoHandler(ActivityHandler):
    def __init__(self, adapter: CloudAdapter, late_reply_seconds: float):
        self.adapter = adapter
        self.late_reply_seconds = late_reply_seconds
        self._pending: set[asyncio.Task] = set()

    async def on_turn(self, turn_context: TurnContext) -> None:
        incoming = turn_context.activity.serialize()
        replies = echo.replies_to(incoming)
        if replies:
            # botbuilder leaves replyToId out on the directline channel; set it, as the built-in echo does
            await turn_context.send_activities(
                [Activity().deserialize({**reply, "replyToId": incoming.get("id")}) for reply in replies])
        late = echo.late_reply_to(incoming)
        if late is not None:
            reference = TurnContext.get_conversation_reference(turn_context.activity)
            task = asyncio.get_running_loop().create_task(self._send_later(reference, late))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _send_later(self, reference, late: dict) -> None:
        await asyncio.sleep(self.late_reply_seconds)  # the bot's own behaviour: reply some seconds after the turn

        async def send(context: TurnContext) -> None:
            await context.send_activity(Activity().deserialize(late))

        try:
            await self.adapter.continue_conversation(reference, send, APP_ID)
        except Exception:
            log.exception("late reply to %s failed", reference.conversation.id)


def build_app(late_reply_seconds: float = echo.DEFAULT_LATE_REPLY_SECONDS) -> web.Application:
    config = SimpleNamespace(APP_ID=APP_ID, APP_PASSWORD="", APP_TYPE="MultiTenant", APP_TENANTID="")
    adapter = CloudAdapter(ConfigurationBotFrameworkAuthentication(config))

    async def on_error(context: TurnContext, error: Exception) -> None:
        log.exception("turn failed", exc_info=error)

    adapter.on_turn_error = on_error
    bot = EchoHandler(adapter, late_reply_seconds)

    async def messages(request: web.Request) -> web.StreamResponse:
        return await adapter.process(request, bot)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/api/messages", messages)
    app.router.add_get("/health", health)
    return app


class EchoBot(ManagedProcess):
    """`python -m devstack.bot` on a loopback port; `.url` is its messaging endpoint."""

    def __init__(self, *, port: int | None = None, late_reply_seconds: float | None = None,
                 log_path: Path | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/messages"
        argv = python_module("devstack.bot", "--port", str(self.port))
        if late_reply_seconds is not None:
            argv += ["--late-reply-seconds", f"{late_reply_seconds:g}"]
        super().__init__("echo bot", argv, env=env, log_path=log_path, ready=lambda: port_open(self.port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.bot", description="The botbuilder echo bot.")
    parser.add_argument("--port", type=int, default=3978)
    parser.add_argument("--late-reply-seconds", type=float, default=echo.DEFAULT_LATE_REPLY_SECONDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    print(f"echo bot on http://127.0.0.1:{args.port}/api/messages", flush=True)
    web.run_app(build_app(args.late_reply_seconds), host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
