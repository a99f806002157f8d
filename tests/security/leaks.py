"""Finding secrets in log text: the configured ones, the forms they travel in, and Direct Line tokens.

Used by the session-wide check in tests/conftest.py (every log record of the test process and every
*.log file the suite's processes wrote) and by test_secrets.py (with the tokens and resume keys
one run handed out). Findings name what leaked and where, never the value.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from devstack.channels import DEV_VALUES
from devstack.procs import AZURITE_KEY
from relay.settings import SETTINGS

# Secrets the suite configures besides DEV_VALUES (tests/conftest.py, tests/chaos/soak.py).
SUITE_SECRETS = {"DIRECTLINE_SECRET (tests)": "test-directline-secret",
                 "DIRECTLINE_SECRET (chaos)": "chaos-directline-secret",
                 "AzureWebJobsStorage account key": AZURITE_KEY}
# An emulator token: base64url JSON claims, a dot, a base64url HMAC-SHA256.
TOKEN_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])([A-Za-z0-9_-]{40,})\.([A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])")


# Meta sends the verify token in the query string of its subscription GET, so every request log (the
# platform's, Application Insights', the local host's access log) records it: SECURITY.md says so.
IN_REQUEST_URLS = {"WHATSAPP_VERIFY_TOKEN"}


def configured_secrets() -> dict[str, str]:
    """name -> value of every secret the suite hands the relay, with the encodings they travel in."""
    found = {name: value for name, value in DEV_VALUES.items()
             if SETTINGS[name].secret and value and name not in IN_REQUEST_URLS}
    found |= SUITE_SECRETS
    sid, token = DEV_VALUES["TWILIO_ACCOUNT_SID"], DEV_VALUES["TWILIO_AUTH_TOKEN"]
    found["TWILIO_AUTH_TOKEN (Basic auth)"] = base64.b64encode(f"{sid}:{token}".encode()).decode()
    generic = DEV_VALUES["GENERIC_WEBHOOK_SECRET"]
    found["GENERIC_WEBHOOK_SECRET (key)"] = base64.b64decode(generic.removeprefix("whsec_")).decode()
    return found


def directline_tokens(text: str) -> list[str]:
    """Emulator-issued Direct Line tokens in `text` (shape and decodable claims, so no false alarms)."""
    tokens = []
    for match in TOKEN_SHAPE.finditer(text):
        payload = match.group(1)
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            continue
        if isinstance(claims, dict) and {"c", "e", "j"} <= set(claims):
            tokens.append(match.group(0))
    return tokens


def find_leaks(sources: Mapping[str, str], secrets: Mapping[str, str]) -> list[str]:
    """'<what> in <where>' for every secret found in a source text, and every Direct Line token."""
    leaks = []
    for where, text in sources.items():
        leaks += [f"{name} in {where}" for name, value in secrets.items() if value and value in text]
        leaks += [f"a Direct Line token in {where}" for _ in directline_tokens(text)[:1]]
    return leaks


def log_files(root: Path) -> dict[str, str]:
    return {str(path): path.read_text(errors="replace") for path in sorted(root.rglob("*.log")) if path.is_file()}


class LogCapture(logging.Handler):
    """Every record of this process, formatted with its arguments and traceback, as the log would show it."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is not ours to fail on
            self.lines.append(f"{record.name} unformattable record")

    def text(self) -> str:
        return "\n".join(self.lines)


def scan(sources: Iterable[tuple[str, str]], extra: Mapping[str, str] | None = None) -> list[str]:
    return find_leaks(dict(sources), {**configured_secrets(), **(extra or {})})
