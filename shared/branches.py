"""A session's turns form a tree: each turn follows its parent's answer
(`turns.parent_id`; null: a first question). Regenerating an answer or
editing a question makes a sibling of a turn (shared/turns.submit_turn with
`branch`); the session's active path runs from its leaf
(`sessions.active_turn_id`) up to a first question, and a new message
continues it. A caller that never branches sees a straight line: each turn
follows the one before.

The model of a turn is sent its path only (tasks/turn.py's claim). The run
order stays the session's (`turns.number`): one turn at a time whatever
its branch, so multitask, send-now and the sweeper work as they did.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.models import ChatSession, Turn
from shared.turn_states import QUEUED


@dataclass(frozen=True)
class Node:
    id: str
    parent_id: str | None
    number: int


class Tree:
    """A session's turns as a tree, read in one query (id, parent, number)."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = {n.id: n for n in nodes}
        self.children: dict[str | None, list[str]] = {}
        for n in sorted(nodes, key=lambda n: n.number):
            self.children.setdefault(n.parent_id, []).append(n.id)

    @classmethod
    def of(cls, db: Session, session_id: str) -> Tree:
        rows = db.execute(select(Turn.id, Turn.parent_id, Turn.number).where(Turn.session_id == session_id))
        return cls([Node(*row) for row in rows])

    def path(self, leaf: str | None) -> list[str]:
        """The turns from a first question down to `leaf`, in order."""
        out = []
        while leaf is not None and leaf in self.nodes:
            out.append(leaf)
            leaf = self.nodes[leaf].parent_id
        return out[::-1]

    def siblings(self, turn_id: str) -> list[str]:
        """The turns that follow the same answer as this one (itself
        included), oldest first."""
        return self.children.get(self.nodes[turn_id].parent_id, [])

    def leaf_under(self, turn_id: str) -> str:
        """The end of the newest line below a turn: following, at each
        step, its most recent child."""
        while self.children.get(turn_id):
            turn_id = self.children[turn_id][-1]
        return turn_id

    def latest(self) -> str | None:
        return max(self.nodes.values(), key=lambda n: n.number).id if self.nodes else None


def active_leaf(chat: ChatSession, tree: Tree) -> str | None:
    """The session's leaf; if it is gone, its newest turn's line."""
    if chat.active_turn_id in tree.nodes:
        return chat.active_turn_id
    return tree.latest()


def before_removal(db: Session, turn: Turn) -> None:
    """A turn is being removed (a rollback): what followed it follows its
    parent, and a leaf that was it moves up to its parent."""
    db.execute(update(Turn).where(Turn.parent_id == turn.id).values(parent_id=turn.parent_id))
    db.execute(
        update(ChatSession)
        .where(ChatSession.id == turn.session_id, ChatSession.active_turn_id == turn.id)
        .values(active_turn_id=turn.parent_id)
    )


def move_ahead(db: Session, turn: Turn) -> None:
    """A queued turn sent now goes ahead of the queued turns it followed:
    it follows the answer they followed, the first of them follows it, and
    what followed it follows the turn it followed (the line keeps its other
    turns in their order). Call with the session's row locked."""
    chain: list[Turn] = []  # its queued ancestors, nearest first
    parent_id = turn.parent_id
    while parent_id is not None:
        parent = db.get(Turn, parent_id)
        if parent is None or parent.status != QUEUED:
            break
        chain.append(parent)
        parent_id = parent.parent_id
    if not chain:
        return
    first = chain[-1]
    before_removal(db, turn)  # its children follow its parent; a leaf that was it, too
    db.execute(update(Turn).where(Turn.id == turn.id).values(parent_id=first.parent_id))
    db.execute(update(Turn).where(Turn.id == first.id).values(parent_id=turn.id))
    db.refresh(turn)
