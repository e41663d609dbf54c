"""Export a conversation as Markdown or JSON (no Qt)."""

from __future__ import annotations

import datetime as dt
import json

from app.storage import Conversation, Message

EXPORT_FORMAT_VERSION = 1


def conversation_to_markdown(conversation: Conversation, messages: list[Message]) -> str:
    lines = [f"# {conversation.title}", ""]
    if conversation.system_prompt:
        lines += ["**System:**", "", conversation.system_prompt, ""]
    for m in messages:
        who = {"user": "User", "assistant": "Assistant", "system": "System"}.get(m.role, m.role)
        note = " (partial)" if m.status != "complete" else ""
        lines += [f"## {who}{note}", "", m.content, ""]
    return "\n".join(lines).rstrip() + "\n"


def conversation_to_json(conversation: Conversation, messages: list[Message]) -> str:
    def stamp(t: float) -> str:
        return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).isoformat()

    doc = {
        "format": "tandem-conversation",
        "version": EXPORT_FORMAT_VERSION,
        "title": conversation.title,
        "system_prompt": conversation.system_prompt,
        "created": stamp(conversation.created),
        "messages": [
            {
                "role": m.role,
                "content": m.content,
                "status": m.status,
                "created": stamp(m.created),
                **({"stats": m.meta["stats"]} if "stats" in m.meta else {}),
            }
            for m in messages
        ],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
