"""The turn task: claim, load history, stream from the model, finish once."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import kombu.exceptions
import redis
from celery import shared_task
from opentelemetry.trace import SpanKind
from sqlalchemy import Boolean, Integer, String, and_, bindparam, column, func, join, or_, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import aliased
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from shared import logs, metrics, tracing
from shared.approvals import allowed_for_session, decisions, pause_turn
from shared.assistants import Profile, default_profile, load_profile
from shared.broker import RUN_TURN, mark_sent, send_replay_advance, send_turn
from shared.config import get_settings
from shared.db import autocommit_engine, committed, transaction
from shared.events import EventLog, EventLogLost, get_publisher
from shared.models import AssistantVersion, Message, Turn, new_id
from shared.recovery import requeue_turn
from shared.turn_states import (
    CANCELLED,
    CLAIM,
    DEFER,
    FAILED,
    FINISH,
    HOLD,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    WAITING,
    status_of,
)
from shared.turns import hold_back, next_queued_turn, running_of_owner, send_held_back
from tasks.agent import BACKOFF, Approvals, Outcome, run_agent
from tasks.base import TRANSIENT, TurnstreamTask
from tasks.heartbeat import get_heartbeat
from tasks.tools import get_toolbox
from tasks.waker import get_waker

log = logging.getLogger(__name__)

T = TypeVar("T")


class TurnFailed(Exception):
    """A turn that ended failed or cancelled, raised once its end is recorded
    so that Celery's task events (what Flower shows) say so: the task fails
    with the turn's id and error code. Expected (`throws`): logged in a line,
    never retried (nothing is left to do), and the message is acknowledged.
    Its args are its fields, so it pickles back as itself, as Celery checks
    (else it is wrapped, and logged as unexpected with a traceback)."""

    def __init__(self, turn_id: str, status: str, error: dict[str, Any] | None, assistant: str) -> None:
        super().__init__(turn_id, status, error, assistant)

    def __str__(self) -> str:
        turn_id, status, error, assistant = self.args
        detail = f"{error['code']}: {error['message']}" if error else f"{status} by request"
        return f"turn {turn_id} {status} on {assistant} ({detail})"

    def __repr__(self) -> str:
        return f"TurnFailed({str(self)!r})"


@dataclass(frozen=True)
class Claim:
    turn_id: str
    session_id: str
    owner_id: str
    number: int
    attempt: int
    history: list[dict[str, Any]]
    accepted_at: float  # when the API accepted the turn (Unix time)
    origin: dict[str, Any] | None  # the request that sent it (shared/tracing.py)
    assistant: tuple[str, int] | None  # the assistant version it runs with; None: the default
    paused: bool  # it waited for a person, and goes on from where it stopped (turns.paused)
    resumes: int  # attempts that went on from a pause: they do not count as tries

    def profile(self) -> Profile | None:
        """What it runs with; None if its assistant was deleted since."""
        if self.assistant is None:
            return default_profile(get_settings())
        return load_profile(*self.assistant)


# Built once (building a statement costs more CPU than running it), and run
# on a Core connection: a turn needs no ORM unit of work.
_CLAIM = (
    update(Turn)
    .where(
        Turn.id == bindparam("turn_id"),
        # checked again on the row as it is once locked, so two claims never both win
        CLAIM.allows(status_of(Turn)),
        Turn.id == next_queued_turn(Turn.session_id),
        # Fairness: an owner runs at most MAX_RUNNING_TURNS_PER_OWNER turns at
        # once, so one owner's burst leaves threads for others' turns.
        func.owner_may_run(Turn.owner_id, bindparam("max_running", type_=Integer), type_=Boolean),
    )
    .values(
        status=CLAIM.target,
        attempts=Turn.attempts + 1,
        started_at=func.coalesce(Turn.started_at, func.now()),
        claimed_at=func.now(),
        # the model of its assistant's version (one read by primary key), else the default assistant's
        model=func.coalesce(
            select(AssistantVersion.model)
            .where(
                AssistantVersion.assistant_id == Turn.assistant_id, AssistantVersion.version == Turn.assistant_version
            )
            .scalar_subquery(),
            bindparam("model", type_=String),
        ),
    )
    .returning(
        Turn.session_id,
        Turn.owner_id,
        Turn.number,
        Turn.attempts,
        Turn.created_at,
        Turn.origin,
        Turn.assistant_id,
        Turn.assistant_version,
        Turn.paused.isnot(None).label("was_paused"),
        Turn.resumes,
    )
)
# Why a claim found nothing to do, when the reason is the owner's running
# turns: the turn is queued and its session's next, so it is held back.
_HELD_BACK = select(Turn.owner_id).where(
    Turn.id == bindparam("turn_id"),
    HOLD.allows(status_of(Turn)),
    Turn.id == next_queued_turn(Turn.session_id),
)
_RUNNING = select(running_of_owner(bindparam("owner_id")))
# The claim and the history the model is sent, in one statement (in
# autocommit: one round trip). The history's snapshot is the claim's: every
# earlier turn's messages committed before this turn was sent.
# The history is the turn's path: the turn and its ancestors up to a first
# question (a session's turns form a tree: shared/branches.py), so a branch
# never sees another's messages.
_claimed = _CLAIM.cte("claimed")
_up = aliased(Turn)
_path = select(Turn.id, Turn.parent_id).where(Turn.id == bindparam("turn_id")).cte("path", recursive=True)
_path = _path.union_all(select(_up.id, _up.parent_id).select_from(_up).join(_path, _up.id == _path.c.parent_id))
_past = aliased(Turn)
_CLAIM_WITH_HISTORY = (
    select(_claimed, Message.role, Message.content)
    .select_from(_claimed)
    .outerjoin(
        join(Message, _past, _past.id == Message.turn_id),
        and_(
            Message.session_id == _claimed.c.session_id,
            _past.id.in_(select(_path.c.id)),
            # a question taken out of the queue before it ran is no part of the conversation
            or_(_past.started_at.isnot(None), _past.status != CANCELLED),
        ),
    )
    .order_by(_past.number, Message.role.desc())  # 'user' before 'assistant'
)
# The finish_turn() function (migration 0004): under the session's row lock,
# the final state guarded by the attempt, the answer, and what to send next.
# One round trip in autocommit; its columns named in order, so the result's
# metadata is kept with the compiled statement (as _SUBMIT's).
_FINISH = (
    text(
        "SELECT ended, next_turn, replay FROM finish_turn("
        ":turn_id, :session_id, :attempt, :status, :answer, :usage, :tools, :error, :message_id)"
    )
    .bindparams(bindparam("usage", type_=JSONB), bindparam("tools", type_=JSONB), bindparam("error", type_=JSONB))
    .columns(column("ended"), column("next_turn"), column("replay"))
)


def claim_turn(turn_id: str) -> Claim | None:
    """queued -> running, atomically, only if it is its session's next turn
    (`next_queued_turn()`) and its owner runs fewer than
    MAX_RUNNING_TURNS_PER_OWNER. Returns None when there is nothing to do:
    the turn is gone, finished, already running elsewhere, waiting its turn
    in its session, or held back until one of its owner's turns ends."""
    settings = get_settings()
    params = {"turn_id": turn_id, "model": settings.openai_model, "max_running": settings.max_running_turns}
    with autocommit_engine().connect() as db:
        rows = db.execute(_CLAIM_WITH_HISTORY, params).all()
        if not rows:
            owner_id = db.scalar(_HELD_BACK, {"turn_id": turn_id})
            if owner_id is not None:

                def running() -> int:
                    return db.scalar(_RUNNING, {"owner_id": owner_id})

                hold_back(owner_id, turn_id, running, settings.max_running_turns)
            return None
    first = rows[0]
    history = [{"role": r.role, "content": r.content} for r in rows if r.role is not None]
    claim = Claim(
        turn_id,
        first.session_id,
        first.owner_id,
        first.number,
        first.attempts,
        history,
        first.created_at.timestamp(),
        first.origin,
        None if first.assistant_id is None else (first.assistant_id, first.assistant_version),
        first.was_paused,
        first.resumes,
    )
    metrics.TURN_ATTEMPTS.inc()
    if claim.attempt == 1:
        metrics.QUEUE_WAIT.observe(max(time.time() - claim.accepted_at, 0.0))
    return claim


