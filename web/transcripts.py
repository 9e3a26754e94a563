"""A session written out: its whole tree as JSON, a path as Markdown, and
the snapshot a share keeps (web/shares.py). The JSON holds everything the
other two are made from: each turn's parent, question and answer, and the
active path."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.branches import Tree, active_leaf
from shared.models import ChatSession, Message, Turn
from web.resources import iso

FORMAT = "turnstream.session/1"


def export(db: Session, chat: ChatSession) -> dict[str, Any]:
    """The session's every turn (every branch), oldest first, and its active path."""
    rows = db.execute(
        select(Turn, Message.content)
        .join(Message, (Message.turn_id == Turn.id) & (Message.role == "user"))
        .where(Turn.session_id == chat.id)
        .order_by(Turn.number)
    ).all()
    tree = Tree.of(db, chat.id)
    return {
        "format": FORMAT,
        "session": {
            "id": chat.id,
            "title": chat.title,
            "metadata": chat.meta,
            "assistant_id": chat.assistant_id,
            "assistant_version": chat.assistant_version,
            "created_at": iso(chat.created_at),
        },
        "active_path": tree.path(active_leaf(chat, tree)),
        "turns": [
            {
                "id": turn.id,
                "parent_id": turn.parent_id,
                "status": turn.status,
                "question": question,
                "answer": turn.answer,
                "error": turn.error,
                "tools": turn.tools or [],
                "usage": turn.usage,
                "model": turn.model,
                "assistant_id": turn.assistant_id,
                "assistant_version": turn.assistant_version,
                "created_at": iso(turn.created_at),
                "finished_at": iso(turn.finished_at),
            }
            for turn, question in rows
        ],
    }


def path_of(data: dict[str, Any], leaf: str | None = None) -> list[dict[str, Any]]:
    """The turns of an export's path to `leaf` (default: its active path), in order."""
    turns = {t["id"]: t for t in data["turns"]}
    if leaf is None:
        return [turns[i] for i in data["active_path"]]
    path = []
    while leaf is not None:
        path.append(turns[leaf])
        leaf = turns[leaf]["parent_id"]
    return path[::-1]


def markdown(data: dict[str, Any], leaf: str | None = None) -> str:
    """A path of an export as Markdown: the title, then each question and
    its answer (or why it has none)."""
    title = data["session"]["title"] or "Chat"
    parts = [f"# {title}\n"]
    for turn in path_of(data, leaf):
        parts.append(f"**You:**\n\n{turn['question']}\n")
        if turn["answer"]:
            parts.append(f"**Assistant:**\n\n{turn['answer']}\n")
        elif turn["status"] != "succeeded":
            why = f": {turn['error']['message']}" if turn["error"] else ""
            parts.append(f"*No answer ({turn['status']}{why}).*\n")
    return "\n".join(parts)


def snapshot(data: dict[str, Any], leaf: str | None, include_tools: bool) -> dict[str, Any]:
    """What a share shows: the title and the messages of one path; each
    answer's tool calls (name, arguments, output) only if asked."""
    messages = []
    for turn in path_of(data, leaf):
        messages.append({"role": "user", "content": turn["question"]})
        if turn["answer"]:
            answer: dict[str, Any] = {"role": "assistant", "content": turn["answer"]}
            if include_tools and turn["tools"]:
                answer["tools"] = [
                    {k: call.get(k) for k in ("name", "arguments", "output", "ok")} for call in turn["tools"]
                ]
            messages.append(answer)
    return {"title": data["session"]["title"], "messages": messages}
