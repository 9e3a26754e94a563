"""Pipeline benchmark: what Turnstream adds on top of bare Celery.

    python -m tests.bench.pipeline [--samples 100] [--concurrent 100] [--turns 1000] [--load-seconds 15]
        [--workers 1] [--webs 1] [--assistant default|named|both] [--webhook] [--out .bench/pipeline.json]

Starts Postgres, Redis, the offline model (instant: no first-token delay, no
token delay), one `gunicorn -k gevent` web process (`--webs` for more, on
one port as WEB_CONCURRENCY runs them) and one worker process (`--workers`
for more; threads pool, twice `--concurrent` threads in all, `--threads`
per process to change) that also loads the baseline task
(tests/bench/bare.py). Measured in the same run, the baseline's samples
taken in turn with Turnstream's so that drift in the VM's speed moves both
sides of a ratio alike:

1. Baseline: the bare Celery task PUBLISHes to a channel this process
   listens on. Round trip (send_task to receipt) one at a time, p50 and p99;
   tasks per second with `--turns` sent at once, before and after 4.
2. The model's own time to first token, through the worker's openai client.
3. Turnstream's time to first token: `POST /api/sessions/{id}/turns`, then
   `GET` its events, until the first `message.delta`; "added" subtracts the
   model's own p50. One at a time, and `--concurrent` at once.
4. Completed turns per second with 10-token instant answers: `--concurrent`
   clients each submit a turn and read its stream to `turn.completed`,
   counted by the client and checked against Postgres.
5. Time to first token with `--concurrent` turns in flight: as many clients
   run turns back to back for `--load-seconds`, each answered at a chat
   model's pace (60 tokens, 50 ms apart); the burst in 3. measures a queue,
   this measures the load; with each service's CPU use meanwhile (% of one
   core: a worker near 100% is bound by its interpreter lock).
6. Redis round trips per event in the worker (its publisher's counters).

Turns run on the default assistant (the operator's settings); `--assistant
named` runs them on one made for the run (ASSISTANT: instructions, no
tools), and `--assistant both` on each, taken in turn within every phase
(see turnstream()), and reports the named one's figures over the default's.
`--assistant aa` runs as `both` with the default on both sides: the ratios
it gives are what the machine's noise alone makes.

`--webhook` gives the run's owner a webhook endpoint (`POST /api/webhooks`,
`turn.completed` and `turn.failed`) pointing at a receiver on a thread of
this process (tests/receiver.py), the issue 37 point 6 cost on the turn
path: run the same command without it and with it, taken in turn, and
compare; Postgres times the trigger's calls itself (track_functions),
the figure least moved by noise. No webhook worker runs and beat is not started: the turn path's
cost is the trigger's INSERT into webhook_deliveries in the transaction
that ends the turn (migration 0015), whoever sends it later (see
tests/bench/webhooks.py for that). Without `--webhook` the trigger still
runs and looks for the owner's endpoints, finding none. The rows left
pending are counted at the end: one per turn that ended.

Prints a table, writes JSON, and exits non-zero if a turn was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import statistics
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import func, select

from tests import bench, services
from tests.bench.bare import PUBLISH
from tests.bench.report import report

ENV = {
    **bench.ENV,
    "REDIS_PREFIX": "pipe:",
    "OPENAI_MAX_RETRIES": "0",
    "OPENAI_TIMEOUT": "60",
    # `--webhook`'s receiver is on this machine; set on both sides so that
    # the two commands differ only in the endpoint.
    "WEBHOOK_ALLOW_PRIVATE": "on",
}
MESSAGE = "pipeline [[tokens=10]]"
# A model at a chat model's pace: 60 tokens, 50 ms apart.
PACED = "pipeline [[tokens=60]] [[delay=0.05]]"
PACED_SECONDS = 3.0
# Between samples taken one at a time, so that none shares the CPU with the
# tail of the one before (a turn goes on after its first delta, a task's ack
# comes after its PUBLISH). Each sample then starts from an idle machine,
# as a lone user's does: every figure is higher than back to back (the bare
# round trip 2.4-3.1 ms against 1.5-2), the ratios steadier.
SETTLE = 0.01
# The named assistant of `--assistant named` or `both`: the default's model
# and endpoint, with instructions (sent first) and no tools.
ASSISTANT = {"name": "bench", "instructions": "You are the benchmark's assistant."}


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds used by a process and its descendants (a service and, for
    Postgres, its backends), those that ended too: a process's children's
    time once it has reaped them (Postgres's backends on connections its
    clients' pools closed come and go in a run)."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # ppid; utime + stime + cutime + cstime
        stats[int(stat.parent.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    children: dict[int, list[int]] = {}
    for child, (parent, _ticks) in stats.items():
        children.setdefault(parent, []).append(child)
    # Followed down from the root, not by pid order: pids wrap (at 32768 here,
    # within minutes when the machine is busy), and a backend started after
    # that has a smaller pid than its postmaster.
    tree, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            tree.add(child)
            todo.append(child)
    return sum(stats.get(member, (0, 0))[1] for member in tree) / CLK_TCK


def cpu_by_service(procs: list[services.Proc]) -> dict[str, float]:
    usage = {proc.name: tree_cpu(proc.popen.pid) for proc in procs}
    usage["bench client"] = time.process_time()
    return usage


def cpu_since(procs: list[services.Proc], before: dict[str, float]) -> dict[str, float]:
    """CPU seconds each service spent since `before` (a cpu_by_service)."""
    after = cpu_by_service(procs)
    return {name: after[name] - before[name] for name in before}


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def p(values: list[float], q: int) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class Bare:
    """The baseline: the bare task, PUBLISHing to a channel this process
    listens on. Its samples are taken between Turnstream's (see turnstream()),
    so both see the VM at the same speed."""

    def __init__(self) -> None:
        from shared.broker import get_celery
        from shared.redis import get_redis

        self.celery = get_celery()
        self.channel = f"bench-bare-{uuid.uuid4().hex[:8]}"
        self.pubsub = get_redis().pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(self.channel)
        self.pubsub.get_message(timeout=1)  # the subscribe confirmation
        self.sent = 0
        for _ in range(20):  # warm-up: connections, the worker's first tasks
            self.round_trip()

    def _send(self) -> str:
        self.sent += 1
        self.celery.send_task(PUBLISH, args=[self.channel, str(self.sent)])
        return str(self.sent)

    def _receive(self, timeout: float = 10) -> str:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            message = self.pubsub.get_message(timeout=1)
            if message is not None:
                return message["data"].decode()
        raise SystemExit("the baseline task's message never arrived")

    def round_trip(self) -> float:
        """Seconds from send_task to the PUBLISH arriving here."""
        start = time.perf_counter()
        sent = self._send()
        if self._receive() != sent:
            raise SystemExit("the baseline task's messages came out of order")
        return time.perf_counter() - start

    def burst(self, n: int, procs: list[services.Proc]) -> tuple[float, dict[str, float]]:
        """n tasks sent at once: tasks per second, and the CPU seconds each
        service spent meanwhile."""
        before, start = cpu_by_service(procs), time.perf_counter()
        sent = {self._send() for _ in range(n)}
        got = {self._receive() for _ in range(n)}
        elapsed, cpu = time.perf_counter() - start, cpu_since(procs, before)
        if got != sent:
            raise SystemExit("baseline tasks were lost")
        return n / elapsed, cpu

    def close(self) -> None:
        self.pubsub.close()


def model_ttft() -> float:
    """The model's own time to first token, seconds, through the worker's
    model client (its connection kept between requests, as the worker's is)."""
    from tasks.model import stream_completion

    firsts: list[float] = []
    start = time.perf_counter()
    stream_completion([{"role": "user", "content": MESSAGE}], lambda text: firsts or firsts.append(time.perf_counter()))
    return firsts[0] - start


class Client:
    """Turnstream over HTTP/1.1, as a browser or an SDK would use it, on bare
    asyncio streams: the client shares the machine's 2 cores with the
    servers, and httpx spent 7 to 12 ms of CPU per turn, as much as the web
    process. Each turn uses one connection: POST, then GET its events."""

    def __init__(self, base: str, headers: dict) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.headers = "".join(f"{name}: {value}\r\n" for name, value in headers.items())

    def _send(self, writer: asyncio.StreamWriter, method: str, path: str, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode() + b"\r\n" + data)

    @staticmethod
    async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        return status, headers

    async def _json(self, reader: asyncio.StreamReader) -> tuple[int, dict]:
        status, headers = await self._head(reader)
        return status, json.loads(await reader.readexactly(int(headers["content-length"])))

    async def session(self, assistant_id: str | None = None) -> str:
        """A new session, answered by the assistant (None: the default)."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            self._send(writer, "POST", "/api/sessions", {"assistant_id": assistant_id} if assistant_id else {})
            return (await self._json(reader))[1]["id"]
        finally:
            writer.close()

    async def sessions(self, n: int, assistant_id: str | None = None) -> list[str]:
        """n new sessions, made 50 at a time (setup, not measured)."""
        made: list[str] = []
        while len(made) < n:
            made += await asyncio.gather(*(self.session(assistant_id) for _ in range(min(50, n - len(made)))))
        return made

    async def turn(
        self, session_id: str, until: str, message: str = MESSAGE, mark: str | None = None
    ) -> tuple[float, str]:
        """Submit a turn and read its events until `until`; returns the
        seconds from sending the POST to the first `mark` event (`until` if
        None), and the turn id."""
        start, marked = time.perf_counter(), None
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            self._send(writer, "POST", f"/api/sessions/{session_id}/turns", {"message": message})
            status, turn = await self._json(reader)
            if status != 202:
                raise SystemExit(f"POST turns answered {status}: {turn}")
            self._send(writer, "GET", turn["events_url"])
            status, _ = await self._head(reader)
            # The body is chunked; every frame is written whole, so its lines
            # arrive intact between the chunk-size lines.
            wanted, first, seen = f"event: {until}\n".encode(), f"event: {mark or until}\n".encode(), []
            while line := await reader.readline():
                if line == first and marked is None:
                    marked = time.perf_counter() - start
                if line == wanted:
                    return marked, turn["id"]
                seen.append(line)
        finally:
            writer.close()
        raise SystemExit(f"turn {turn['id']}: the stream ended before {until} (HTTP {status}): {seen[-8:]}")


async def ttft(client: Client, concurrent: int, rounds: int, assistant_id: str | None = None) -> list[float]:
    times = []
    for _ in range(rounds):
        sessions = await client.sessions(concurrent, assistant_id)
        results = await asyncio.gather(*(client.turn(s, "message.delta") for s in sessions))
        times += [t for t, _id in results]
    return times


async def throughput(
    client: Client, sessions: list[str], concurrent: int, procs: list[services.Proc]
) -> tuple[float, list[str], dict[str, float]]:
    """Seconds for a turn in each session, `concurrent` in flight; their ids;
    the CPU seconds each service spent meanwhile."""
    gate = asyncio.Semaphore(concurrent)

    async def one(session_id: str) -> str:
        async with gate:
            return (await client.turn(session_id, "turn.completed"))[1]

    before = cpu_by_service(procs)
    start = time.perf_counter()
    ids = await asyncio.gather(*(one(s) for s in sessions))
    wall = time.perf_counter() - start
    return wall, ids, cpu_since(procs, before)


async def under_load(
    client: Client, assistants: dict[str, str | None], concurrent: int, seconds: float, procs: list[services.Proc]
) -> tuple[dict[str, list[float]], list[str], dict[str, float]]:
    """Time to first token with `concurrent` turns in flight: as many
    clients each run turns back to back (a fresh session each) with a paced
    model (PACED: about 3 s a turn), starting spread over one turn's length,
    each client taking the assistants in turn (client i starting at the
    i-th), so that every kind of turn sees the same load. Returns the times
    of the turns started after that ramp, by assistant, every id, and each
    service's CPU use after the ramp (% of one core)."""
    n = int(seconds * concurrent / PACED_SECONDS * 1.5) + concurrent
    sessions = {kind: await client.sessions(n, assistant_id) for kind, assistant_id in assistants.items()}
    kinds = list(assistants)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    ids: list[str] = []
    start = time.perf_counter()
    ramped, deadline = start + PACED_SECONDS, start + seconds

    async def loop(i: int) -> None:
        await asyncio.sleep(i * PACED_SECONDS / concurrent)
        while sessions[kind := kinds[i % len(kinds)]] and time.perf_counter() < deadline:
            i += 1
            began = time.perf_counter()
            t, turn_id = await client.turn(sessions[kind].pop(), "turn.completed", PACED, mark="message.delta")
            ids.append(turn_id)
            if began >= ramped:
                times[kind].append(t)

    async def busy() -> dict[str, float]:
        await asyncio.sleep(ramped - time.perf_counter())
        before, began = cpu_by_service(procs), time.perf_counter()
        await asyncio.sleep(deadline - began)
        spent, wall = cpu_since(procs, before), time.perf_counter() - began
        return {name: round(seconds / wall * 100) for name, seconds in spent.items()}

    *_, use = await asyncio.gather(*(loop(i) for i in range(concurrent)), busy())
    return times, ids, use


def succeeded(ids: list[str]) -> int:
    from shared.db import transaction
    from shared.models import Turn

    with transaction() as db:
        return db.scalar(select(func.count()).where(Turn.id.in_(ids), Turn.status == "succeeded"))


def track_triggers() -> None:
    """Postgres times each PL/pgSQL function's calls (track_functions), so
    the turns' webhook trigger is timed inside the transactions it runs in:
    a figure the machine's noise moves far less than the run's."""
    from sqlalchemy import text

    from shared.db import autocommit_engine

    with autocommit_engine().connect() as conn:
        conn.execute(text("ALTER SYSTEM SET track_functions = 'pl'"))
        conn.execute(text("SELECT pg_reload_conf()"))


def trigger_time() -> dict:
    """The turns' webhook trigger (webhook_turn_event): calls, and ms in all
    and per turn, once the workers have stopped (a backend's counts reach
    the statistics when it ends, or within seconds after its last commit)."""
    from sqlalchemy import text

    from shared.db import transaction

    with transaction() as db:
        turns = db.scalar(text("SELECT count(*) FROM turns"))
        row = db.execute(
            text("SELECT calls, total_time FROM pg_stat_user_functions WHERE funcname = 'webhook_turn_event'")
        ).one_or_none()
    calls, total = row if row else (0, 0.0)
    return {
        "turns_in_postgres": turns,
        "calls": calls,
        "ms_in_all": round(total, 1),
        "us_per_call": round(total / calls * 1000, 1) if calls else None,
        "us_per_turn": round(total / turns * 1000, 1) if turns else None,
    }


def webhook_deliveries(endpoint_id: str) -> int:
    """The deliveries the turns' trigger wrote for the endpoint (none is sent)."""
    from shared.db import transaction
    from shared.models import WebhookDelivery

    with transaction() as db:
        return db.scalar(select(func.count()).where(WebhookDelivery.endpoint_id == endpoint_id))


def publisher_counters(workers: list[services.Proc]) -> dict:
    pattern = r"event publisher: (\d+) events submitted, (\d+) sent, in (\d+) round trips"
    found = [re.findall(pattern, worker.log_tail(400)) for worker in workers]
    if not all(found):
        return {}
    submitted, sent, trips = (sum(int(lines[-1][i]) for lines in found) for i in range(3))  # each worker's last
    return {
        "events_submitted": submitted,
        "events_sent_after_merging": sent,
        "redis_round_trips": trips,
        "round_trips_per_event": round(trips / submitted, 3),
    }


async def turnstream(
    base: str,
    headers: dict,
    bare: Bare,
    assistants: dict[str, str | None],
    samples: int,
    concurrent: int,
    turns: int,
    load_seconds: float,
    procs: list[services.Proc],
) -> dict:
    """Every phase; the baseline's samples are taken in turn with
    Turnstream's, so drift in the VM's speed (30% and more within minutes)
    moves both sides of each ratio alike: one at a time, a bare round trip,
    the model's own first token and a turn's, in rotation, each once the
    one before has ended (a turn is read to its end, then SETTLE); the bare
    burst both before and after the turns' throughput run. (The sync
    samples block this loop for a moment: nothing else runs then.)

    Turns run on each of `assistants` (kind -> assistant id, None for the
    default), taken in turn the same way: in the rotation (the first kind
    first in even rounds, last in odd ones), a burst of each, the
    throughput run in quarters ordered ABBABAAB (each kind `turns` turns,
    its CPU its own), and mixed among the turns in flight. Figures by kind."""
    client = Client(base, headers)
    kinds = list(assistants)
    # ABBA BAAB: the kinds alike in the mean and spread of their places in
    # the run, and each at one of its ends (a run's first and last parts ran
    # dearer in CPU per turn with both kinds the default, ABBA giving 0.87).
    order = kinds if len(kinds) == 1 else [*kinds, *kinds[::-1], *kinds[::-1], *kinds]
    per = turns * len(kinds) // len(order)
    sessions = {kind: await client.sessions(turns, assistant_id) for kind, assistant_id in assistants.items()}
    one: dict[str, list[float]] = {kind: [] for kind in kinds}
    many: dict[str, list[float]] = {kind: [] for kind in kinds}
    for assistant_id in assistants.values():
        await ttft(client, 1, 10, assistant_id)  # warm-up (and the worker's read of the assistant)
    rotation = {kind: await client.sessions(samples, assistant_id) for kind, assistant_id in assistants.items()}
    trips, model = [], []
    for i in range(samples):
        trips.append(bare.round_trip())
        await asyncio.sleep(SETTLE)
        model.append(model_ttft())
        await asyncio.sleep(SETTLE)
        for kind in kinds if i % 2 == 0 else reversed(kinds):
            one[kind].append((await client.turn(rotation[kind][i], "turn.completed", mark="message.delta"))[0])
            await asyncio.sleep(SETTLE)
    for round_ in range(3):
        for kind in kinds if round_ % 2 == 0 else reversed(kinds):
            many[kind] += await ttft(client, concurrent, 1, assistants[kind])
    each = " of each kind" if len(kinds) > 1 else ""
    print(f"turnstream: {turns} turns{each}, {concurrent} in flight, between two bare bursts …", flush=True)
    rate_before, bare_cpu = bare.burst(turns, procs)
    wall = {kind: 0.0 for kind in kinds}
    ids: dict[str, list[str]] = {kind: [] for kind in kinds}
    cpu: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
    for kind in order:
        chunk, sessions[kind] = sessions[kind][:per], sessions[kind][per:]
        seconds, chunk_ids, spent = await throughput(client, chunk, concurrent, procs)
        wall[kind] += seconds
        ids[kind] += chunk_ids
        cpu[kind] = {name: cpu[kind].get(name, 0) + used for name, used in spent.items()}
    rate_after, bare_cpu_after = bare.burst(turns, procs)
    cpu_ms_per_turn = {
        kind: {name: round(seconds / len(ids[kind]) * 1000, 2) for name, seconds in cpu[kind].items()} for kind in kinds
    }
    cpu_ms_per_task = {
        name: round((bare_cpu[name] + bare_cpu_after[name]) / (2 * turns) * 1000, 2) for name in bare_cpu
    }
    print(f"turnstream: time to first token with {concurrent} paced turns in flight …", flush=True)
    loaded, load_ids, load_cpu = await under_load(client, assistants, concurrent, load_seconds, procs)
    return {
        "trips": trips,
        "bare_rates": (rate_before, rate_after),
        "cpu_ms_per_task": cpu_ms_per_task,
        "model": model,
        "one": one,
        "many": many,
        "loaded": loaded,
        "wall": wall,
        "ids": ids,
        "load_ids": load_ids,
        "cpu_ms_per_turn": cpu_ms_per_turn,
        "load_cpu": load_cpu,
    }


def turn_figures(run: dict, kind: str, model: float, c: int) -> dict:
    """One kind's turn figures (see turnstream())."""
    one, many, loaded = run["one"][kind], run["many"][kind], run["loaded"][kind]
    added_one, added_many, added_loaded = ([t - model for t in times] for times in (one, many, loaded))
    return {
        "ttft_1": {"p50_ms": ms(statistics.median(one)), "p99_ms": ms(p(one, 99))},
        "added_ttft_1": {"p50_ms": ms(statistics.median(added_one)), "p99_ms": ms(p(added_one, 99))},
        f"ttft_{c}": {"p50_ms": ms(statistics.median(many)), "p99_ms": ms(p(many, 99))},
        f"added_ttft_{c}": {"p50_ms": ms(statistics.median(added_many)), "p99_ms": ms(p(added_many, 99))},
        f"added_ttft_{c}_in_flight": {
            "p50_ms": ms(statistics.median(added_loaded)),
            "p99_ms": ms(p(added_loaded, 99)),
            "turns_measured": len(added_loaded),
            "model": PACED,
        },
        "turns": len(run["ids"][kind]),
        "turns_per_s": round(len(run["ids"][kind]) / run["wall"][kind], 1),
        "cpu_ms_per_turn_by_service": run["cpu_ms_per_turn"][kind],
    }


def over(named: dict, default: dict) -> dict:
    """named / default, figure by figure (nested alike); counts left out."""
    ratios = {}
    for key, value in named.items():
        if isinstance(value, dict):
            ratios[key] = over(value, default[key])
        elif isinstance(value, float) and default[key]:
            ratios[key] = round(value / default[key], 3)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument(
        "--threads", type=int, help="pool threads per worker (default: twice --concurrent over --workers)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (the baseline task uses them too)")
    parser.add_argument("--webs", type=int, default=1, help="web processes (gunicorn workers, one port)")
    parser.add_argument("--load-seconds", type=float, default=15, help="the run with paced turns in flight")
    parser.add_argument(
        "--assistant",
        choices=("default", "named", "both", "aa"),
        default="default",
        help="whose turns: the default assistant's, a named one's (made for the run: short instructions, no tools),"
        " or both, taken in turn, with the named one's figures over the default's; aa: as both, but the 'named'"
        " side on the default assistant too (an A/A run: the ratios that noise alone gives)",
    )
    parser.add_argument(
        "--webhook",
        action="store_true",
        help="the run's owner has a webhook endpoint for turn.completed and turn.failed (no webhook worker runs:"
        " the turn path's cost is the trigger's insert)",
    )
    parser.add_argument("--out", default=".bench/pipeline.json")
    args = parser.parse_args()
    # A turn holds its thread until its task returns, a little after the
    # client saw it end; with exactly as many threads as turns in flight, a
    # new turn waits for one (added TTFT p50 75-160 ms at 100 in flight
    # against 31 ms with 200 threads).
    args.threads = args.threads or -(-2 * args.concurrent // args.workers)
    logging.basicConfig(level=logging.WARNING)
    model_args = ("--first-token-delay", "0", "--token-delay", "0")
    with services.stack("turnstream-bench-pipeline-", ENV, model_args, mcp=False) as info:
        from web.auth import create_key

        track_triggers()
        logdir, env = info["logdir"], info["env"]
        workers = [
            services.start_worker(logdir, env, name, args.threads, extra=("--include", "tests.bench.bare"))
            for name in (["pipeline"] if args.workers == 1 else [f"pipeline{i}" for i in range(1, args.workers + 1)])
        ]
        info["procs"] += workers
        for worker in workers:
            services.wait_for_worker(worker)
        web, port = services.start_gunicorn(logdir, env, workers=args.webs)
        info["procs"].append(web)
        base = f"http://127.0.0.1:{port}"
        services.wait_until(lambda: httpx.get(f"{base}/api/health", timeout=2).status_code == 200, 30, "web")
        headers = {"Authorization": f"Bearer {create_key('bench-' + uuid.uuid4().hex[:8])}"}
        assistants: dict[str, str | None] = {"default": None}
        if args.assistant in ("named", "both"):
            made = httpx.post(f"{base}/api/assistants", json=ASSISTANT, headers=headers, timeout=10)
            assistants["named"] = made.raise_for_status().json()["id"]
            if args.assistant == "named":
                del assistants["default"]
        elif args.assistant == "aa":
            assistants["named"] = None
        receiver = hook = None
        if args.webhook:
            from tests.receiver import Receiver

            receiver = Receiver()
            made = httpx.post(
                f"{base}/api/webhooks",
                json={"url": f"{receiver.url}/pipeline", "event_types": ["turn.completed", "turn.failed"]},
                headers=headers,
                timeout=10,
            )
            hook = made.raise_for_status().json()["id"]

        print("one at a time: the bare task, the model, a turn, in rotation …", flush=True)
        bare = Bare()
        run = asyncio.run(
            turnstream(
                base,
                headers,
                bare,
                assistants,
                args.samples,
                args.concurrent,
                args.turns,
                args.load_seconds,
                info["procs"],
            )
        )
        bare.close()
        every_id = [turn_id for ids in run["ids"].values() for turn_id in ids] + run["load_ids"]
        stored = succeeded(every_id)
        pending_deliveries = webhook_deliveries(hook) if hook else None
        if receiver is not None:
            receiver.close()
        for worker in workers:
            worker.stop()
        counters = publisher_counters(workers)
        time.sleep(1)  # the workers' backends' last statistics
        trigger = trigger_time()

    trips, c = run["trips"], args.concurrent
    model = statistics.median(run["model"])
    figures = {kind: turn_figures(run, kind, model, c) for kind in assistants}
    first = figures[next(iter(assistants))]
    bare_rate = statistics.mean(run["bare_rates"])
    base_figures = {
        "round_trip_ms_p50": ms(statistics.median(trips)),
        "round_trip_ms_p99": ms(p(trips, 99)),
        "tasks": args.turns,
        "tasks_per_s": round(bare_rate, 1),
        "tasks_per_s_before_and_after_the_turns": [round(rate, 1) for rate in run["bare_rates"]],
        "cpu_ms_per_task_by_service": run["cpu_ms_per_task"],
    }
    results = {
        "worker_processes": args.workers,
        "worker_threads": args.threads,
        "web_processes": args.webs,
        "assistant": args.assistant,
        "baseline": base_figures,
        "model_ttft_ms_p50": ms(model),
        **first,
        "turns_completed_by_client": len(every_id),
        "turns_succeeded_in_postgres": stored,
        "ratios": {
            "added_ttft_p50_over_baseline_round_trip_p50": round(
                first["added_ttft_1"]["p50_ms"] / base_figures["round_trip_ms_p50"], 2
            ),
            "turns_per_s_over_baseline_tasks_per_s": round(first["turns_per_s"] / base_figures["tasks_per_s"], 3),
        },
        "publisher": counters,
        "cpu_percent_of_a_core_in_flight": run["load_cpu"],
        # The services', not this process's: Postgres, Redis, the model, workers, web.
        "cpu_ms_per_turn_all_services": round(
            sum(v for name, v in first["cpu_ms_per_turn_by_service"].items() if name != "bench client"), 2
        ),
        "webhook_endpoint": args.webhook,
        "webhook_deliveries_written": pending_deliveries,
        "webhook_trigger": trigger,
    }
    if len(figures) > 1:
        results["named"] = figures["named"]
        results["named_over_default"] = {
            **over(figures["named"], figures["default"]),
            "cpu_ms_per_turn_all_services": round(
                sum(figures["named"]["cpu_ms_per_turn_by_service"].values())
                / sum(figures["default"]["cpu_ms_per_turn_by_service"].values()),
                3,
            ),
        }
    rows = [
        (
            "turns on",
            {"both": "the default assistant, a named one's over it", "aa": "the default, twice (A/A)"}.get(
                args.assistant, args.assistant
            ),
        ),
        (
            "baseline round trip, ms p50 / p99",
            f"{base_figures['round_trip_ms_p50']} / {base_figures['round_trip_ms_p99']}",
        ),
        (
            "baseline tasks/s, before / after the turns' run: mean",
            " / ".join(map(str, base_figures["tasks_per_s_before_and_after_the_turns"]))
            + f": {base_figures['tasks_per_s']}",
        ),
        ("model's own time to first token, ms p50", results["model_ttft_ms_p50"]),
        (
            "Turnstream TTFT, 1 at a time, ms p50 / p99",
            f"{results['ttft_1']['p50_ms']} / {results['ttft_1']['p99_ms']}",
        ),
        (
            "  added (minus the model's), ms p50 / p99",
            f"{results['added_ttft_1']['p50_ms']} / {results['added_ttft_1']['p99_ms']}",
        ),
        (
            f"Turnstream TTFT, {c} sent at once (a burst), ms p50 / p99",
            f"{results[f'ttft_{c}']['p50_ms']} / {results[f'ttft_{c}']['p99_ms']}",
        ),
        (
            "  added (minus the model's), ms p50 / p99",
            f"{results[f'added_ttft_{c}']['p50_ms']} / {results[f'added_ttft_{c}']['p99_ms']}",
        ),
        (
            f"added TTFT with {c} paced turns in flight, ms p50 / p99 (target p99 <= 50)",
            f"{results[f'added_ttft_{c}_in_flight']['p50_ms']} / {results[f'added_ttft_{c}_in_flight']['p99_ms']}"
            f" ({results[f'added_ttft_{c}_in_flight']['turns_measured']} turns)",
        ),
        ("webhook endpoint for the owner (deliveries written)", f"{args.webhook} ({pending_deliveries})"),
        (
            "webhook trigger: calls / us per call / us per turn (Postgres's timing)",
            f"{trigger['calls']} / {trigger['us_per_call']} / {trigger['us_per_turn']}",
        ),
        (f"Turnstream completed turns/s ({c} clients)", results["turns_per_s"]),
        ("turns: completed (client) / succeeded (Postgres)", f"{len(every_id)} / {stored}"),
        (
            "added TTFT p50 / baseline round trip p50 (target <= 3)",
            results["ratios"]["added_ttft_p50_over_baseline_round_trip_p50"],
        ),
        ("turns/s / baseline tasks/s (target >= 0.5)", results["ratios"]["turns_per_s_over_baseline_tasks_per_s"]),
        ("Redis round trips per event in the worker", counters.get("round_trips_per_event")),
        (
            "events submitted / sent after merging deltas",
            f"{counters.get('events_submitted')} / {counters.get('events_sent_after_merging')}",
        ),
    ]
    rows += [(f"CPU ms per baseline task: {name}", v) for name, v in base_figures["cpu_ms_per_task_by_service"].items()]
    rows += [(f"CPU ms per completed turn: {name}", v) for name, v in first["cpu_ms_per_turn_by_service"].items()]
    rows += [(f"CPU % of a core with {c} paced turns in flight: {name}", v) for name, v in run["load_cpu"].items()]
    if len(figures) > 1:
        named, ratio = figures["named"], results["named_over_default"]

        def pair(key: str) -> str:
            return f"{named[key]['p50_ms']} / {named[key]['p99_ms']} ({ratio[key]['p50_ms']} / {ratio[key]['p99_ms']})"

        rows += [
            ("named: added TTFT, 1 at a time, ms p50 / p99 (named / default)", pair("added_ttft_1")),
            (f"named: added TTFT, {c} sent at once, ms p50 / p99 (named / default)", pair(f"added_ttft_{c}")),
            (
                f"named: added TTFT, {c} paced in flight, ms p50 / p99 (named / default)",
                pair(f"added_ttft_{c}_in_flight"),
            ),
            ("named: completed turns/s (named / default)", f"{named['turns_per_s']} ({ratio['turns_per_s']})"),
        ]
        rows += [
            (
                f"named: CPU ms per completed turn: {name} (named / default)",
                f"{v} ({ratio['cpu_ms_per_turn_by_service'].get(name)})",
            )
            for name, v in named["cpu_ms_per_turn_by_service"].items()
        ]
        rows.append(
            ("named: CPU per completed turn, all services, named / default", ratio["cpu_ms_per_turn_all_services"])
        )
    report(rows, results, args.out)
    if stored != len(every_id):
        raise SystemExit(f"{len(every_id) - stored} turns were lost")


if __name__ == "__main__":
    main()
