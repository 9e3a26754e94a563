"""A person approves tool calls before they run.

A step whose calls the assistant's policy (`approval`) has a person approve
pauses its turn (`pause_turn`): the turn becomes `waiting`, its transcript
so far is kept on its row (`turns.paused`), each call of the step gets a
row (`tool_approvals`, its id the request id), and the worker's thread is
free. Each decision (`decide`) is recorded under the session's row lock;
the last one of the step resumes the turn (`waiting -> queued`), and the
next attempt starts where the step stopped: it runs the step's calls as
decided (a rejected call's result is the person's message, so no call is
left without an answer) and goes on. Past APPROVAL_TIMEOUT_SECONDS the
sweeper decides what is left (`expire_overdue`): rejected, with a reason.

Everything lives in Postgres, so a pause outlives a worker's SIGKILL,
Redis losing its data and a deploy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from shared.assistants import Profile
from shared.db import after_commit, transaction
from shared.events import EventLog
from shared.models import ChatSession, ToolApproval, Turn
from shared.turn_states import PAUSE, RESUME, status_of
from shared.turns import lock_session, schedule_next

log = logging.getLogger(__name__)

PENDING, APPROVED, REJECTED, EXPIRED = "pending", "approved", "rejected", "expired"
DECIDED = (APPROVED, REJECTED, EXPIRED)


@dataclass(frozen=True)
class Asked:
    """One call of a step that needs a person's decision."""

    request_id: str
    call_id: str
    name: str  # <server>__<tool>
    server: str
    tool: str
    arguments: dict[str, Any]
    input_schema: dict[str, Any]

    def event(self, deadline: datetime) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "call_id": self.call_id,
            "name": self.name,
            "server": self.server,
            "tool": self.tool,
            "arguments": self.arguments,
            "deadline": deadline.isoformat(),
        }


def needs_approval(profile: Profile, name: str, read_only: bool, allowed_for_session: frozenset[str]) -> bool:
    """Whether the assistant's policy has a person approve a call of `name`."""
    policy = profile.approval or {}
    kind = policy.get("policy", "never")
    if kind == "never" or name in allowed_for_session:
        return False
    if read_only and policy.get("read_only_without_asking"):
        return False
    return kind == "always" or name in (policy.get("tools") or ())


def allowed_for_session(session_id: str) -> frozenset[str]:
    """The tools a person allowed for the rest of the session, read when a
    step would ask (so an "always" given during this turn counts)."""
    with transaction() as db:
        found = db.scalar(select(ChatSession.approved_tools).where(ChatSession.id == session_id))
    return frozenset(found or ())


_PAUSE = (
    update(Turn)
    .where(
        Turn.id == bindparam("turn_id"),
        PAUSE.allows(status_of(Turn)),
        Turn.attempts == bindparam("attempt"),
    )
    .values(status=PAUSE.target, paused=bindparam("paused"))
)


def pause_turn(
    turn_id: str, session_id: str, owner_id: str, attempt: int, paused: dict[str, Any], asked: list[Asked], seconds: int
) -> datetime | None:
    """Record the pause and its calls in one transaction, under the
    session's row lock; the deadline, or None if this attempt no longer
    owns the turn (or its session was deleted): nothing written."""
    deadline = datetime.now(UTC) + timedelta(seconds=seconds)
    with transaction() as db:
        if lock_session(db, session_id, owner_id) is None:
            return None
        if db.execute(_PAUSE, {"turn_id": turn_id, "attempt": attempt, "paused": paused}).rowcount != 1:
            return None
        db.execute(
            insert(ToolApproval),
            [
                {
                    "id": a.request_id,
                    "turn_id": turn_id,
                    "owner_id": owner_id,
                    "attempt": attempt,
                    "call_id": a.call_id,
                    "name": a.name,
                    "server": a.server,
                    "tool": a.tool,
                    "arguments": a.arguments,
                    "input_schema": a.input_schema,
                    "deadline": deadline,
                }
                for a in asked
            ],
        )
    return deadline


