"""The bundled SQL MCP server through the real mcp client over stdio: only a
role that can do nothing but read, read-only enforced by the database too,
a statement timeout, row and byte limits, and a cap on connections."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from mcp import Client, StdioServerParameters

from tests.services import ROOT


def _call_all(url: str, calls: list[tuple[str, dict]], *flags: str, at_once: bool = False) -> list[tuple[bool, str]]:
    async def go():
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "tasks.mcp.sql", *flags], env={"DATABASE_URL": url}, cwd=str(ROOT)
        )
        async with Client(params) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert names == {"list_tables", "describe_table", "query"}

            async def call(name, args):
                r = await client.call_tool(name, args)
                return not r.is_error, r.content[0].text

            if at_once:
                return await asyncio.gather(*(call(name, args) for name, args in calls))
            return [await call(name, args) for name, args in calls]

    return asyncio.run(go())


def _as(url: str, user: str) -> str:
    """The same database URL for another role (trust authentication here)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))


@pytest.fixture(scope="module")
def demo(stack):
    return stack["demo_url"]


def test_demo_data_answers_questions(demo):
    (ok, out), (ok2, out2) = _call_all(
        demo,
        [
            ("query", {"sql": "SELECT count(*) AS n FROM customers"}),
            ("query", {"sql": "SELECT category, count(*) FROM products GROUP BY 1 ORDER BY 1"}),
        ],
    )
    assert ok and json.loads(out) == {"columns": ["n"], "rows": [[60]], "truncated": False}
    assert ok2 and json.loads(out2)["rows"] == [["electronics", 4], ["home", 3], ["stationery", 3], ["travel", 2]]


def test_a_superuser_is_refused_with_how_to_make_a_reader(stack):
    [(ok, out)] = _call_all(_as(stack["demo_url"], "turnstream"), [("query", {"sql": "SELECT 1"})])
    assert not ok
    assert "refuses to run as 'turnstream'" in out and "a superuser" in out
    assert "GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader" in out


def test_a_role_that_can_write_is_refused_and_says_where(stack):
    import psycopg

    writer = f"writer_{uuid.uuid4().hex[:8]}"
    admin_url = _as(stack["demo_url"], "turnstream")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {writer} LOGIN")
        admin.execute(f"GRANT SELECT, INSERT ON orders TO {writer}")
    try:
        [(ok, out)] = _call_all(_as(stack["demo_url"], writer), [("query", {"sql": "SELECT 1"})])
        assert not ok and "write to orders" in out
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"REVOKE ALL ON orders FROM {writer}")
            admin.execute(f"DROP ROLE {writer}")


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO products VALUES (99, 'x', 'y', 1)",
        "UPDATE orders SET quantity = 0",
        "SET default_transaction_read_only = off; COMMIT; DELETE FROM orders",
        "SET TRANSACTION READ WRITE",
        "CREATE TABLE evil (id int)",
        "COPY (SELECT 1) TO PROGRAM 'true'",
    ],
)
def test_writes_are_refused_by_the_database(demo, sql):
    [(ok, out)] = _call_all(demo, [("query", {"sql": sql})])
    assert not ok
    refusals = ("read-only transaction", "multiple commands", "before any query", "permission denied", "must be")
    assert any(s in out for s in refusals), out
    [(ok, out)] = _call_all(demo, [("query", {"sql": "SELECT count(*) FROM orders WHERE quantity > 0"})])
    assert json.loads(out)["rows"] == [[400]]


def test_the_demo_reader_has_a_password(demo):
    assert urlsplit(demo).password


def test_a_huge_value_is_cut_in_the_server(demo):
    [(ok, out)] = _call_all(
        demo, [("query", {"sql": "SELECT repeat('x', 3000000) AS big, 1 AS n"})], "--max-bytes", "10000"
    )
    result = json.loads(out)
    assert ok and len(out) < 10_000 and result["truncated"] is False
    assert result["rows"][0][0] == "x" * 2500 + "…" and result["rows"][0][1] == 1
    [(ok, out)] = _call_all(demo, [("query", {"sql": "SELECT repeat('y', 900) FROM orders"})], "--max-bytes", "10000")
    result = json.loads(out)
    assert ok and len(out) < 10_000 and result["truncated"] is True and 0 < len(result["rows"]) < 12


def test_calls_at_once_share_a_capped_number_of_connections(stack, demo):
    import psycopg

    seen, done = [], threading.Event()

    def watch():
        with psycopg.connect(_as(demo, "turnstream"), autocommit=True) as conn:
            while not done.is_set():
                seen.append(
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'turnstream_reader'"
                        " AND query LIKE '%pg_sleep(0.3)%'"
                    ).fetchone()[0]
                )
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        calls = [("query", {"sql": "SELECT pg_sleep(0.3)"})] * 6
        results = _call_all(demo, calls, "--max-connections", "2", at_once=True)
    finally:
        done.set()
        watcher.join()
    assert all(ok for ok, _out in results)
    assert max(seen) == 2, seen


def test_the_reader_role_cannot_see_other_tables(stack, demo):
    app_db = demo.replace("/turnstream_demo", "/turnstream")
    [(ok, out)] = _call_all(app_db, [("query", {"sql": "SELECT key_hash FROM api_keys"})])
    assert not ok and "permission denied" in out


def test_statement_timeout_and_row_limit(demo):
    (ok, out), (ok2, out2) = _call_all(
        demo,
        [("query", {"sql": "SELECT pg_sleep(5)"}), ("query", {"sql": "SELECT id FROM orders ORDER BY id"})],
        "--timeout-ms",
        "300",
        "--max-rows",
        "7",
    )
    assert not ok and "statement timeout" in out
    result = json.loads(out2)
    assert result["rows"] == [[i] for i in range(1, 8)] and result["truncated"] is True


def test_list_and_describe(demo):
    (ok, tables), (ok2, columns), (ok3, missing) = _call_all(
        demo,
        [("list_tables", {}), ("describe_table", {"table": "public.customers"}), ("describe_table", {"table": "nope"})],
    )
    assert [t[0] for t in json.loads(tables)] == ["public.customers", "public.orders", "public.products"]
    assert ["email", "text", False] in json.loads(columns)
    assert not ok3 and "no table named 'nope'" in missing
