"""Markdown -> Qt rich-text HTML, with pygments-highlighted code blocks and copy links.

Model output is parsed with markdown-it (CommonMark + tables, raw HTML disabled so a
model cannot inject markup). Each fenced block becomes a one-cell table with a header
holding the language and a `copy:N` link; the chat view turns a click on it into a
clipboard copy of `RenderedMarkdown.code_blocks[N]`.

Accepted draft tokens are tinted after rendering: the visible characters of the HTML are
aligned with the source text (rendering only removes syntax characters, so the visible
text is, in order, a subsequence of the source), and runs whose source characters were
drafted get a background colour. Putting markers into the source instead would break the
syntax that drafts often produce (a drafted "```" would no longer open a fence).
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache

from markdown_it import MarkdownIt
from pygments.lexers import get_lexer_by_name
from pygments.styles import get_style_by_name
from pygments.util import ClassNotFound

log = logging.getLogger(__name__)

LIGHT_CODE_STYLE = "default"
DARK_CODE_STYLE = "monokai"
_TAG_OR_TEXT = re.compile(r"(<[^>]*>)")
_HEADER_START, _HEADER_END = (
    "<!--header-->",
    "<!--/header-->",
)  # tinting skips the text of a code block's header
_ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")


@dataclass
class RenderedMarkdown:
    html: str
    code_blocks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Palette:
    code_background: str
    code_border: str
    code_header: str
    draft_tint: str
    code_style: str


LIGHT = Palette("#f6f8fa", "#d0d7de", "#57606a", "#fff3b0", LIGHT_CODE_STYLE)
DARK = Palette("#272822", "#444444", "#a0a0a0", "#5a4a12", DARK_CODE_STYLE)


@lru_cache(maxsize=4)
def _style_table(style_name: str) -> dict:
    style = get_style_by_name(style_name)
    return {ttype: s for ttype, s in style}


def _span_style(s: dict) -> str:
    parts = []
    if s.get("color"):
        parts.append(f"color:#{s['color']}")
    if s.get("bold"):
        parts.append("font-weight:bold")
    if s.get("italic"):
        parts.append("font-style:italic")
    return ";".join(parts)


@lru_cache(maxsize=64)
def _lexer(lang: str):  # noqa: ANN202
    try:
        return get_lexer_by_name(lang, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


COMMON_LANGUAGES = (
    "python",
    "javascript",
    "typescript",
    "c",
    "cpp",
    "rust",
    "go",
    "java",
    "bash",
    "json",
    "html",
    "css",
    "sql",
    "yaml",
    "toml",
    "markdown",
    "diff",
    "text",
)


def warm_lexers() -> None:
    """Import the lexers of common languages (call off the GUI thread: imports take ~10-40 ms each)."""
    for lang in COMMON_LANGUAGES:
        _lexer(lang)
    for name in ("default", "monokai"):
        _style_table(name)


def highlight_code(code: str, lang: str, palette: Palette) -> str:
    """HTML spans (inline styles) for `code`; plain escaped text when no lexer fits."""
    # No guessing for unlabeled blocks: pygments' guess_lexer imports every lexer (seconds)
    lexer = _lexer(lang.lower()) if lang else None
    if lexer is None:
        return html.escape(code, quote=False)
    table = _style_table(palette.code_style)
    out = []
    for ttype, value in lexer.get_tokens(code):
        t = ttype
        while t not in table and t.parent is not None:
            t = t.parent
        css = _span_style(table.get(t, {}))
        text = html.escape(value, quote=False)
        out.append(f'<span style="{css}">{text}</span>' if css and text else text)
    return "".join(out)


class MarkdownRenderer:
    def __init__(self, dark: bool = False) -> None:
        self.palette = DARK if dark else LIGHT
        self._md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
        # markdown-it binds rule functions to its renderer, so these take the renderer first.
        fence = lambda _renderer, tokens, idx, _options, env: self._fence_html(tokens[idx], env)
        self._md.add_render_rule("fence", fence)
        self._md.add_render_rule("code_block", fence)
        table = lambda *_: '<table border="1" cellspacing="0" cellpadding="4">\n'
        self._md.add_render_rule("table_open", table)

    def render(self, text: str, drafted: bytes | bytearray | None = None) -> RenderedMarkdown:
        """`drafted[i]` (one byte per character of `text`) = 1 tints that character."""
        return self._render_part(text, drafted, [])

    def _render_part(
        self, text: str, drafted: bytes | bytearray | None, blocks: list[str]
    ) -> RenderedMarkdown:
        env: dict = {"code_blocks": blocks}
        body = self._md.render(text, env) if text else ""
        if drafted is not None and any(drafted):
            body = tint_drafted(body, text, drafted, self.palette.draft_tint)
        return RenderedMarkdown(body, env["code_blocks"])

    def _fence_html(self, token, env: dict) -> str:  # noqa: ANN001 (a markdown-it Token)
        code = token.content
        lang = (token.info or "").strip().split(" ")[0] if token.type == "fence" else ""
        blocks: list[str] = env["code_blocks"]
        n = len(blocks)
        blocks.append(code.rstrip("\n"))
        p = self.palette
        label = html.escape(lang) if lang else "code"
        body = highlight_code(code.rstrip("\n"), lang, p)
        return (
            f'<table width="100%" cellspacing="0" cellpadding="6" '
            f'style="background-color:{p.code_background}; border: 1px solid {p.code_border};">'
            f'<tr><td>{_HEADER_START}<span style="color:{p.code_header};">{label}</span>&nbsp;&nbsp;'
            f'<a href="copy:{n}">Copy</a>{_HEADER_END}</td></tr>'
            f"<tr><td><pre>{body}</pre></td></tr></table>\n"
        )


_FENCE = re.compile(r" {0,3}(```|~~~)")


def stable_prefix_end(text: str) -> int:
    """End of the last blank line outside a code fence that is followed by an unindented line."""
    pos, best, in_fence, prev_blank = 0, 0, False, False
    for line in text.splitlines(keepends=True):
        if not in_fence and prev_blank and line[:1] not in (" ", "\t", "\n", "\r") and pos > 0:
            best = pos
        if _FENCE.match(line):
            in_fence = not in_fence
        prev_blank = not in_fence and line.strip() == ""
        pos += len(line)
    return best


def drafted_mask(length: int, spans: list[list[int]] | list[tuple[int, int]]) -> bytearray:
    """Per-character mask from [start, end) spans (as stored with a message)."""
    mask = bytearray(length)
    for start, end in spans:
        start, end = max(0, start), min(length, end)
        if end > start:
            mask[start:end] = b"\x01" * (end - start)
    return mask


def mask_to_spans(mask: bytes | bytearray) -> list[list[int]]:
    spans: list[list[int]] = []
    start = None
    for i, b in enumerate(mask):
        if b and start is None:
            start = i
        elif not b and start is not None:
            spans.append([start, i])
            start = None
    if start is not None:
        spans.append([start, len(mask)])
    return spans


def tint_drafted(body: str, source: str, drafted: bytes | bytearray, colour: str, window: int = 64) -> str:
    """Wrap visible runs of `body` whose aligned source characters are drafted in a tinted span."""
    j = 0  # position in source
    out: list[str] = []
    open_tag, close_tag = f'<span style="background-color:{colour};">', "</span>"
    skipping = False  # inside a code block's header ("python  Copy"), which is not in the source
    for piece in _TAG_OR_TEXT.split(body):
        if not piece:
            continue
        if piece.startswith("<"):
            out.append(piece)
            if piece == _HEADER_END:
                skipping = False
            elif piece == _HEADER_START:
                skipping = True
            continue
        if skipping:
            out.append(piece)
            continue
        state = False
        run: list[str] = []
        for unit, char in _text_units(piece):
            if char.isspace():
                if j < len(source) and source[j].isspace():
                    tinted = bool(drafted[j]) if j < len(drafted) else False
                    j += 1
                else:  # whitespace the renderer added: keep the run going
                    tinted = state
            else:
                k = source.find(char, j, j + window)
                if k >= 0:
                    j = k + 1
                    tinted = bool(drafted[k]) if k < len(drafted) else False
                else:
                    tinted = False
            if tinted != state:
                out.append("".join(run))
                run = []
                out.append(open_tag if tinted else close_tag)
                state = tinted
            run.append(unit)
        out.append("".join(run))
        if state:
            out.append(close_tag)
    return "".join(out)


def _text_units(text: str):  # noqa: ANN202
    """(html unit, visible character) pairs; an entity is one unit."""
    i = 0
    while i < len(text):
        if text[i] == "&":
            m = _ENTITY.match(text, i)
            if m:
                yield m.group(0), html.unescape(m.group(0))
                i = m.end()
                continue
        yield text[i], text[i]
        i += 1
