"""`python -m relay.channels.telegram_webhook set-webhook [--url URL]` (`make telegram-webhook`): point a
Telegram bot's updates at the relay, from the relay's own settings.

It calls setWebhook with the webhook URL (RELAY_PUBLIC_BASE_URL + /api/channels/telegram unless --url
is given), TELEGRAM_WEBHOOK_SECRET as the secret_token Telegram will echo on every update, and the
update types the relay relays; TELEGRAM_BOT_TOKEN authorises the call, TELEGRAM_API_BASE says where
the API is. It prints what was done and never a secret; a failure is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import requests

from relay.channels.common import new_session
from relay.channels.telegram import ALLOWED_UPDATES, TelegramAdapter, webhook_url
from relay.errors import ProviderError, SettingsError

__all__ = ["main"]

SETTINGS = ("TELEGRAM_WEBHOOK_SECRET", "TELEGRAM_BOT_TOKEN", "TELEGRAM_API_BASE")


def main(argv: list[str] | None = None, *, environ: Mapping[str, str] | None = None,
         session: requests.Session | None = None) -> int:
    """Run the command line in `argv` with the settings in `environ` (the process's by default); the exit code."""
    parser = argparse.ArgumentParser(prog="python -m relay.channels.telegram_webhook", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("set-webhook", help="point the bot's updates at the relay (setWebhook)")
    register.add_argument("--url", default="", help="the webhook URL (default: RELAY_PUBLIC_BASE_URL + "
                                                    "/api/channels/telegram)")
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    base = environ.get("RELAY_PUBLIC_BASE_URL", "").strip()
    url = args.url or (webhook_url(base) if base else "")
    try:
        if not url:
            raise SettingsError("RELAY_PUBLIC_BASE_URL is not set: set it, or give the webhook URL with --url")
        adapter = TelegramAdapter({name: environ.get(name, "") for name in SETTINGS}, session=session or new_session())
        adapter.set_webhook(url)
    except (SettingsError, ProviderError) as error:
        print(f"the Telegram webhook was not set: {error}", file=sys.stderr)
        return 1
    print(f"Telegram now sends {' and '.join(ALLOWED_UPDATES)} updates to {url} with the secret token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
