"""Batch replay: many questions submitted at once, run `concurrency` at a time.

Items get their turn when `advance` reaches them, in index order; `advance`
runs when the replay is created and whenever one of its turns ends. What it
does there does not grow with the replay: the replay's row keeps the turns
it started and has not yet seen end (`running`, at most `concurrency`) and
how many ended succeeded or failed, so an advance looks at those turns and
at the items it starts, never at the whole replay.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import ColumnElement, Row, any_, bindparam, func, insert, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Bundle, Session
from sqlalchemy.types import Uuid

from shared.broker import send_replay_advance
from shared.db import after_commit
from shared.events import EventLog
from shared.expectations import Result, judge, passed, tool_names, total_tokens
from shared.models import ChatSession, Replay, ReplayItem, Turn, new_id
from shared.turn_states import ACTIVE, ENDED, SUCCEEDED
from shared.turns import submit_turn


def create_replay(
    db: Session,
    owner_id: str,
    questions: list[dict[str, Any]],
    concurrency: int,
    assistant: tuple[str, int] | None = None,
    **of_set: Any,
) -> Replay:
    """Record a replay and its items; the first batch starts after commit.
    Every question is answered by `assistant` (id, version) if given, else
    by its session's (a new session's: the default). A question may carry a
    `key`, an `expect` and a `repeat` (a set's run: shared/question_sets.py,
    which passes `set_id`, `repeats` and maybe `schedule_id` as `of_set`)."""
    replay = Replay(
        owner_id=owner_id,
        concurrency=concurrency,
        assistant_id=assistant[0] if assistant else None,
        assistant_version=assistant[1] if assistant else None,
        **of_set,
    )
    db.add(replay)
    db.flush()
    db.execute(
        insert(ReplayItem),
        [
            {
                "id": new_id(),
                "replay_id": replay.id,
                "index": i,
                "message": q["message"],
                "session_id": q.get("session_id"),
                "key": q.get("key"),
                "repeat": q.get("repeat", 0),
                "expect": q.get("expect"),
            }
            for i, q in enumerate(questions)
        ],
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


# What a result line reads of an item and of its turn: as columns, not ORM
# objects, a run's 10,000 rows (a comparison's 40,000) load in half the time.
_ITEM = Bundle(
    "item",
    ReplayItem.replay_id,
    ReplayItem.index,
    ReplayItem.key,
    ReplayItem.repeat,
    ReplayItem.message,
    ReplayItem.expect,
    ReplayItem.turn_id,
)
_TURN = Bundle(
    "turn", Turn.id, Turn.status, Turn.answer, Turn.error, Turn.tools, Turn.usage, Turn.created_at, Turn.finished_at
)
_ITEM_ROWS = (
    select(_ITEM, _TURN)
    .outerjoin(Turn, Turn.id == ReplayItem.turn_id)
    .where(ReplayItem.replay_id.in_(bindparam("replay_ids", expanding=True)))
    .order_by(ReplayItem.replay_id, ReplayItem.index)
    .execution_options(yield_per=1000)
)


def item_rows(db: Session, replay_ids: list[str]) -> Iterator[tuple[Row, Row | None]]:
    """Every item of the replays with its turn (None if it has none), in
    order, read in batches: a run holds up to 10,000 questions."""
    for item, turn in db.execute(_ITEM_ROWS, {"replay_ids": replay_ids}):
        yield item, turn if turn.id is not None else None


def result_line(item: Row, turn: Row | None) -> dict[str, Any]:
    """One question's result, judged by its expectations (shared/expectations.py)."""
    result = Result(
        status=turn.status if turn else "pending",
        answer=turn.answer if turn else None,
        tools=tool_names(turn.tools) if turn else [],
        latency_ms=_latency_ms(turn),
        tokens=total_tokens(turn.usage) if turn else None,
    )
    checks = judge(item.expect, result)
    return {
        "index": item.index,
        "key": item.key if item.key is not None else str(item.index),
        "repeat": item.repeat,
        "message": item.message,
        "status": result.status,
        "answer": result.answer,
        "error": turn.error if turn else None,
        "turn_id": item.turn_id,
        "latency_ms": result.latency_ms,
        "tokens": result.tokens,
        "tools": result.tools,
        "passed": passed(checks) if result.status in ENDED else None,
        "checks": checks,
    }


def _latency_ms(turn: Row | None) -> int | None:
    if turn is None or not turn.finished_at or not turn.created_at:
        return None
    return round((turn.finished_at - turn.created_at).total_seconds() * 1000)


def _total(replay_id: ColumnElement | str) -> ColumnElement[int]:
    """The replay's number of questions: its items are numbered from 0, so
    the last index + 1, read from the end of the (replay_id, index) index."""
    return func.coalesce(
        select(func.max(ReplayItem.index)).where(ReplayItem.replay_id == replay_id).scalar_subquery() + 1, 0
    )


