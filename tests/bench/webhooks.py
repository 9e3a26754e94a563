"""Webhooks benchmark: deliveries per second from one webhook worker process
to a local receiver (issue 37, point 6; the cost on the turn path is
`tests.bench.pipeline --webhook`'s).

    python -m tests.bench.webhooks [--deliveries 5000] [--threads 16] [--receiver asyncio|stdlib]
        [--out .bench/webhooks.json]

Starts Postgres, Redis, the offline model (unused), ONE webhook worker from
the Procfile's `webhooks` line with `-c --threads` after it (the last -c
wins: 16, the Procfile's own, by default), a turn worker from its line
with 2 threads (it runs `dispatch_webhooks`, on the maintenance queue,
which takes at most 500 due deliveries: tasks/webhooks.py's BATCH) and
beat from its line (it sends the dispatch each second). The receiver runs on a thread of this process:

- `asyncio` (the default): HTTP/1.1 with keep-alive on one event loop,
  answering 200 at once, as a receiver that queues events would;
- `stdlib`: tests/receiver.py, a ThreadingHTTPServer speaking HTTP/1.0 (a
  new connection and a new thread per delivery), to see what the receiver
  itself costs.

One endpoint is made through the API (`POST /api/webhooks`, the test
client of `web.create_app()`, WEBHOOK_ALLOW_PRIVATE=on). The deliveries
are made pending at once by ONE INSERT into webhook_deliveries of
`--deliveries` rows shaped as the turns' trigger makes them (migration
0015's `webhook_turn_event`): as many turns ending would take minutes,
and would not leave them pending together. 100 are delivered first to
warm up (connections, the worker's first tasks).

Measured, on the wall clock of this machine (Postgres's `now()` and the
receiver's `time.time()`):

- deliveries/s: the run's deliveries over the span from the first receipt
  to the last (the receiver's clock); also over Postgres's span from the
  first attempt (`webhook_attempts.at`, written after its POST) to the last
  `finished_at`, and from the INSERT's commit to the last receipt (this
  holds the wait for beat's next tick);
- the receiver's count: each webhook-id received once? (duplicates), the
  rows delivered in Postgres and their attempts (more than one: a retry);
- every signature checked with `standardwebhooks` after the run (outside
  the timed span);
- CPU ms per delivery of the webhook worker (the dispatches run on the turn worker),
  Postgres, Redis, beat and this process (the receiver, and its polling);
- from each delivery's `created_at` to its receipt, p50 / p99 / max: with
  every row inserted at once, mostly its place in the queue;
- the dispatches in the span (the worker's log: each one's count and
  time) and the ones that expired unrun (beat sends them with expires=2);
- the machine's load average before and after.

Prints a table, writes JSON, and exits non-zero if a delivery was lost,
failed or did not verify.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import statistics
import threading
import time
import uuid
from collections import Counter

from sqlalchemy import text

from tests import bench, services
from tests.bench.pipeline import p, tree_cpu
from tests.bench.report import report

ENV = {
    **bench.ENV,
    "REDIS_PREFIX": "webhooksbench:",
    "WEBHOOK_ALLOW_PRIVATE": "on",  # the receiver is on this machine
}
WARM_UP = 100
TIMEOUT = 600.0  # seconds the run may take before the rest count as lost
# As webhook_turn_event() writes them (migration 0015), for turns that do not
# exist: the worker reads nothing but the row.
INSERT = text(
    """
    INSERT INTO webhook_deliveries (id, endpoint_id, event_type, payload)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), CAST(:endpoint AS uuid), 'turn.completed',
           jsonb_build_object(
               'type', 'turn.completed',
               'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'data', jsonb_build_object(
                   'turn_id', g.turn_id, 'session_id', g.session_id, 'status', 'succeeded', 'error_code', NULL,
                   'turn_url', '/api/turns/' || g.turn_id, 'session_url', '/api/sessions/' || g.session_id))
    FROM (SELECT gen_random_uuid() AS turn_id, gen_random_uuid() AS session_id FROM generate_series(1, :n)) AS g
    RETURNING id, extract(epoch FROM created_at)
    """
)
DISPATCHED = re.compile(r"tasks\.dispatch_webhooks\[[^\]]+\] succeeded in ([0-9.]+)s: (\d+)")
# Celery's line for a message past its `expires` (beat's dispatches: 2 s).
EXPIRED = re.compile(r"Discarding revoked task: tasks\.dispatch_webhooks\[")


class AsyncReceiver:
    """A webhook receiver that is not the bottleneck: HTTP/1.1 keep-alive on
    one asyncio loop in a thread, answering 200 at once; it keeps each
    request (its wall-clock time, headers, body) for after the run."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict[str, str], bytes]] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while await reader.readline():  # the request line; b"" when the client closed
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                self.got.append((time.time(), headers, body))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def received(self) -> list[tuple[float, dict[str, str], bytes]]:
        return list(self.got)

    async def _close(self) -> None:
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await asyncio.sleep(0.1)  # the handlers see their connections end

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


