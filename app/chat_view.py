"""The chat view: one auto-height rich-text widget per message in a scroll area.

Only the streaming answer is re-rendered while tokens arrive, and only its tail: Markdown
blocks that can no longer change (everything before the last blank line outside a code
fence, `stable_prefix_end`) are frozen into their own rich-text segment once. An update
therefore costs about the size of the last block, not of the answer or the conversation.
"""

from __future__ import annotations

import logging
import math
from html import escape

from PySide6.QtCore import Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.markdown_render import MarkdownRenderer, drafted_mask, stable_prefix_end
from app.storage import Message

log = logging.getLogger(__name__)


def _dispose(widget: QWidget) -> None:
    # hide now: deleteLater waits for the event loop, and a removed widget would stay painted
    widget.hide()
    widget.deleteLater()


class MessageBrowser(QTextBrowser):
    """A QTextBrowser as tall as its document; `copy:N` links copy code block N."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.code_blocks: list[str] = []
        self._fitting = False
        self.setOpenLinks(False)
        self.setFrameShape(QFrame.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.viewport().setAutoFillBackground(False)
        self.setStyleSheet("QTextBrowser { background: transparent; }")
        self.anchorClicked.connect(self._on_anchor)
        self.document().documentLayout().documentSizeChanged.connect(lambda _s: self.fit_height())

    def set_rendered(self, html: str, code_blocks: list[str]) -> None:
        self.code_blocks = code_blocks
        self.setHtml(html)  # documentSizeChanged -> fit_height

    def copy_code_block(self, index: int) -> str:
        code = self.code_blocks[index]
        QGuiApplication.clipboard().setText(code)
        return code

    def _on_anchor(self, url: QUrl) -> None:
        if url.scheme() == "copy":
            try:
                self.copy_code_block(int(url.path()))
            except (ValueError, IndexError):
                log.warning("bad copy link %s", url.toString())
        elif url.scheme() in ("http", "https", "mailto"):
            QDesktopServices.openUrl(url)

    def fit_height(self) -> None:
        if self._fitting:  # setTextWidth re-lays out and reports a new size: one pass is enough
            return
        self._fitting = True
        try:
            doc = self.document()
            width = self.viewport().width()
            if width > 0 and doc.textWidth() != width:
                doc.setTextWidth(width)
            m = self.contentsMargins()
            h = int(math.ceil(doc.size().height())) + m.top() + m.bottom() + 2
            if h != self.height():
                self.setFixedHeight(h)
        finally:
            self._fitting = False

    def resizeEvent(self, event) -> None:  # noqa: ANN001, N802 (Qt override)
        super().resizeEvent(event)
        self.fit_height()


class MessageWidget(QFrame):
    edit_clicked = Signal(int)
    regenerate_clicked = Signal(int)

    def __init__(
        self, message: Message, renderer: MarkdownRenderer, tint: bool, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.message = message
        self.renderer = renderer
        self.tint = tint
        self.text = message.content
        self.mask = drafted_mask(len(message.content), message.meta.get("drafted", []))
        self.setObjectName("userBubble" if message.role == "user" else "assistantBubble")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 6)
        layout.setSpacing(2)
        header = QHBoxLayout()
        role = QLabel({"user": "You", "assistant": "Assistant"}.get(message.role, message.role))
        role.setObjectName("roleLabel")
        header.addWidget(role)
        header.addStretch(1)
        self.copy_button = self._tool_button("Copy", "Copy this message as Markdown", self._copy_message)
        self.edit_button = self._tool_button(
            "Edit", "Edit and resend this message", lambda: self.edit_clicked.emit(self.message.id)
        )
        self.regenerate_button = self._tool_button(
            "Regenerate", "Generate this answer again", lambda: self.regenerate_clicked.emit(self.message.id)
        )
        for b in (self.copy_button, self.edit_button, self.regenerate_button):
            header.addWidget(b)
        self.edit_button.setVisible(False)
        self.regenerate_button.setVisible(False)
        layout.addLayout(header)
        # frozen segments (finished Markdown blocks), then the live tail while streaming
        self._body = QVBoxLayout()
        self._body.setSpacing(0)
        layout.addLayout(self._body)
        self.browsers: list[MessageBrowser] = []
        self.frozen_upto = 0  # characters of self.text rendered into frozen segments
        self.footer = QLabel("")
        self.footer.setObjectName("messageFooter")
        self.footer.setVisible(False)
        layout.addWidget(self.footer)
        self.render(incremental=False)
        self.set_footer_from_meta()

    def _tool_button(self, text: str, tip: str, slot) -> QToolButton:  # noqa: ANN001
        b = QToolButton(self)
        b.setText(text)
        b.setToolTip(tip)
        b.setAutoRaise(True)
        b.clicked.connect(slot)
        return b

    def _copy_message(self) -> None:
        QGuiApplication.clipboard().setText(self.text)

    def _new_browser(self) -> MessageBrowser:
        b = MessageBrowser(self)
        self._body.addWidget(b)
        b.show()  # a layout shows a new child only at the next event-loop turn
        self.browsers.append(b)
        return b

    def _clear_browsers(self) -> None:
        for b in self.browsers:
            self._body.removeWidget(b)
            _dispose(b)
        self.browsers = []
        self.frozen_upto = 0

    def _render_into(self, browser: MessageBrowser, start: int, end: int) -> None:
        mask = self.mask[start:end] if self.tint else None
        rendered = self.renderer.render(self.text[start:end], mask)
        browser.set_rendered(rendered.html, rendered.code_blocks)

    def render(self, incremental: bool) -> None:
        """Render the text. While streaming (`incremental`), Markdown blocks that can no longer
        change are frozen into their own segment once, and only the tail is re-rendered."""
        if self.message.role == "user":
            # the user's text is shown as typed (Markdown would eat their line breaks)
            if not self.browsers:
                self._new_browser()
            self.browsers[0].set_rendered(f'<p style="white-space: pre-wrap;">{escape(self.text)}</p>', [])
            return
        if not incremental:
            self._clear_browsers()
        if not self.browsers:
            self._new_browser()  # the tail
        tail = self.browsers[-1]
        cut = stable_prefix_end(self.text)
        if cut > self.frozen_upto:
            frozen = tail
            self._render_into(frozen, self.frozen_upto, cut)
            self.frozen_upto = cut
            tail = self._new_browser()
        self._render_into(tail, self.frozen_upto, len(self.text))
        tail.setVisible(self.frozen_upto < len(self.text) or len(self.browsers) == 1)

    def code_blocks(self) -> list[str]:
        return [c for b in self.browsers for c in b.code_blocks]

    def html(self) -> str:
        return "".join(b.toHtml() for b in self.browsers)

    def set_footer(self, text: str) -> None:
        self.footer.setText(text)
        self.footer.setVisible(bool(text))

    def set_footer_from_meta(self) -> None:
        parts = []
        if self.message.status == "partial":
            parts.append("stopped before the end")
        if self.message.meta.get("summary"):
            parts.append(self.message.meta["summary"])
        if self.message.meta.get("error"):
            parts.append("error: " + self.message.meta["error"])
        self.set_footer(" · ".join(parts))


class ChatView(QScrollArea):
    edit_requested = Signal(int)  # user message id
    regenerate_requested = Signal(int)  # assistant message id

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self._container = QWidget()
        self._layout = QVBoxLayout(self._container)
        self._layout.setContentsMargins(12, 12, 12, 12)
        self._layout.setSpacing(10)
        self._layout.addStretch(1)
        self.setWidget(self._container)
        self.renderer = MarkdownRenderer(dark=False)
        self.tint = False
        self.widgets: list[MessageWidget] = []
        self.streaming: MessageWidget | None = None
        self._stick_to_bottom = True
        self._render_pending = False
        self.verticalScrollBar().rangeChanged.connect(self._on_range_changed)
        self.verticalScrollBar().valueChanged.connect(self._on_scrolled)

    # content
    def set_messages(self, messages: list[Message]) -> None:
        self.clear()
        for m in messages:
            self._add_widget(m)
        self._update_buttons()
        self._stick_to_bottom = True

    def sync_messages(self, messages: list[Message]) -> None:
        """Show `messages`, keeping the widgets of an unchanged leading run (cheap on send)."""
        keep = 0
        for w, m in zip(self.widgets, messages, strict=False):
            if w.message.id != m.id or w.text != m.content or w.message.status != m.status:
                break
            keep += 1
        for w in self.widgets[keep:]:
            self._layout.removeWidget(w)
            _dispose(w)
        self.widgets = self.widgets[:keep]
        self.streaming = None
        for m in messages[keep:]:
            self._add_widget(m)
        self._update_buttons()
        self._stick_to_bottom = True

    def clear(self) -> None:
        for w in self.widgets:
            self._layout.removeWidget(w)
            _dispose(w)
        self.widgets = []
        self.streaming = None

    def add_message(self, message: Message) -> MessageWidget:
        w = self._add_widget(message)
        self._update_buttons()
        self._stick_to_bottom = True
        return w

    def _add_widget(self, message: Message) -> MessageWidget:
        w = MessageWidget(message, self.renderer, self.tint, self._container)
        w.edit_clicked.connect(self.edit_requested)
        w.regenerate_clicked.connect(self.regenerate_requested)
        self._layout.insertWidget(self._layout.count() - 1, w)
        self.widgets.append(w)
        return w

    def _update_buttons(self) -> None:
        last_user = next((w for w in reversed(self.widgets) if w.message.role == "user"), None)
        last = self.widgets[-1] if self.widgets else None
        for w in self.widgets:
            w.edit_button.setVisible(w is last_user and self.streaming is None)
            w.regenerate_button.setVisible(
                w is last and w.message.role == "assistant" and self.streaming is None
            )

    # streaming
    def begin_stream(self, message: Message) -> MessageWidget:
        w = self.add_message(message)
        self.streaming = w
        self._update_buttons()
        return w

    def append_stream(self, text: str, mask: bytes) -> None:
        w = self.streaming
        if w is None:
            return
        w.text += text
        w.mask += mask
        if not self._render_pending:  # several queued updates -> one render
            self._render_pending = True
            QTimer.singleShot(0, self._render_stream)

    def _render_stream(self) -> None:
        self._render_pending = False
        if self.streaming is not None:
            self.streaming.render(incremental=True)

    def end_stream(self, message: Message) -> None:
        w = self.streaming
        self.streaming = None
        self._render_pending = False
        if w is None:
            return
        w.message = message
        mask = drafted_mask(len(message.content), message.meta.get("drafted", []))
        if message.content != w.text or (w.tint and mask != w.mask):
            w.text, w.mask = message.content, mask
            w.render(incremental=False)
        else:
            w.render(incremental=True)  # only the tail, if anything is pending
        w.set_footer_from_meta()
        self._update_buttons()

    # appearance
    def set_tint(self, on: bool) -> None:
        self.tint = on
        for w in self.widgets:
            w.tint = on
            w.render(incremental=False)

    def set_dark(self, dark: bool) -> None:
        self.renderer = MarkdownRenderer(dark=dark)
        for w in self.widgets:
            w.renderer = self.renderer
            w.render(incremental=False)

    # scrolling: follow the answer while the view is at the bottom
    def _on_scrolled(self, value: int) -> None:
        bar = self.verticalScrollBar()
        self._stick_to_bottom = value >= bar.maximum() - 8

    def _on_range_changed(self, _lo: int, hi: int) -> None:
        if self._stick_to_bottom:
            self.verticalScrollBar().setValue(hi)
