"""ChatStore: WAL, per-message writes, partial answers after a crash, search."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

from app.storage import ChatStore


def test_wal_mode_and_roundtrip(tmp_path):
    db = tmp_path / "c.sqlite3"
    s = ChatStore(db)
    conv = s.create_conversation("T", "sys")
    m = s.add_message(conv.id, "user", "hi")
    s.add_message(conv.id, "assistant", "hello", meta={"drafted": [[0, 2]]})
    s.close()
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = raw.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()
    assert rows == [("user", "hi", "complete"), ("assistant", "hello", "complete")]
    raw.close()
    s = ChatStore(db)
    assert [x.content for x in s.messages(conv.id)] == ["hi", "hello"]
    assert s.messages(conv.id)[1].meta == {"drafted": [[0, 2]]}
    assert s.message(m.id).role == "user"
    assert s.conversation(conv.id).system_prompt == "sys"
    s.close()


def test_answer_of_a_killed_process_is_kept_as_partial(tmp_path):
    """A child process writes a streaming answer and dies without closing: the text survives."""
    db = tmp_path / "crash.sqlite3"
    code = textwrap.dedent(f"""
        import os
        from app.storage import ChatStore
        s = ChatStore({str(db)!r})
        c = s.create_conversation("crash")
        s.add_message(c.id, "user", "question")
        a = s.add_message(c.id, "assistant", "", status="streaming")
        s.update_message(a.id, "half an ans")
        os._exit(9)  # no close, no cleanup
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert r.returncode == 9
    s = ChatStore(db)
    conv = s.conversations()[0]
    msgs = s.messages(conv.id)
    assert [(m.role, m.content, m.status) for m in msgs] == [
        ("user", "question", "complete"),
        ("assistant", "half an ans", "partial"),
    ]
    s.close()


def test_search_is_substring_case_insensitive_and_escapes_wildcards(tmp_path):
    s = ChatStore(tmp_path / "s.sqlite3")
    a = s.create_conversation("Cooking")
    s.add_message(a.id, "user", "How long do I boil an EGG?")
    b = s.create_conversation("Maths")
    s.add_message(b.id, "assistant", "50% of 10 is 5; a_b is a name")
    hits = s.search("egg")
    assert [(h.conversation_id, h.message_id is not None) for h in hits] == [(a.id, True)]
    assert "EGG" in hits[0].snippet
    assert [h.conversation_id for h in s.search("cook")] == [a.id]  # title hit
    assert len(s.search("50%")) == 1 and s.search("5%") == []  # % is literal
    assert len(s.search("a_b")) == 1 and s.search("a_c") == []  # _ is literal
    assert s.search("   ") == []
    s.close()


def test_delete_cascades_and_delete_from(tmp_path):
    s = ChatStore(tmp_path / "d.sqlite3")
    c = s.create_conversation()
    ids = [s.add_message(c.id, r, t).id for r, t in [("user", "1"), ("assistant", "2"), ("user", "3")]]
    s.delete_messages_from(c.id, ids[1])
    assert [m.content for m in s.messages(c.id)] == ["1"]
    s.delete_conversation(c.id)
    assert s.messages(c.id) == [] and s.conversations() == []
    s.close()