def decisions(turn_id: str, attempt: int) -> dict[str, ToolApproval]:
    """The decisions of the step that attempt `attempt` paused, by call id."""
    with transaction() as db:
        rows = db.scalars(
            select(ToolApproval).where(ToolApproval.turn_id == turn_id, ToolApproval.attempt == attempt)
        ).all()
        db.expunge_all()
    return {row.call_id: row for row in rows}


class DecisionRefused(Exception):
    """A decision that cannot be taken as asked (already decided, turn ended)."""


def decide(
    db: Session,
    turn: Turn,
    approval: ToolApproval,
    status: str,
    by: str,
    *,
    arguments: dict[str, Any] | None = None,
    message: str | None = None,
    always: bool = False,
) -> None:
    """Record one decision; the step's last resumes the turn. Call with the
    session's row locked and `turn` and `approval` read after the lock."""
    if approval.status != PENDING:
        raise DecisionRefused(f"this call was already {approval.status}")
    if turn.status != PAUSE.target or (turn.paused or {}).get("attempt") != approval.attempt:
        raise DecisionRefused(f"the turn is {turn.status}: it no longer waits for this call")
    approval.status = status
    approval.decided_by = by
    approval.decided_at = func.now()
    approval.decided_arguments = arguments
    approval.message = message
    approval.always = always
    if always and status == APPROVED:
        db.execute(
            update(ChatSession)
            .where(ChatSession.id == turn.session_id)
            .values(approved_tools=func.array_append(ChatSession.approved_tools, approval.name))
        )
    db.flush()
    db.refresh(approval)
    events = EventLog("turn", turn.id)
    after_commit(db, events.append, "tool.approval_decided", **decision_event(approval))
    _resume_if_decided(db, turn, approval.attempt)


def decision_event(approval: ToolApproval) -> dict[str, Any]:
    return {
        "request_id": approval.id,
        "call_id": approval.call_id,
        "status": approval.status,
        "decided_by": approval.decided_by,
        "arguments": approval.decided_arguments,
        "message": approval.message,
    }


def _resume_if_decided(db: Session, turn: Turn, attempt: int) -> None:
    pending = select(func.count()).where(
        ToolApproval.turn_id == turn.id, ToolApproval.attempt == attempt, ToolApproval.status == PENDING
    )
    if db.scalar(pending):
        return
    db.execute(
        update(Turn)
        .where(Turn.id == turn.id, RESUME.allows(status_of(Turn)))
        .values(status=RESUME.target, resumes=Turn.resumes + 1)
    )
    schedule_next(db, turn.session_id)  # sends it: it is its session's next


def expire_overdue(most: int = 100) -> int:
    """Reject the calls nobody decided before their deadline, each turn's
    under its session's lock; the turns go on. Returns how many."""
    overdue = (
        select(ToolApproval.turn_id, Turn.session_id, Turn.owner_id)
        .join(Turn, Turn.id == ToolApproval.turn_id)
        .where(ToolApproval.status == PENDING, ToolApproval.deadline < func.now())
        .distinct()
        .limit(most)
    )
    expired = 0
    with transaction() as db:
        turns = db.execute(overdue).all()
    for turn_id, session_id, owner_id in turns:
        with transaction() as db:
            if lock_session(db, session_id, owner_id) is None:
                continue
            turn = db.get(Turn, turn_id, populate_existing=True)
            rows = db.scalars(
                select(ToolApproval).where(
                    ToolApproval.turn_id == turn_id,
                    ToolApproval.status == PENDING,
                    ToolApproval.deadline < func.now(),
                )
            ).all()
            for row in rows:
                try:
                    decide(db, turn, row, EXPIRED, "sweeper", message="no one decided before the deadline")
                except DecisionRefused:  # the turn ended meanwhile: its calls stay as they were
                    continue
                expired += 1
    if expired:
        log.info("rejected %d tool calls nobody decided in time", expired)
    return expired