def finish_turn(claim: Claim, outcome: Outcome) -> tuple[str, dict[str, Any]] | None:
    """Write the final state and the answer in one transaction, then send
    what comes next (the session's next turn, the replay's next item);
    returns the terminal event to emit. The update is guarded by the attempt
    number, so an attempt that no longer owns the turn writes nothing and
    emits nothing (None)."""
    status = FINISH[outcome.status].target
    with autocommit_engine().connect() as db:
        end = db.execute(
            _FINISH,
            {
                "turn_id": claim.turn_id,
                "session_id": claim.session_id,
                "attempt": claim.attempt,
                "status": status,
                "answer": outcome.text,
                "usage": outcome.usage,
                "tools": outcome.tools,
                "error": outcome.error,
                "message_id": new_id(),
            },
        ).one()
    if end.ended == "lost":
        return None
    committed(send_held_back, claim.owner_id)  # a place freed for its owner's turn held back longest
    if end.ended == "gone":  # the session was deleted while the turn ran
        return "turn.cancelled", {}
    if end.next_turn is not None:
        committed(send_turn, str(end.next_turn))
    if end.replay is not None:
        committed(send_replay_advance, str(end.replay))
    if status == SUCCEEDED:
        return "turn.completed", {"answer": outcome.text, "usage": outcome.usage, "tools": outcome.tools}
    if status == FAILED:
        return "turn.failed", {"error": outcome.error}
    if status == INTERRUPTED:
        return "turn.interrupted", {"answer": outcome.text}
    return "turn.cancelled", {}