def summary(db: Session, replay: Replay) -> dict[str, Any]:
    """The replay's progress as its last advance counted it; a turn's end
    sends an advance, so the counts follow within moments."""
    return _summary(replay, db.scalar(select(_total(replay.id))))


def _summary(replay: Replay, total: int) -> dict[str, Any]:
    return {
        "id": replay.id,
        "status": "finished" if replay.finished_at else "running",
        "assistant_id": replay.assistant_id,
        "assistant_version": replay.assistant_version,
        "total": total,
        "succeeded": replay.succeeded,
        "failed": replay.failed,
        "passed": replay.passed,
        "set_id": replay.set_id,
        "schedule_id": replay.schedule_id,
        "repeats": replay.repeats,
        "created_at": replay.created_at.isoformat(),
        "finished_at": replay.finished_at.isoformat() if replay.finished_at else None,
    }


# Statements run on every turn's end, built once with bind parameters.
# The replay, locked for the rest of the transaction (its advances run one
# at a time), read afresh even if the session holds it, with its size.
_LOCK = (
    select(Replay, _total(Replay.id))
    .where(Replay.id == bindparam("replay_id"))
    .with_for_update(of=Replay)
    .execution_options(populate_existing=True)
)
# The turns it has under way, by id.
_STATUSES = select(Turn.id, Turn.status).where(Turn.id == any_(bindparam("ids", type_=ARRAY(Uuid(as_uuid=False)))))
# The next items to start, through the (replay_id, index) index.
_NEXT = (
    select(ReplayItem)
    .where(ReplayItem.replay_id == bindparam("replay_id"), ReplayItem.index >= bindparam("first"))
    .order_by(ReplayItem.index)
    .limit(bindparam("count"))
)


def advance(db: Session, replay_id: str) -> None:
    """Count the replay's turns that ended since its last advance, start
    items up to its concurrency, in index order, and mark it finished when
    every item's turn has ended. Serialised per replay by its row lock; sent
    twice, the second finds nothing new. A handful of statements, and one
    more per item started, whatever the replay's size."""
    row = db.execute(_LOCK, {"replay_id": replay_id}).one_or_none()
    if row is None or row[0].finished_at is not None:
        return
    replay, total = row
    succeeded, failed, running = replay.succeeded, replay.failed, []
    if replay.running:
        statuses = dict(db.execute(_STATUSES, {"ids": replay.running}).all())
        for turn_id in replay.running:
            status = statuses.get(turn_id)
            if status == SUCCEEDED:
                succeeded += 1
            elif status is None or status in ENDED:  # None: deleted with its session, which cancelled it
                failed += 1
            else:
                running.append(turn_id)
    # Items start in index order and each is counted once its turn ended,
    # so the items started so far are the first `started`.
    started = succeeded + failed + len(running)
    free = replay.concurrency - len(running)
    if free > 0 and started < total:
        for item in db.scalars(_NEXT, {"replay_id": replay.id, "first": started, "count": free}).all():
            if item.turn_id is None:  # else started by an advance of the code before this one
                _start(db, replay, item)
            running.append(item.turn_id)
    finished = not running  # every item started, and every turn ended
    # Judged once, at the end (a set's run; else passing is succeeding),
    # before the one UPDATE that finishes it: the webhook it sets off
    # carries the count.
    passing = (_count_passed(db, replay.id) if replay.set_id else succeeded) if finished else None
    # Written once, at the end: an earlier change would be flushed on its own
    # before the next statement.
    replay.succeeded, replay.failed, replay.running = succeeded, failed, running
    if finished:
        replay.finished_at, replay.passed = func.clock_timestamp(), passing  # after the judging, not when it began
    db.flush()
    state = _summary(replay, total)
    events = EventLog("replay", replay.id)
    after_commit(db, events.append, "replay.progress", **state)
    if replay.finished_at is not None:
        after_commit(db, events.append, "replay.finished", **state)


def _count_passed(db: Session, replay_id: str) -> int:
    return sum(1 for item, turn in item_rows(db, [replay_id]) if result_line(item, turn)["passed"])


def _start(db: Session, replay: Replay, item: ReplayItem) -> None:
    """Give the item its turn: in the session it names, or in a new one if
    it names none or that session is gone."""
    session_id = item.session_id
    assistant = (replay.assistant_id, replay.assistant_version) if replay.assistant_id else None
    submitted = submit_turn(db, session_id, replay.owner_id, item.message, assistant=assistant) if session_id else None
    if submitted is None:
        chat = ChatSession(
            owner_id=replay.owner_id,
            title=item.message[:80],
            meta={"replay_id": replay.id},  # as before the column, for clients that read it
            replay_id=replay.id,
            assistant_id=replay.assistant_id,
            assistant_version=replay.assistant_version,
        )
        db.add(chat)
        db.flush()
        session_id = chat.id
        submitted = submit_turn(db, session_id, replay.owner_id, item.message, assistant=assistant)
    item.session_id, item.turn_id = session_id, submitted[0].id  # one UPDATE
