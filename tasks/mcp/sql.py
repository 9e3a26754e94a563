"""Read-only SQL over a database URL, as an MCP server on stdio.

    python -m tasks.mcp.sql [--database-url URL] [--max-rows N] [--timeout-ms N]
    python -m tasks.mcp.sql demo URL     create (or refill) the demo database at URL

Tools: `list_tables`, `describe_table`, `query`. It connects only as a role
that can do nothing but read: a superuser, a member of the roles that reach
the server's files and programs, or a role that can create or write
anything is refused with a sentence saying how to make a reader role (the
demo makes one, `turnstream_reader`). Then the database enforces read-only
too: every call runs in a transaction started READ ONLY (with
`default_transaction_read_only` on for the connection), the statement is
sent alone in the extended protocol (so "…; COMMIT; INSERT …" is refused), a
statement timeout bounds it, rows are read one at a time and at most
--max-rows rows and --max-bytes bytes of them come back, and at most
--max-connections calls run at once.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import decimal
import json
import os
import random
import secrets
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from psycopg import sql as pgsql

READER_ROLE = "turnstream_reader"


def _libpq_url(url: str) -> str:
    """postgres://, postgresql:// and postgresql+psycopg:// all name the same database."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


# What a role must not be able to do, as (the check's column, what it means).
_POWERS = (
    ("rolsuper", "do anything (a superuser)"),
    ("rolcreaterole", "create roles"),
    ("rolcreatedb", "create databases"),
    ("programs", "run programs on the database server (pg_execute_server_program)"),
    ("read_files", "read the database server's files (pg_read_server_files)"),
    ("write_files", "write the database server's files (pg_write_server_files)"),
    ("create_schema", "create schemas"),
    ("create_in", "create objects in schema"),
    ("writable", "write to"),
)
_ROLE_CHECK = """
SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb,
    pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER') AS programs,
    pg_has_role(current_user, 'pg_read_server_files', 'MEMBER') AS read_files,
    pg_has_role(current_user, 'pg_write_server_files', 'MEMBER') AS write_files,
    has_database_privilege(current_database(), 'CREATE') AS create_schema,
    (SELECT string_agg(n.nspname, ', ') FROM pg_namespace n
        WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
          AND has_schema_privilege(n.oid, 'CREATE')) AS create_in,
    (SELECT string_agg(c.oid::regclass::text, ', ') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'f') AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
          AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')) AS writable
FROM pg_roles r WHERE r.rolname = current_user
"""


def _refusal(user: str, database: str, powers: dict[str, Any]) -> str | None:
    """The sentence refusing a role that can do more than read, or None."""
    can = [f"{what} {value}" if isinstance(value, str) else what for name, what in _POWERS if (value := powers[name])]
    if not can:
        return None
    return (
        f"the SQL tool refuses to run as {user!r}, which can {'; '.join(can)}. Connect it as a role that can only"
        f" read: CREATE ROLE reader LOGIN PASSWORD '…'; GRANT CONNECT ON DATABASE {database} TO reader;"
        " GRANT USAGE ON SCHEMA public TO reader; GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader;"
        " then use that role in the tool's DATABASE_URL (`python -m tasks.mcp.sql demo URL` makes one for the demo)."
    )


