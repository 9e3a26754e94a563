"""Approvals benchmark: turns paused for a person hold no worker thread, and
a decision sets its turn running again at once.

    python -m tests.bench.approvals [--turns 200] [--paused 200] [--threads 8] [--pace 5] [--out .bench/approvals.json]

Starts Postgres, Redis, the offline model (10 ms to the first token, 10 ms
between tokens), the MCP test servers (`kit`, whose `shout` tool answers its
text in capitals) and one worker process from its Procfile line with
`--threads` threads (8). The API is driven in this process, through
`web.create_app()`'s test client (no gunicorn), by 8 client threads; one
key sends everything, with the limits lifted (RATE_LIMITS=off,
MAX_*_PER_OWNER). Statuses are read from Postgres, not polled through the
API.

Unpaused load: `--turns` turns, each in a session of its own (made first,
not timed), each a 20-token answer 10 ms apart, sent at once; turns/s is
`--turns` over the span from the first turn's `created_at` to the last
one's `finished_at` (Postgres's clock), until every one succeeded.
Paused turns: an assistant `{"tools": {"kit": ["shout"]}, "approval":
{"policy": "always"}}`, each turn in a session of its own, its message
`[[call=kit__shout {"text": "p<i>"}]]`: the model calls the tool, and the
turn waits.

In one run (after 20 unpaused turns to warm up), so that the machine's
drift shows beside the ratio:

1. baseline A: the unpaused load;
2. `--paused` turns pause (the first set): the time until all wait (the
   first turn's `created_at` to the last `tool_approvals.created_at`); then
   the worker's active tasks (Celery's inspect) and the turns running, both
   0 if no thread is held;
3. L1: the unpaused load while they wait (and they still wait after it);
4. each of them approved one at a time, `--pace` decisions a second, with
   a new unpaused turn sent half-way between decisions: its time from
   being accepted (`turns.created_at`) to its claim is the baseline for a
   decision's;
5. baseline B;
6. a second set of `--paused` turns pause;
7. L2: the unpaused load while they wait;
8. each of them approved, all at once (8 client threads, as fast as the
   API answers);
9. baseline C.

The ratio is the mean of L1 and L2 over the mean of A, B and C (and each L
over the baselines either side of it). Time from a decision to the turn
running again: `turns.claimed_at` (the resumed attempt's claim) minus
`tool_approvals.decided_at`, both Postgres's now(): the decision's is its
request's transaction start, so the figure holds the rest of that request,
its commit, the task's trip through Redis to the worker and the claim; p50,
p99 and max for each way of deciding, and likewise to the turn's end
(`finished_at`); also split where the decision's answer reached the client
(this process's clock, the same machine's as Postgres's). Checked at the
end: every paused turn succeeded after one resumed attempt, its call
approved, run once (one `tool.started`, one result, its answer saying
`kit__shout returned: P<i>.` once), and every unpaused turn succeeded.
Prints a table, writes JSON, and exits non-zero if a turn is lost, fails,
or a call is not answered exactly once.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import func, select

from tests import bench, services
from tests.bench.pipeline import p, tree_cpu
from tests.bench.report import report

ENV = {
    **bench.ENV,
    "REDIS_PREFIX": "approvalsbench:",
    "OPENAI_MAX_RETRIES": "0",
    "OPENAI_TIMEOUT": "60",
}
MODEL_ARGS = ("--first-token-delay", "0.01", "--token-delay", "0.01")
UNPAUSED = "bench [[tokens=20]] [[delay=0.01]]"
CLIENT_THREADS = 8
TIMEOUT = 300.0  # seconds a phase may take before its turns count as lost
POLL = 0.05
T = TypeVar("T")


class Lost(Exception):
    """Turns that did not get where they should within TIMEOUT."""


def paused_message(i: int) -> str:
    return f'approvals bench {i} [[call=kit__shout {{"text": "p{i}"}}]]'


def spread(values: list[float]) -> dict[str, float]:
    """p50 / p99 / max of seconds, in ms."""
    return {
        "p50_ms": round(p(values, 50) * 1000, 1),
        "p99_ms": round(p(values, 99) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
        "mean_ms": round(statistics.mean(values) * 1000, 1),
    }


class Bench:
    def __init__(self, info: dict, worker: services.Proc) -> None:
        from web import create_app
        from web.auth import create_key

        self.info = info
        self.worker = worker
        self.app = create_app()
        logging.getLogger("web").setLevel(logging.WARNING)  # a line per request, in this process
        self.local = threading.local()
        self.headers = {"Authorization": f"Bearer {create_key('bench-' + uuid.uuid4().hex[:8])}"}
        self.pool = ThreadPoolExecutor(CLIENT_THREADS)
        self.node = self._node()
        made = self.client().post(
            "/api/assistants",
            json={
                "name": f"approvals-bench-{uuid.uuid4().hex[:8]}",
                "tools": {"kit": ["shout"]},
                "approval": {"policy": "always"},
            },
            headers=self.headers,
        )
        assert made.status_code == 201, made.get_json()
        self.assistant_id = made.get_json()["id"]
        self.paused_made = 0

    def client(self):
        """A test client of this thread's own."""
        if not hasattr(self.local, "client"):
            self.local.client = self.app.test_client()
        return self.local.client

    def _node(self) -> str:
        from shared.broker import get_celery

        replies = get_celery().control.ping(timeout=1)
        return next(node for reply in replies for node in reply if node.startswith(f"{self.worker.name}@"))

    def all_at_once(self, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
        return list(self.pool.map(fn, items))

    # --- the API --------------------------------------------------------

    def session(self, assistant: bool) -> str:
        body = {"assistant_id": self.assistant_id} if assistant else {}
        r = self.client().post("/api/sessions", json=body, headers=self.headers)
        assert r.status_code == 201, r.get_json()
        return r.get_json()["id"]

    def submit(self, session_id: str, message: str) -> str:
        r = self.client().post(f"/api/sessions/{session_id}/turns", json={"message": message}, headers=self.headers)
        if r.status_code != 202:
            raise SystemExit(f"POST turns answered {r.status_code}: {r.get_json()}")
        return r.get_json()["id"]

    def approve(self, turn_id: str, request_id: str) -> tuple[str, float, float]:
        """Approve the call; the turn, when the answer came (Unix time), and
        the request's seconds."""
        began = time.perf_counter()
        r = self.client().post(
            f"/api/turns/{turn_id}/approvals/{request_id}", json={"decision": "approve"}, headers=self.headers
        )
        answered = time.time()
        if r.status_code != 200 or r.get_json()["status"] != "approved":
            raise SystemExit(f"a decision answered {r.status_code}: {r.get_json()}")
        return turn_id, answered, time.perf_counter() - began

    # --- Postgres and the worker -----------------------------------------

    @staticmethod
    def statuses(ids: list[str]) -> dict[str, int]:
        from shared.db import transaction
        from shared.models import Turn

        with transaction() as db:
            rows = db.execute(select(Turn.status, func.count()).where(Turn.id.in_(ids)).group_by(Turn.status)).all()
        return {status: n for status, n in rows}

    @staticmethod
    def running_now() -> int:
        from shared.db import transaction
        from shared.models import Turn

        with transaction() as db:
            return db.scalar(select(func.count()).where(Turn.status == "running"))

    def wait_for(self, ids: list[str], status: str, what: str) -> int:
        """Wait until every turn of `ids` has `status`; the most turns seen
        running at once meanwhile (any turn). Lost if one ends otherwise, or
        TIMEOUT passes."""
        deadline, most = time.monotonic() + TIMEOUT, 0
        ends = {"succeeded", "failed", "cancelled", "waiting"} - {status}
        while True:
            counts = self.statuses(ids)
            most = max(most, self.running_now())
            if counts.get(status, 0) == len(ids):
                return most
            if any(counts.get(end) for end in ends) or time.monotonic() > deadline:
                raise Lost(f"{what}: {counts} of {len(ids)} turns, waiting for all to be {status}")
            time.sleep(POLL)

    def active_tasks(self) -> int:
        """Tasks the worker is executing now (Celery's inspect)."""
        from shared.broker import get_celery

        replies = get_celery().control.inspect(destination=[self.node], timeout=2).active() or {}
        if self.node not in replies:
            raise SystemExit(f"the worker {self.node} did not answer inspect")
        return len(replies[self.node])

    def cpu(self) -> dict[str, float]:
        return {
            "worker": tree_cpu(self.worker.popen.pid),
            "postgres": tree_cpu(self.info["postgres"].popen.pid),
            "bench client (web in-process)": time.process_time(),
        }

    # --- the phases -------------------------------------------------------

    def unpaused(self, label: str, n: int) -> dict:
        """n unpaused turns sent at once; turns/s until all succeeded."""
        from shared.db import transaction
        from shared.models import Turn

        print(f"{label}: {n} unpaused turns …", flush=True)
        sessions = self.all_at_once(lambda _: self.session(False), range(n))
        cpu, began = self.cpu(), time.perf_counter()
        ids = self.all_at_once(lambda s: self.submit(s, UNPAUSED), sessions)
        sent = time.perf_counter() - began
        most = self.wait_for(ids, "succeeded", label)
        wall = time.perf_counter() - began
        used = self.cpu()
        with transaction() as db:
            first, last = db.execute(
                select(func.min(Turn.created_at), func.max(Turn.finished_at)).where(Turn.id.in_(ids))
            ).one()
        span = (last - first).total_seconds()
        return {
            "turns": n,
            "turns_per_s": round(n / span, 2),
            "span_s": round(span, 3),
            "client_wall_s": round(wall, 3),
            "sent_in_s": round(sent, 3),
            "most_running_at_once": most,
            "accepted_to_running": self.accepted_to_running(ids),
            "cpu_ms_per_turn": {name: round((used[name] - cpu[name]) / n * 1000, 2) for name in cpu},
            "ids": ids,
        }

    def pause(self, label: str, n: int) -> dict:
        """n turns that pause for a person; how long until all wait, and
        whether the worker holds anything then."""
        from shared.db import transaction
        from shared.models import ToolApproval, Turn

        print(f"{label}: {n} turns that wait for approval …", flush=True)
        numbers = range(self.paused_made, self.paused_made + n)
        self.paused_made += n
        sessions = self.all_at_once(lambda _: self.session(True), numbers)
        began = time.perf_counter()
        ids = self.all_at_once(
            lambda pair: self.submit(pair[0], paused_message(pair[1])), zip(sessions, numbers, strict=True)
        )
        self.wait_for(ids, "waiting", label)
        wall = time.perf_counter() - began
        with transaction() as db:
            first = db.scalar(select(func.min(Turn.created_at)).where(Turn.id.in_(ids)))
            rows = db.execute(
                select(ToolApproval.turn_id, ToolApproval.id, ToolApproval.created_at, ToolApproval.status).where(
                    ToolApproval.turn_id.in_(ids)
                )
            ).all()
        if len(rows) != n or {r.status for r in rows} != {"pending"} or {r.turn_id for r in rows} != set(ids):
            raise SystemExit(f"{label}: expected one pending call per turn, found {len(rows)} rows")
        span = (max(r.created_at for r in rows) - first).total_seconds()
        time.sleep(0.5)  # a task's return comes a moment after its pause commits
        active, running = self.active_tasks(), self.running_now()
        return {
            "turns": n,
            "all_waiting_s": round(span, 3),
            "paused_per_s": round(n / span, 2),
            "client_wall_s": round(wall, 3),
            "worker_active_tasks_once_all_wait": active,
            "turns_running_once_all_wait": running,
            "requests": {r.turn_id: r.id for r in rows},
            "ids": ids,
        }

    def decide(self, label: str, paused: dict, pace: float | None) -> dict:
        """Approve each waiting call: `pace` a second, one at a time, or
        (None) all at once; the time from each decision to its turn running
        again, by Postgres's clock. One at a time, a new unpaused turn is
        sent half-way between decisions, as the baseline: the time from its
        acceptance (`created_at`) to its claim."""
        how = f"one at a time, {pace:g} a second" if pace else f"all at once ({CLIENT_THREADS} client threads)"
        print(f"{label}: approving {len(paused['ids'])} calls, {how} …", flush=True)
        pairs = list(paused["requests"].items())
        fresh = self.all_at_once(lambda _: self.session(False), pairs) if pace else []
        new_ids, submits = [], []
        began = time.perf_counter()
        answered = []
        if pace:
            for i, ((turn_id, request_id), session_id) in enumerate(zip(pairs, fresh, strict=True)):
                time.sleep(max(0.0, began + i / pace - time.perf_counter()))
                answered.append(self.approve(turn_id, request_id))
                time.sleep(max(0.0, began + (i + 0.5) / pace - time.perf_counter()))
                submitted = time.perf_counter()
                new_ids.append(self.submit(session_id, UNPAUSED))
                submits.append(time.perf_counter() - submitted)
        else:
            answered = self.all_at_once(lambda pair: self.approve(*pair), pairs)
        sent = time.perf_counter() - began
        self.wait_for(paused["ids"] + new_ids, "succeeded", label)
        results = {"how": how, "sent_in_s": round(sent, 3), **self.resumed(paused["ids"], answered)}
        if new_ids:
            results["new_turn_request"] = spread(submits)
            results["new_turn_accepted_to_running"] = self.accepted_to_running(new_ids)
            results["decision_over_new_turn_p50"] = round(
                results["decision_to_running"]["p50_ms"] / results["new_turn_accepted_to_running"]["p50_ms"], 2
            )
        return results

    @staticmethod
    def accepted_to_running(ids: list[str]) -> dict:
        from shared.db import transaction
        from shared.models import Turn

        with transaction() as db:
            waits = db.scalars(
                select(func.extract("epoch", Turn.claimed_at - Turn.created_at)).where(Turn.id.in_(ids))
            ).all()
        return spread([float(w) for w in waits])

    @staticmethod
    def resumed(ids: list[str], decided: list[tuple[str, float, float]]) -> dict:
        """How the turns went on after their decisions, checked: each
        succeeded with its call run once and answered once. `decided`:
        each turn, and when its decision's answer came, in order."""
        answered = {turn_id: at for turn_id, at, _s in decided}
        order = {turn_id: i for i, (turn_id, _at, _s) in enumerate(decided)}
        from shared.db import transaction
        from shared.events import EventLog
        from shared.models import ToolApproval, Turn

        with transaction() as db:
            rows = db.execute(
                select(
                    Turn.id,
                    Turn.status,
                    Turn.attempts,
                    Turn.resumes,
                    Turn.tools,
                    Turn.answer,
                    ToolApproval.status.label("decision"),
                    ToolApproval.call_id,
                    ToolApproval.arguments,
                    func.extract("epoch", ToolApproval.decided_at).label("decided"),
                    func.extract("epoch", Turn.claimed_at).label("claimed"),
                    func.extract("epoch", Turn.finished_at).label("finished"),
                )
                .join(ToolApproval, ToolApproval.turn_id == Turn.id)
                .where(Turn.id.in_(ids))
            ).all()
        problems = []
        for r in rows:
            shouted = r.arguments["text"].upper()
            events = EventLog("turn", r.id).read_after(0)
            started = [e.data["call_id"] for e in events if e.type == "tool.started"]
            tools = r.tools or []
            if (
                r.status != "succeeded"
                or r.decision != "approved"
                or started != [r.call_id]
                or len(tools) != 1
                or not tools[0].get("ok")
                or tools[0].get("call_id") != r.call_id
                or (r.answer or "").count(f"kit__shout returned: {shouted}.") != 1
            ):
                problems.append(
                    f"turn {r.id}: {r.status}, call {r.decision}, started {started}, tools {tools}, answer {r.answer!r}"
                )
        if len(rows) != len(ids):
            problems.append(f"{len(ids) - len(rows)} turns without their call")
        return {
            "turns": len(ids),
            "decision_request": spread([seconds for _id, _at, seconds in decided]),
            "succeeded": sum(r.status == "succeeded" for r in rows),
            "calls_answered_once": len(rows) - len(problems),
            "attempts": sorted({(r.attempts, r.resumes) for r in rows}),
            "decision_to_running": spread([float(r.claimed - r.decided) for r in rows]),
            "decision_to_end": spread([float(r.finished - r.decided) for r in rows]),
            # from the first decision to the last of these turns' ends
            "resumed_turns_per_s": round(
                len(rows) / float(max(r.finished for r in rows) - min(r.decided for r in rows)), 2
            ),
            # The same split where the decision's answer reached the client,
            # by this machine's clock (Postgres's now() and time.time() are
            # the same clock here): the request after its first statement,
            # then the task's trip to the worker and the claim.
            "decision_to_answered": spread([answered[r.id] - float(r.decided) for r in rows]),
            "answered_to_running": spread([float(r.claimed) - answered[r.id] for r in rows]),
            "slowest_to_running": [
                {
                    "decision": order[r.id] + 1,
                    "ms": round(float(r.claimed - r.decided) * 1000, 1),
                    "request_ms": round((answered[r.id] - float(r.decided)) * 1000, 1),
                }
                for r in sorted(rows, key=lambda r: r.decided - r.claimed)[:5]
            ],
            "problems": problems[:10],
            "problem_count": len(problems),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200, help="unpaused turns in each throughput run")
    parser.add_argument("--paused", type=int, default=200, help="turns waiting for approval, in each of two sets")
    parser.add_argument("--threads", type=int, default=8, help="the worker process's threads")
    parser.add_argument("--pace", type=float, default=5, help="decisions a second, one at a time")
    parser.add_argument("--out", default=".bench/approvals.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()
    began = time.perf_counter()
    with services.stack("turnstream-bench-approvals-", ENV, MODEL_ARGS, mcp=True) as info:
        worker = services.start_worker(info["logdir"], info["env"], "approvals", concurrency=args.threads)
        info["procs"].append(worker)
        services.wait_for_worker(worker)
        bench = Bench(info, worker)
        bench.unpaused("warm-up", 20)  # connections, the tool servers' first calls
        runs: dict[str, Any] = {}
        try:
            runs["A"] = bench.unpaused("A: baseline", args.turns)
            runs["pause1"] = bench.pause("pause, first set", args.paused)
            runs["L1"] = bench.unpaused(f"L1: with {args.paused} waiting", args.turns)
            still = bench.statuses(runs["pause1"]["ids"])
            if still != {"waiting": args.paused}:
                raise Lost(f"the waiting turns did not all wait through L1: {still}")
            runs["paced"] = bench.decide("decisions, first set", runs["pause1"], args.pace)
            runs["B"] = bench.unpaused("B: baseline", args.turns)
            runs["pause2"] = bench.pause("pause, second set", args.paused)
            runs["L2"] = bench.unpaused(f"L2: with {args.paused} waiting", args.turns)
            still = bench.statuses(runs["pause2"]["ids"])
            if still != {"waiting": args.paused}:
                raise Lost(f"the waiting turns did not all wait through L2: {still}")
            runs["burst"] = bench.decide("decisions, second set", runs["pause2"], None)
            runs["C"] = bench.unpaused("C: baseline", args.turns)
        except Lost as exc:
            raise SystemExit(f"turns lost or failed: {exc}\nworker log:\n{worker.log_tail()}") from None
        finally:
            bench.pool.shutdown()
        worker.stop()
    run_s = time.perf_counter() - began

    rate = {name: runs[name]["turns_per_s"] for name in ("A", "B", "C", "L1", "L2")}
    without = statistics.mean([rate["A"], rate["B"], rate["C"]])
    with_ = statistics.mean([rate["L1"], rate["L2"]])
    for run in runs.values():
        run.pop("ids", None)
        run.pop("requests", None)
    problems = runs["paced"]["problem_count"] + runs["burst"]["problem_count"]
    results = {
        "worker": {"processes": 1, "threads": args.threads},
        "model": {"args": list(MODEL_ARGS), "unpaused_message": UNPAUSED, "paused_message": paused_message(0)},
        "client": f"web.create_app() test client in the benchmark's process, {CLIENT_THREADS} threads",
        "turns": args.turns,
        "paused": args.paused,
        "pace_per_s": args.pace,
        "unpaused_turns_per_s": {
            "without_waiting": round(without, 2),
            "with_waiting": round(with_, 2),
            "by_run_in_order": {name: rate[name] for name in ("A", "L1", "B", "L2", "C")},
        },
        "ratios": {
            "with_over_without": round(with_ / without, 3),
            "L1_over_A_B": round(rate["L1"] / statistics.mean([rate["A"], rate["B"]]), 3),
            "L2_over_B_C": round(rate["L2"] / statistics.mean([rate["B"], rate["C"]]), 3),
        },
        "runs": runs,
        "load_average_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "run_s": round(run_s, 1),
    }
    paced, burst = runs["paced"], runs["burst"]

    def three(d: dict) -> str:
        return f"{d['p50_ms']} / {d['p99_ms']} / {d['max_ms']}"

    rows = [
        ("worker", f"1 process, {args.threads} threads; model: 10 ms to the first token, 10 ms a token"),
        (
            f"unpaused turns/s ({args.turns} at once): A / L1 / B / L2 / C",
            " / ".join(str(rate[name]) for name in ("A", "L1", "B", "L2", "C")),
        ),
        (f"  without / with {args.paused} waiting, mean", f"{round(without, 2)} / {round(with_, 2)}"),
        (
            "  ratio with / without (L1 over A,B; L2 over B,C)",
            f"{results['ratios']['with_over_without']} "
            f"({results['ratios']['L1_over_A_B']}; {results['ratios']['L2_over_B_C']})",
        ),
        (
            "  most turns running at once: A / L1 / B / L2 / C",
            " / ".join(str(runs[name]["most_running_at_once"]) for name in ("A", "L1", "B", "L2", "C")),
        ),
        (
            "  worker CPU ms per turn: A / L1 / B / L2 / C",
            " / ".join(str(runs[name]["cpu_ms_per_turn"]["worker"]) for name in ("A", "L1", "B", "L2", "C")),
        ),
        (
            "  Postgres CPU ms per turn: A / L1 / B / L2 / C",
            " / ".join(str(runs[name]["cpu_ms_per_turn"]["postgres"]) for name in ("A", "L1", "B", "L2", "C")),
        ),
        (
            f"{args.paused} turns until all wait: s (first / second set)",
            f"{runs['pause1']['all_waiting_s']} / {runs['pause2']['all_waiting_s']}",
        ),
        (
            "  once all wait: worker's active tasks / turns running",
            f"{runs['pause1']['worker_active_tasks_once_all_wait']} / {runs['pause1']['turns_running_once_all_wait']}"
            f", {runs['pause2']['worker_active_tasks_once_all_wait']} / "
            f"{runs['pause2']['turns_running_once_all_wait']}",
        ),
        (f"decision -> running again, {paced['how']}: ms p50 / p99 / max", three(paced["decision_to_running"])),
        ("  decision -> its answer to the client / answer -> running", _split(paced)),
        (
            "  the decision's request / a new turn's request (POST), ms p50 / p99",
            f"{paced['decision_request']['p50_ms']} / {paced['decision_request']['p99_ms']}, "
            f"{paced['new_turn_request']['p50_ms']} / {paced['new_turn_request']['p99_ms']}",
        ),
        (
            "  beside: a new turn sent between decisions, accepted -> running: ms p50 / p99 / max",
            three(paced["new_turn_accepted_to_running"])
            + f" (decision's p50 over it: {paced['decision_over_new_turn_p50']})",
        ),
        ("  decision -> turn's end: ms p50 / p99 / max", three(paced["decision_to_end"])),
        (
            f"decision -> running again, {burst['how']}, sent in {burst['sent_in_s']} s: ms p50 / p99 / max",
            three(burst["decision_to_running"]),
        ),
        ("  decision -> its answer to the client / answer -> running", _split(burst)),
        (
            f"  beside: {args.turns} new turns sent at once (A, B, C), accepted -> running: ms p50 / p99",
            " / ".join(
                f"{runs[name]['accepted_to_running']['p50_ms']}, {runs[name]['accepted_to_running']['p99_ms']}"
                for name in ("A", "B", "C")
            ),
        ),
        (
            "  resumed turns/s, first decision to last end (unpaused turns/s in B, C)",
            f"{burst['resumed_turns_per_s']} ({rate['B']}, {rate['C']})",
        ),
        ("  decision -> turn's end: ms p50 / p99 / max", three(burst["decision_to_end"])),
        (
            "paused turns: succeeded / calls answered once / of",
            f"{paced['succeeded'] + burst['succeeded']} / "
            f"{paced['calls_answered_once'] + burst['calls_answered_once']} / {2 * args.paused}",
        ),
        (
            "  (attempts, resumes) of the paused turns",
            sorted({tuple(a) for a in paced["attempts"] + burst["attempts"]}),
        ),
        ("load average before / after (1, 5, 15 min)", results["load_average_before_after"]),
        ("the whole run, s", results["run_s"]),
    ]
    report(rows, results, args.out)
    if problems:
        raise SystemExit(f"{problems} paused turns did not end with their call answered once: see problems in the JSON")


def _split(run: dict) -> str:
    a, b = run["decision_to_answered"], run["answered_to_running"]
    return f"p50 {a['p50_ms']} / {b['p50_ms']}, p99 {a['p99_ms']} / {b['p99_ms']} ms"


if __name__ == "__main__":
    main()
