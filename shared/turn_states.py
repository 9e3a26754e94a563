"""The turn state machine: every status a turn can have and every change
between them, declared once.

Everything else is built from this table or held to it by a test:

- Python statements take their guard and their new status from a
  `Transition` (`CLAIM.allows(...)`, `values(status=CLAIM.target)`), so a
  statement asks only for a change the table has.
- Postgres refuses any other change, whoever makes it (a function, the ORM,
  an operator's `psql`): the trigger function `turn_status_change()` is this
  table rendered as SQL (`trigger_function_sql()`; its newest file in
  shared/migrations/functions/ is that text, tests/test_turn_states.py checks).
- docs/architecture.md's diagram is `mermaid()` (checked the same way).

A transition whose status stays the same (HOLD) is a change of where the
turn waits, not of its row: it is in the table so that the whole life of a
turn is read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement

QUEUED = "queued"  # accepted; waiting for its session's turn, its owner's share or a worker
RUNNING = "running"  # an attempt of a worker holds it (`attempts` numbers the attempt)
WAITING = "waiting"  # paused for a person to decide its tool calls; no worker holds it
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
INTERRUPTED = "interrupted"  # gave way to a newer message of its session, its answer so far kept
ACTIVE = (QUEUED, RUNNING, WAITING)
ENDED = (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED)
STATUSES = ACTIVE + ENDED


@dataclass(frozen=True)
class Transition:
    """One allowed change: from any of `sources` (none: a new turn) to `target`."""

    name: str
    sources: tuple[str, ...]
    target: str
    by: str  # who makes it, and where

    def allows(self, status: ColumnElement[Any]) -> ColumnElement[bool]:
        """The guard of a statement making this change: `status` (best
        `status_of(Turn)`) is one of the sources."""
        return status == self.sources[0] if len(self.sources) == 1 else status.in_(self.sources)


SUBMIT = Transition("submit", (), QUEUED, "the API or a replay: Postgres's submit_turn()")
HOLD = Transition(
    "hold",
    (QUEUED,),
    QUEUED,
    "a claim whose owner runs MAX_RUNNING_TURNS_PER_OWNER turns: its place is kept in Redis"
    " (owner:{id}:held) until one of them ends",
)
CLAIM = Transition("claim", (QUEUED,), RUNNING, "a worker, for its session's next turn (tasks/turn.py)")
SUCCEED = Transition("succeed", (RUNNING,), SUCCEEDED, "the running attempt: Postgres's finish_turn()")
FAIL = Transition("fail", (RUNNING,), FAILED, "the running attempt: Postgres's finish_turn()")
STOP = Transition("stop", (RUNNING,), CANCELLED, "the running attempt, asked to cancel: Postgres's finish_turn()")
CANCEL = Transition("cancel", (QUEUED, WAITING), CANCELLED, "the API, or its session deleted (shared/turns.py)")
PAUSE = Transition(
    "pause",
    (RUNNING,),
    WAITING,
    "the running attempt, at tool calls its assistant's policy has a person approve (shared/approvals.py)",
)
RESUME = Transition(
    "resume",
    (WAITING,),
    QUEUED,
    "the last decision of the paused step: the API, or the sweeper once APPROVAL_TIMEOUT_SECONDS passed",
)
REQUEUE = Transition(
    "requeue",
    (RUNNING,),
    QUEUED,
    "the sweeper (no heartbeat), a worker handing back (shutdown, Redis lost), an operator;"
    " the next claim is a new attempt",
)
DEFER = Transition(
    "defer",
    (RUNNING,),
    QUEUED,
    "the running attempt, when its model endpoint failed or its breaker is open: it waits in the queue,"
    " no worker holding it, and goes on from where it stopped (tasks/turn.py)",
)
INTERRUPT = Transition(
    "interrupt",
    (RUNNING, WAITING),
    INTERRUPTED,
    "a message sent with multitask interrupt: the running attempt, asked to stop (Postgres's finish_turn());"
    " a waiting turn, the API at once (shared/turns.py)",
)
TRANSITIONS = (SUBMIT, HOLD, CLAIM, SUCCEED, FAIL, STOP, CANCEL, REQUEUE, DEFER, PAUSE, RESUME, INTERRUPT)
# How a running attempt's end is recorded, by the status it ends with.
FINISH = {t.target: t for t in (SUCCEED, FAIL, STOP, INTERRUPT)}


def allowed(source: str | None, target: str) -> bool:
    """Whether a turn may go from `source` (None: not yet made) to `target`."""
    return any(target == t.target and (source in t.sources if source else not t.sources) for t in TRANSITIONS)


def status_of(turn: Any) -> ColumnElement[str]:
    """The status of `turn` (Turn or an alias of it) in a statement that
    finds the turn by its id or its session: as `status || ''`, which the
    status index (ix_turns_status_created, for the sweeper's walk over the
    queue) cannot serve. With statistics from before a queue built up,
    a plan made with the status known (a SQL function's literal, a
    statement's first runs on a connection) takes `status = 'queued'` for
    the cheapest lookup and walks every queued turn to find one
    (tests/test_queue_plans.py)."""
    return turn.status.concat("")


def _sql(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def trigger_function_sql() -> str:
    """The table as Postgres's `turn_status_change()`, the trigger that
    refuses a turn's row any change of status the table lacks."""
    made = " OR ".join(f"NEW.status = {_sql(t.target)}" for t in TRANSITIONS if not t.sources)
    changes = sorted({(s, t.target) for t in TRANSITIONS for s in t.sources if s != t.target})
    pairs = ",\n            ".join(f"({_sql(s)}, {_sql(target)})" for s, target in changes)
    return f"""-- Generated from shared/turn_states.py (python -m shared.turn_states): the
-- turn state machine. A new turn starts as the table says; a change of
-- status is one of its transitions, or the statement fails (check_violation).
CREATE OR REPLACE FUNCTION turn_status_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF {made} THEN
            RETURN NEW;
        END IF;
    ELSIF (OLD.status, NEW.status) IN (
            {pairs}
        ) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'turn %: % -> % is not a transition of the turn state machine', NEW.id, OLD.status, NEW.status
        USING ERRCODE = 'check_violation';
END
$$
"""


def mermaid() -> str:
    """The table as a Mermaid state diagram (docs/architecture.md)."""
    lines = ["stateDiagram-v2"]
    for t in TRANSITIONS:
        for source in t.sources or ("[*]",):
            lines.append(f"    {source} --> {t.target}: {t.name}")
    lines += [f"    {status} --> [*]" for status in ENDED]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(trigger_function_sql(), end="")
