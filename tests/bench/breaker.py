"""Breaker benchmark: a model endpoint that dies under load and comes back
(issue 36, point 4).

    python -m tests.bench.breaker [--turns 200] [--cooldown 5] [--down 20] [--threads 100] [--out .bench/breaker.json]

Starts Postgres, Redis and the offline model (50 ms to the first token),
with a TCP proxy (tests/proxy.py) in front of the model, and two worker
processes from the Procfile's line with `--threads` threads each (100: two
processes so that the one probe across processes is exercised, and 200
threads in all so that every turn is in flight at once). The workers reach
the model through the proxy, with the breaker as an operator would set it:
BREAKER_COOLDOWN_SECONDS=`--cooldown`, BREAKER_MIN_FAILURES=5,
BREAKER_FAILURE_RATE=0.5, BREAKER_WINDOW_SECONDS=30, MODEL_WAIT_SECONDS=300,
OPENAI_MAX_RETRIES=3 (the default), and the limits lifted (RATE_LIMITS=off,
MAX_*_PER_OWNER). The API is driven in this process through
`web.create_app()`'s test client.

After 10 short turns to warm up, `--turns` turns are sent, each in a
session of its own, each a long answer (400 tokens 50 ms apart: 20 s).
Once every one is streaming (running in Postgres, its newest event a
`message.delta`), the proxy is cut: open connections are closed and new
ones refused for `--down` seconds, then it lets them through again. A
thread polls the breaker's hash in Redis every 10 ms meanwhile (its state
and `probes`), and from just before the endpoint returns this process
listens to the turns' Pub/Sub channels for the first `message.delta`.

Measured (one clock: this process's monotonic clock, Redis's `since`
converted to it by sampling both once; Postgres's `finished_at` by the
wall clock, the same machine's):

- when the breaker opened after the cut (the hash's `since`);
- connections the proxy refused while the endpoint was down, before and
  after the breaker opened, and the probes counted after it opened (the
  hash's `probes`): the goal is refused after the open == probes;
- from the endpoint's return to its first accepted connection, to the
  breaker closing, to the first `message.delta` (the first answer; goal
  <= the cool-down + 1 s), and to the first and last `turn.completed`
  (these hold the 20 s answer itself: a broken stream starts again), and
  to each turn's last claim (`claimed_at`): a turn claimed more than 10 s
  after the return was not sent again when the breaker closed;
- the turns failed / succeeded / other once all ended (goal: 0 failed),
  the turns that were delayed (a `turn.delayed` event), those events and
  the deferrals (`turns.resumes`), and the streams restarted in the turn
  (`turn.restarted`);
- the workers' breaker log lines (which process opened, probed, closed).

Prints a table, writes JSON, and exits non-zero if a turn failed or did
not end.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from sqlalchemy import func, select

from shared.turn_states import ENDED
from tests import bench, services
from tests.bench.pipeline import p
from tests.bench.report import report
from tests.proxy import Proxy

ENV = {
    **bench.ENV,
    "REDIS_PREFIX": "breakerbench:",
    "OPENAI_MAX_RETRIES": "3",
    "OPENAI_TIMEOUT": "60",
    "BREAKER_MIN_FAILURES": "5",
    "BREAKER_FAILURE_RATE": "0.5",
    "BREAKER_WINDOW_SECONDS": "30",
    "MODEL_WAIT_SECONDS": "300",
}
MODEL_ARGS = ("--first-token-delay", "0.05", "--token-delay", "0.01")
MESSAGE = "breaker bench {n} [[tokens=400]] [[delay=0.05]]"
WORKERS = 2
CLIENT_THREADS = 8
TIMEOUT = 600.0  # seconds a phase may take before its turns count as lost
POLL = 0.01  # the breaker's hash, seconds
LATE = 10.0  # a turn whose last attempt started this long after the endpoint's return was not handed back at once


class Lost(Exception):
    """Turns that did not get where they should within TIMEOUT."""


class CountingProxy(Proxy):
    """The test proxy, also noting when each connection went through."""

    def __init__(self, targets: list[tuple[str, int]]) -> None:
        self.accepted: list[float] = []  # before the accepting thread starts
        super().__init__(targets)

    def _connect(self):
        upstream = super()._connect()
        if upstream is not None:
            self.accepted.append(time.monotonic())
        return upstream


class BreakerWatch:
    """Polls the endpoint's breaker: each change of its state or of its
    probes, with this process's monotonic time."""

    def __init__(self) -> None:
        from shared.breakers import model_breaker

        self.breaker = model_breaker("default")
        self.changes: list[tuple[float, str, int, float | None]] = []  # (when, state, probes, since)
        self.probes: list[float] = []  # when each probe was counted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            s = self.breaker.state()
            seen = (s["state"], s["probes"], s["open_since"])
            if seen != last:
                self.changes.append((time.monotonic(), *seen))
                if last is not None and seen[1] > last[1]:
                    self.probes.append(time.monotonic())
                last = seen
            time.sleep(POLL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class FirstDelta:
    """Listens to every turn's channel from now on; `at` is when the first
    `message.delta` came (monotonic)."""

    def __init__(self, url: str, pattern: str) -> None:
        self.at: float | None = None
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(pattern)
        self._pubsub.get_message(timeout=1)  # the subscription's reply: subscribed from here on
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.at is None and time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=0.5)
            if message and b'"type":"message.delta"' in message["data"]:
                self.at = time.monotonic()
        self._pubsub.close()


