"""Batch replay: many questions submitted at once, run `concurrency` at a time.

A replay's progress is derived from its items' turns, never counted twice.
Items get their turn when `advance` reaches them; `advance` runs when the
replay is created and whenever one of its turns ends.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from shared.broker import send_replay_advance
from shared.db import after_commit
from shared.events import EventLog
from shared.models import ChatSession, Replay, ReplayItem, Turn
from shared.turn_states import ACTIVE, ENDED
from shared.turns import submit_turn


def create_replay(db: Session, owner_id: str, questions: list[dict[str, Any]], concurrency: int) -> Replay:
    """Record a replay and its items; the first batch starts after commit."""
    replay = Replay(owner_id=owner_id, concurrency=concurrency)
    db.add(replay)
    db.flush()
    db.add_all(
        ReplayItem(replay_id=replay.id, index=i, message=q["message"], session_id=q.get("session_id"))
        for i, q in enumerate(questions)
    )
    after_commit(db, send_replay_advance, replay.id)
    return replay


def unfinished_items(db: Session, owner_id: str) -> int:
    """Questions of the owner's replays not answered yet: not started, or
    their turn queued or running."""
    return db.scalar(
        select(func.count())
        .select_from(ReplayItem)
        .join(Replay, Replay.id == ReplayItem.replay_id)
        .outerjoin(Turn, Turn.id == ReplayItem.turn_id)
        .where(
            Replay.owner_id == owner_id, Replay.finished_at.is_(None), or_(Turn.id.is_(None), Turn.status.in_(ACTIVE))
        )
    )


def item_rows(db: Session, replay_id: str) -> list[tuple[ReplayItem, Turn | None]]:
    query = (
        select(ReplayItem, Turn)
        .outerjoin(Turn, Turn.id == ReplayItem.turn_id)
        .where(ReplayItem.replay_id == replay_id)
        .order_by(ReplayItem.index)
    )
    return [(item, turn) for item, turn in db.execute(query)]


def summary(replay: Replay, rows: list[tuple[ReplayItem, Turn | None]]) -> dict[str, Any]:
    counts = {"succeeded": 0, "failed": 0}
    for _item, turn in rows:
        if turn is not None and turn.status in ENDED:
            counts["succeeded" if turn.status == "succeeded" else "failed"] += 1
    return {
        "id": replay.id,
        "status": "finished" if replay.finished_at else "running",
        "total": len(rows),
        **counts,
        "created_at": replay.created_at.isoformat(),
        "finished_at": replay.finished_at.isoformat() if replay.finished_at else None,
    }


def advance(db: Session, replay_id: str) -> None:
    """Start items up to the replay's concurrency; mark it finished when every
    item's turn has ended. Serialised per replay by its row lock."""
    replay = db.get(Replay, replay_id, with_for_update=True)
    if replay is None or replay.finished_at is not None:
        return
    rows = item_rows(db, replay_id)
    running = sum(1 for item, turn in rows if item.turn_id and (turn is None or turn.status not in ENDED))
    for item, _turn in rows:
        if running >= replay.concurrency:
            break
        if item.turn_id is not None:
            continue
        submitted = submit_turn(db, item.session_id, replay.owner_id, item.message) if item.session_id else None
        if submitted is None:  # no session given, or it is gone: a new one
            chat = ChatSession(owner_id=replay.owner_id, title=item.message[:80], meta={"replay_id": replay.id})
            db.add(chat)
            db.flush()
            item.session_id = chat.id
            submitted = submit_turn(db, chat.id, replay.owner_id, item.message)
        item.turn_id = submitted[0].id
        running += 1
    db.flush()
    rows = item_rows(db, replay_id)
    if all(turn is not None and turn.status in ENDED for _item, turn in rows):
        replay.finished_at = func.now()
        db.flush()
        db.refresh(replay)
    state = summary(replay, rows)
    events = EventLog("replay", replay.id)
    after_commit(db, events.append, "replay.progress", **state)
    if replay.finished_at is not None:
        after_commit(db, events.append, "replay.finished", **state)
