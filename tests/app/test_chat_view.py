"""ChatView: streaming into frozen segments + a live tail, final re-render, sync on send."""

from __future__ import annotations

from app.chat_view import ChatView, MessageBrowser
from app.storage import Message


def visible_text(widget) -> str:
    """Text of every visible rich-text child, including any removed but not yet deleted."""
    return "\n".join(b.toPlainText() for b in widget.findChildren(MessageBrowser) if b.isVisibleTo(widget))


def msg(mid: int, role: str, content: str, status: str = "complete") -> Message:
    return Message(mid, 1, role, content, status, 0.0, {})


def test_streaming_freezes_finished_blocks_and_final_text_shows_once(qtbot):
    view = ChatView()
    qtbot.addWidget(view)
    view.resize(600, 400)
    view.show()
    w = view.begin_stream(msg(1, "assistant", "", "streaming"))
    parts = ["First para", "graph.\n\n```python\nx = 1\n", "\ny = 2\n```\n\nLast ", "words"]
    for p in parts:
        view.append_stream(p, bytes(len(p)))
        qtbot.waitUntil(lambda: not view._render_pending, timeout=2000)
    assert w.text == "".join(parts)
    assert w.frozen_upto == w.text.index("Last")  # the paragraph and the fenced block are frozen
    assert len(w.browsers) >= 2
    assert w.code_blocks() == ["x = 1\n\ny = 2"]
    # the final message differs from what streamed (the engine's final text wins): shown once, fully
    final = w.text + " and more."
    view.end_stream(msg(1, "assistant", final))
    text = visible_text(w)
    assert text.count("First paragraph.") == 1 and text.count("Last words and more.") == 1
    assert view.streaming is None


def test_sync_keeps_unchanged_widgets(qtbot):
    view = ChatView()
    qtbot.addWidget(view)
    view.set_messages([msg(1, "user", "q1"), msg(2, "assistant", "a1")])
    first = view.widgets[0]
    view.sync_messages([msg(1, "user", "q1"), msg(2, "assistant", "a1"), msg(3, "user", "q2")])
    assert view.widgets[0] is first and len(view.widgets) == 3
    view.sync_messages([msg(1, "user", "q1 edited")])  # an edit replaces from the changed message on
    assert len(view.widgets) == 1 and view.widgets[0] is not first
    assert view.widgets[0].edit_button.isVisibleTo(view.widgets[0])


def test_user_text_is_not_markdown(qtbot):
    view = ChatView()
    qtbot.addWidget(view)
    view.set_messages([msg(1, "user", "# not a heading\n*literal* <b>")])
    assert view.widgets[0].browsers[0].toPlainText() == "# not a heading\n*literal* <b>"