def redis_offset() -> float:
    """Redis's clock minus this process's monotonic clock."""
    from shared.redis import get_redis

    before = time.monotonic()
    seconds, micros = get_redis().time()
    return seconds + micros / 1e6 - (before + time.monotonic()) / 2


def statuses(ids: list[str]) -> dict[str, int]:
    from shared.db import transaction
    from shared.models import Turn

    with transaction() as db:
        rows = db.execute(select(Turn.status, func.count()).where(Turn.id.in_(ids)).group_by(Turn.status)).all()
    return dict(rows)


def newest_event_types(ids: list[str]) -> list[str | None]:
    from shared.events import Event, EventLog
    from shared.redis import get_redis

    pipe = get_redis().pipeline(transaction=False)
    for turn_id in ids:
        pipe.xrevrange(EventLog("turn", turn_id).stream_key, count=1)
    return [Event.parse(e[0][1][b"d"]).type if e else None for e in pipe.execute()]


def wait(check, what: str, ids: list[str]) -> float:
    """Poll until check(statuses) holds; when it did (monotonic)."""
    deadline = time.monotonic() + TIMEOUT
    while not check(counts := statuses(ids)):
        if time.monotonic() > deadline:
            raise Lost(f"{what}: {counts} of {len(ids)} turns after {TIMEOUT:g} s")
        time.sleep(0.1)
    return time.monotonic()


def send(client, headers: dict, pool: ThreadPoolExecutor, messages: list[str]) -> list[str]:
    """One session per message, then its turn: the turns' ids."""

    def one(message: str) -> str:
        sid = client().post("/api/sessions", json={}, headers=headers).get_json()["id"]
        made = client().post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=headers)
        if made.status_code != 202:
            raise SystemExit(f"POST turns answered {made.status_code}: {made.get_json()}")
        return made.get_json()["id"]

    return list(pool.map(one, messages))


def outcome(ids: list[str], restored_wall: float) -> dict[str, Any]:
    """What became of the turns, from Postgres and their event logs."""
    from shared.db import transaction
    from shared.events import EventLog
    from shared.models import Turn

    with transaction() as db:
        rows = db.execute(
            select(
                Turn.id,
                Turn.status,
                Turn.resumes,
                Turn.attempts,
                Turn.error,
                (func.extract("epoch", Turn.claimed_at) - restored_wall).label("claimed"),
                (func.extract("epoch", Turn.finished_at) - restored_wall).label("finished"),
            ).where(Turn.id.in_(ids))
        ).all()
    types = [[e.type for e in EventLog("turn", t).read_after(0)] for t in ids]
    done = sorted(float(r.finished) for r in rows if r.status == "succeeded")
    claims = sorted(float(r.claimed) for r in rows)  # its last attempt's, for a deferred turn the one after the return
    late = [r.id for r in rows if float(r.claimed) > LATE]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "succeeded": counts.pop("succeeded", 0),
        "failed": counts.pop("failed", 0),
        "other": counts,
        "errors": sorted({r.error["code"] for r in rows if r.error})[:5],
        "delayed_turns": sum("turn.delayed" in t for t in types),
        "delayed_events": sum(t.count("turn.delayed") for t in types),
        "deferrals_resumes_sum": sum(r.resumes for r in rows),
        "most_deferrals_of_a_turn": max(r.resumes for r in rows),
        "attempts_sum": sum(r.attempts for r in rows),
        "streams_restarted_in_turn": sum(t.count("turn.restarted") for t in types),
        "completed_before_restore": sum(d < 0 for d in done),
        "restore_to_first_completed_s": round(done[0], 3) if done else None,
        "restore_to_last_completed_s": round(done[-1], 3) if done else None,
        "restore_to_last_claim_s": {
            "p50": round(p(claims, 50), 3),
            "p99": round(p(claims, 99), 3),
            "max": round(claims[-1], 3),
        },
        f"claimed_over_{LATE:g}_s_after_restore": len(late),
        "late_turns": late[:10],
    }


