"""Command line of the provider simulator: serve it, or make a user send a message through it."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import requests

from devstack.channels import DEFAULT_PORT, load_values
from devstack.channels.server import make_server
from devstack.channels.webhooks import PROVIDERS


def _pairs(items: list[str]) -> dict[str, str]:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes NAME=VALUE, got {item!r}")
        values[name] = value
    return values


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = make_server(args.port, load_values(overrides=_pairs(args.set)), args.relay_url)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"provider simulator on http://127.0.0.1:{args.port}/ sending webhooks to {args.relay_url}", flush=True)
    stopping.wait()
    server.shutdown()
    server.server_close()
    return 0


def send(args: argparse.Namespace) -> int:
    """Ask the running simulator to sign and send the message, so its page shows it too."""
    media = [{"url": url} for url in args.media]
    body = {"provider": args.provider, "from": args.sender, "text": args.text, "name": args.name, "media": media}
    try:
        response = requests.post(f"{args.simulator.rstrip('/')}/_sim/inbound", json=body, timeout=60)
    except requests.RequestException as error:
        print(f"cannot reach the simulator at {args.simulator} ({type(error).__name__}); is it running?",
              file=sys.stderr)
        return 1
    if not response.ok:
        print(f"the simulator answered {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    answer = response.json()
    print(f"{args.provider} message {answer['message_id']}: relay answered {answer['status']} {answer['body']}")
    return 0 if answer["status"] < 400 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.channels", description=__doc__)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--relay-url", default="http://127.0.0.1:7071", help="where webhooks go (+ /api/channels/…)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a provider setting by the relay's name (e.g. TWILIO_AUTH_TOKEN=…); wins over the env")
    commands = parser.add_subparsers(dest="command")
    sender = commands.add_parser("send", help="send a user's message through the running simulator")
    sender.add_argument("provider", choices=PROVIDERS)
    sender.add_argument("text")
    sender.add_argument("--from", dest="sender", required=True, help="the user: +15550001, whatsapp:+15550001, …")
    sender.add_argument("--name", default="", help="the user's display name")
    sender.add_argument("--media", action="append", default=[], metavar="URL", help="attach a media URL")
    sender.add_argument("--simulator", default=f"http://127.0.0.1:{DEFAULT_PORT}")
    args = parser.parse_args(argv)
    return send(args) if args.command == "send" else serve(args)


if __name__ == "__main__":
    sys.exit(main())
