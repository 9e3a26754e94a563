"""What web runs again while Postgres is away (shared/db.run_again_while_away):
work that sent no write, or that writes nothing; never work whose COMMIT was
sent, whose outcome a lost connection leaves unknown."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from shared.db import run_again_while_away, transaction


def _cut() -> OperationalError:
    return OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed the connection unexpectedly"))


@pytest.mark.parametrize(
    ("commit_first", "writes", "runs"),
    [(False, True, 2), (True, False, 2), (True, True, 1)],
)
def test_work_runs_again_unless_its_commit_was_sent(stack, commit_first, writes, runs):
    calls = []

    def work() -> str:
        calls.append(1)
        if commit_first:
            with transaction() as db:
                db.execute(text("SELECT 1"))
        if len(calls) == 1:
            raise _cut()
        return "done"

    if runs == 1:
        with pytest.raises(OperationalError):
            run_again_while_away(work, writes=writes)
    else:
        assert run_again_while_away(work, writes=writes) == "done"
    assert len(calls) == runs


def test_an_error_that_is_not_an_outage_is_not_run_again(stack):
    calls = []

    def work() -> None:
        calls.append(1)
        with transaction() as db:
            db.execute(text("SELECT 1/0"))

    with pytest.raises(Exception, match="division by zero"):
        run_again_while_away(work, writes=False)
    assert len(calls) == 1