@shared_task(name=RUN_TURN, base=TurnstreamTask, throws=(TurnFailed,))
def run_turn(turn_id: str) -> str:
    """Run one chat turn. Safe to receive twice: only a claim runs it.
    Returns what happened, for Flower; raises TurnFailed for a turn that
    ended failed or cancelled."""
    heartbeat = get_heartbeat()
    logs.bind(turn_id=turn_id)
    claim = claim_turn(turn_id)  # a failure that passes: nothing was written, and Celery retries
    if claim is None:
        log.info("turn %s: nothing to run", turn_id)
        return f"turn {turn_id}: nothing to run (finished, running elsewhere, or waiting behind its session)"
    origin = claim.origin or {}
    profile = _retrying(claim.profile, f"read the assistant of turn {turn_id}")
    label = profile.label if profile is not None else f"deleted assistant {claim.assistant[0]}"
    logs.bind(session_id=claim.session_id, owner_id=claim.owner_id, attempt=claim.attempt, assistant=label)
    if origin.get("request_id"):  # none for a turn the API did not make (a replay's)
        logs.bind(request_id=origin["request_id"])
    events = EventLog("turn", turn_id, publisher=get_publisher(), attempt=claim.attempt)
    heartbeat.track(turn_id, claim.attempt, events)
    span = tracing.tracer.start_as_current_span(
        "turn",
        context=tracing.parent(origin),
        kind=SpanKind.CONSUMER,
        attributes={"turnstream.turn_id": turn_id, "turnstream.attempt": claim.attempt},
    )
    try:
        with span as current:
            outcome = _run(claim, events, profile)
            if outcome is None:
                _hand_back(claim)
                return f"turn {turn_id}: handed back to the queue (attempt {claim.attempt})"
            current.set_attribute("turnstream.status", outcome.status)
            if outcome.status == QUEUED:
                outcome = _wait_for_endpoint(claim, events, outcome)
            if outcome.status == QUEUED:
                if not _deferred(claim, events, outcome):
                    return f"turn {turn_id}: attempt {claim.attempt} no longer owned the turn; wrote nothing"
                return f"turn {turn_id} waits in the queue: {outcome.unavailable}"
            if outcome.status == WAITING:
                if not _pause(claim, events, outcome):
                    return f"turn {turn_id}: attempt {claim.attempt} no longer owned the turn; wrote nothing"
                return f"turn {turn_id} waits on {label} for a person to decide {len(outcome.asked)} tool calls"
            if not _finish(claim, events, outcome):
                return f"turn {turn_id}: attempt {claim.attempt} no longer owned the turn; wrote nothing"
    finally:
        heartbeat.forget(turn_id, claim.attempt)
    if outcome.status != SUCCEEDED:
        raise TurnFailed(turn_id, outcome.status, outcome.error, label)
    return f"turn {turn_id} succeeded on {label} (attempt {claim.attempt})"


