"""Regenerate the README's settings table from `relay.settings.SETTINGS`: `python -m devstack.docs`."""

from __future__ import annotations

import re
import sys

from devstack.procs import ROOT
from relay.settings import SETTINGS

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def settings_table() -> str:
    rows = ["| setting | default | secret | what it is for |", "|---|---|---|---|"]
    for setting in SETTINGS.values():
        default = f"`{setting.default}`" if setting.default else ("required" if setting.default is None else "(empty)")
        rows.append(f"| `{setting.name}` | {default} | {'yes' if setting.secret else ''} | {setting.description} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    block = f"{BEGIN}\n{settings_table()}\n{END}"
    return re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.DOTALL)


def main() -> int:
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
