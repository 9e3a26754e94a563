"""Replay benchmark: the bookkeeping of a 10,000-question replay.

    python -m tests.bench.replay [--questions 10000] [--concurrency 4] [--window 100] [--out .bench/replay.json]

Starts Postgres and Redis (no web, no worker: no model runs). Creates a
replay as `POST /api/replays` does (`create_replay`), then lives its whole
life as the worker would, with the model left out: `advance` in a
transaction of its own, as the task runs it (its events and sends after
commit); then, until the replay finishes, the oldest turn it started is
claimed (queued -> running, attempt 1, as the claim writes it) and ended
by Postgres's `finish_turn()` (every tenth failed), and `advance` runs
again, as the end of a turn sends it.

Measured: `--window` turn ends at the start, the middle and the end of the
replay (`--window 0`: every one). The stretches between are passed through
unmeasured by the replay's own advance, its concurrency raised for one
advance, so that a run takes minutes however much an advance costs.

For each advance: its time in this process (wall and CPU, from its first
statement to its last, commit left out), the CPU of its Postgres server
process, the statements it ran and the rows they returned (SQLAlchemy's
cursor events), and the rows Postgres read for it, by table
(`pg_stat_xact_user_tables` in its transaction: rows of sequential scans
and of index scans that fetched the row). The end is checked: the replay
finished, and its `replay.finished` event counts every question as its
turn ended. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event, select, text, update

from tests import services
from tests.bench.report import report

ENV = {
    "TURNSTREAM_ENV": "development",
    "REDIS_PREFIX": "replaybench:",
    "OPENAI_API_KEY": "offline",
    "SECRET_KEY": "bench-" + "x" * 32,
}
FAIL_EVERY = 10  # every tenth turn ends failed, so both counts move

# The rows this transaction has read so far, by table, and its server process.
_READ = text(
    "SELECT pg_backend_pid() AS pid, relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS read"
    " FROM pg_stat_xact_user_tables"
)
_TICK = os.sysconf("SC_CLK_TCK")
_FINISH = text(
    "SELECT ended, replay FROM finish_turn("
    ":turn_id, :session_id, 1, :status, :answer, '{}'::jsonb, '[]'::jsonb, :error, :message_id)"
)


class Counter:
    """Statements and rows returned on this thread's connections, while on."""

    def __init__(self, engine) -> None:
        self.on, self.statements, self.rows = False, 0, 0
        self.thread = threading.get_ident()
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.on and threading.get_ident() == self.thread:
            self.statements += 1

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.on and threading.get_ident() == self.thread and cursor.description is not None:
            self.rows += max(cursor.rowcount, 0)

    @contextmanager
    def counting(self):
        self.statements = self.rows = 0
        self.on = True
        try:
            yield
        finally:
            self.on = False


def timed_advance(counter: Counter, replay_id: str) -> dict:
    """One advance as the task runs it; its figures."""
    from shared.db import transaction
    from shared.replays import advance

    with transaction() as db:
        pid, before = rows_read(db)
        with counter.counting():
            server = server_cpu(pid)
            wall, cpu = time.perf_counter(), time.thread_time()
            advance(db, replay_id)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            server = server_cpu(pid) - server
        _pid, after = rows_read(db)
    read = {table: int(n - before.get(table, 0)) for table, n in after.items() if n - before.get(table, 0)}
    return {
        "ms": wall * 1000,
        "cpu_ms": cpu * 1000,
        "postgres_cpu_ms": server * 1000,
        "statements": counter.statements,
        "rows_returned": counter.rows,
        "rows_read": sum(read.values()),
        "rows_read_by_table": read,
    }


def rows_read(db) -> tuple[int, dict[str, int]]:
    rows = db.execute(_READ).all()
    return rows[0].pid, {row.relname: row.read for row in rows}