def breaker_lines(workers: list[services.Proc]) -> dict[str, list[str]]:
    """Each worker's log lines about the breaker."""
    marks = ("opened", "probes it", "closed:")
    return {
        w.name: [
            line[:300] for line in w.log_path.read_text(errors="replace").splitlines() if any(m in line for m in marks)
        ]
        for w in workers
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from shared.redis import key
    from web import create_app
    from web.auth import create_key

    env = {**ENV, "BREAKER_COOLDOWN_SECONDS": str(args.cooldown)}
    with services.stack("turnstream-bench-breaker-", env, MODEL_ARGS, mcp=False) as info:
        proxy = CountingProxy([("127.0.0.1", info["model_port"])])
        worker_env = {**info["env"], "OPENAI_BASE_URL": f"http://127.0.0.1:{proxy.port}/v1"}
        workers = [
            services.start_worker(info["logdir"], worker_env, f"breaker{n}", concurrency=args.threads)
            for n in range(WORKERS)
        ]
        info["procs"].extend(workers)
        for worker in workers:
            services.wait_for_worker(worker)
        app = create_app()
        logging.getLogger("web").setLevel(logging.WARNING)
        local = threading.local()

        def client():
            if not hasattr(local, "client"):
                local.client = app.test_client()
            return local.client

        headers = {"Authorization": f"Bearer {create_key('bench-' + uuid.uuid4().hex[:8])}"}
        pool = ThreadPoolExecutor(CLIENT_THREADS)
        try:
            print("warm-up: 10 short turns …", flush=True)
            warm = send(client, headers, pool, ["warm [[tokens=5]]"] * 10)
            wait(lambda c: c.get("succeeded") == len(warm), "warm-up", warm)

            print(f"{args.turns} turns of 400 tokens, 50 ms apart …", flush=True)
            sent = time.monotonic()
            ids = send(client, headers, pool, [MESSAGE.format(n=n) for n in range(args.turns)])
            deadline = sent + TIMEOUT
            while not (statuses(ids).get("running") == len(ids) and set(newest_event_types(ids)) == {"message.delta"}):
                if time.monotonic() > deadline:
                    raise Lost(f"not all streaming: {statuses(ids)}")
                time.sleep(0.1)
            all_streaming = time.monotonic() - sent
            watch = BreakerWatch()
            offset = redis_offset()
            before = watch.breaker.state()
            refused_before = len(proxy.refused)

            print(f"all {len(ids)} streaming after {all_streaming:.1f} s; the endpoint dies for {args.down:g} s …")
            cut = time.monotonic()
            proxy.cut(3600)
            time.sleep(max(0.0, cut + args.down - 0.5 - time.monotonic()))
            first_delta = FirstDelta(info["env"]["REDIS_URL"], key("turn", "*"))
            time.sleep(max(0.0, cut + args.down - time.monotonic()))
            at_restore = watch.breaker.state()
            refused = list(proxy.refused[refused_before:])
            proxy.down_until = 0  # it comes back
            restored, restored_wall = time.monotonic(), time.time()

            print("back; waiting for every turn to end …", flush=True)
            ended = wait(lambda c: sum(c.get(s, 0) for s in ENDED) == len(ids), "the end", ids)
            watch.stop()
        except Lost as exc:
            tails = "\n".join(f"--- {w.name}\n{w.log_tail(30)}" for w in workers)
            raise SystemExit(f"turns lost: {exc}\n{tails}") from None
        finally:
            pool.shutdown()
            proxy.down_until = 0
        turns = outcome(ids, restored_wall)
        for worker in workers:
            worker.stop()
        proxy.close()
        logdir = str(info["logdir"])

    opens = [(t, since) for t, state, _p, since in watch.changes if state != "closed" and since is not None]
    opened = opens[0][1] - offset if opens else None  # the hash's `since`, as monotonic
    closed = next((t for t, state, _p, _s in watch.changes if t > restored and state == "closed"), None)
    accepted = next((t for t in proxy.accepted if t >= restored), None)

    def since_restore(t: float | None) -> float | None:
        return None if t is None else round(t - restored, 3)

    return {
        "turns": args.turns,
        "message": MESSAGE.format(n=0),
        "workers": {"processes": WORKERS, "threads_each": args.threads},
        "settings": {k: v for k, v in env.items() if k.startswith(("BREAKER", "MODEL_WAIT", "OPENAI_M", "OPENAI_T"))},
        "model_args": list(MODEL_ARGS),
        "down_s": args.down,
        "all_streaming_after_s": round(all_streaming, 2),
        "cut_to_open_s": None if opened is None else round(opened - cut, 3),
        "opens": at_restore["opens"] - before["opens"],
        "refused_before_open": sum(t < opened for t in refused) if opened else len(refused),
        "refused_after_open": sum(t >= opened for t in refused) if opened else 0,
        "probes_after_open": at_restore["probes"] - before["probes"],
        "probes_after_open_s": [round(t - opened, 2) for t in watch.probes if t < restored] if opened else [],
        "refused_after_open_s": [round(t - opened, 2) for t in refused if t >= opened][:50] if opened else [],
        "restore_to_first_connection_s": since_restore(accepted),
        "restore_to_breaker_closed_s": since_restore(closed),
        "restore_to_first_delta_s": since_restore(first_delta.at),
        **turns,
        "restore_to_all_ended_s": round(ended - restored, 2),
        "breaker_log_lines": breaker_lines(workers),
        "logdir": logdir,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200, help="turns in flight when the endpoint dies")
    parser.add_argument("--cooldown", type=float, default=5.0, help="BREAKER_COOLDOWN_SECONDS")
    parser.add_argument("--down", type=float, default=20.0, help="seconds the endpoint stays dead")
    parser.add_argument("--threads", type=int, default=100, help="threads of each of the two worker processes")
    parser.add_argument("--out", default=".bench/breaker.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before, began = os.getloadavg(), time.perf_counter()
    results = run(args)
    results["load_average_before_after"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    results["run_s"] = round(time.perf_counter() - began, 1)
    r, goal = results, args.cooldown + 1
    rows = [
        ("workers", f"{WORKERS} processes x {args.threads} threads; {args.turns} turns of 400 tokens, 50 ms apart"),
        ("breaker", f"cool-down {args.cooldown:g} s, >= 5 failures and >= 50 % of 30 s; endpoint down {args.down:g} s"),
        ("all turns streaming after, s", r["all_streaming_after_s"]),
        ("cut -> breaker open, s (opens)", f"{r['cut_to_open_s']} ({r['opens']})"),
        ("refused connections: before the open / after it", f"{r['refused_before_open']} / {r['refused_after_open']}"),
        (
            "probes after the open (goal: == refused after it)",
            f"{r['probes_after_open']} at {r['probes_after_open_s']} s",
        ),
        (
            "return -> first connection / breaker closed, s",
            f"{r['restore_to_first_connection_s']} / {r['restore_to_breaker_closed_s']}",
        ),
        (f"return -> first answer (message.delta), s (goal <= {goal:g})", r["restore_to_first_delta_s"]),
        (
            "return -> first / last turn.completed, s",
            f"{r['restore_to_first_completed_s']} / {r['restore_to_last_completed_s']}",
        ),
        ("turns succeeded / failed / other (goal: 0 failed)", f"{r['succeeded']} / {r['failed']} / {r['other'] or 0}"),
        (
            "turns delayed / turn.delayed events / deferrals (resumes)",
            f"{r['delayed_turns']} / {r['delayed_events']} / {r['deferrals_resumes_sum']}",
        ),
        ("streams restarted in the turn (turn.restarted)", r["streams_restarted_in_turn"]),
        (
            f"return -> last attempt's claim, s p50 / p99 / max (turns over {LATE:g} s)",
            f"{r['restore_to_last_claim_s']['p50']} / {r['restore_to_last_claim_s']['p99']} / "
            f"{r['restore_to_last_claim_s']['max']} ({r[f'claimed_over_{LATE:g}_s_after_restore']})",
        ),
        ("load average before / after (1, 5, 15 min)", r["load_average_before_after"]),
        ("the whole run, s", r["run_s"]),
    ]
    report(rows, results, args.out)
    if r["failed"] or r["other"]:
        raise SystemExit(f"{r['failed']} turns failed ({r['errors']}), others {r['other']}: see {r['logdir']}")


if __name__ == "__main__":
    main()
