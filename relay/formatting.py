"""The bot's Markdown as a phone shows it: WhatsApp's own formatting, or plain text on SMS.

Bots (Copilot Studio's generative answers above all) write Markdown; a phone shows its asterisks
and brackets as they are. `format_for(kind, text)` is the one translation, applied where an adapter
sends a reply:

- WHATSAPP: `**bold**`/`__bold__` -> `*bold*`, `*italic*`/`_italic_` -> `_italic_`, `~~strike~~` ->
  `~strike~`, inline code and code blocks -> monospace (```), a heading -> a bold line, a quote
  stays `> `;
- PLAIN (SMS and every channel that shows text as it is): no markup at all.

Both keep every URL visible (`[text](url)` -> `text (url)`, an autolink or bare URL as it is, never
touched by the emphasis rules), list items as `•` or their number, and citations readable: the
markers (`[1]`) stay in the text and a reference definition (`[1]: https://… "Title"`) becomes
`[1] Title: https://…`. Text without Markdown comes out as it went in. The result depends on the
text alone (a retried reply is split into the same parts).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum

__all__ = ["ChannelKind", "format_for"]


class ChannelKind(StrEnum):
    """How a channel shows text: WhatsApp's formatting, or plain text (SMS, generic)."""

    WHATSAPP = "whatsapp"
    PLAIN = "plain"


# Private-use characters: a protected piece of text (code, URL) is replaced by _HOLD + index + _END
# until the end, and emphasis is marked with _BOLD/_ITALIC/_STRIKE until it is written for the channel.
_HOLD, _END = "\ue000", "\ue001"
_BOLD, _ITALIC, _STRIKE = "\ue002", "\ue003", "\ue004"
_MARKS = {
    ChannelKind.WHATSAPP: {_BOLD: "*", _ITALIC: "_", _STRIKE: "~"},
    ChannelKind.PLAIN: {_BOLD: "", _ITALIC: "", _STRIKE: ""},
}
_MONOSPACE = "```"

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(?:\[([ xX])\]\s+)?(.*)$")
_NUMBERED = re.compile(r"^(\s*)(\d{1,9})[.)]\s+(.*)$")
_QUOTE = re.compile(r"^\s{0,3}>\s?(.*)$")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_TABLE_RULE = re.compile(r"^(?=.*\|)(?=.*-)[\s|:-]+$")
"""The rule under a table's header (`|---|:-:|`)."""
_DEFINITION = re.compile(r"""^\s{0,3}\[([^\]]+)\]:\s*<?(\S+?)>?(?:\s+["'(](.*)["')])?\s*$""")

_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(\s*<?([^\s)>]+)>?(?:\s+[\"'(].*?[\"')])?\s*\)")
_LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^\s)>]+)>?(?:\s+[\"'(].*?[\"')])?\s*\)")
_REFERENCE_LINK = re.compile(r"\[([^\]]*[^\]\d\s][^\]]*)\]\[([^\]]+)\]")
"""`[text][label]`; never citations side by side (`[1][2]`)."""
_AUTOLINK = re.compile(r"<((?:https?|mailto|tel):[^\s>]+)>")
_BARE_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\]]*[^\s<>\].,;:!?'\")]")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_BOLD_ITALIC = re.compile(r"(\*\*\*|___)(?=\S)(.+?)(?<=\S)\1")
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EMPHASIS = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])"
                       r"|(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])")
"""`*italic*` or `_italic_`, never inside a word (snake_case, 2*3*4) or around a blank."""
_STRIKETHROUGH = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!~>|])")
_HELD = re.compile(f"{_HOLD}(\\d+){_END}")
_BLANK_RUNS = re.compile(r"\n{3,}")


def format_for(kind: ChannelKind, text: str) -> str:
    """`text` (the bot's Markdown) as a `kind` channel shows it; see the module docstring."""
    if not text:
        return text
    return _Formatter(kind).format(text)