def server_cpu(pid: int) -> float:
    """CPU seconds a Postgres server process has used (user and system), in
    clock ticks: one advance's share is a tick or none, a stretch's mean is
    its cost."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def end_oldest_turn(owner_id: str, n: int) -> str | None:
    """Claim and end the owner's oldest queued turn, as a worker would; the
    replay finish_turn() names, or None if no turn was waiting."""
    from shared.db import autocommit_engine
    from shared.models import Turn, new_id
    from shared.turn_states import CLAIM, FAIL, QUEUED, SUCCEED

    with autocommit_engine().connect() as db:
        turn = db.execute(
            select(Turn.id, Turn.session_id)
            .where(Turn.owner_id == owner_id, Turn.status == QUEUED)
            .order_by(Turn.created_at, Turn.id)
            .limit(1)
        ).one_or_none()
        if turn is None:
            return None
        db.execute(
            update(Turn)
            .where(Turn.id == turn.id)
            .values(status=CLAIM.target, attempts=1, started_at=text("now()"), claimed_at=text("now()"))
        )
        failed = n % FAIL_EVERY == FAIL_EVERY - 1
        end = db.execute(
            _FINISH,
            {
                "turn_id": turn.id,
                "session_id": turn.session_id,
                "status": FAIL.target if failed else SUCCEED.target,
                "answer": "" if failed else "an answer",
                "error": json.dumps({"code": "bench", "message": "a failed turn"}) if failed else None,
                "message_id": new_id(),
            },
        ).one()
    assert end.ended == "ended", end
    return str(end.replay)


def by_tenth(runs: list[dict]) -> list[dict]:
    """Mean figures of each tenth of the turns' ends, in order."""
    out = []
    for i in range(10):
        part = runs[len(runs) * i // 10 : len(runs) * (i + 1) // 10]
        if part:
            out.append(
                {
                    "turn_ends": len(part),
                    "ms_mean": round(statistics.mean(r["ms"] for r in part), 3),
                    "statements_mean": round(statistics.mean(r["statements"] for r in part), 2),
                    "rows_returned_mean": round(statistics.mean(r["rows_returned"] for r in part), 1),
                    "rows_read_mean": round(statistics.mean(r["rows_read"] for r in part), 1),
                }
            )
    return out


def last_event(replay_id: str) -> dict:
    from shared.redis import get_redis, key

    [(_id, fields)] = get_redis().xrevrange(key("replay", replay_id, "events"), count=1)
    return json.loads(fields[b"d"])


def fast_forward(counter: Counter, replay_id: str, owner_id: str, ended: int, turns: int, concurrency: int) -> None:
    """Take the replay `turns` turn ends further, unmeasured, through its own
    advance: its concurrency raised so one advance starts them all, they end,
    it is lowered back and an advance counts them. Then ANALYZE, so the
    planner sees the tables as autovacuum would soon have them."""
    from shared.db import transaction
    from shared.models import Replay

    for more in (turns, 0):
        with transaction() as db:
            db.execute(update(Replay).where(Replay.id == replay_id).values(concurrency=concurrency + more))
        timed_advance(counter, replay_id)
        for n in range(ended, ended + more):
            end_oldest_turn(owner_id, n)
    analyze()


def analyze(tables: str = "replays, replay_items, turns, sessions, messages") -> None:
    from shared.db import autocommit_engine

    with autocommit_engine().connect() as db:
        db.execute(text(f"ANALYZE {tables}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4, help="the replay's (the CLI's default)")
    parser.add_argument(
        "--window",
        type=int,
        default=100,
        help="turn ends measured at the start, the middle and the end of the run (0: every one)",
    )
    parser.add_argument("--out", default=".bench/replay.json")
    args = parser.parse_args()
    n, c, w = args.questions, args.concurrency, args.window
    # Where each measured stretch starts, in turns ended, and how long it is.
    windows = [(0, n)] if w == 0 or 3 * w >= n else [(0, w), (n // 2 - w // 2, w), (n - w, w)]
    logging.basicConfig(level=logging.WARNING)
    with services.stack("turnstream-bench-replay-", ENV, (), mcp=False):
        from shared.db import get_engine, transaction
        from shared.models import Owner, Replay
        from shared.replays import create_replay

        counter = Counter(get_engine())
        with transaction() as db:
            owner = Owner(name=f"bench-replay-{uuid.uuid4().hex[:8]}")
            db.add(owner)
            db.flush()
            owner_id = owner.id
            began = time.perf_counter()
            replay_id = create_replay(db, owner_id, [{"message": f"question {i}"} for i in range(n)], c).id
        created_s = time.perf_counter() - began
        print(f"replay of {n} questions made in {created_s:.1f} s", flush=True)
        # Not the empty tables of turns, sessions and messages: with
        # statistics that say so, the planner reads all of them (a seq scan)
        # until the next ANALYZE, which a used database does not.
        analyze("replays, replay_items")

        began = time.perf_counter()
        start = timed_advance(counter, replay_id)
        ended, parts = 0, []
        for at, length in windows:
            if at > ended:
                print(f"  taking it to {at} turns ended (not measured) …", flush=True)
                fast_forward(counter, replay_id, owner_id, ended, at - ended, c)
                ended = at
            print(f"  measuring turn ends {at} to {at + length} …", flush=True)
            runs = []
            for _ in range(length):
                assert end_oldest_turn(owner_id, ended) == replay_id
                ended += 1
                runs.append(timed_advance(counter, replay_id))
            parts.append((at, runs))
        assert end_oldest_turn(owner_id, ended) is None  # nothing left to run
        with transaction() as db:
            finished_at = db.scalar(select(Replay.finished_at).where(Replay.id == replay_id))
        run_s = time.perf_counter() - began
        final = last_event(replay_id)

    failed = sum(1 for i in range(n) if i % FAIL_EVERY == FAIL_EVERY - 1)
    expected = {"status": "finished", "total": n, "succeeded": n - failed, "failed": failed}
    got = {k: final.get(k) for k in expected}
    every = [r for _at, runs in parts for r in runs]
    stretches = [{"from_turn_end": at, **summarise(runs), "by_tenth": by_tenth(runs)} for at, runs in parts]
    results = {
        "questions": n,
        "concurrency": c,
        "create_replay_s": round(created_s, 2),
        "first_advance": {k: round(v, 3) if isinstance(v, float) else v for k, v in start.items()},
        "advance_per_turn_end": summarise(every),
        "stretches": stretches,
        "turn_ends_measured": len(every),
        # Every turn's end of the replay, from the stretches' means (the
        # measured ones, with --window 0).
        "every_advance_estimated_s": {
            key: round(n * statistics.mean(part[f"{key}_mean"] for part in stretches) / 1000, 1)
            for key in ("ms", "cpu_ms", "postgres_cpu_ms")
        },
        "run_s": round(run_s, 1),
        "finished": finished_at is not None,
        "finished_event": got,
    }
    per = results["advance_per_turn_end"]
    rows = [
        ("questions, concurrency", f"{n}, {c}"),
        ("first advance: ms / statements / rows returned / rows read", _four(start)),
        ("advance per turn's end: ms p50 / p99 / max", f"{per['ms_p50']} / {per['ms_p99']} / {per['ms_max']}"),
        ("advance per turn's end: CPU ms here / in Postgres, mean", _pair(per, "cpu_ms_mean", "postgres_cpu_ms_mean")),
        ("advance per turn's end: statements", ", ".join(map(str, per["statements"]))),
        ("advance per turn's end: rows returned / read, mean", _pair(per, "rows_returned_mean", "rows_read_mean")),
        ("  read, by table", ", ".join(f"{t} {v}" for t, v in per["rows_read_mean_by_table"].items())),
    ]
    for part in results["stretches"]:
        rows.append(
            (
                f"  turn ends {part['from_turn_end']}+{part['turn_ends']}: ms / CPU ms here, Postgres / rows read",
                f"{part['ms_mean']} / {part['cpu_ms_mean']}, {part['postgres_cpu_ms_mean']} / {part['rows_read_mean']}",
            )
        )
    total = results["every_advance_estimated_s"]
    rows += [
        (
            f"every advance of the replay ({n} x the stretches' mean): s / CPU s here, Postgres",
            f"{total['ms']} / {total['cpu_ms']}, {total['postgres_cpu_ms']}",
        ),
        ("the whole run (fast-forwards and finish_turn() included): s", results["run_s"]),
        ("finished; its last event", f"{results['finished']}; {got}"),
    ]
    report(rows, results, args.out)
    if not results["finished"] or got != expected:
        raise SystemExit(f"the replay did not end as it should: expected {expected}")


def summarise(runs: list[dict]) -> dict:
    ms = sorted(r["ms"] for r in runs)
    return {
        "turn_ends": len(runs),
        "ms_mean": round(statistics.mean(ms), 3),
        "ms_p50": round(statistics.median(ms), 3),
        "ms_p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
        "ms_max": round(ms[-1], 3),
        "cpu_ms_mean": round(statistics.mean(r["cpu_ms"] for r in runs), 3),
        "postgres_cpu_ms_mean": round(statistics.mean(r["postgres_cpu_ms"] for r in runs), 3),
        "statements": sorted({r["statements"] for r in runs}),
        "rows_returned_mean": round(statistics.mean(r["rows_returned"] for r in runs), 1),
        "rows_read_mean": round(statistics.mean(r["rows_read"] for r in runs), 1),
        "rows_read_mean_by_table": {
            table: round(sum(r["rows_read_by_table"].get(table, 0) for r in runs) / len(runs), 1)
            for table in sorted({t for r in runs for t in r["rows_read_by_table"]})
        },
    }


def _pair(r: dict, a: str, b: str) -> str:
    return f"{r[a]} / {r[b]}"


def _four(r: dict) -> str:
    return f"{r['ms']:.1f} / {r['statements']} / {r['rows_returned']} / {r['rows_read']}"


if __name__ == "__main__":
    main()
