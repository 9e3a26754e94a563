"""The Postgres functions: the migrated database runs each function's newest
.sql file (shared/migrations/functions/), so that file is its current text."""

from __future__ import annotations

from sqlalchemy import text

from shared.db import get_engine
from shared.migrations.functions import current_versions, function_sql


def _body(sql: str) -> str:
    return sql.split("$$")[1]


def test_the_database_runs_the_newest_version_of_each_function(stack):
    newest = current_versions()
    assert set(newest) == {
        "submit_turn",
        "finish_turn",
        "next_queued_turn",
        "owner_may_run",
        "turn_status_change",
        "webhook_turn_event",
        "webhook_replay_event",
    }
    with get_engine().connect() as conn:
        for name, version in newest.items():
            running = conn.execute(text("SELECT prosrc FROM pg_proc WHERE proname = :n"), {"n": name}).scalars().all()
            assert running == [_body(function_sql(name, version))], f"{name}: not v{version}"
