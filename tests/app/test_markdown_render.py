"""Markdown rendering: highlighted code blocks with copy links, escaping, draft tinting."""

from __future__ import annotations

import re

from app.markdown_render import MarkdownRenderer, drafted_mask, mask_to_spans, stable_prefix_end, tint_drafted

TINT = "background-color:#fff3b0;"


def visible(html: str) -> str:
    import html as h

    return h.unescape(re.sub(r"<[^>]*>", "", html))


def tinted_text(html: str) -> str:
    """The text inside tint spans (tint spans never contain tags)."""
    import html as h

    return "".join(
        h.unescape(m) for m in re.findall(r'<span style="' + re.escape(TINT) + r'">([^<]*)</span>', html)
    )


def test_code_block_is_highlighted_with_a_copy_link():
    r = MarkdownRenderer()
    out = r.render("Text\n\n```python\ndef f(x):\n    return x < 1\n```\n\n```\nplain\n```\n")
    assert out.code_blocks == ["def f(x):\n    return x < 1", "plain"]
    assert 'href="copy:0"' in out.html and 'href="copy:1"' in out.html
    # pygments' default style colours the keyword "def" green and bold
    assert '<span style="color:#008000;font-weight:bold">def</span>' in out.html
    assert "return x < 1" in visible(out.html)


def test_model_output_cannot_inject_html():
    out = MarkdownRenderer().render('<img src="x"> <a href="copy:0">evil</a> **b**')
    assert "<img" not in out.html and "&lt;img" in out.html
    assert 'href="copy:0"' not in out.html
    assert "<strong>b</strong>" in out.html


def test_tint_marks_exactly_the_drafted_characters():
    src = "Some **bold** words and `code`."
    start = src.index("bold")
    mask = drafted_mask(len(src), [[start, start + 4], [src.index("code"), src.index("code") + 4]])
    out = MarkdownRenderer().render(src, mask)
    assert tinted_text(out.html) == "boldcode"
    assert visible(out.html).strip() == "Some bold words and code."


def test_tint_inside_code_block_skips_the_header():
    src = "```python\nx = 1\ny = 2\n```\n"
    s = src.index("y = 2")
    out = MarkdownRenderer().render(src, drafted_mask(len(src), [[s, s + 5]]))
    assert tinted_text(out.html).replace(" ", "") == "y=2"  # x = 1 and the header stay plain
    assert "Copy</a>" in out.html  # header untouched


def test_split_at_stable_prefix_renders_like_the_whole():
    r = MarkdownRenderer()
    text = "# Title\n\nPara one.\n\n```python\na = 1\n\nb = 2\n```\n\nPara two with *em*"
    cut = stable_prefix_end(text)
    assert cut == text.index("Para two")
    head, tail = r.render(text[:cut]), r.render(text[cut:])
    full = r.render(text)
    assert head.code_blocks + tail.code_blocks == full.code_blocks == ["a = 1\n\nb = 2"]
    assert visible(head.html + tail.html) == visible(full.html)
    # an open fence is never split
    open_fence = "Intro\n\n```python\nx = 1\n\ny = 2\n"
    assert stable_prefix_end(open_fence) == open_fence.index("```")


def test_mask_spans_roundtrip():
    mask = bytearray(b"\x00\x01\x01\x00\x01")
    assert mask_to_spans(mask) == [[1, 3], [4, 5]]
    assert drafted_mask(5, mask_to_spans(mask)) == mask


def test_tint_handles_entities():
    src = "a & b"
    html = tint_drafted("<p>a &amp; b</p>", src, drafted_mask(5, [[2, 3]]), "#fff3b0")
    assert tinted_text(html) == "&"