class StdlibReceiver:
    """tests/receiver.py, its monotonic times made wall-clock ones."""

    def __init__(self) -> None:
        from tests.receiver import Receiver

        self.receiver = Receiver()
        self.url = self.receiver.url
        self.offset = time.time() - time.monotonic()

    def received(self) -> list[tuple[float, dict[str, str], bytes]]:
        with self.receiver._lock:
            got = list(self.receiver.received)
        return [(r.at + self.offset, {k.lower(): v for k, v in r.headers.items()}, r.body) for r in got]

    def close(self) -> None:
        self.receiver.close()


def insert(endpoint_id: str, n: int) -> dict[str, float]:
    """n deliveries pending at once: webhook-id -> created_at (epoch seconds)."""
    from shared.db import transaction

    with transaction() as db:
        return {row[0]: float(row[1]) for row in db.execute(INSERT, {"endpoint": endpoint_id, "n": n})}


def ended(ids: list[str]) -> dict[str, int]:
    from shared.db import transaction

    with transaction() as db:
        rows = db.execute(
            text("SELECT status, count(*) FROM webhook_deliveries WHERE id = ANY(:ids) GROUP BY status"),
            {"ids": ids},
        )
        return dict(rows.all())


def pending(endpoint_id: str) -> int:
    """The endpoint's deliveries not yet ended: a read of the partial index
    of pending rows, cheap as they go (its CPU is counted in Postgres's)."""
    from shared.db import transaction

    with transaction() as db:
        return db.scalar(
            text("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' AND endpoint_id = :e"),
            {"e": endpoint_id},
        )


def wait_ended(endpoint_id: str, ids: list[str], timeout: float = TIMEOUT) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pending(endpoint_id):
        time.sleep(0.1)
    return ended(ids)


def postgres_spans(ids: list[str]) -> dict:
    from shared.db import transaction

    with transaction() as db:
        row = db.execute(
            text(
                """
                SELECT extract(epoch FROM min(a.at)), extract(epoch FROM max(d.finished_at)),
                       count(*) FILTER (WHERE a.number > 1), count(DISTINCT a.delivery_id), count(*)
                FROM webhook_deliveries d JOIN webhook_attempts a ON a.delivery_id = d.id
                WHERE d.id = ANY(:ids)
                """
            ),
            {"ids": ids},
        ).one()
    first, last, retries, with_attempts, attempts = row
    return {
        "first_attempt": float(first),
        "last_finished": float(last),
        "retried_attempts": retries,
        "deliveries_with_attempts": with_attempts,
        "attempts": attempts,
    }


def cpu(procs: dict[str, services.Proc]) -> dict[str, float]:
    usage = {name: tree_cpu(proc.popen.pid) for name, proc in procs.items()}
    usage["bench process (receiver)"] = time.process_time()
    return usage