def _run(claim: Claim, events: EventLog, profile: Profile | None) -> Outcome | None:
    """The turn's outcome, or None if the event log failed (Redis down)."""
    settings = get_settings()
    if claim.attempt - claim.resumes > settings.max_attempts:
        tries = claim.attempt - claim.resumes - 1
        message = f"the turn was started {tries} times without finishing (TURN_MAX_ATTEMPTS)"
        return Outcome(FAILED, error={"code": "attempts_exhausted", "message": message})
    if profile is None:  # deleting an assistant waits for its turns to end: a row deleted by hand
        message = f"the turn's assistant {claim.assistant[0]} (version {claim.assistant[1]}) no longer exists"
        return Outcome(FAILED, error={"code": "assistant_deleted", "message": message})
    try:
        if claim.attempt > 1 and not claim.paused:  # one that goes on from a pause says so itself (turn.resumed)
            metrics.TURN_RESTARTS.labels("redelivered").inc()
            events.emit("turn.restarted", attempt=claim.attempt, reason="redelivered")
        events.emit("turn.started", attempt=claim.attempt)
        accepted_at = None if claim.paused else claim.accepted_at  # a first token after a pause is a person's wait
        approvals = _approvals(claim)
        return run_agent(claim.history, events, get_toolbox(), settings, claim.attempt, accepted_at, profile, approvals)
    except redis.RedisError as exc:  # expected when Redis restarts: no traceback per turn
        log.warning("turn %s: the event log failed (%s); handing the turn back", claim.turn_id, exc)
        return None
    except Exception:
        log.exception("turn %s failed unexpectedly", claim.turn_id)
        error = {"code": "internal_error", "message": "the worker failed while running this turn"}
        return Outcome(FAILED, error=error)


_PAUSED = select(Turn.paused).where(Turn.id == bindparam("turn_id"))
_CHECKPOINT = (
    update(Turn)
    .where(Turn.id == bindparam("turn_id"), Turn.status == RUNNING, Turn.attempts == bindparam("attempt"))
    .values(paused=bindparam("paused"))
)


def _approvals(claim: Claim) -> Approvals:
    """The turn's side of its assistant's approval policy: for a turn that
    waited, where it stopped and what was decided."""
    allowed = functools.partial(allowed_for_session, claim.session_id)
    if not claim.paused:
        return Approvals(allowed)
    with autocommit_engine().connect() as db:
        paused = db.scalar(_PAUSED, {"turn_id": claim.turn_id})
    paused_by = paused["attempt"]

    def checkpoint(transcript: dict[str, Any]) -> None:
        def write() -> None:
            with autocommit_engine().connect() as db:
                params = {
                    "turn_id": claim.turn_id,
                    "attempt": claim.attempt,
                    "paused": {**transcript, "attempt": paused_by},
                }
                db.execute(_CHECKPOINT, params)

        _retrying(write, f"record the progress of turn {claim.turn_id}")

    return Approvals(allowed, paused, decisions(claim.turn_id, paused_by), checkpoint)


def _pause(claim: Claim, events: EventLog, outcome: Outcome) -> bool:
    """Record the pause and its calls, then tell clients what to decide;
    False if this attempt no longer owned the turn."""
    paused = {**outcome.paused, "attempt": claim.attempt}
    seconds = get_settings().approval_timeout
    deadline = _retrying(
        lambda: pause_turn(
            claim.turn_id, claim.session_id, claim.owner_id, claim.attempt, paused, outcome.asked, seconds
        ),
        f"record the pause of turn {claim.turn_id}",
    )
    if deadline is None:
        return False
    metrics.TURNS_PAUSED.inc()
    try:
        for asked in outcome.asked:
            events.emit("tool.approval_required", **asked.event(deadline))
        events.append("turn.waiting", requests=[a.request_id for a in outcome.asked], deadline=deadline.isoformat())
    except redis.RedisError:  # clients read the pause from Postgres (GET …/approvals)
        log.warning("turn %s: could not tell clients it waits", claim.turn_id, exc_info=True)
    committed(send_held_back, claim.owner_id)  # its place among the owner's running turns is free
    return True


_DEFER = (
    update(Turn)
    .where(Turn.id == bindparam("turn_id"), DEFER.allows(status_of(Turn)), Turn.attempts == bindparam("attempt"))
    .values(status=DEFER.target, paused=bindparam("paused"), resumes=Turn.resumes + 1)
)


