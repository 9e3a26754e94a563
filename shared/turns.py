"""Turn submission and the per-session run order, shared by web and worker.

Every change that starts or ends a turn takes the session's row lock
(`SELECT ... FOR UPDATE`), so submission and completion are serialised per
session: a new turn is sent at once only when nothing else in its session is
active, otherwise the turn that finishes before it sends it. That keeps turns
of one session running one at a time in the order they were accepted, with no
worker waiting on a lock.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from shared.broker import send_turn
from shared.db import after_commit
from shared.events import EventLog, announce_turn
from shared.models import ACTIVE, ChatSession, Message, Turn


class TurnConflict(Exception):
    """The turn cannot be accepted as asked (multitask reject, key reuse)."""


def lock_session(db: Session, session_id: str, owner_id: str) -> ChatSession | None:
    """The caller's session, row-locked for the rest of the transaction."""
    return db.scalar(
        select(ChatSession).where(ChatSession.id == session_id, ChatSession.owner_id == owner_id).with_for_update()
    )


def submit_turn(
    db: Session,
    chat: ChatSession,
    message: str,
    *,
    multitask: str = "enqueue",
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[Turn, bool]:
    """Record a user message and its queued turn; send it after commit.

    `chat` must have been locked with `lock_session` in this transaction.
    Returns (turn, created); an Idempotency-Key replay returns the original.
    """
    if idempotency_key is not None:
        existing = db.scalar(
            select(Turn).where(Turn.owner_id == chat.owner_id, Turn.idempotency_key == idempotency_key)
        )
        if existing is not None:
            if existing.request_hash != request_hash or existing.session_id != chat.id:
                raise TurnConflict("Idempotency-Key was already used with a different request")
            return existing, False
    busy = _has_active_turn(db, chat.id)
    if busy and multitask == "reject":
        raise TurnConflict("a turn is already running in this session")
    chat.turn_count += 1
    chat.updated_at = func.now()
    turn = Turn(
        session_id=chat.id,
        owner_id=chat.owner_id,
        number=chat.turn_count,
        status="queued",
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    db.add(turn)
    db.flush()
    db.add(Message(session_id=chat.id, turn_id=turn.id, role="user", content=message))
    if not busy:
        after_commit(db, send_turn, turn.id)
    after_commit(db, announce_turn, chat.id, turn.id)
    return turn, True


def schedule_next(db: Session, session_id: str) -> None:
    """After a turn of this session ended: send the next queued one, if no
    other turn is running. Call with the session row locked."""
    running = aliased(Turn)
    nxt = db.scalar(
        select(Turn.id)
        .where(
            Turn.session_id == session_id,
            Turn.status == "queued",
            ~exists().where(running.session_id == session_id, running.status == "running"),
        )
        .order_by(Turn.number)
        .limit(1)
    )
    if nxt is not None:
        after_commit(db, send_turn, nxt)


def cancel_turn(db: Session, turn: Turn) -> None:
    """Cancel a turn. A queued turn ends here; a running one is flagged and
    its worker stops between deltas. Call with the session row locked."""
    log = EventLog("turn", turn.id)
    if turn.status == "queued":
        db.execute(
            update(Turn)
            .where(Turn.id == turn.id, Turn.status == "queued")
            .values(status="cancelled", finished_at=func.now())
        )
        db.refresh(turn)
        schedule_next(db, turn.session_id)
        after_commit(db, log.append, "turn.cancelled")
    elif turn.status == "running":
        log.request_cancel()


def _has_active_turn(db: Session, session_id: str) -> bool:
    return db.scalar(select(Turn.id).where(Turn.session_id == session_id, Turn.status.in_(ACTIVE)).limit(1)) is not None


def is_next_in_session() -> ColumnElement[bool]:
    """SQL condition on Turn: no earlier turn of its session is still active."""
    earlier = aliased(Turn)
    return ~exists().where(
        and_(earlier.session_id == Turn.session_id, earlier.number < Turn.number, earlier.status.in_(ACTIVE))
    )
