"""The bot's Markdown as a phone shows it: WhatsApp formatting, or plain text with the URLs visible."""

from __future__ import annotations

import pytest

from relay.formatting import ChannelKind, format_for

WHATSAPP, PLAIN = ChannelKind.WHATSAPP, ChannelKind.PLAIN

CITED = ('Staff get 25 days of leave [1] and carry 5 over [2].\n\n'
         '[1]: https://contoso.example/hr/leave_policy "Leave policy"\n'
         '[2]: https://contoso.example/hr/faq')


@pytest.mark.parametrize(("markdown", "whatsapp", "plain"), [
    pytest.param("**bold** and __bold__", "*bold* and *bold*", "bold and bold", id="bold"),
    pytest.param("*italic* and _italic_", "_italic_ and _italic_", "italic and italic", id="italic"),
    pytest.param("***both***", "*_both_*", "both", id="bold italic"),
    pytest.param("~~gone~~ now", "~gone~ now", "gone now", id="strikethrough"),
    pytest.param("run `pip install x`", "run ```pip install x```", "run pip install x", id="inline code"),
    pytest.param("```python\nprint('*hi*')\nx = a_b\n```\nDone.", "```print('*hi*')\nx = a_b```\nDone.",
                 "print('*hi*')\nx = a_b\nDone.", id="a code block keeps its text, marks and all"),
    pytest.param("# Opening hours\nMonday", "*Opening hours*\nMonday", "Opening hours\nMonday", id="heading"),
    pytest.param("## **Already bold**", "*Already bold*", "Already bold", id="a bold heading is bold once"),
    pytest.param("- one\n* two\n+ three\n  - nested", "• one\n• two\n• three\n  • nested",
                 "• one\n• two\n• three\n  • nested", id="bullets"),
    pytest.param("1. first\n2) second", "1. first\n2. second", "1. first\n2. second", id="numbered list"),
    pytest.param("- [ ] todo\n- [x] done", "• ☐ todo\n• ☑ done", "• ☐ todo\n• ☑ done", id="task list"),
    pytest.param("> quoted **text**", "> quoted *text*", "quoted text", id="quote"),
    pytest.param("See [the docs](https://docs.example/a_b_c?x=1).", "See the docs (https://docs.example/a_b_c?x=1).",
                 "See the docs (https://docs.example/a_b_c?x=1).", id="a link shows its URL, untouched"),
    pytest.param("[**Docs**](https://docs.example)", "*Docs* (https://docs.example)", "Docs (https://docs.example)",
                 id="a formatted link text"),
    pytest.param("[https://x.example](https://x.example) <https://y.example/*a*>",
                 "https://x.example https://y.example/*a*", "https://x.example https://y.example/*a*",
                 id="a link to itself and an autolink are their URLs"),
    pytest.param("Go to https://z.example/under_score_ now", "Go to https://z.example/under_score_ now",
                 "Go to https://z.example/under_score_ now", id="a bare URL is left alone"),
    pytest.param("![Logo](https://i.example/logo.png)", "Logo (https://i.example/logo.png)",
                 "Logo (https://i.example/logo.png)", id="an image shows its URL"),
    pytest.param(CITED,
                 "Staff get 25 days of leave [1] and carry 5 over [2].\n\n"
                 "[1] Leave policy: https://contoso.example/hr/leave_policy\n[2]: https://contoso.example/hr/faq",
                 "Staff get 25 days of leave [1] and carry 5 over [2].\n\n"
                 "[1] Leave policy: https://contoso.example/hr/leave_policy\n[2]: https://contoso.example/hr/faq",
                 id="citations and their reference list"),
    pytest.param("Two sources [1][2].\n[1]: cite:1 \"HR FAQ\"", "Two sources [1][2].\n[1] HR FAQ",
                 "Two sources [1][2].\n[1] HR FAQ", id="citations side by side and a reference without a URL"),
    pytest.param("[the guide][1]\n\n[1]: https://g.example", "the guide [1]\n\n[1]: https://g.example",
                 "the guide [1]\n\n[1]: https://g.example", id="a reference link"),
    pytest.param("| a | b |\n|---|:-:|\n| 1 | 2 |", "| a | b |\n| 1 | 2 |", "| a | b |\n| 1 | 2 |",
                 id="a table loses its rule line"),
    pytest.param("above\n\n---\n\nbelow", "above\n\nbelow", "above\n\nbelow", id="a horizontal rule"),
    pytest.param(r"not \*emphasis\* here", "not *emphasis* here", "not *emphasis* here", id="escapes"),
    pytest.param("5 * 3 = 15, file_name.txt, snake_case_id, 2*3*4", "5 * 3 = 15, file_name.txt, snake_case_id, 2*3*4",
                 "5 * 3 = 15, file_name.txt, snake_case_id, 2*3*4", id="text that only looks like Markdown"),
    pytest.param("Grüß Gott 👋\nline two", "Grüß Gott 👋\nline two", "Grüß Gott 👋\nline two", id="plain text"),
    pytest.param("", "", "", id="nothing"),
])
def test_markdown_becomes_whatsapp_formatting_or_plain_text(markdown, whatsapp, plain):
    assert format_for(WHATSAPP, markdown) == whatsapp
    assert format_for(PLAIN, markdown) == plain
