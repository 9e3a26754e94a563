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


def test_a_pooled_connection_past_descriptor_1024_is_checked_out(stack):
    """A web process holding thousands of streams opens its Postgres
    connections on descriptors select() cannot watch; the check at checkout
    (shared/db.py) must still work there."""
    import os
    import resource

    from shared.db import get_engine

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1400:
        pytest.skip("this machine allows fewer than 1,400 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    engine = get_engine()
    engine.dispose()
    pipes = [os.pipe() for _ in range(600)]  # the next connections open on descriptors past 1,024
    try:
        for _ in range(2):  # a new connection, then the same one from the pool
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
                assert conn.connection.dbapi_connection.pgconn.socket > 1024
    finally:
        engine.dispose()
        for r, w in pipes:
            os.close(r)
            os.close(w)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
