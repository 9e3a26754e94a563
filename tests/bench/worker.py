"""Worker benchmark: how many turns one worker process keeps in flight, and
what it costs in CPU per streamed delta. Starts its own Postgres, Redis,
offline model and workers; prints a table and writes JSON.

    python -m tests.bench.worker [--turns 400] [--concurrency 200] [--out .bench/worker.json]

1. I/O concurrency. The model streams 100 tokens, 200 ms apart (about 20 s
   a turn). Baseline: the same streams read straight from the model with the
   `openai` client in `concurrency` threads. Turnstream: the same number of
   turns through web -> Postgres -> Celery -> one worker process (threads
   pool, `concurrency` threads) -> Redis, queued first, then counted from the
   first turn's start to the last one's end. Figures: turns per second of
   each, and their ratio; the most turns seen running at once.
2. CPU per delta. Baselines, reading instant 3,000-token streams in this
   process (thread CPU time per chunk): the `openai` client's typed chunks,
   and the worker's own reader alone (the same client, chunks left as dicts,
   nothing done per delta). Turnstream: the worker process's CPU (utime +
   stime from /proc) over the deltas it streamed, for 3,000-token turns;
   "added" is what it spends beyond its reader alone. Also the deltas per
   second one and two worker processes sustain.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import func, select

from tests import bench, services
from tests.bench.report import report

ENV = {
    **bench.ENV,
    "REDIS_PREFIX": "bench:",
    "OPENAI_MAX_RETRIES": "0",
    "OPENAI_TIMEOUT": "60",
}
SLOW = "bench [[tokens=100]] [[delay=0.2]]"
FAST = "bench [[tokens=3000]]"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Bench:
    def __init__(self, info: dict) -> None:
        from web import create_app
        from web.auth import create_key

        self.info = info
        self.client = create_app().test_client()
        self.headers = {"Authorization": f"Bearer {create_key('bench-' + uuid.uuid4().hex[:8])}"}

    def submit(self, n: int, message: str) -> list[str]:
        ids = []
        for _ in range(n):
            sid = self.client.post("/api/sessions", json={}, headers=self.headers).get_json()["id"]
            r = self.client.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=self.headers)
            ids.append(r.get_json()["id"])
        return ids

    def wait(self, ids: list[str], timeout: float) -> dict:
        """Poll Postgres until every turn is terminal; the most seen running at once."""
        from shared.db import transaction
        from shared.models import Turn

        peak, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            with transaction() as db:
                rows = dict(
                    db.execute(select(Turn.status, func.count()).where(Turn.id.in_(ids)).group_by(Turn.status)).all()
                )
            peak = max(peak, rows.get("running", 0))
            if sum(rows.get(s, 0) for s in ("succeeded", "failed", "cancelled")) == len(ids):
                return {"peak_running": peak, "statuses": rows, "finished_at": time.monotonic()}
            time.sleep(0.2)
        raise SystemExit(f"turns did not finish in {timeout}s: {rows}")

    def span(self, ids: list[str]) -> float:
        """Seconds from the first turn's start to the last one's end."""
        from shared.db import transaction
        from shared.models import Turn

        with transaction() as db:
            first, last = db.execute(
                select(func.min(Turn.started_at), func.max(Turn.finished_at)).where(Turn.id.in_(ids))
            ).one()
        return (last - first).total_seconds()

    def timings(self, ids: list[str]) -> dict:
        """Median and worst seconds turns waited queued, and ran."""
        from shared.db import transaction
        from shared.models import Turn

        with transaction() as db:
            rows = db.execute(select(Turn.created_at, Turn.started_at, Turn.finished_at).where(Turn.id.in_(ids))).all()
        waited = sorted((s - c).total_seconds() for c, s, _f in rows)
        ran = sorted((f - s).total_seconds() for _c, s, f in rows)
        return {
            "queued_s_p50": round(statistics.median(waited), 2),
            "queued_s_max": round(waited[-1], 2),
            "ran_s_p50": round(statistics.median(ran), 2),
            "ran_s_max": round(ran[-1], 2),
        }

    def deltas_of(self, ids: list[str]) -> int:
        from shared.db import transaction
        from shared.models import Turn

        with transaction() as db:
            usages = db.scalars(select(Turn.usage).where(Turn.id.in_(ids))).all()
        return sum(u["completion_tokens"] for u in usages)


def openai_client():
    from openai import OpenAI

    from shared.config import get_settings

    s = get_settings()
    return OpenAI(base_url=s.openai_base_url, api_key="x", max_retries=0, timeout=60)


def baseline_streams(n: int, threads: int) -> float:
    """Seconds for n model streams read with the openai client, `threads` at a time."""
    client = openai_client()

    def one(_):
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": SLOW}], stream=True)
        return sum(1 for _ in stream)

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return time.monotonic() - start


def client_cpu_per_chunk(typed: bool, streams: int = 4) -> float:
    """CPU per chunk of reading a model stream alone (thread CPU time over
    chunks): the openai client's typed chunks, or the worker's own reader
    (tasks.model.stream_completion, the same client leaving chunks as dicts)
    with nothing done per delta."""
    from tasks.model import stream_completion

    client = openai_client()
    messages = [{"role": "user", "content": FAST}]
    cpu = chunks = 0
    for _ in range(streams):
        start = time.thread_time()
        if typed:
            for chunk in client.chat.completions.create(model="m", messages=messages, stream=True):
                for choice in chunk.choices:
                    _ = choice.delta.content  # what the worker reads of each chunk
                chunks += 1
        else:
            chunks += stream_completion(messages, lambda _delta: None).usage["completion_tokens"]
        cpu += time.thread_time() - start
    return cpu / chunks


def cpu_phase(bench: Bench, workers: list[services.Proc], turns: int) -> dict:
    before = {w.name: proc_cpu(w.popen.pid) for w in workers}
    start = time.monotonic()
    ids = bench.submit(turns, FAST)
    done = bench.wait(ids, 600)
    wall = done["finished_at"] - start
    cpu = sum(proc_cpu(w.popen.pid) - before[w.name] for w in workers)
    deltas = bench.deltas_of(ids)
    return {
        "workers": len(workers),
        "turns": turns,
        "deltas": deltas,
        "wall_s": round(wall, 2),
        "worker_cpu_s": round(cpu, 2),
        "worker_cpu_us_per_delta": round(cpu / deltas * 1e6, 1),
        "deltas_per_s": round(deltas / wall),
        "worker_cpu_utilisation": round(cpu / wall / len(workers), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--out", default=".bench/worker.json")
    args = parser.parse_args()
    results: dict = {"turns": args.turns, "concurrency": args.concurrency}
    model_args = ("--first-token-delay", "0", "--token-delay", "0")
    logging.basicConfig(level=logging.WARNING)
    with services.stack("turnstream-bench-", ENV, model_args, mcp=False) as info:
        logdir, env = info["logdir"], info["env"]
        bench = Bench(info)

        # 1. I/O concurrency
        print(f"baseline: {args.turns} streams straight from the model, {args.concurrency} at a time …", flush=True)
        base_wall = baseline_streams(args.turns, args.concurrency)
        # All turns wait in the queue first, so the figure is the worker's pace,
        # not how fast one client can submit them.
        print(f"turnstream: {args.turns} turns on one worker process, {args.concurrency} threads …", flush=True)
        ids = bench.submit(args.turns, SLOW)
        worker = services.start_worker(logdir, env, "io", concurrency=args.concurrency)
        info["procs"].append(worker)
        done = bench.wait(ids, 600)
        worker.stop()
        span = bench.span(ids)
        ideal = args.concurrency / (99 * 0.2)
        results["io"] = {
            "model_allows_turns_per_s": round(ideal, 2),
            "baseline_turns_per_s": round(args.turns / base_wall, 2),
            "turnstream_turns_per_s": round(args.turns / span, 2),
            "turnstream_over_baseline": round(base_wall / span, 3),
            "turnstream_over_model_speed": round(args.turns / span / ideal, 3),
            "peak_running": done["peak_running"],
            "statuses": done["statuses"],
            **bench.timings(ids),
        }

        # 2. CPU per delta
        print("client alone: CPU per chunk …", flush=True)
        typed_chunk = statistics.median(client_cpu_per_chunk(True) for _ in range(3))
        per_chunk = statistics.median(client_cpu_per_chunk(False) for _ in range(3))
        cpu_workers = []
        phases = []
        for n in (1, 2):
            w = services.start_worker(logdir, env, f"cpu{n}", concurrency=8)
            info["procs"].append(w)
            services.wait_for_worker(w)
            cpu_workers.append(w)
            print(f"turnstream: CPU per delta, {n} worker process(es) …", flush=True)
            phases.append(cpu_phase(bench, cpu_workers, 16 * n))
        one = phases[0]
        added = one["worker_cpu_us_per_delta"] - per_chunk * 1e6
        results["cpu"] = {
            "openai_typed_chunks_cpu_us_per_chunk": round(typed_chunk * 1e6, 1),
            "client_cpu_us_per_chunk": round(per_chunk * 1e6, 1),
            "worker_cpu_us_per_delta": one["worker_cpu_us_per_delta"],
            "added_us_per_delta": round(added, 1),
            "added_over_client": round(added / (per_chunk * 1e6), 3),
            "added_over_typed_chunk": round(added / (typed_chunk * 1e6), 3),
            "phases": phases,
        }
    io, cpu = results["io"], results["cpu"]
    rows = [
        ("I/O: turns/s the model's speed allows", io["model_allows_turns_per_s"]),
        ("I/O: baseline (openai client, threads) turns/s", io["baseline_turns_per_s"]),
        ("I/O: Turnstream turns/s (one worker process)", io["turnstream_turns_per_s"]),
        ("I/O: Turnstream / baseline", io["turnstream_over_baseline"]),
        ("I/O: most turns running at once", io["peak_running"]),
        ("I/O: seconds a turn ran, p50 / max", f"{io['ran_s_p50']} / {io['ran_s_max']}"),
        ("CPU: openai client alone, typed chunks, µs per chunk", cpu["openai_typed_chunks_cpu_us_per_chunk"]),
        ("CPU: the worker's reader alone (dict chunks), µs per chunk", cpu["client_cpu_us_per_chunk"]),
        ("CPU: worker, µs per delta", cpu["worker_cpu_us_per_delta"]),
        ("CPU: added by Turnstream, µs per delta", cpu["added_us_per_delta"]),
        ("CPU: added / the worker's reader alone", cpu["added_over_client"]),
        ("CPU: added / openai typed chunk", cpu["added_over_typed_chunk"]),
    ]
    rows += [
        (
            f"deltas/s with {p['workers']} worker process(es) (CPU use {p['worker_cpu_utilisation']:.0%} each)",
            p["deltas_per_s"],
        )
        for p in cpu["phases"]
    ]
    report(rows, results, args.out)
    lost = sum(v for k, v in io["statuses"].items() if k != "succeeded")
    if lost:
        raise SystemExit(f"{lost} turns did not succeed")


if __name__ == "__main__":
    main()
