"""The main window against the fake engine: start, stream, stop, settings, errors."""

from __future__ import annotations

import threading

from PySide6.QtCore import Qt, QUrl

from engine.api import SamplingParams


def wait_ready(qtbot, w, timeout=10000):
    if w.controller.model_info is None:
        with qtbot.waitSignal(w.controller.model_ready, timeout=timeout):
            pass


def test_window_starts_and_loads_default_models_in_worker(make_window, qtbot, fake_engine):
    w = make_window()
    assert w.isVisible()
    with qtbot.waitSignal(w.controller.model_ready, timeout=10000) as blocker:
        pass
    info = blocker.args[0]
    assert info["model"] == "fake-model"
    cfg = fake_engine.configs[-1]
    assert cfg.model.endswith("qwen2.5-coder-1.5b.gguf")  # the default target, via the locator
    from engine.session import pick_device

    # draft mode "auto": n-gram lookup on a GPU, none on the CPU; no draft model either way
    assert cfg.draft.mode == ("ngram" if pick_device("auto")[0] == "cuda" else "none")
    assert cfg.draft.path is None
    assert fake_engine.load_threads and "MainThread" not in fake_engine.load_threads  # off the GUI thread
    assert "Ready" in w.status_label.text()


def test_message_streams_and_is_stored(make_window, qtbot, fake_engine, store):
    w = make_window()
    wait_ready(qtbot, w)
    chunks = []
    w.controller.answer_text.connect(lambda t, m: chunks.append(t))
    with qtbot.waitSignal(w.controller.answer_finished, timeout=10000) as blocker:
        assert w.send("Add two numbers")
    msg, finished = blocker.args
    assert finished.stop_reason == "eos"
    assert msg.content == fake_engine.answer and msg.status == "complete"
    assert "".join(chunks) == fake_engine.answer
    msgs = store.messages(w.conversation_id)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[0].content == "Add two numbers" and msgs[1].content == fake_engine.answer
    assert store.conversation(w.conversation_id).title == "Add two numbers"
    # the engine saw the conversation as chat messages
    sent, params = fake_engine.sessions[-1].requests[-1]
    assert sent == [{"role": "user", "content": "Add two numbers"}]
    assert isinstance(params, SamplingParams)
    # markdown: the answer's code block is rendered with a copy link that copies the code
    widget = w.chat.widgets[-1]
    assert widget.code_blocks() == ["def add(a, b):\n    return a + b"]
    browser = next(b for b in widget.browsers if b.code_blocks)
    assert "copy:0" in browser.toHtml()
    browser.anchorClicked.emit(QUrl("copy:0"))
    from PySide6.QtGui import QGuiApplication

    assert QGuiApplication.clipboard().text() == "def add(a, b):\n    return a + b"
    # meter keeps the final figures and shows them under the answer
    assert float(w.meter.values["decode"].text()) > 0
    assert "tok/s" in widget.footer.text()


def test_system_prompt_is_sent(make_window, qtbot, fake_engine):
    w = make_window()
    wait_ready(qtbot, w)
    w.new_conversation()
    w.system_prompt.setText("You are terse.")
    with qtbot.waitSignal(w.controller.answer_finished, timeout=10000):
        w.send("hi")
    sent, _ = fake_engine.sessions[-1].requests[-1]
    assert sent[0] == {"role": "system", "content": "You are terse."}
    assert w.store.conversation(w.conversation_id).system_prompt == "You are terse."


def test_stop_mid_answer_keeps_partial(make_window, qtbot, fake_engine, store):
    fake_engine.answer = "word " * 2000
    fake_engine.token_delay = 0.005
    w = make_window()
    wait_ready(qtbot, w)
    with qtbot.waitSignal(w.controller.answer_text, timeout=10000):
        w.send("go")
    assert w.stop_button.isEnabled() and not w.send_button.isEnabled()
    with qtbot.waitSignal(w.controller.answer_finished, timeout=10000) as blocker:
        qtbot.mouseClick(w.stop_button, Qt.LeftButton)
    msg, finished = blocker.args
    assert finished.stop_reason == "cancelled"
    assert msg.status == "partial"
    assert 0 < len(msg.content) < len(fake_engine.answer)
    assert store.message(msg.id).content == msg.content
    assert w.send_button.isEnabled() and not w.stop_button.isEnabled()


