"""Turn submission and the per-session run order, shared by web and worker.

Every change that starts or ends a turn takes the session's row lock
(submission in Postgres's `submit_turn()`, migration 0003, with `SELECT ...
FOR UPDATE`; completion by updating the row), so
submission and completion are serialised per session: a new turn is sent at
once only when nothing else in its session is active, otherwise the turn that
finishes before it sends it. That keeps turns of one session running one at a
time in the order they were accepted, with no worker waiting on a lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Boolean, ColumnElement, Connection, Row, bindparam, case, column, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.types import Uuid

from shared import metrics
from shared.branches import before_removal, move_ahead
from shared.broker import send_turn
from shared.db import after_commit
from shared.events import LAST_WORD, STOP_INTERRUPT, STOP_ROLLBACK, EventLog, announce_turn
from shared.models import ChatSession, Message, Turn, new_id
from shared.redis import get_redis, key
from shared.tracing import origin
from shared.turn_states import ACTIVE, CANCEL, INTERRUPT, QUEUED, RUNNING, WAITING, status_of


class TurnConflict(Exception):
    """The turn cannot be accepted as asked (multitask reject, key reuse)."""


class BranchRefused(Exception):
    """The turn a new one was to follow is not one of its session's."""


_NOT_OF_SESSION = "22023"  # invalid_parameter_value: submit_turn()'s refusal of a parent


# Statements run on every turn are built once, with bind parameters:
# building one costs more CPU than running it (tests/bench/pipeline.py).
_LOCK = (
    select(ChatSession.id, ChatSession.owner_id)
    .where(ChatSession.id == bindparam("session_id"), ChatSession.owner_id == bindparam("owner_id"))
    .with_for_update()
)
# The submit_turn() function (migration 0003): the session's row lock, then,
# in a statement whose snapshot is taken after the lock was granted (so it
# sees a turn that ended meanwhile), the turn and its question and whether
# another turn of the session is active. One round trip in autocommit. Its
# columns are named in the order given to .columns(), so SQLAlchemy matches
# them by position and keeps the result's metadata with the compiled
# statement (matched by name, it rebuilds them on every execution).
_SUBMIT = (
    text(
        "SELECT "
        + ", ".join(f"(s.turn).{c.name}" for c in Turn.__table__.c)
        + """, s.busy, s.created FROM submit_turn(
        :session_id, :owner_id, :turn_id, :message_id, :content,
        :idempotency_key, :request_hash, :reject_if_busy, :active, :origin, :assistant_id, :assistant_version,
        :branch, :parent_id
    ) AS s"""
    )
    .bindparams(bindparam("origin", type_=JSONB))
    .columns(*Turn.__table__.c, column("busy", Boolean), column("created", Boolean))
)


def lock_session(db: Session | Connection, session_id: str, owner_id: str) -> Row | None:
    """The caller's session (its id and owner_id), row-locked for the rest
    of the transaction."""
    return db.execute(_LOCK, {"session_id": session_id, "owner_id": owner_id}).one_or_none()


