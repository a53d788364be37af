"""Untrusted text (model outputs, prompts, judge replies, names read from files) embedded so that it stays text.

The negative prompts ask for harmful text by design, so an output may hold anything: a Markdown fence, a
`<script>` tag, a line starting with `#`, terminal escape sequences. Three helpers, one per destination:

- `terminal_safe(text)`: for anything printed to a terminal or written to a log. Control characters other
  than newline and tab (ANSI escapes, a lone carriage return that would overwrite the line, NUL, DEL, C1)
  are shown the way Python's repr shows them, as `\\x1b`, `\\r`, `\\x00`; CRLF line endings become `\\n`.
  With `one_line=True` newlines, tabs and the Unicode line separators are shown as `\\n`, `\\t`, `\\u2028`
  too: a log line quoting a file name or an output cannot start a fake log line.
- `code_block(text)`: a fenced Markdown code block whose fence is longer than any backtick run inside, so
  nothing in the text can close it, after `terminal_safe` (a report.md may be read with `cat`).
- `md_inline(text)`: text for one line of Markdown (a table cell, a list item, a heading, bold): line
  breaks become spaces, and every character that could start markup anywhere on a line (`` \\ ` * _ [ < >
  & | ~ $ # ``: emphasis, code, links, raw HTML, entities, table cells, strikethrough, math, headings) or at
  its start (a list marker `+ - 1. 1)`, an underline `=`; not when a digit follows, so `-0.5` stays as is)
  is backslash-escaped. Renders as exactly the text.

In HTML, `html.escape(terminal_safe(text))`.
"""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 except \t \n, DEL, C1
_CONTROL_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # all that str.splitlines() breaks at
_MARKUP = re.compile(r"([\\`*_\[<>&|~$#])")  # each may start markup; a lone ] cannot
_LINE_START = re.compile(r"^([+\-=]|\d+[.)])(?!\d)")  # list items, thematic breaks, setext underlines


def terminal_safe(text: str, one_line: bool = False) -> str:
    """text with every control character except newline and tab (all, with one_line) shown as its repr
    escape (`\\x1b`, `\\r`, `\\n`)."""
    return (_CONTROL_ONE_LINE if one_line else _CONTROL).sub(lambda m: repr(m.group())[1:-1], text.replace("\r\n", "\n"))


def code_block(text: str, info: str = "text") -> str:
    """A fenced Markdown code block showing text verbatim (after `terminal_safe`), without a trailing newline.
    info: the fence's language word, such as "yaml"."""
    if not re.fullmatch(r"[\w+.-]*", info):
        raise ValueError(f"code_block: info must be a language word, got {info!r}")
    text = terminal_safe(text)
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}{info}\n{text}\n{fence}"


def md_inline(text: str) -> str:
    """text as Markdown for use within one line: renders as exactly the text, line breaks as spaces,
    surrounding whitespace trimmed (Markdown trims it anyway)."""
    text = terminal_safe(text).replace("\n", " ").replace("\t", " ").strip()
    text = _MARKUP.sub(r"\\\1", text)
    return _LINE_START.sub(lambda m: m.group()[:-1] + "\\" + m.group()[-1], text)
