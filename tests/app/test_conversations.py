"""Conversations: restart survival, search, rename/delete, export."""

from __future__ import annotations

import json

from PySide6.QtCore import QSettings

from app.conversation_list import ROLE_ID
from app.storage import ChatStore


def wait_ready(qtbot, w):
    if w.controller.model_info is None:
        with qtbot.waitSignal(w.controller.model_ready, timeout=10000):
            pass


def chat(qtbot, w, text):
    with qtbot.waitSignal(w.controller.answer_finished, timeout=10000) as b:
        w.send(text)
    return b.args[0]


def test_conversations_survive_restart(make_window, qtbot, fake_engine, tmp_path):
    db, ini = tmp_path / "restart.sqlite3", str(tmp_path / "restart.ini")
    store1 = ChatStore(db)
    w = make_window(store_=store1, settings_=QSettings(ini, QSettings.IniFormat))
    wait_ready(qtbot, w)
    chat(qtbot, w, "about apples")
    first = w.conversation_id
    w.new_conversation()
    w.system_prompt.setText("Speak like a pirate.")
    chat(qtbot, w, "about bananas")
    second = w.conversation_id
    w.open_conversation(first)  # the last-open conversation is restored
    w.close()
    store1.close()

    store2 = ChatStore(db)
    w2 = make_window(store_=store2, settings_=QSettings(ini, QSettings.IniFormat))
    assert w2.conversation_id == first
    assert w2.conversations.list.count() == 2
    assert [m.content for m in store2.messages(first)] == ["about apples", fake_engine.answer]
    assert store2.conversation(second).system_prompt == "Speak like a pirate."
    assert [wd.message.content for wd in w2.chat.widgets] == ["about apples", fake_engine.answer]
    w2.close()
    store2.close()


def test_search_finds_a_message(make_window, qtbot, fake_engine):
    w = make_window()
    wait_ready(qtbot, w)
    chat(qtbot, w, "tell me about zebras")
    zebra = w.conversation_id
    w.new_conversation()
    chat(qtbot, w, "and now giraffes")
    w.conversations.search.setText("ZEBRA")
    qtbot.waitUntil(lambda: w.conversations.hit_count() > 0, timeout=5000)
    items = [w.conversations.list.item(i) for i in range(w.conversations.list.count())]
    assert len(items) == 2  # the title and the message
    assert [it.data(ROLE_ID) for it in items] == [zebra, zebra], [it.text() for it in items]
    w.conversations.list.setCurrentRow(1)
    assert w.conversation_id == zebra
    # a search inside the answer text works too, and a miss gives nothing
    w.conversations.search.setText("return a + b")
    qtbot.waitUntil(lambda: w.conversations.hit_count() == 2, timeout=5000)
    w.conversations.search.setText("no such text 100%")
    qtbot.waitUntil(lambda: w.conversations.shown_query == "no such text 100%", timeout=5000)
    assert w.conversations.list.count() == 0


def test_rename_delete_export(make_window, qtbot, fake_engine, tmp_path):
    w = make_window()
    wait_ready(qtbot, w)
    chat(qtbot, w, "hello there")
    cid = w.conversation_id
    w.rename_conversation(cid, "Greetings")
    assert w.conversations.list.item(0).text() == "Greetings"
    md = w.export_conversation(cid, str(tmp_path / "out.md"))
    text = md.read_text()
    assert text.startswith("# Greetings\n") and "## User\n\nhello there" in text and "```python" in text
    js = json.loads(w.export_conversation(cid, str(tmp_path / "out.json")).read_text())
    assert js["title"] == "Greetings"
    assert [m["role"] for m in js["messages"]] == ["user", "assistant"]
    assert js["messages"][1]["content"] == fake_engine.answer and js["messages"][1]["stats"]["new_tokens"] > 0
    w.delete_conversation(cid, confirm=False)
    assert w.store.conversation(cid) is None and w.store.messages(cid) == []
    assert w.conversations.list.count() == 0 and w.chat.widgets == []