def _wait_for_endpoint(claim: Claim, events: EventLog, outcome: Outcome) -> Outcome:
    """A turn whose model endpoint's breaker is open waits in the queue, for
    MODEL_WAIT_SECONDS at most from when it first found it open; past that
    it fails `model_unavailable`."""
    waited = time.time() - outcome.paused["delayed_since"]
    if waited <= get_settings().model_wait:
        return outcome
    exc = outcome.unavailable
    message = (
        f"the {exc.breaker.describe()} stayed unavailable for MODEL_WAIT_SECONDS ({get_settings().model_wait} s);"
        f" its last error: {exc.error or 'none recorded'}"
    )
    return Outcome(
        FAILED, outcome.text, outcome.usage, outcome.tools, {"code": "model_unavailable", "message": message}
    )


def _deferred(claim: Claim, events: EventLog, outcome: Outcome) -> bool:
    """Hand the turn back to the queue to wait for its endpoint, going on
    from where it stopped when it runs again (a deferral is not a try:
    `resumes`); False if this attempt no longer owned the turn."""
    exc = outcome.unavailable
    params = {
        "turn_id": claim.turn_id,
        "attempt": claim.attempt,
        "paused": {**outcome.paused, "attempt": claim.attempt},
    }

    def write() -> bool:
        with autocommit_engine().connect() as db:
            return db.execute(_DEFER, params).rowcount == 1

    if not _retrying(write, f"hand back turn {claim.turn_id} to wait for its model endpoint"):
        return False
    metrics.TURNS_DELAYED.labels(exc.breaker.name).inc()
    retry_at = datetime.fromtimestamp(exc.until, UTC).isoformat()
    try:
        due_in = exc.breaker.wait(claim.turn_id, exc.until, exc.open)
        if due_in is None:  # the breaker closed since it refused the turn: no wait
            send_turn(claim.turn_id)
        else:
            mark_sent(claim.turn_id, later=due_in)  # the sweeper leaves it alone while it waits
            events.emit(
                "turn.delayed",
                endpoint=exc.breaker.name,
                reason=f"{exc.breaker.describe()} unavailable, retrying at {retry_at}",
                retry_at=retry_at,
            )
            get_waker().at(exc.breaker, due_in)
    except redis.RedisError:  # without its mark, the sweeper sends it again
        log.warning("turn %s: could not record that it waits", claim.turn_id, exc_info=True)
    committed(send_held_back, claim.owner_id)  # its place among the owner's running turns is free
    return True


def _finish(claim: Claim, events: EventLog, outcome: Outcome) -> bool:
    """Record the end, then emit the terminal event, each retried while
    Postgres or Redis is unreachable; False if this attempt no longer owned
    the turn. If the end never lands, the turn stays running without a
    heartbeat once this task ends, and the sweeper re-queues it. If the log
    was lost, clients get the end from Postgres (the relay's snapshot)."""
    with tracing.tracer.start_as_current_span("finish_turn", attributes={"turnstream.status": outcome.status}):
        terminal = _retrying(lambda: finish_turn(claim, outcome), f"record the end of turn {claim.turn_id}")
    if terminal is None:
        return False
    type_, fields = terminal
    if type_ == "turn.cancelled" and outcome.status != CANCELLED:  # its session was deleted meanwhile
        outcome.status, outcome.error = CANCELLED, None
    metrics.turn_ended(outcome.status, outcome.error, claim.accepted_at)
    try:
        _retrying(lambda: events.append(type_, **fields), f"emit the end of turn {claim.turn_id}")
    except EventLogLost:
        log.warning("turn %s: its event log was lost; clients read the end from Postgres", claim.turn_id)
    return True


def _retrying(fn: Callable[[], T], what: str) -> T:
    """fn(), retried with backoff while Postgres or Redis is unreachable
    (6 tries over about 15 s)."""
    retrying = Retrying(
        retry=retry_if_exception_type(TRANSIENT),
        stop=stop_after_attempt(6),
        wait=BACKOFF,
        before_sleep=lambda state: log.warning("could not %s, retrying: %s", what, state.outcome.exception()),
        reraise=True,
    )
    return retrying(fn)


def _hand_back(claim: Claim) -> None:
    """Put the turn back in the queue now, rather than wait for the sweeper."""
    try:
        with transaction() as db:
            requeue_turn(db, claim.turn_id, claim.attempt)
        send_held_back(claim.owner_id)
    except (*TRANSIENT, redis.RedisError, kombu.exceptions.OperationalError):
        log.warning("turn %s: could not hand it back; the sweeper will", claim.turn_id, exc_info=True)
