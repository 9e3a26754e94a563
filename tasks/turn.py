"""The turn task: claim, load history, stream from the model, finish once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Task, shared_task
from sqlalchemy import func, select, update

from shared.broker import RUN_TURN, send_replay_advance
from shared.config import get_settings
from shared.db import after_commit, db_session
from shared.events import EventLog
from shared.models import ChatSession, Message, ReplayItem, Turn
from shared.turns import is_next_in_session, schedule_next
from tasks.model import Completion, ModelError, Stop, stream_completion

log = logging.getLogger(__name__)


class TurnstreamTask(Task):
    """Base for every task: late acks (a crash means redelivery, and the task
    is idempotent), results kept in Postgres rather than Celery."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True


@dataclass(frozen=True)
class Claim:
    turn_id: str
    session_id: str
    number: int
    attempt: int
    history: list[dict[str, Any]]


def claim_turn(turn_id: str) -> Claim | None:
    """queued -> running, atomically, only if no earlier turn of its session
    is still active. Returns None when there is nothing to do: the turn is
    gone, finished, already running elsewhere, or waiting its turn."""
    with db_session() as db:
        row = db.execute(
            update(Turn)
            .where(
                Turn.id == turn_id,
                Turn.status == "queued",
                is_next_in_session(),
            )
            .values(
                status="running",
                attempts=Turn.attempts + 1,
                started_at=func.coalesce(Turn.started_at, func.now()),
                model=get_settings().openai_model,
            )
            .returning(Turn.session_id, Turn.number, Turn.attempts)
        ).one_or_none()
        if row is None:
            return None
        session_id, number, attempt = row
        history = db.execute(
            select(Message.role, Message.content)
            .join(Turn, Turn.id == Message.turn_id)
            .where(Message.session_id == session_id, Turn.number <= number)
            .order_by(Turn.number, Message.role.desc())  # 'user' before 'assistant'
        ).all()
    return Claim(turn_id, session_id, number, attempt, [{"role": r, "content": c} for r, c in history])


def finish_turn(
    claim: Claim, events: EventLog, status: str, result: Completion | None = None, error: dict | None = None
) -> None:
    """Write the final state and the answer in one transaction, then emit the
    terminal event. The update is guarded by the attempt number, so an attempt
    that no longer owns the turn writes nothing and emits nothing."""
    text = result.text if result else ""
    with db_session() as db:
        chat = db.get(ChatSession, claim.session_id, with_for_update=True)
        if chat is None:  # the session was deleted while the turn ran
            after_commit(db, events.append, "turn.cancelled")
            return
        done = db.execute(
            update(Turn)
            .where(Turn.id == claim.turn_id, Turn.status == "running", Turn.attempts == claim.attempt)
            .values(
                status=status,
                answer=text if result else None,
                usage=result.usage if result else None,
                tools=[],
                error=error,
                finished_at=func.now(),
            )
        ).rowcount
        if not done:
            return
        if text:
            db.add(Message(session_id=claim.session_id, turn_id=claim.turn_id, role="assistant", content=text))
        chat.updated_at = func.now()
        schedule_next(db, claim.session_id)
        replay_id = db.scalar(select(ReplayItem.replay_id).where(ReplayItem.turn_id == claim.turn_id))
        if replay_id is not None:
            after_commit(db, send_replay_advance, replay_id)
        if status == "succeeded":
            after_commit(db, events.append, "turn.completed", answer=text, usage=result.usage, tools=[])
        elif status == "failed":
            after_commit(db, events.append, "turn.failed", error=error)
        else:
            after_commit(db, events.append, "turn.cancelled")


@shared_task(name=RUN_TURN, bind=True, base=TurnstreamTask)
def run_turn(self: Task, turn_id: str) -> None:
    """Run one chat turn. Safe to receive twice: only a claim runs it."""
    claim = claim_turn(turn_id)
    if claim is None:
        log.info("turn %s: nothing to run", turn_id)
        return
    events = EventLog("turn", turn_id)
    if claim.attempt > 1:
        events.append("turn.restarted", attempt=claim.attempt, reason="redelivered")
    events.append("turn.started", attempt=claim.attempt)

    def on_delta(text: str) -> None:
        _seq, cancelled = events.append("message.delta", delta=text)
        if cancelled:
            raise Stop

    try:
        result = stream_completion(claim.history, on_delta)
    except ModelError as exc:
        finish_turn(claim, events, "failed", error={"code": exc.code, "message": exc.message})
        return
    except Exception:
        log.exception("turn %s failed unexpectedly", turn_id)
        error = {"code": "internal_error", "message": "the worker failed while running this turn"}
        finish_turn(claim, events, "failed", error=error)
        return
    finish_turn(claim, events, "cancelled" if result.stopped else "succeeded", result)