class ReadOnlySQL:
    def __init__(
        self, url: str, max_rows: int, timeout_ms: int, max_bytes: int = 1_000_000, max_connections: int = 4
    ) -> None:
        self.url = _libpq_url(url)
        self.max_rows = max_rows
        self.timeout_ms = timeout_ms
        self.max_bytes = max_bytes
        self._connections = asyncio.Semaphore(max_connections)
        self._refused: str | None = None
        self._checked = False

    async def run(self, statement: str, params: tuple[Any, ...] = (), max_rows: int | None = None) -> dict[str, Any]:
        max_rows = max_rows or self.max_rows
        options = f"-c default_transaction_read_only=on -c statement_timeout={self.timeout_ms}"
        try:
            async with (
                self._connections,
                await psycopg.AsyncConnection.connect(self.url, options=options, connect_timeout=10) as conn,
            ):
                await self._check_role(conn)
                await conn.execute("SET TRANSACTION READ ONLY")
                # A query now, so the transaction can no longer be switched to READ WRITE.
                await conn.execute("SELECT 1")
                return await self._read(conn, statement, params, max_rows)
        except psycopg.Error as exc:
            raise ToolError(str(exc).strip()) from None

    async def _check_role(self, conn: psycopg.AsyncConnection) -> None:
        if not self._checked:
            cur = await conn.execute(_ROLE_CHECK)
            powers = dict(zip([d.name for d in cur.description], await cur.fetchone(), strict=True))
            self._refused = _refusal(conn.info.user, conn.info.dbname, powers)
            self._checked = True
        if self._refused is not None:
            raise ToolError(self._refused)

    async def _read(
        self, conn: psycopg.AsyncConnection, statement: str, params: tuple[Any, ...], max_rows: int
    ) -> dict[str, Any]:
        """Rows one at a time (single-row mode: a huge result is never held
        whole), cut at max_rows rows or max_bytes of the answer's JSON."""
        rows: list[list[Any]] = []
        size, truncated = 0, False
        cur = conn.cursor()
        async for row in cur.stream(statement, params or None):
            if len(rows) == max_rows:
                truncated = True
                break
            if not size:  # the answer around the rows
                size = len(json.dumps({"columns": [d.name for d in cur.description], "rows": [], "truncated": True}))
            plain = [_plain(v, self.max_bytes // 4) for v in row]  # a huge value shows, cut
            size += len(json.dumps(plain, default=str)) + 2  # and its ", "
            if size > self.max_bytes:
                truncated = True
                break
            rows.append(plain)
        if cur.description is None:
            return {"columns": [], "rows": [], "truncated": False, "status": cur.statusmessage}
        return {"columns": [d.name for d in cur.description], "rows": rows, "truncated": truncated}


def _plain(value: Any, max_chars: int) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (int, float, bool, type(None), list, dict)):
        return value
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= max_chars else text[:max_chars] + "…"


def build_server(db: ReadOnlySQL) -> MCPServer:
    server = MCPServer("turnstream-sql", instructions="Read-only SQL over one database.")
    # Said to clients: an assistant may let read-only tools run without asking a person.
    reads = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

    @server.tool(annotations=reads)
    async def list_tables() -> str:
        """List the tables and views you can read, with their approximate row counts."""
        result = await db.run(
            "SELECT table_schema || '.' || table_name AS table, table_type AS kind,"
            " coalesce((SELECT greatest(reltuples, 0)::bigint FROM pg_class"
            "   WHERE oid = (quote_ident(table_schema) || '.' || quote_ident(table_name))::regclass), 0) AS rows"
            " FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            " ORDER BY 1",
            max_rows=10_000,
        )
        return json.dumps(result["rows"])

    @server.tool(annotations=reads)
    async def describe_table(table: str) -> str:
        """Describe a table's columns: name, type, nullable. `table` is `name` or `schema.name`."""
        schema, _, name = table.rpartition(".")
        result = await db.run(
            "SELECT column_name, data_type, is_nullable = 'YES' AS nullable FROM information_schema.columns"
            " WHERE table_name = %s AND (%s = '' OR table_schema = %s)"
            " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
            " ORDER BY table_schema, ordinal_position",
            (name, schema, schema),
            max_rows=10_000,
        )
        if not result["rows"]:
            raise ToolError(f"there is no table named {table!r}; list_tables shows what exists")
        return json.dumps(result["rows"])

    @server.tool(annotations=reads)
    async def query(sql: str) -> str:
        """Run one read-only SQL statement (PostgreSQL) and return its columns and rows as JSON."""
        return json.dumps(await db.run(sql), default=str)

    return server


# The demo dataset: a small shop. Dates are relative to the day it is made,
# so "last week" always means something; everything else is fixed by the seed.
_DEMO_SCHEMA = """
DROP TABLE IF EXISTS orders, products, customers;
CREATE TABLE customers (
    id integer PRIMARY KEY, name text NOT NULL, email text NOT NULL UNIQUE,
    country text NOT NULL, signed_up_at date NOT NULL);
CREATE TABLE products (
    id integer PRIMARY KEY, name text NOT NULL, category text NOT NULL, price numeric(10, 2) NOT NULL);
CREATE TABLE orders (
    id integer PRIMARY KEY, customer_id integer NOT NULL REFERENCES customers,
    product_id integer NOT NULL REFERENCES products, quantity integer NOT NULL,
    status text NOT NULL, ordered_at date NOT NULL);
"""
_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia", "Ken", "Sophie", "Linus"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Backus", "Perlman", "Thompson"]
_COUNTRIES = ["UK", "US", "NL", "FR", "DE", "IN", "BR", "JP"]
_PRODUCTS = [
    ("Notebook", "stationery", 4.5),
    ("Fountain pen", "stationery", 32.0),
    ("Desk lamp", "home", 45.0),
    ("Mug", "home", 9.5),
    ("Keyboard", "electronics", 79.0),
    ("Mouse", "electronics", 25.0),
    ("Monitor", "electronics", 219.0),
    ("Backpack", "travel", 65.0),
    ("Water bottle", "travel", 18.0),
    ("Headphones", "electronics", 129.0),
    ("Plant pot", "home", 14.0),
    ("Sketchbook", "stationery", 12.0),
]


