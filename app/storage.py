"""Conversations and messages in SQLite (WAL), written one message at a time.

An assistant answer is inserted with status "streaming" when it starts, its content is
updated while it streams, and it is marked "complete" (or "partial" when stopped) at the
end. A row still marked "streaming" when the store is opened belonged to a run that died
mid-answer: it is kept and marked "partial".
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'complete',
    created REAL NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""

STATUSES = ("complete", "streaming", "partial")


@dataclass
class Conversation:
    id: int
    title: str
    system_prompt: str
    created: float
    updated: float


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str  # system | user | assistant
    content: str
    status: str  # complete | streaming | partial
    created: float
    meta: dict = field(default_factory=dict)  # stats of an answer, drafted character spans


@dataclass
class SearchHit:
    conversation_id: int
    conversation_title: str
    message_id: int | None  # None when the title matched
    snippet: str


class ChatStore:
    """One SQLite file; every call commits. Used from the GUI thread only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.warning("SQLite refused WAL mode (got %s) for %s", mode, self.path)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        n = self._db.execute("UPDATE messages SET status='partial' WHERE status='streaming'").rowcount
        if n:
            log.info("kept %d answer(s) interrupted by an earlier exit as partial", n)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    # conversations
    def create_conversation(self, title: str = "New chat", system_prompt: str = "") -> Conversation:
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO conversations(title, system_prompt, created, updated) VALUES (?, ?, ?, ?)",
            (title, system_prompt, now, now),
        )
        self._db.commit()
        return Conversation(cur.lastrowid, title, system_prompt, now, now)

    def conversations(self) -> list[Conversation]:
        rows = self._db.execute("SELECT * FROM conversations ORDER BY updated DESC, id DESC").fetchall()
        return [
            Conversation(r["id"], r["title"], r["system_prompt"], r["created"], r["updated"]) for r in rows
        ]

    def conversation(self, conversation_id: int) -> Conversation | None:
        r = self._db.execute("SELECT * FROM conversations WHERE id=?", (conversation_id,)).fetchone()
        return (
            Conversation(r["id"], r["title"], r["system_prompt"], r["created"], r["updated"]) if r else None
        )

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self._db.execute("UPDATE conversations SET title=? WHERE id=?", (title, conversation_id))
        self._db.commit()

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        self._db.execute(
            "UPDATE conversations SET system_prompt=? WHERE id=?", (system_prompt, conversation_id)
        )
        self._db.commit()

    def delete_conversation(self, conversation_id: int) -> None:
        self._db.execute("DELETE FROM conversations WHERE id=?", (conversation_id,))
        self._db.commit()

    def _touch(self, conversation_id: int) -> None:
        self._db.execute("UPDATE conversations SET updated=? WHERE id=?", (time.time(), conversation_id))

    # messages
    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        status: str = "complete",
        meta: dict | None = None,
    ) -> Message:
        if status not in STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        now = time.time()
        meta = meta or {}
        cur = self._db.execute(
            "INSERT INTO messages(conversation_id, role, content, status, created, meta) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (conversation_id, role, content, status, now, json.dumps(meta)),
        )
        self._touch(conversation_id)
        self._db.commit()
        return Message(cur.lastrowid, conversation_id, role, content, status, now, meta)

    def update_message(
        self, message_id: int, content: str, status: str | None = None, meta: dict | None = None
    ) -> None:
        sets, args = ["content=?"], [content]
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"unknown message status {status!r}")
            sets.append("status=?")
            args.append(status)
        if meta is not None:
            sets.append("meta=?")
            args.append(json.dumps(meta))
        args.append(message_id)
        self._db.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id=?", args)
        self._db.commit()

    def delete_messages_from(self, conversation_id: int, message_id: int) -> None:
        """Delete a message and everything after it in its conversation (regenerate, edit)."""
        self._db.execute(
            "DELETE FROM messages WHERE conversation_id=? AND id>=?", (conversation_id, message_id)
        )
        self._db.commit()

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._db.execute(
            "SELECT * FROM messages WHERE conversation_id=? ORDER BY id", (conversation_id,)
        ).fetchall()
        return [self._message(r) for r in rows]

    def message(self, message_id: int) -> Message | None:
        r = self._db.execute("SELECT * FROM messages WHERE id=?", (message_id,)).fetchone()
        return self._message(r) if r else None

    @staticmethod
    def _message(r: sqlite3.Row) -> Message:
        try:
            meta = json.loads(r["meta"] or "{}")
        except json.JSONDecodeError:
            meta = {}
        return Message(
            r["id"], r["conversation_id"], r["role"], r["content"], r["status"], r["created"], meta
        )

    # search
    def search(self, text: str, limit: int = 200) -> list[SearchHit]:
        """Case-insensitive substring search over titles and every message."""
        text = text.strip()
        if not text:
            return []
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        hits: list[SearchHit] = []
        for r in self._db.execute(
            "SELECT id, title FROM conversations WHERE title LIKE ? ESCAPE '\\' ORDER BY updated DESC",
            (pattern,),
        ):
            hits.append(SearchHit(r["id"], r["title"], None, r["title"]))
        rows = self._db.execute(
            "SELECT m.id, m.conversation_id, m.content, c.title FROM messages m "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.content LIKE ? ESCAPE '\\' ORDER BY c.updated DESC, m.id LIMIT ?",
            (pattern, limit),
        )
        for r in rows:
            hits.append(SearchHit(r["conversation_id"], r["title"], r["id"], _snippet(r["content"], text)))
        return hits


def _snippet(content: str, text: str, width: int = 40) -> str:
    i = content.lower().find(text.lower())
    if i < 0:
        return content[: 2 * width]
    start, end = max(0, i - width), min(len(content), i + len(text) + width)
    s = content[start:end].replace("\n", " ")
    return ("…" if start > 0 else "") + s + ("…" if end < len(content) else "")