def submit_turn(
    db: Session | Connection,
    session_id: str,
    owner_id: str,
    message: str,
    *,
    multitask: str = "enqueue",
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    assistant: tuple[str, int] | None = None,
    branch: tuple[str | None] | None = None,
) -> tuple[Row, bool] | None:
    """Record a user message and its queued turn in the owner's session, and
    send it once that has committed (see `after_commit`). It runs with the
    session's assistant, or `assistant` (id, version) if given (a replay's).
    It follows the session's active path, or with `branch` (a 1-tuple) the
    turn it holds (None: a new first question), as a regeneration or an
    edit does; BranchRefused if that is not a turn of the session.

    Returns None if the owner has no such session, else (the turn's row,
    created): an Idempotency-Key replay returns the original turn. Raises
    TurnConflict, having written nothing, for a multitask "reject" while
    another turn is active, or a key reused for another request.
    """
    params = {
        "session_id": session_id,
        "owner_id": owner_id,
        "turn_id": new_id(),
        "message_id": new_id(),
        "content": message,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "reject_if_busy": multitask == "reject",
        "active": list(ACTIVE),
        "origin": origin(),
        "assistant_id": assistant[0] if assistant else None,
        "assistant_version": assistant[1] if assistant else None,
        "branch": branch is not None,
        "parent_id": branch[0] if branch else None,
    }
    try:
        turn = db.execute(_SUBMIT, params).one_or_none()
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == _NOT_OF_SESSION:
            raise BranchRefused(f"turn {params['parent_id']} is not one of this session's") from None
        raise
    if turn is None:
        return None
    if not turn.created:
        if turn.busy:
            raise TurnConflict("a turn is already running in this session")
        if turn.request_hash != request_hash or turn.session_id != session_id:
            raise TurnConflict("Idempotency-Key was already used with a different request")
        return turn, False
    if not turn.busy:
        after_commit(db, send_turn, turn.id)
    after_commit(db, announce_turn, session_id, turn.id)
    metrics.TURNS_SUBMITTED.inc()
    return turn, True


_ACTIVE_OF_OWNER = (
    select(func.count()).select_from(Turn).where(Turn.owner_id == bindparam("owner_id"), Turn.status.in_(ACTIVE))
)


def active_turns(db: Session | Connection, owner_id: str) -> int:
    """The owner's turns queued or running (through ix_turns_owner_status)."""
    return db.scalar(_ACTIVE_OF_OWNER, {"owner_id": owner_id})


_owner_turn = aliased(Turn)


def running_of_owner(owner_id: ColumnElement) -> ColumnElement:
    """How many turns the owner has running (through ix_turns_owner_status)."""
    return (
        select(func.count())
        .select_from(_owner_turn)
        .where(_owner_turn.owner_id == owner_id, _owner_turn.status == RUNNING)
        .scalar_subquery()
    )


def _held_key(owner_id: str) -> str:
    return key("owner", owner_id, "held")


def hold_back(owner_id: str, turn_id: str, running: Callable[[], int], most: int) -> None:
    """A turn that may run but whose owner already runs MAX_RUNNING_TURNS_PER_OWNER
    turns waits, without a message, until one of them ends (`send_held_back`).
    `running()` is read again after the turn is recorded: a turn that ended
    in between found nothing to send, and this one goes now."""
    held = _held_key(owner_id)
    pipe = get_redis().pipeline(transaction=False)
    pipe.zadd(held, {turn_id: time.time()})
    pipe.expire(held, 86400)  # the sweeper re-sends what a lost key held
    pipe.execute()
    if running() < most:
        send_held_back(owner_id)


def send_held_back(owner_id: str) -> None:
    """One of the owner's turns ended (or was handed back): send the one it
    held back longest, if any."""
    popped = get_redis().zpopmin(_held_key(owner_id))
    if popped:
        send_turn(popped[0][0].decode())


def next_queued_turn(session_id: ColumnElement) -> ColumnElement:
    """Postgres's `next_queued_turn()`, the one definition of a session's run
    order: its first queued turn, if none is running (as a str, as ids are).
    Called in FROM, so that Postgres inlines it into the calling query."""
    return select(func.next_queued_turn(session_id, type_=Uuid(as_uuid=False)).column_valued("n")).scalar_subquery()


def next_queued(db: Session | Connection, session_id: str) -> str | None:
    """The session's turn to send now that one of its turns ended. Call with
    the session row locked."""
    return db.scalar(select(next_queued_turn(bindparam("session_id"))), {"session_id": session_id})


def schedule_next(db: Session, session_id: str) -> None:
    """After a turn of this session ended: send the next queued one after
    commit, if no other turn is running. Call with the session row locked."""
    nxt = next_queued(db, session_id)
    if nxt is not None:
        after_commit(db, send_turn, nxt)


