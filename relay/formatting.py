"""The bot's Markdown as a phone shows it: WhatsApp's own formatting, Telegram's HTML, or plain text on SMS.

Bots (Copilot Studio's generative answers above all) write Markdown; a phone shows its asterisks
and brackets as they are. `format_for(kind, text)` is the one translation, applied where an adapter
sends a reply:

- WHATSAPP: `**bold**`/`__bold__` -> `*bold*`, `*italic*`/`_italic_` -> `_italic_`, `~~strike~~` ->
  `~strike~`, inline code and code blocks -> monospace (```), a heading -> a bold line, a quote
  stays `> `;
- TELEGRAM_HTML (sent with parse_mode HTML): `<b>`, `<i>`, `<s>`, `<code>` and `<pre>`, every other
  `<`, `>` and `&` escaped as Telegram requires; a quote stays `> `. Emphasis that does not nest
  (`**a _b** c_`) is dropped rather than sent as tags Telegram would refuse ("can't parse entities");
- PLAIN (SMS and every channel that shows text as it is): no markup at all.

Both keep every URL visible (`[text](url)` -> `text (url)`, an autolink or bare URL as it is, never
touched by the emphasis rules), list items as `•` or their number, and citations readable: the
markers (`[1]`) stay in the text and a reference definition (`[1]: https://… "Title"`) becomes
`[1] Title: https://…`. Text without Markdown comes out as it went in. The result depends on the
text alone (a retried reply is split into the same parts).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from enum import StrEnum

__all__ = ["ChannelKind", "format_for"]


class ChannelKind(StrEnum):
    """How a channel shows text: WhatsApp's formatting, Telegram's HTML, or plain text (SMS, generic)."""

    WHATSAPP = "whatsapp"
    PLAIN = "plain"
    TELEGRAM_HTML = "telegram_html"


# Private-use characters: a protected piece of text (code, URL) is replaced by _HOLD + index + _END
# until the end, and emphasis is marked with _BOLD/_ITALIC/_STRIKE until it is written for the channel.
_HOLD, _END = "\ue000", "\ue001"
_BOLD, _ITALIC, _STRIKE = "\ue002", "\ue003", "\ue004"
_CODE, _PRE = "\ue005", "\ue006"
"""Telegram's inline code and code block, kept as marks until the text is written as HTML."""
_MARKS = {
    ChannelKind.WHATSAPP: {_BOLD: "*", _ITALIC: "_", _STRIKE: "~"},
    ChannelKind.PLAIN: {_BOLD: "", _ITALIC: "", _STRIKE: ""},
    ChannelKind.TELEGRAM_HTML: {},  # written as tags by _as_html, once the whole text is known
}
_MONOSPACE = "```"
_HTML_TAGS = {_BOLD: "b", _ITALIC: "i", _STRIKE: "s", _CODE: "code", _PRE: "pre"}
_HTML_MARK = re.compile(f"([{''.join(_HTML_TAGS)}])")

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
    written = _Formatter(kind).format(text)
    return _as_html(written) if kind is ChannelKind.TELEGRAM_HTML else written


def _as_html(marked: str) -> str:
    """`marked` escaped for Telegram's HTML, its marks as tags; without any tag when they do not nest."""
    pieces: list[str] = []
    opened: list[str] = []
    for piece in _HTML_MARK.split(html.escape(marked, quote=False)):
        if piece not in _HTML_TAGS:
            pieces.append(piece)
        elif opened and opened[-1] == piece:
            opened.pop()
            pieces.append(f"</{_HTML_TAGS[piece]}>")
        elif piece in opened:  # crossing emphasis: tags Telegram would refuse
            return _HTML_MARK.sub("", html.escape(marked, quote=False))
        else:
            opened.append(piece)
            pieces.append(f"<{_HTML_TAGS[piece]}>")
    return "".join(pieces) if not opened else _HTML_MARK.sub("", html.escape(marked, quote=False))


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
        if self.kind is ChannelKind.TELEGRAM_HTML:
            return self.hold(f"{_PRE}{body}{_PRE}")
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
            return f"> {quoted}" if self.kind is not ChannelKind.PLAIN else quoted
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
        if self.kind is ChannelKind.TELEGRAM_HTML and code:
            return f"{_CODE}{code}{_CODE}"
        return f"{_MONOSPACE}{code}{_MONOSPACE}" if self.kind is ChannelKind.WHATSAPP and code else code

    def marks(self, text: str) -> str:
        for mark, written in _MARKS[self.kind].items():
            text = text.replace(mark, written)
        return text


def _apply(pattern: re.Pattern[str], text: str, wrap: Callable[[str], str], *, group: int = 2) -> str:
    return pattern.sub(lambda m: wrap(m.group(group)), text)
