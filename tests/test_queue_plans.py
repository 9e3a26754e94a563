"""A long queue under statistics from when it was short: the statements a
turn runs find their row by its id or its session, never by walking every
queued turn through ix_turns_status_created (which the sweeper uses).

Postgres's statistics on `turns.status` are whatever its last ANALYZE saw;
autovacuum redoes it only once a tenth of the table changed. Queued turns
pile up when workers are away, and with statistics that say none are
queued, a plan made with the status known (a SQL function's literal; a
statement's first runs on a connection) takes `status = 'queued'` for the
cheapest lookup: with 10,000 queued, each claim walked 9,800 of them (0.75
ms) and each turn's end too (1 ms), measured at 98824b2. Here everything
happens in one transaction, rolled back, so nothing else sees its rows or
statistics. The claim is planned with its values inline, as its first
runs on a connection are.
"""

from __future__ import annotations

from sqlalchemy.dialects import postgresql

from shared.db import get_engine
from shared.migrations.functions import current_versions, function_sql
from tasks.turn import _CLAIM_WITH_HISTORY

ENDED, QUEUED = 2000, 3000


def _status_scans(conn, sql: str, params: dict | None = None) -> list[str]:
    """The plan's index scans whose condition is on the turn's status."""
    explain = "EXPLAIN (FORMAT JSON) " + sql
    plan = (conn.exec_driver_sql(explain, params) if params else conn.exec_driver_sql(explain)).scalar()
    found, nodes = [], [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if "status" in node.get("Index Cond", ""):
            found.append(f"{node['Node Type']} on {node.get('Index Name')}: {node['Index Cond']}")
    return found


def test_a_long_queue_under_old_statistics_is_not_walked_per_turn(stack):
    with get_engine().connect() as conn:
        try:
            # The statistics of a table of ended turns; then a queue builds up.
            owner_id = conn.exec_driver_sql(
                "INSERT INTO owners (id, name) VALUES (gen_random_uuid(), 'plans') RETURNING id"
            ).scalar()
            conn.exec_driver_sql(
                "INSERT INTO sessions (id, owner_id) SELECT gen_random_uuid(), %(o)s FROM generate_series(1, %(n)s)",
                {"o": owner_id, "n": ENDED + QUEUED},
            )
            add_turns = (  # queued, as every turn starts
                "INSERT INTO turns (id, session_id, owner_id, number)"
                " SELECT gen_random_uuid(), id, owner_id, 1 FROM sessions"
                " WHERE owner_id = %(o)s AND NOT EXISTS (SELECT FROM turns t WHERE t.session_id = sessions.id)"
                " LIMIT %(n)s"
            )
            # Others' turns are out of the statistics (deleted in this transaction: an
            # ANALYZE here samples none of them), so earlier tests' rows do not make
            # the planner's costs, and whether the trap below is set, depend on them.
            conn.exec_driver_sql("DELETE FROM turns WHERE owner_id <> %(o)s", {"o": owner_id})
            conn.exec_driver_sql(add_turns, {"o": owner_id, "n": ENDED})
            conn.exec_driver_sql("UPDATE turns SET status = 'cancelled' WHERE owner_id = %(o)s", {"o": owner_id})
            conn.exec_driver_sql("ANALYZE turns")
            conn.exec_driver_sql(add_turns, {"o": owner_id, "n": QUEUED})
            turn_id, session_id = conn.exec_driver_sql(
                "SELECT id, session_id FROM turns WHERE owner_id = %(o)s AND status = 'queued' LIMIT 1",
                {"o": owner_id},
            ).one()
            ids = {"turn_id": str(turn_id), "session_id": str(session_id), "model": "m"}

            # The trap is set: a plain lookup by id and status walks the queue.
            assert _status_scans(conn, "SELECT id FROM turns WHERE id = %(turn_id)s AND status = 'queued'", ids)

            claim = _CLAIM_WITH_HISTORY.params(turn_id=ids["turn_id"], model="m", max_running=16).compile(
                dialect=postgresql.psycopg.dialect(), compile_kwargs={"literal_binds": True}
            )
            assert not _status_scans(conn, str(claim)), "the claim"
            body = conn.exec_driver_sql("SELECT prosrc FROM pg_proc WHERE proname = 'next_queued_turn'").scalar()
            assert not _status_scans(conn, body.replace("p_session_id", "%(session_id)s"), ids), "next_queued_turn()"
            finish = _statement("finish_turn", "UPDATE turns", "p_turn_id", "%(turn_id)s", "p_attempt", "1")
            finish = finish.replace("p_status", "'succeeded'").replace("p_answer", "'a'")
            for name in ("p_usage", "p_tools", "p_error"):
                finish = finish.replace(name, "NULL")
            assert not _status_scans(conn, finish, ids), "finish_turn()'s update"
            busy = _statement("submit_turn", "SELECT FROM turns", "p_session_id", "%(session_id)s")
            busy = busy.replace("p_active", "ARRAY['queued', 'running']")
            assert not _status_scans(conn, busy, ids), "submit_turn()'s busy check"
        finally:
            conn.rollback()


def _statement(function: str, start: str, *replace: str) -> str:
    """The statement of a function's newest body that begins with `start`,
    its parameters replaced pairwise by `replace`."""
    newest = current_versions()[function]
    body = function_sql(function, newest).split("$$")[1]
    statement = body[body.index(start) :].split(";")[0]
    while statement.count(")") > statement.count("("):  # the close of an enclosing EXISTS (...)
        statement = statement[: statement.rindex(")")]
    for name, value in zip(replace[::2], replace[1::2], strict=True):
        statement = statement.replace(name, value)
    return statement