class _Formatter:
    def __init__(self, kind: ChannelKind):
        self.kind = kind
        self.held: list[str] = []

    def hold(self, piece: str) -> str:
        """A placeholder for `piece`, which nothing after this touches."""
        self.held.append(piece)
        return f"{_HOLD}{len(self.held) - 1}{_END}"

    def format(self, text: str) -> str:
        lines: list[str] = []
        code: list[str] | None = None  # the lines of the code block being read
        for line in text.replace("\r\n", "\n").split("\n"):
            if _FENCE.match(line):
                if code is None:
                    code = []
                else:
                    lines.append(self.code_block(code))
                    code = None
                continue
            if code is not None:
                code.append(line)
            elif not _TABLE_RULE.match(line):  # a table's header rule goes; its rows stay as they are
                lines.append(self.marks(self.line(line)))
        if code is not None:  # a block never closed runs to the end
            lines.append(self.code_block(code))
        written = _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")
        for _ in range(2):  # a held link may hold a URL in turn
            written = _HELD.sub(lambda m: self.held[int(m.group(1))], written)
        return written

    def code_block(self, code: list[str]) -> str:
        body = "\n".join(code)
        return self.hold(f"{_MONOSPACE}{body}{_MONOSPACE}" if self.kind is ChannelKind.WHATSAPP else body)

    def line(self, line: str) -> str:
        if _RULE.match(line):
            return ""
        if match := _DEFINITION.match(line):
            label, target, title = match.groups()
            shown = target if re.match(r"(?:https?|mailto|tel):", target) else ""
            named = f"[{label}] {self.inline(title)}" if title else f"[{label}]"
            return f"{named}: {self.hold(shown)}" if shown else named
        if match := _HEADING.match(line):
            heading = self.inline(match.group(1)).replace(_BOLD, "")
            return f"{_BOLD}{heading}{_BOLD}" if heading else ""
        if match := _BULLET.match(line):
            indent, task, rest = match.groups()
            box = "" if task is None else ("☐ " if task == " " else "☑ ")
            return f"{indent}• {box}{self.inline(rest)}"
        if match := _NUMBERED.match(line):
            indent, number, rest = match.groups()
            return f"{indent}{number}. {self.inline(rest)}"
        if match := _QUOTE.match(line):
            quoted = self.inline(match.group(1))
            return f"> {quoted}" if self.kind is ChannelKind.WHATSAPP else quoted
        return self.inline(line)

    def inline(self, text: str) -> str:
        text = _CODE_SPAN.sub(lambda m: self.hold(self.monospace(m.group(2).strip())), text)
        text = _ESCAPE.sub(lambda m: self.hold(m.group(1)), text)  # an escaped character is only itself
        text = _BREAK.sub("\n", text)
        text = _IMAGE.sub(lambda m: self.link(m.group(1), m.group(2)), text)
        text = _LINK.sub(lambda m: self.link(m.group(1), m.group(2)), text)
        text = _REFERENCE_LINK.sub(lambda m: f"{m.group(1)} [{m.group(2)}]", text)
        text = _AUTOLINK.sub(lambda m: self.hold(m.group(1)), text)
        text = _BARE_URL.sub(lambda m: self.hold(m.group(0)), text)
        text = _apply(_BOLD_ITALIC, text, lambda inner: f"{_BOLD}{_ITALIC}{inner}{_ITALIC}{_BOLD}")
        text = _apply(_STRONG, text, lambda inner: f"{_BOLD}{inner}{_BOLD}")
        text = _EMPHASIS.sub(lambda m: f"{_ITALIC}{m.group(1) or m.group(2)}{_ITALIC}", text)
        return _apply(_STRIKETHROUGH, text, lambda inner: f"{_STRIKE}{inner}{_STRIKE}", group=1)

    def link(self, label: str, url: str) -> str:
        """`label (url)`: the URL shown (held, so no emphasis rule touches it); the bare URL when that is the label."""
        shown = self.hold(url)
        label = label.strip()
        if not label or label == url or re.sub(r"^\w+://", "", url).rstrip("/") == label.rstrip("/"):
            return shown
        return f"{label} ({shown})"

    def monospace(self, code: str) -> str:
        return f"{_MONOSPACE}{code}{_MONOSPACE}" if self.kind is ChannelKind.WHATSAPP and code else code

    def marks(self, text: str) -> str:
        for mark, written in _MARKS[self.kind].items():
            text = text.replace(mark, written)
        return text


def _apply(pattern: re.Pattern[str], text: str, wrap: Callable[[str], str], *, group: int = 2) -> str:
    return pattern.sub(lambda m: wrap(m.group(group)), text)
