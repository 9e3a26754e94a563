"""The bundled SQL MCP server through the real mcp client over stdio:
read-only enforced by the database, a statement timeout and a row limit."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from mcp import Client, StdioServerParameters

from tests.services import ROOT


def _call_all(url: str, calls: list[tuple[str, dict]], *flags: str) -> list[tuple[bool, str]]:
    async def go():
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "tasks.mcp.sql", *flags], env={"DATABASE_URL": url}, cwd=str(ROOT)
        )
        async with Client(params) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert names == {"list_tables", "describe_table", "query"}
            results = []
            for name, args in calls:
                r = await client.call_tool(name, args)
                results.append((not r.is_error, r.content[0].text))
            return results

    return asyncio.run(go())


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


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO products VALUES (99, 'x', 'y', 1)",
        "UPDATE orders SET quantity = 0",
        "SET default_transaction_read_only = off; COMMIT; DELETE FROM orders",
        "SET TRANSACTION READ WRITE",
        "CREATE TABLE evil (id int)",
    ],
)
def test_writes_are_refused_by_the_database_even_as_a_superuser(stack, sql):
    # the test connects as the cluster's superuser: only the transaction stops it
    superuser = stack["demo_url"].replace("turnstream_reader@", "turnstream@")
    [(ok, out)] = _call_all(superuser, [("query", {"sql": sql})])
    assert not ok
    assert any(s in out for s in ("read-only transaction", "multiple commands", "before any query")), out
    [(ok, out)] = _call_all(superuser, [("query", {"sql": "SELECT count(*) FROM orders WHERE quantity > 0"})])
    assert json.loads(out)["rows"] == [[400]]


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