def dispatches(log: str) -> list[tuple[float, int]]:
    return [(float(s), int(n)) for s, n in DISPATCHED.findall(log)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=16, help="the webhook worker's -c (the Procfile's: 16)")
    parser.add_argument("--receiver", choices=("asyncio", "stdlib"), default="asyncio")
    parser.add_argument("--out", default=".bench/webhooks.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()
    with services.stack("turnstream-bench-webhooks-", ENV, ("--first-token-delay", "0"), mcp=False) as info:
        from standardwebhooks import Webhook

        from web import create_app
        from web.auth import create_key

        logdir, env = info["logdir"], info["env"]
        hooks = services.Proc("webhooks", services.procfile_args("webhooks", "-c", str(args.threads)), logdir, env)
        dispatcher = services.start_worker(logdir, env, "worker", 2)
        info["procs"] += [hooks, dispatcher]
        services.wait_for_worker(hooks)
        services.wait_for_worker(dispatcher)
        beat = services.start_beat(logdir, env)
        info["procs"].append(beat)
        receiver = AsyncReceiver() if args.receiver == "asyncio" else StdlibReceiver()
        client = create_app().test_client()
        owner = {"Authorization": f"Bearer {create_key('bench-' + uuid.uuid4().hex[:8])}"}
        made = client.post(
            "/api/webhooks",
            json={"url": receiver.url + "/bench", "event_types": ["turn.completed", "turn.failed"]},
            headers=owner,
        )
        if made.status_code != 201:
            raise SystemExit(f"POST /api/webhooks answered {made.status_code}: {made.get_json()}")
        endpoint = made.get_json()

        print(f"warm-up: {WARM_UP} deliveries …", flush=True)
        warm = list(insert(endpoint["id"], WARM_UP))
        if wait_ended(endpoint["id"], warm, 60).get("delivered") != WARM_UP:
            raise SystemExit(f"the warm-up's deliveries did not all arrive: {ended(warm)}\n{hooks.log_tail()}")
        time.sleep(1.5)  # the dispatches after the warm-up, out of the timed run

        log_start = dispatcher.log_path.stat().st_size
        watched = {
            "webhook worker": hooks,
            "turn worker (dispatches)": dispatcher,
            "postgres": info["postgres"],
            "redis": info["redis"],
            "beat": beat,
        }
        print(f"run: {args.deliveries} deliveries pending at once …", flush=True)
        before = cpu(watched)
        committed, started = time.time(), time.monotonic()
        created = insert(endpoint["id"], args.deliveries)
        ids = list(created)
        while pending(endpoint["id"]) and time.monotonic() - started < TIMEOUT:
            time.sleep(0.1)
        spent = {name: seconds - before[name] for name, seconds in cpu(watched).items()}
        counts = ended(ids)
        time.sleep(1)  # anything sent twice arrives
        run_log = dispatcher.log_path.read_text(errors="replace")[log_start:]

        mine = set(ids)
        got = [r for r in receiver.received() if r[1].get("webhook-id") in mine]
        times = sorted(at for at, _h, _b in got)
        seen = Counter(h["webhook-id"] for _at, h, _b in got)
        first_receipt: dict[str, float] = {}
        for at, headers, _body in got:
            first_receipt[headers["webhook-id"]] = min(at, first_receipt.get(headers["webhook-id"], at))
        latency = [first_receipt[i] - created[i] for i in first_receipt]
        verifier, bad = Webhook(endpoint["secret"]), 0
        for _at, headers, body in got:
            try:
                verifier.verify(body, headers)
            except Exception:  # noqa: BLE001 - any failure to verify counts
                bad += 1
        spans = postgres_spans(ids)
        runs = dispatches(run_log)
        receiver.close()
        beat.stop()
        hooks.stop()
        dispatcher.stop()
    load_after = os.getloadavg()

    n = args.deliveries
    receipt_span = times[-1] - times[0] if len(times) > 1 else float("nan")
    pg_span = spans["last_finished"] - spans["first_attempt"]
    results = {
        "deliveries": n,
        "worker_threads": args.threads,
        "receiver": args.receiver,
        "pending_made_by": "one INSERT of the rows the turns' trigger writes",
        "deliveries_per_s_first_to_last_receipt": round(n / receipt_span, 1),
        "deliveries_per_s_postgres_first_attempt_to_last_finished": round(n / pg_span, 1),
        "deliveries_per_s_insert_to_last_receipt": round(n / (times[-1] - committed), 1),
        "seconds_first_to_last_receipt": round(receipt_span, 3),
        "seconds_insert_to_first_receipt": round(times[0] - committed, 3),
        "status_in_postgres": counts,
        "attempts_in_postgres": spans["attempts"],
        "retried_attempts": spans["retried_attempts"],
        "received": len(got),
        "distinct_webhook_ids_received": len(seen),
        "webhook_ids_received_more_than_once": sum(1 for c in seen.values() if c > 1),
        "signatures_verified": len(got) - bad,
        "signatures_not_verified": bad,
        "created_to_receipt_ms": {
            "p50": round(statistics.median(latency) * 1000, 1),
            "p99": round(p(latency, 99) * 1000, 1),
            "max": round(max(latency) * 1000, 1),
        },
        "cpu_ms_per_delivery_by_service": {name: round(s / n * 1000, 3) for name, s in spent.items()},
        "cpu_percent_of_a_core_by_service": {name: round(s / receipt_span * 100) for name, s in spent.items()},
        "dispatches": {
            "count": len(runs),
            "taken_each": [c for _s, c in runs],
            "seconds_each": [round(s, 3) for s, _c in runs],
            "expired_unrun": len(EXPIRED.findall(run_log)),
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
    }
    rows = [
        ("deliveries pending at once (one INSERT)", n),
        ("webhook worker: processes / threads", f"1 / {args.threads}"),
        ("receiver", args.receiver),
        ("deliveries/s, first to last receipt", results["deliveries_per_s_first_to_last_receipt"]),
        (
            "deliveries/s, first attempt to last finished (Postgres)",
            results["deliveries_per_s_postgres_first_attempt_to_last_finished"],
        ),
        ("deliveries/s, INSERT to last receipt", results["deliveries_per_s_insert_to_last_receipt"]),
        ("seconds INSERT to first receipt", results["seconds_insert_to_first_receipt"]),
        ("status in Postgres", counts),
        ("attempts in Postgres / retried", f"{spans['attempts']} / {spans['retried_attempts']}"),
        (
            "received / distinct webhook-ids / ids more than once",
            f"{len(got)} / {len(seen)} / {results['webhook_ids_received_more_than_once']}",
        ),
        ("signatures verified / not", f"{len(got) - bad} / {bad}"),
        (
            "created_at to receipt, ms p50 / p99 / max",
            " / ".join(str(v) for v in results["created_to_receipt_ms"].values()),
        ),
        (
            "dispatches in the run: count / taken each",
            f"{len(runs)} / {results['dispatches']['taken_each']}",
        ),
        ("dispatch messages expired unrun", results["dispatches"]["expired_unrun"]),
    ]
    rows += [(f"CPU ms per delivery: {k}", v) for k, v in results["cpu_ms_per_delivery_by_service"].items()]
    rows += [(f"CPU % of a core in the run: {k}", v) for k, v in results["cpu_percent_of_a_core_by_service"].items()]
    rows.append(("load average before / after", f"{results['load_average_before']} / {results['load_average_after']}"))
    report(rows, results, args.out)
    lost = n - counts.get("delivered", 0)
    if lost or bad or len(seen) != n:
        raise SystemExit(f"{lost} not delivered, {n - len(seen)} never received, {bad} signatures did not verify")


if __name__ == "__main__":
    main()
