"""rlcd.text: untrusted text (model outputs, prompts, names read from files) stays text in Markdown, HTML and
terminals, whatever it holds. Checked by parsing the Markdown back with markdown-it-py (CommonMark plus GFM
tables and strikethrough, as GitHub renders report.md)."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rlcd.text import code_block, md_inline, terminal_safe

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces of what a hostile output holds; mixed with arbitrary characters (lone surrogates are refused on reading).
HOSTILE = ["`", "```", "````", "~~~", "\n```\n", "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "</details>",
           "<!--", "# heading", "\n# heading\n", "\n## x", "heading\n===", "|", "\\|", "\\", "&lt;", "&amp;", "&#60;script&#62;",
           "\x1b[31m", "\x1b]0;title\x07", "\x1b[2J", "\r", "\r\n", "\x00", "\x7f", "\x85", "\x9b", "\n", "\t", "    ", "- ", "1. ",
           "> ", "---", "[a](javascript:alert(1))", "![i](x.png)", "[x]: http://e", "**", "_", "~~", "<http://e>", "$x$", " ",
           "\u00a0", "\u2028", "é", "😀"]
hostile = st.lists(st.one_of(st.sampled_from(HOSTILE), st.integers(1, 12).map(lambda n: "`" * n),
                             st.text(st.characters(blacklist_categories=("Cs",)), max_size=4)), max_size=12).map("".join)
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def markdown_parser():
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py parses the Markdown back (pip install markdown-it-py)")
    return markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])


def text_of(inline) -> str:
    """The rendered text of an inline token whose children are all plain text (else an AssertionError)."""
    assert {c.type for c in inline.children} <= {"text", "text_special"}, [(c.type, c.content) for c in inline.children]
    return "".join(c.content for c in inline.children)


def one_line(text: str) -> str:
    """What md_inline shows: the text with controls escaped, on one line, trimmed."""
    return terminal_safe(text).replace("\n", " ").replace("\t", " ").strip()


def test_terminal_safe_shows_controls_as_their_escapes():
    assert terminal_safe("ok\x1b[31mred\x1b[0m\r\nnext\rover\x00\x7f\x9b\ttab") == "ok\\x1b[31mred\\x1b[0m\nnext\\rover\\x00\\x7f\\x9b\ttab"
    assert terminal_safe("a\nfake log line\tx\r\n", one_line=True) == "a\\nfake log line\\tx\\n"


@FUZZ
@given(hostile)
def test_terminal_safe_leaves_no_control_but_newline_and_tab(text):
    shown = terminal_safe(text)
    assert not CONTROL.search(shown)
    assert shown == text if not CONTROL.search(text) else shown != text
    assert len((terminal_safe(text, one_line=True) + "x").splitlines()) == 1


def test_code_block_fence_outgrows_every_backtick_run():
    assert code_block("a ``` b ````` c") == "``````text\na ``` b ````` c\n``````"
    assert code_block("plain", "yaml") == "```yaml\nplain\n```"
    with pytest.raises(ValueError):
        code_block("x", "text`\n# heading")


@FUZZ
@example("```\n<script>alert(1)</script>\n# heading\n```", "")  # the case: an output closing its fence
@example("````\n```\n\r# heading", "- item\n\n")
@given(hostile, st.sampled_from(["", "before\n\n", "- item\n\n", "| a |\n|---|\n| b |\n\n"]))
def test_code_block_is_one_code_node_holding_exactly_the_text(text, before):
    tokens = markdown_parser().parse(before + code_block(text) + "\n\nafter\n")
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1 and fences[0].content == terminal_safe(text) + "\n"
    assert not any(t.type.startswith(("html", "heading")) for t in tokens)
    assert tokens[-2].type == "inline" and tokens[-2].content == "after"  # the block closed where it should


def test_md_inline_escapes_markup_and_keeps_numbers_readable():
    assert md_inline("<script>x</script> | # h\n- y") == r"\<script\>x\</script\> \| \# h - y"
    assert md_inline("- item") == r"\- item" and md_inline("1. item") == r"1\. item" and md_inline("---") == r"\---"
    assert md_inline("-0.200") == "-0.200" and md_inline("62.5% [55.0, 70.0]") == r"62.5% \[55.0, 70.0]"


@FUZZ
@example("a\r# heading\n## x | y <script>")
@example("\\|")
@given(hostile)
def test_md_inline_renders_as_exactly_the_text_in_a_cell_a_list_a_heading_and_bold(text):
    md = markdown_parser()
    shown, want = md_inline(text), one_line(text)
    assert "\n" not in shown and "\r" not in shown
    tokens = md.parse(f"| h | n |\n|---|---|\n| {shown} | 1 |\n")
    assert [text_of(t) for t in tokens if t.type == "inline"] == ["h", "n", want, "1"]
    tokens = md.parse(f"- {shown}\n- next\n")
    assert [t.type for t in tokens].count("list_item_open") == 2
    assert [text_of(t) for t in tokens if t.type == "inline"] == [want, "next"][not want:]  # an empty item has no text
    tokens = md.parse(f"# {shown}\n\nafter\n")
    assert [t.type for t in tokens] == ["heading_open", "inline", "heading_close", "paragraph_open", "inline", "paragraph_close"]
    assert text_of(tokens[1]) == want
    if want:
        children = [c for c in md.parse(f"**{shown}** x\n")[1].children if c.content or c.type != "text"]
        assert [c.type for c in children] == ["strong_open", "text", "strong_close", "text"]
        assert [c.content for c in children] == ["", want, "", " x"]