def make_demo(url: str, customers: int = 60, orders: int = 400) -> str:
    """Create the demo database (if missing) and fill it; returns a read-only URL for it."""
    url = _libpq_url(url)
    info = psycopg.conninfo.conninfo_to_dict(url)
    name = info.get("dbname")
    if not name:
        raise SystemExit("the demo database URL must name a database")
    role = pgsql.Identifier(READER_ROLE)
    password = secrets.token_urlsafe(24)
    with psycopg.connect(psycopg.conninfo.make_conninfo(url, dbname="postgres"), autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER_ROLE,)).fetchone():
            admin.execute(pgsql.SQL("CREATE ROLE {} LOGIN").format(role))
        admin.execute(pgsql.SQL("ALTER ROLE {} PASSWORD {}").format(role, pgsql.Literal(password)))
        # Every database may be connected to by any role unless PUBLIC loses
        # CONNECT: the reader keeps it on the demo's only. (Owners and
        # superusers connect regardless.)
        others = admin.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> %s"
            " AND datdba = (SELECT oid FROM pg_roles WHERE rolname = current_user)",
            (name,),
        ).fetchall()
        for (other,) in others:
            admin.execute(pgsql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(pgsql.Identifier(other)))
    rng = random.Random(7)
    today = dt.date.today()
    with psycopg.connect(url) as conn:
        conn.execute(_DEMO_SCHEMA)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO customers VALUES (%s, %s, %s, %s, %s)",
                [
                    (
                        i,
                        f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                        f"customer{i}@example.com",
                        rng.choice(_COUNTRIES),
                        today - dt.timedelta(days=min(int(rng.expovariate(1 / 45)), 364)),  # recent ones more often
                    )
                    for i in range(1, customers + 1)
                ],
            )
            cur.executemany(
                "INSERT INTO products VALUES (%s, %s, %s, %s)",
                [(i, n, c, p) for i, (n, c, p) in enumerate(_PRODUCTS, 1)],
            )
            cur.executemany(
                "INSERT INTO orders VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (
                        i,
                        rng.randrange(1, customers + 1),
                        rng.randrange(1, len(_PRODUCTS) + 1),
                        rng.choice([1, 1, 1, 2, 3]),
                        rng.choice(["paid", "paid", "paid", "shipped", "refunded"]),
                        today - dt.timedelta(days=rng.randrange(0, 180)),
                    )
                    for i in range(1, orders + 1)
                ],
            )
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute(pgsql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(pgsql.Identifier(name), role))
        conn.execute(pgsql.SQL("GRANT SELECT ON customers, products, orders TO {}").format(role))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE customers, products, orders")  # so list_tables shows row counts
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{READER_ROLE}:{password}@{parts.netloc.rpartition('@')[2]}"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        parser = argparse.ArgumentParser(prog="python -m tasks.mcp.sql demo")
        parser.add_argument("url", help="database URL; the database is created if missing")
        args = parser.parse_args(argv[1:])
        print(make_demo(args.url))
        return
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m tasks.mcp.sql",
        description=__doc__.split("\n\n")[0],
        epilog="python -m tasks.mcp.sql demo URL creates (or refills) a demo shop database at URL and a role"
        " that can only read it, and prints that role's URL.",
    )
    parser.add_argument("--database-url", default=env("DATABASE_URL"), help="the database to read (DATABASE_URL)")
    parser.add_argument(
        "--max-rows", type=int, default=int(env("SQL_MAX_ROWS", "200")), help="rows a query returns at most (200)"
    )
    parser.add_argument(
        "--timeout-ms", type=int, default=int(env("SQL_TIMEOUT_MS", "5000")), help="statement timeout (5000 ms)"
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=int(env("SQL_MAX_BYTES", "1000000")),
        help="bytes of JSON a query returns at most (1000000); longer values are cut",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=int(env("SQL_MAX_CONNECTIONS", "4")),
        help="calls run at once, each on a connection of its own (4); more wait",
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url or DATABASE_URL is required")
    db = ReadOnlySQL(args.database_url, args.max_rows, args.timeout_ms, args.max_bytes, args.max_connections)
    build_server(db).run()


if __name__ == "__main__":
    main()