def test_regenerate_and_edit_last_message(make_window, qtbot, fake_engine, store):
    w = make_window()
    wait_ready(qtbot, w)
    with qtbot.waitSignal(w.controller.answer_finished, timeout=10000):
        w.send("first")
    cid = w.conversation_id
    fake_engine.answer = "second answer"
    with qtbot.waitSignal(w.controller.answer_finished, timeout=10000):
        w.chat.widgets[-1].regenerate_button.click()
    msgs = store.messages(cid)
    assert [m.content for m in msgs] == ["first", "second answer"]
    user_widget = w.chat.widgets[0]
    assert user_widget.edit_button.isVisibleTo(w.chat)
    user_widget.edit_button.click()
    assert w.input.toPlainText() == "first"
    w.input.setPlainText("first, edited")
    fake_engine.answer = "third answer"
    with qtbot.waitSignal(w.controller.answer_finished, timeout=10000):
        qtbot.keyClick(w.input, Qt.Key_Return)
    assert [m.content for m in store.messages(cid)] == ["first, edited", "third answer"]
    sent, _ = fake_engine.sessions[-1].requests[-1]
    assert sent == [{"role": "user", "content": "first, edited"}]


def test_closing_mid_answer_stops_cleanly(make_window, qtbot, fake_engine, store):
    fake_engine.answer = "word " * 5000
    fake_engine.token_delay = 0.005
    w = make_window()
    wait_ready(qtbot, w)
    with qtbot.waitSignal(w.controller.answer_text, timeout=10000):
        w.send("go")
    w.close()
    assert not w.controller.thread.isRunning()
    assert fake_engine.sessions[-1].closed
    msgs = store.messages(w.conversation_id)
    assert msgs[-1].status == "partial" and msgs[-1].content
    assert threading.active_count() >= 1


def test_broken_model_shows_error_and_app_stays_usable(make_window, qtbot, fake_engine, tmp_path):
    w = make_window()
    wait_ready(qtbot, w)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf at all")
    w.settings_panel.model_path.setText(str(broken))
    with qtbot.waitSignal(w.controller.load_failed, timeout=10000) as blocker:
        assert w.settings_panel.apply()
    assert "not a valid GGUF" in blocker.args[0]
    assert w.banner.isVisible() and "not a valid GGUF" in w.banner.text()
    assert w.settings_panel.error.isVisible()
    # sending without a model gives a readable message, not a crash
    with qtbot.waitSignal(w.controller.answer_failed, timeout=10000) as blocker:
        w.send("hello?")
    assert "No model is loaded" in blocker.args[1]
    # and choosing a good model again works
    w.settings_panel.model_path.setText("")
    with qtbot.waitSignal(w.controller.model_ready, timeout=10000):
        assert w.settings_panel.apply()
    assert not w.banner.isVisible()


def test_out_of_memory_mid_answer_is_readable(make_window, qtbot, fake_engine):
    fake_engine.fail_after = 5
    w = make_window()
    wait_ready(qtbot, w)
    with qtbot.waitSignal(w.controller.answer_failed, timeout=10000) as blocker:
        w.send("go")
    msg, text = blocker.args
    assert text.startswith("Out of memory.")
    assert msg.status == "partial" and msg.content == fake_engine.answer[:15]
    assert w.banner.isVisible()


def test_missing_default_model_is_explained(make_window, qtbot, fake_engine):
    from engine.errors import TandemError

    def missing(name, progress=None):
        raise TandemError(f"The default model {name} is not installed. Run: bash packaging/setup_env.sh app")

    w = make_window(locator=missing, autoload=False)
    with qtbot.waitSignal(w.controller.load_failed, timeout=10000) as failed:
        w.controller.load(w.engine_settings)
    assert "qwen2.5-coder-1.5b is not installed" in failed.args[0]
    assert w.banner.isVisible() and "setup_env.sh" in w.banner.text()
    assert fake_engine.configs == []  # nothing was loaded
    # the app stays usable: conversations still work
    cid = w.new_conversation()
    w.rename_conversation(cid, "still works")
    assert w.store.conversation(cid).title == "still works"


def test_draft_with_another_vocabulary_is_explained(make_window, qtbot, fake_engine, tmp_path):
    w = make_window()
    wait_ready(qtbot, w)
    draft = tmp_path / "othervocab.gguf"
    draft.write_bytes(b"GGUF")
    p = w.settings_panel
    p.draft_mode.setCurrentIndex(p.draft_mode.findData("draft-model"))
    p.draft_path.setText(str(draft))
    with qtbot.waitSignal(w.controller.load_failed, timeout=10000) as failed:
        assert p.apply()
    assert "different vocabulary" in failed.args[0]
    assert p.error.text() == failed.args[0] and w.banner.isVisible()
    assert fake_engine.configs[-1].draft.path == str(draft)
