"""The turn state machine (shared/turn_states.py) is the one definition of a
turn's life: Postgres's trigger is its text, the docs' diagram is its
picture, and the database refuses every change of status it lacks."""

from __future__ import annotations

import itertools
import re
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from shared.migrations.functions import current_versions, function_sql
from shared.turn_states import (
    ACTIVE,
    ENDED,
    FINISH,
    STATUSES,
    SUBMIT,
    TRANSITIONS,
    allowed,
    mermaid,
    trigger_function_sql,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.fast
def test_the_trigger_function_is_the_table_rendered():
    newest = current_versions()["turn_status_change"]
    assert function_sql("turn_status_change", newest) == trigger_function_sql(), (
        "shared/turn_states.py changed: write its trigger as a new version,"
        f" python -m shared.turn_states > shared/migrations/functions/turn_status_change.v{newest + 1}.sql,"
        " and a migration that loads it"
    )


@pytest.mark.fast
def test_the_architecture_page_draws_the_table():
    assert mermaid() in (ROOT / "docs" / "architecture.md").read_text(), "docs/architecture.md:\n" + mermaid()


@pytest.mark.fast
def test_every_status_is_reachable_and_every_active_one_can_end():
    reached = {SUBMIT.target}
    while grown := {t.target for t in TRANSITIONS if set(t.sources) & reached} - reached:
        reached |= grown
    assert reached == set(STATUSES)
    for status in ACTIVE:
        ends, seen = {status}, set()
        while ends - seen:
            seen |= ends
            ends |= {t.target for t in TRANSITIONS if set(t.sources) & ends}
        assert ends & set(ENDED), f"{status} can never end"


@pytest.mark.fast
def test_an_ended_turn_never_changes_and_a_new_one_is_queued():
    for status, target in itertools.product(ENDED, STATUSES):
        assert not allowed(status, target)
    assert [s for s in STATUSES if allowed(None, s)] == [SUBMIT.target]
    assert set(FINISH) == set(ENDED)


@pytest.mark.fast
def test_the_sql_functions_name_only_statuses_of_the_table():
    named = set()
    for name, version in current_versions().items():
        named |= set(re.findall(r"'([a-z_]+)'", function_sql(name, version).split("$$")[1]))
    # Words the functions use that are not statuses: message roles, finish_turn()'s answers, error codes,
    # and the webhook triggers' payload: its keys, and the prefix of a delivery's id.
    others = {"user", "assistant", "ended", "lost", "gone", "check_violation", "foreign_key_violation"}
    others |= {"invalid_parameter_value"}
    others |= {"msg_", "type", "timestamp", "data", "status", "code", "error_code"}
    others |= {"turn_id", "session_id", "turn_url", "session_url", "replay_id", "replay_url"}
    others |= {"schedule_id", "schedule_url", "set_id", "total", "passed"}
    assert named - others <= set(STATUSES), f"not statuses of shared/turn_states.py: {named - others - set(STATUSES)}"


# The database itself: every change walked, every other refused.


@pytest.fixture
def conn(stack):
    """A connection in a transaction that is rolled back after the test:
    nothing it makes is ever committed, so no worker sees it."""
    from shared.db import get_engine

    with get_engine().connect() as conn:
        outer = conn.begin()
        try:
            yield conn
        finally:
            outer.rollback()


def _new_turn(conn) -> str:
    """A queued turn, made by Postgres's submit_turn()."""
    owner = conn.execute(
        text("INSERT INTO owners (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"), {"n": uuid.uuid4().hex}
    ).scalar()
    session = conn.execute(
        text("INSERT INTO sessions (id, owner_id) VALUES (gen_random_uuid(), :o) RETURNING id"), {"o": owner}
    ).scalar()
    turn_id = str(uuid.uuid4())
    submit = text(
        "SELECT created FROM submit_turn("
        ":s, :o, :t, gen_random_uuid(), 'q', NULL, NULL, false, :active, NULL, NULL, NULL, false, NULL)"
    )
    assert conn.execute(submit, {"s": session, "o": owner, "t": turn_id, "active": list(ACTIVE)}).scalar()
    return turn_id


def _path_to(status: str) -> list[str]:
    """Statuses from a new turn's to `status`, along the table's transitions."""
    paths = {SUBMIT.target: [SUBMIT.target]}
    while status not in paths:
        for t in TRANSITIONS:
            for source in t.sources:
                if source in paths and t.target not in paths:
                    paths[t.target] = [*paths[source], t.target]
    return paths[status]


def _status(conn, turn_id: str) -> str:
    return conn.execute(text("SELECT status FROM turns WHERE id = :t"), {"t": turn_id}).scalar()


def _set(conn, turn_id: str, status: str) -> None:
    conn.execute(text("UPDATE turns SET status = :s WHERE id = :t"), {"s": status, "t": turn_id})


def test_the_database_takes_every_transition_and_refuses_every_other(conn):
    for source, target in itertools.product(STATUSES, STATUSES):
        if source == target:
            continue  # not a change of status (HOLD keeps the row as it is)
        walk = conn.begin_nested()
        turn_id = _new_turn(conn)
        for step in _path_to(source)[1:]:
            _set(conn, turn_id, step)
        assert _status(conn, turn_id) == source
        if allowed(source, target):
            _set(conn, turn_id, target)
            assert _status(conn, turn_id) == target
        else:
            with pytest.raises(IntegrityError) as refused, conn.begin_nested():
                _set(conn, turn_id, target)
            assert isinstance(refused.value.orig, psycopg.errors.CheckViolation)
            assert f"{source} -> {target} is not a transition" in str(refused.value.orig)
            assert _status(conn, turn_id) == source
        walk.rollback()


def test_a_turn_is_made_queued_and_a_finish_cannot_leave_the_table(conn):
    turn_id = _new_turn(conn)
    assert _status(conn, turn_id) == SUBMIT.target
    session = conn.execute(text("SELECT session_id FROM turns WHERE id = :t"), {"t": turn_id}).scalar()
    made = text(
        "INSERT INTO turns (id, session_id, owner_id, number, status)"
        " SELECT gen_random_uuid(), id, owner_id, 99, :s FROM sessions WHERE id = :session"
    )
    for status in STATUSES:
        if status != SUBMIT.target:
            with pytest.raises(IntegrityError), conn.begin_nested():
                conn.execute(made, {"s": status, "session": session})
    conn.execute(text("UPDATE turns SET status = 'running', attempts = 1 WHERE id = :t"), {"t": turn_id})
    finish = text("SELECT ended FROM finish_turn(:t, :s, 1, :status, 'a', NULL, '[]', NULL, gen_random_uuid())")
    with pytest.raises(IntegrityError), conn.begin_nested():
        conn.execute(finish, {"t": turn_id, "s": session, "status": "paused"})  # no such status
    assert _status(conn, turn_id) == "running"
    assert conn.execute(finish, {"t": turn_id, "s": session, "status": "succeeded"}).scalar() == "ended"
    assert _status(conn, turn_id) == "succeeded"
