"""The chat list under an owner's evaluation runs: 10,000 replay sessions
newer than their 30 chats. The chat page's list (`origin=chat`) reads its
page from the partial index ix_sessions_owner_chats, so what it reads is
the page, not the replay sessions before it (through ix_sessions_owner_created
it would walk all 10,000 to find the chats). Everything happens in one
transaction, rolled back: no other test sees its rows or statistics.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.dialects import postgresql

from shared.db import get_engine
from web.sessions import session_page

CHATS, REPLAY_SESSIONS, LIMIT = 30, 10_000, 20


def _plan(conn, query) -> dict:
    sql = query.compile(dialect=postgresql.psycopg.dialect(), compile_kwargs={"literal_binds": True})
    return conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").scalar()[0]["Plan"]


def _reads(plan: dict) -> list[tuple[str, str | None, int]]:
    """How the plan reads `sessions` (not the message counts' subplans):
    each scan's node type, index and the rows it returned."""
    found, nodes = [], [plan]
    while nodes:
        node = nodes.pop()
        nodes += [n for n in node.get("Plans", []) if n.get("Parent Relationship") != "SubPlan"]
        if node.get("Relation Name") == "sessions" or node.get("Index Name", "").startswith("ix_sessions"):
            found.append((node["Node Type"], node.get("Index Name"), node["Actual Rows"]))
    return found


def _indexes(reads: list[tuple[str, str | None, int]]) -> set[str | None]:
    """The indexes read (a bitmap heap scan's is its child's)."""
    return {index for kind, index, _ in reads if kind != "Bitmap Heap Scan"}


def test_the_chat_list_reads_its_page_from_the_chat_index_under_10000_newer_replay_sessions(stack):
    with get_engine().connect() as conn:
        try:
            owner_id = str(
                conn.exec_driver_sql(
                    "INSERT INTO owners (id, name) VALUES (gen_random_uuid(), 'session-plans') RETURNING id"
                ).scalar()
            )
            replay_id = conn.exec_driver_sql(
                "INSERT INTO replays (id, owner_id, concurrency) VALUES (gen_random_uuid(), %(o)s, 4) RETURNING id",
                {"o": owner_id},
            ).scalar()
            # The chats an hour ago, then the runs' sessions, each a second apart.
            conn.exec_driver_sql(
                "INSERT INTO sessions (id, owner_id, title, created_at) SELECT gen_random_uuid(), %(o)s, 'chat ' || i,"
                " now() - interval '2 hours' + i * interval '1 second' FROM generate_series(1, %(n)s) i",
                {"o": owner_id, "n": CHATS},
            )
            conn.exec_driver_sql(
                "INSERT INTO sessions (id, owner_id, title, replay_id, metadata, created_at)"
                " SELECT gen_random_uuid(), %(o)s, 'question ' || i, %(r)s, jsonb_build_object('replay_id', %(r)s),"
                " now() - interval '1 hour' + i * interval '1 second' FROM generate_series(1, %(n)s) i",
                {"o": owner_id, "r": replay_id, "n": REPLAY_SESSIONS},
            )
            conn.exec_driver_sql("ANALYZE sessions")

            # The first page: read from the chats' index, at most the chats
            # (an index scan backward stops at the page's 21 rows; a bitmap
            # scan and a sort read the 30), never the 10,000 newer sessions.
            first = _plan(conn, session_page(owner_id, LIMIT, origin="chat"))
            reads = _reads(first)
            print(f"origin=chat, first page: {reads}, {first['Actual Total Time']} ms")
            assert _indexes(reads) == {"ix_sessions_owner_chats"}, reads
            assert max(rows for _, _, rows in reads) <= CHATS and first["Actual Rows"] == LIMIT + 1, reads

            # The next page, after a cursor, from the same index.
            cursor = conn.exec_driver_sql(
                "SELECT created_at, id FROM sessions WHERE owner_id = %(o)s AND replay_id IS NULL"
                " ORDER BY created_at DESC, id DESC OFFSET %(n)s LIMIT 1",
                {"o": owner_id, "n": LIMIT - 1},
            ).one()
            assert isinstance(cursor[0], datetime)
            after = _plan(conn, session_page(owner_id, LIMIT, origin="chat", cursor=(cursor[0], str(cursor[1]))))
            reads = _reads(after)
            print(f"origin=chat, second page: {reads}, {after['Actual Total Time']} ms")
            assert _indexes(reads) == {"ix_sessions_owner_chats"}, reads
            assert max(rows for _, _, rows in reads) <= CHATS and after["Actual Rows"] == CHATS - LIMIT, reads

            # The list of every session (the API's default) still reads a page.
            every = _plan(conn, session_page(owner_id, LIMIT))
            reads = _reads(every)
            print(f"origin=all, first page: {reads}, {every['Actual Total Time']} ms")
            assert _indexes(reads) == {"ix_sessions_owner_created"}, reads
            assert every["Actual Rows"] == LIMIT + 1 and max(rows for _, _, rows in reads) <= LIMIT + 1, reads
        finally:
            conn.rollback()