def give_way(db: Session, session_id: str, owner_id: str, how: str) -> str | None:
    """A message sent with multitask `interrupt` or `rollback`: the turn of
    the session that runs, or waits for a person, gives way to it. Interrupt
    ends it keeping its answer so far (a running attempt stops at its next
    event and ends INTERRUPTED; a waiting turn ends here); rollback removes
    it and its question, as if never sent (a running attempt's end then
    writes nothing). Returns its id, if any. Call in the transaction that
    submitted the new turn: the session's row lock is held."""
    turn = db.scalar(
        select(Turn).where(Turn.session_id == session_id, Turn.status.in_((RUNNING, WAITING))).with_for_update()
    )
    if turn is None:
        return None
    log = EventLog("turn", turn.id)
    running = turn.status == RUNNING
    if how == STOP_ROLLBACK:
        created_at = turn.created_at.timestamp()
        before_removal(db, turn)
        db.delete(turn)  # its messages and tool calls go with it (foreign keys)
        db.flush()
        if running:
            after_commit(db, log.request_cancel, STOP_ROLLBACK)
            after_commit(db, send_held_back, owner_id)  # its owner's place is free
        after_commit(db, EventLog("turn", turn.id, attempt=LAST_WORD).append, "turn.rolled_back")
        after_commit(db, metrics.turn_ended, "rolled_back", None, created_at)
        schedule_next(db, session_id)
    elif running:  # its attempt ends it as INTERRUPT, and sends the next
        after_commit(db, log.request_cancel, STOP_INTERRUPT)
    else:
        said = (turn.paused or {}).get("text", "")
        db.execute(
            update(Turn)
            .where(Turn.id == turn.id, INTERRUPT.allows(status_of(Turn)))
            .values(status=INTERRUPT.target, answer=said, finished_at=func.now())
        )
        if said:
            db.add(Message(session_id=session_id, turn_id=turn.id, role="assistant", content=said))
        db.flush()
        after_commit(db, log.append, "turn.interrupted", answer=said)
        after_commit(db, metrics.turn_ended, INTERRUPT.target, None, turn.created_at.timestamp())
        schedule_next(db, session_id)
    return turn.id


def send_now(db: Session, turn: Turn, owner_id: str) -> None:
    """A queued turn goes first: ahead of the session's other queued turns
    (their numbers, which order the session, move up by one), and the turn
    that runs or waits for a person is interrupted for it (`give_way`).
    Call with the session's row locked and `turn` read after the lock."""
    session_id = turn.session_id
    first = db.scalar(select(func.min(Turn.number)).where(Turn.session_id == session_id, Turn.status == QUEUED))
    if first is not None and first < turn.number:
        # In two steps: (session_id, number) is unique, checked row by row.
        moved = (Turn.session_id == session_id, Turn.number.between(first, turn.number))
        db.execute(update(Turn).where(*moved).values(number=-Turn.number))
        db.execute(
            update(Turn)
            .where(Turn.session_id == session_id, Turn.number < 0)
            .values(number=case((Turn.id == turn.id, first), else_=1 - Turn.number))
        )
        db.refresh(turn)
        move_ahead(db, turn)
    if give_way(db, session_id, owner_id, STOP_INTERRUPT) is None:
        schedule_next(db, session_id)


def cancel_turn(db: Session, turn: Turn, *, send_next: bool = True) -> None:
    """Cancel a turn. A queued turn ends here (and, unless the whole session
    is going, the next one is sent if it may run now); a running one is
    flagged and its worker stops between deltas. Call with the session row
    locked."""
    log = EventLog("turn", turn.id)
    if turn.status in CANCEL.sources:
        db.execute(
            update(Turn)
            .where(Turn.id == turn.id, CANCEL.allows(status_of(Turn)))
            .values(status=CANCEL.target, finished_at=func.now())
        )
        db.refresh(turn)
        if send_next:
            schedule_next(db, turn.session_id)
        after_commit(db, log.append, "turn.cancelled")
        after_commit(db, metrics.turn_ended, CANCEL.target, None, turn.created_at.timestamp())
    elif turn.status == RUNNING:  # its attempt stops at its next event, and ends as STOP
        log.request_cancel()
