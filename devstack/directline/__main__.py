"""`python -m devstack.directline`: run the emulator until Ctrl-C or SIGTERM (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading

from devstack.directline import copilot, echo
from devstack.directline.server import (
    AGENT_TOKEN_PATH,
    KEEPALIVE_SECONDS,
    RETENTION_SECONDS,
    Faults,
    Options,
    make_server,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack.directline", description="Direct Line 3.0 emulator.")
    parser.add_argument("--port", type=int, default=3000, help="0 picks a free port (printed at start)")
    parser.add_argument("--secret", default=os.environ.get("DIRECTLINE_SECRET"),
                        help="the channel secret (default: $DIRECTLINE_SECRET)")
    parser.add_argument("--token-ttl", type=float,
                        help="token lifetime in seconds (default 1800; 3600 with --copilot)")
    parser.add_argument("--conversation-ttl", type=float, default=15 * 24 * 3600,
                        help="seconds an idle conversation is kept before it answers 404")
    parser.add_argument("--enhanced-auth", action=argparse.BooleanOptionalAction, default=False,
                        help="the Direct Line site's enhanced authentication: reconnect with the secret is refused")
    parser.add_argument("--retention-seconds", type=float, default=RETENTION_SECONDS,
                        help="how long activities stay in the activity set and the stream")
    parser.add_argument("--keepalive-seconds", type=float, default=KEEPALIVE_SECONDS,
                        help="an open stream gets an empty frame after this many seconds without activity")
    bot = parser.add_mutually_exclusive_group()
    bot.add_argument("--echo", action="store_true", help="built-in echo bot (the default)")
    bot.add_argument("--copilot", action="store_true",
                     help="built-in Copilot-like bot: late answers, greeting on startConversation, cards, handoff")
    bot.add_argument("--bot-url", help="a real bot's messaging endpoint, e.g. http://127.0.0.1:3978/api/messages")
    bot.add_argument("--no-bot", action="store_true",
                     help="nothing answers; bot replies come through /v3/conversations")
    parser.add_argument("--bot-id", default="relaybot", help="the bot handle: from.id of its activities")
    parser.add_argument("--bot-name", help="the bot's from.name (default 'Echo Bot'; 'Copilot' with --copilot)")
    parser.add_argument("--copilot-delay", type=float, nargs=2, metavar=("MIN", "MAX"), default=copilot.DEFAULT_DELAY,
                        help="seconds between a message and the Copilot-like bot's answer, drawn per turn (1 4)")
    parser.add_argument("--bot-timeout", type=float, default=15, help="seconds before a silent bot gives 504 BotError")
    parser.add_argument("--late-reply-seconds", type=float, default=echo.DEFAULT_LATE_REPLY_SECONDS,
                        help="delay of the built-in echo's answer to 'later'")
    parser.add_argument("--page-size", type=int, default=100, help="most activities in one GET")
    parser.add_argument("--max-activity-chars", type=int, default=256 * 1024)
    parser.add_argument("--max-upload-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--forward-end-of-conversation", action=argparse.BooleanOptionalAction, default=True,
                        help="hand the client's endOfConversation to the bot")
    parser.add_argument("--seed", type=int, help="seed of the fault dice")
    faults = parser.add_argument_group("faults (also settable at run time: PUT /_emulator/faults)")
    faults.add_argument("--latency-ms", type=int, default=0)
    faults.add_argument("--throttle-rate", type=float, default=0.0)
    faults.add_argument("--retry-after", default="1")
    faults.add_argument("--poll-limit", action="store_true", help="429 when a conversation is polled too often")
    faults.add_argument("--min-poll-interval", type=float, default=1.0)
    faults.add_argument("--error-500-rate", type=float, default=0.0)
    faults.add_argument("--error-502-rate", type=float, default=0.0)
    faults.add_argument("--drop-rate", type=float, default=0.0)
    faults.add_argument("--no-content-rate", type=float, default=0.0,
                        help="share of POST activities/upload answered 204 without a body once processed")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    args = parser.parse_args(argv)
    if args.copilot and not args.secret:
        args.secret = secrets.token_urlsafe(32)  # an agent without web channel security: clients use its token endpoint
    if not args.secret:
        parser.error("give --secret or set DIRECTLINE_SECRET")
    if not 0 <= args.copilot_delay[0] <= args.copilot_delay[1]:
        parser.error("--copilot-delay needs 0 <= MIN <= MAX")
    if args.token_ttl is None:
        args.token_ttl = copilot.COPILOT_TOKEN_SECONDS if args.copilot else 1800
    if args.bot_name is None:
        args.bot_name = "Copilot" if args.copilot else "Echo Bot"
    if args.keepalive_seconds <= 0 or args.retention_seconds <= 0:
        parser.error("--keepalive-seconds and --retention-seconds must be more than 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    options = Options(
        secret=args.secret, port=args.port, token_ttl=args.token_ttl, conversation_ttl=args.conversation_ttl,
        echo=not args.bot_url and not args.no_bot and not args.copilot, copilot=args.copilot,
        copilot_delay=(args.copilot_delay[0], args.copilot_delay[1]), bot_url=args.bot_url, bot_id=args.bot_id,
        bot_name=args.bot_name,
        bot_timeout=args.bot_timeout, late_reply_seconds=args.late_reply_seconds, page_size=args.page_size,
        max_activity_chars=args.max_activity_chars, max_upload_bytes=args.max_upload_bytes,
        forward_end_of_conversation=args.forward_end_of_conversation, seed=args.seed,
        enhanced_auth=args.enhanced_auth, retention_seconds=args.retention_seconds,
        keepalive_seconds=args.keepalive_seconds,
    )
    try:
        faults = Faults().updated({
            "latency_ms": args.latency_ms, "throttle_rate": args.throttle_rate, "retry_after": args.retry_after,
            "poll_limit": args.poll_limit, "min_poll_interval": args.min_poll_interval,
            "error_500_rate": args.error_500_rate, "error_502_rate": args.error_502_rate, "drop_rate": args.drop_rate,
            "no_content_rate": args.no_content_rate,
        })
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    server, emulator = make_server(options, faults)
    bot = (f"bot at {options.bot_url}" if options.bot_url else "built-in Copilot-like bot" if options.copilot
           else "built-in echo bot" if options.echo else "no bot")
    auth = "enhanced authentication" if options.enhanced_auth else "no enhanced authentication"
    root = f"http://127.0.0.1:{emulator.options.port}"
    print(f"Direct Line emulator on {root}/v3/directline ({bot}; {auth}); admin at {root}/_emulator/", flush=True)
    if options.copilot:
        print(f"agent token endpoint {root}{AGENT_TOKEN_PATH}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        emulator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
