"""Evaluation benchmark: the two scale targets of issue 38, runs of a
question set and the comparison of two runs.

    python -m tests.bench.evaluation [--small 1000] [--large 10000] [--concurrency 16] [--threads 32]
        [--out .bench/evaluation.json]

Starts Postgres, Redis, the offline model (instant: no first-token delay,
no token delay) and one worker process from its Procfile line (`--threads`
threads); drives the API in its own process through `web.create_app()`'s
test client (no gunicorn: the web tier is not what is measured).

1. "A 10,000-question replay's bookkeeping is linear." Two question sets,
   `--small` and `--large` questions, each `question <i> [[tokens=5]]`
   (five tokens: the model costs next to nothing, so the bookkeeping is
   what is left) expecting `{"contains": "You said"}`, and every tenth
   also the answer's fifth word, "This"; stored with `POST /api/sets`.
   Each is run with `POST /api/replays {"set_id", "concurrency"}` and
   followed with `GET /api/replays/{id}` until it finishes; the small set
   before and after the large one, so that a drift in the machine's speed
   shows. Seconds per question: from just before the `POST` to the `GET`
   that sees the replay finished (every 0.5 s, every 20 ms once its last
   turns are under way), over its questions: the items' insert, every
   turn, every advance and the judging of every answer at the end. And
   the ratio large / small (the target: within 20%). Also for each run:
   seconds per question in each tenth of its turns' ends
   (`turns.finished_at`), the tail from its last turn's end to the finish
   seen (mostly the judging, which is also timed here on its own), the
   `POST` requests' times, each service's CPU per question, the load
   average (the machine is shared), and the worker's log lines saying
   that a replay event could not be appended (`replay.progress` and
   `replay.finished` carry fields that shared/events.py does not list:
   each append fails and is logged, so no replay event reaches Redis).

2. "A comparison of two 10,000-question runs renders in under 10 s." The
   large set is run again on a named assistant whose `max_tokens` is 4: its
   answers lose their last word, so every answer's word diff has a change
   and the tenth of questions that expect that word regress. Timed in this
   process, in an app context, each step on its own, twice (the first in a
   process that has not yet imported scipy and plotly, as a web process's
   first comparison is): `web.comparisons.compare`, then `to_json`,
   `to_csv` and `to_html` of its result; the HTML's size; then
   `GET /api/comparisons?...&format=html` and `format=json` once each
   through the test client; then `compare` and `to_html` once more under
   cProfile, for the functions their time goes to. The process's peak RSS
   (VmHWM) before and after.

A 10,000-question set with its expectations is about 0.9 MB of JSON, past
the default MAX_BODY_BYTES (256 KiB): `POST /api/sets` refuses it with 413
unless the operator raises the limit (`flask sets import` has none). The
benchmark raises it, as it lifts the other limits, and records the body's
size.

The end is checked: every question of every run has a turn that
succeeded, each replay counts them all succeeded and none failed, and
`passed` is every question (the candidate's: all but the tenth that expect
the word it cuts); the comparison counts that tenth regressed and the rest
the same. Prints a table, writes JSON, and exits 1 if the end is wrong
(never on a time).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import statistics
import time
import uuid
from pathlib import Path

from sqlalchemy import func, select

from tests import bench, services
from tests.bench.pipeline import tree_cpu
from tests.bench.report import report

ENV = {
    **bench.ENV,
    "REDIS_PREFIX": "evalbench:",
    # A 10,000-question set with expectations is ~0.9 MB of JSON (see above).
    "MAX_BODY_BYTES": str(8 * 1024 * 1024),
}
MODEL_ARGS = ("--first-token-delay", "0", "--token-delay", "0")
EXPECT = {"contains": "You said"}
# Every tenth question also expects the fifth word of its five-token answer
# ('You said: "question <i>". This'), which the candidate's max_tokens cuts.
EXPECT_FIFTH = {"contains": ["You said", "This"]}
STRICT_EVERY = 10
CANDIDATE = {"instructions": "The benchmark's candidate.", "max_tokens": 4}
POLL = 0.5  # seconds between GET /api/replays/{id}
POLL_NEAR_END = 0.02  # the same once the last turns are under way: the end is seen within this
# What the worker logs when an event could not be appended (see the report).
APPEND_FAILED = b"after commit: EventLog.append failed"
PROGRESS = 15  # seconds between progress lines


def questions(n: int) -> list[dict]:
    return [
        {
            "key": f"q{i}",
            "message": f"question {i} [[tokens=5]]",
            "expect": EXPECT_FIFTH if i % STRICT_EVERY == 0 else EXPECT,
        }
        for i in range(n)
    ]


def strict(n: int) -> int:
    """How many of n questions expect the fifth word."""
    return len(range(0, n, STRICT_EVERY))


class Bench:
    """The API through the test client, as one owner; the services' CPU."""

    def __init__(self, info: dict, worker: services.Proc) -> None:
        from web import create_app
        from web.auth import create_key

        self.app = create_app()
        logging.getLogger("web").setLevel(logging.WARNING)  # a line per request, in this process
        self.client = self.app.test_client()
        self.headers = {"Authorization": f"Bearer {create_key('bench-' + uuid.uuid4().hex[:8])}"}
        self.worker = worker
        self.watched = {
            "worker": worker,
            "postgres": info["postgres"],
            "redis": info["redis"],
            "model": next(p for p in info["procs"] if p.name == "model"),
        }

    def post(self, path: str, body: dict, status: int) -> tuple[dict, float]:
        began = time.perf_counter()
        r = self.client.post(path, json=body, headers=self.headers)
        seconds = time.perf_counter() - began
        if r.status_code != status:
            raise SystemExit(f"POST {path} answered {r.status_code}: {r.get_json()}")
        return r.get_json(), seconds

    def get(self, path: str):
        began = time.perf_counter()
        r = self.client.get(path, headers=self.headers)
        seconds = time.perf_counter() - began
        if r.status_code != 200:
            raise SystemExit(f"GET {path} answered {r.status_code}: {r.get_json()}")
        return r, seconds

    def make_set(self, name: str, n: int) -> dict:
        body = {"name": name, "questions": questions(n)}
        made, seconds = self.post("/api/sets", body, 201)
        assert made["size"] == n, made
        return {"id": made["id"], "questions": n, "post_s": round(seconds, 2), "body_bytes": len(json.dumps(body))}

    def cpu(self) -> dict[str, float]:
        usage = {name: tree_cpu(proc.popen.pid) for name, proc in self.watched.items()}
        usage["bench process (API, polling)"] = time.process_time()
        return usage

    def run(self, qset: dict, concurrency: int, timeout: float, assistant_id: str | None = None) -> dict:
        """Run the set as a replay and wait for its end; its figures."""
        n = qset["questions"]
        label = f"{n} questions" + (" on the candidate" if assistant_id else "")
        print(f"run: {label}, concurrency {concurrency} …", flush=True)
        log_from = self.worker.log_path.stat().st_size
        before, load_before = self.cpu(), os.getloadavg()[0]
        began = time.perf_counter()
        body = {"set_id": qset["id"], "concurrency": concurrency}
        if assistant_id:
            body["assistant_id"] = assistant_id
        made, post_s = self.post("/api/replays", body, 202)
        replay_id, shown = made["id"], began
        while True:
            state, _s = self.get(f"/api/replays/{replay_id}")
            state = state.get_json()
            if state["status"] == "finished":
                break
            now = time.perf_counter()
            if now - began > timeout:
                raise SystemExit(f"the replay of {label} did not finish in {timeout} s: {state}")
            done = state["succeeded"] + state["failed"]
            if now - shown >= PROGRESS:
                print(f"  {done}/{n} after {now - began:.0f} s ({done / (now - began):.1f}/s)", flush=True)
                shown = now
            time.sleep(POLL_NEAR_END if done >= n - 2 * concurrency else POLL)
        seen, seen_at = time.perf_counter() - began, time.time()
        spent = {name: used - before[name] for name, used in self.cpu().items()}
        load_after = os.getloadavg()[0]
        log = self.worker.log_path.read_bytes()[log_from:]
        return {
            "replay_id": replay_id,
            "seconds": round(seen, 2),
            "s_per_question": round(seen / n, 5),
            "questions_per_s": round(n / seen, 1),
            "post_s": round(post_s, 2),
            **timeline(replay_id, n, seen_at),
            "cpu_ms_per_question_by_service": {name: round(s / n * 1000, 2) for name, s in spent.items()},
            # The machine is shared: what else ran shows here (2 cores).
            "load_average_1min_before_and_after": [round(load_before, 2), round(load_after, 2)],
            "replay_event_appends_failed": log.count(APPEND_FAILED),
            "state": state,
        }


def timeline(replay_id: str, n: int, seen_at: float) -> dict:
    """From Postgres: seconds per question in each tenth of the replay's
    turns' ends (from its `created_at`, the start of the transaction that
    inserts its items); the tail from its last turn's end to the poll that
    saw it finished (Unix time, this machine's clock as Postgres's); its
    `created_at` to `finished_at` (the finishing advance's start: before it
    judges every answer); its questions' turns by status. And the judging
    of every answer, as the finishing advance does it (item_rows and
    result_line), timed in this process."""
    from shared.db import transaction
    from shared.models import Replay, ReplayItem, Turn
    from shared.replays import item_rows, result_line

    epoch = func.extract("epoch", Turn.finished_at)
    with transaction() as db:
        replay = db.get(Replay, replay_id)
        created, finished_at = replay.created_at.timestamp(), replay.finished_at.timestamp()
        ends = sorted(
            float(t)
            for t in db.scalars(
                select(epoch).join(ReplayItem, ReplayItem.turn_id == Turn.id).where(ReplayItem.replay_id == replay_id)
            )
        )
        statuses = dict(
            db.execute(
                select(func.coalesce(Turn.status, "no turn"), func.count())
                .select_from(ReplayItem)
                .outerjoin(Turn, Turn.id == ReplayItem.turn_id)
                .where(ReplayItem.replay_id == replay_id)
                .group_by(Turn.status)
            ).all()
        )
    with transaction() as db:
        began = time.perf_counter()
        judged = sum(1 for item, turn in item_rows(db, [replay_id]) if result_line(item, turn)["passed"])
        judging = time.perf_counter() - began
    marks = [created] + [ends[len(ends) * k // 10 - 1] for k in range(1, 11)]
    return {
        "s_per_question_by_tenth_of_turn_ends": [
            round((b - a) / (n / 10), 5) for a, b in zip(marks, marks[1:], strict=False)
        ],
        "first_turn_end_s": round(ends[0] - created, 2),
        "tail_last_turn_end_to_seen_finished_s": round(seen_at - ends[-1], 3),
        "created_at_to_finished_at_s": round(finished_at - created, 2),
        "judging_every_answer_here_s": round(judging, 3),
        "passed_judged_here": judged,
        "turns_by_status": statuses,
    }


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def comparison(b: Bench, baseline_id: str, candidate_id: str) -> dict:
    """compare() and each rendering of its result, timed on their own, twice;
    the API's html and json once; a profile of compare + to_html."""
    from shared.db import transaction
    from shared.models import Replay
    from web.comparisons import compare
    from web.reports import to_csv, to_html, to_json

    print("comparison: compare and render, twice …", flush=True)
    rss_before = peak_rss_mb()
    passes, data, html = [], None, ""
    with b.app.app_context():
        for _ in range(2):
            times = {}
            with transaction() as db:
                sides = [[db.get(Replay, baseline_id)], [db.get(Replay, candidate_id)]]
                began = time.perf_counter()
                data = compare(db, *sides)
                times["compare_s"] = time.perf_counter() - began
            for name, render in (("to_json", to_json), ("to_csv", to_csv), ("to_html", lambda c: to_html(c)[0])):
                began = time.perf_counter()
                out = render(data)
                times[f"{name}_s"] = time.perf_counter() - began
                if name == "to_html":
                    html = out
                else:
                    times[f"{name}_bytes"] = len(out.encode())
            passes.append({k: round(v, 3) if k.endswith("_s") else v for k, v in times.items()})
        rss_after = peak_rss_mb()

        print("comparison: through the API …", flush=True)
        query = f"/api/comparisons?baseline={baseline_id}&candidate={candidate_id}"
        api_html, api_html_s = b.get(query + "&format=html")
        api_json, api_json_s = b.get(query)

        print("comparison: profiled …", flush=True)
        profile = cProfile.Profile()
        with transaction() as db:
            sides = [[db.get(Replay, baseline_id)], [db.get(Replay, candidate_id)]]
            profile.enable()
            to_html(compare(db, *sides))
            profile.disable()
    stats = pstats.Stats(profile)
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]  # by own time
    return {
        "questions": len(data["questions"]),
        "changes": data["changes"],
        "passes": passes,
        "compare_and_html_s": [round(p["compare_s"] + p["to_html_s"], 3) for p in passes],
        "compare_and_all_three_s": [
            round(p["compare_s"] + p["to_json_s"] + p["to_csv_s"] + p["to_html_s"], 3) for p in passes
        ],
        "html_bytes": len(html.encode()),
        "html_bytes_without_plotly_js": len(html.encode()) - _plotly_js_bytes(),
        "api_html_s": round(api_html_s, 3),
        "api_html_bytes": len(api_html.data),
        "api_json_s": round(api_json_s, 3),
        "api_json_bytes": len(api_json.data),
        "peak_rss_mb_before_and_after": [rss_before, rss_after],
        "profile_total_s": round(stats.total_tt, 3),
        "profile_top_by_own_time": [
            {
                "function": f"{Path(file).name}:{line}({name})",
                "calls": calls,
                "own_s": round(own, 3),
                "cumulative_s": round(cum, 3),
            }
            for (file, line, name), (_cc, calls, own, cum, _callers) in top
        ],
    }


def _plotly_js_bytes() -> int:
    from plotly.offline import get_plotlyjs

    return len(get_plotlyjs().encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000, help="questions of the small set")
    parser.add_argument("--large", type=int, default=10_000, help="questions of the large set (at most 10,000)")
    parser.add_argument("--concurrency", type=int, default=16, help="each replay's")
    parser.add_argument("--threads", type=int, default=32, help="the worker's threads")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one replay may take")
    parser.add_argument("--out", default=".bench/evaluation.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with services.stack("turnstream-bench-evaluation-", ENV, MODEL_ARGS, mcp=False) as info:
        worker = services.start_worker(info["logdir"], info["env"], "evaluation", concurrency=args.threads)
        info["procs"].append(worker)
        services.wait_for_worker(worker)
        b = Bench(info, worker)
        candidate, _s = b.post("/api/assistants", {"name": "candidate", **CANDIDATE}, 201)

        print(f"sets: {args.small} and {args.large} questions …", flush=True)
        small, large = b.make_set("small", args.small), b.make_set("large", args.large)
        warm = b.make_set("warm-up", 50)
        b.run(warm, args.concurrency, args.timeout)  # connections, the worker's first tasks
        runs = {
            "small_before": b.run(small, args.concurrency, args.timeout),
            "large": b.run(large, args.concurrency, args.timeout),
            "small_after": b.run(small, args.concurrency, args.timeout),
            "large_candidate": b.run(large, args.concurrency, args.timeout, candidate["id"]),
        }
        compared = comparison(b, runs["large"]["replay_id"], runs["large_candidate"]["replay_id"])
        worker.stop()

    small_per = statistics.mean(runs[k]["s_per_question"] for k in ("small_before", "small_after"))
    ratio = runs["large"]["s_per_question"] / small_per
    n, m = args.large, args.small
    expected = {
        "small_before": (m, m),
        "large": (n, n),
        "small_after": (m, m),
        "large_candidate": (n, n - strict(n)),
    }
    wrong = []
    for name, (total, passing) in expected.items():
        state = runs[name]["state"]
        got = (state["total"], state["succeeded"], state["failed"], state["passed"], runs[name]["turns_by_status"])
        if got != (total, total, 0, passing, {"succeeded": total}):
            wrong.append(
                f"{name}: total, succeeded, failed, passed, turns {got}; expected {total} succeeded, {passing} passed"
            )
    want_changes = {"regressed": strict(n), "same": n - strict(n)}
    if {k: v for k, v in compared["changes"].items() if v} != want_changes:
        wrong.append(f"comparison: {compared['changes']}; expected {want_changes}")

    results = {
        "model": "offline, no first-token delay, no token delay, 5 tokens an answer",
        "worker": f"1 process, {args.threads} threads",
        "concurrency": args.concurrency,
        "sets": {"small": small, "large": large},
        "runs": runs,
        "linear": {
            "small_s_per_question": round(small_per, 5),
            "large_s_per_question": runs["large"]["s_per_question"],
            "large_over_small": round(ratio, 3),
            "target": "within 20% (0.8 to 1.2)",
            "large_candidate_over_small": round(runs["large_candidate"]["s_per_question"] / small_per, 3),
        },
        "comparison": compared,
        "end_checked": not wrong,
        "wrong": wrong,
    }
    rows = [
        ("worker; replay concurrency", f"{results['worker']}; {args.concurrency}"),
        (
            f"POST /api/sets: {m} / {n} questions, s (body bytes)",
            f"{small['post_s']} ({small['body_bytes']}) / {large['post_s']} ({large['body_bytes']})",
        ),
    ]
    for name, run in runs.items():
        rows += [
            (
                f"{name} ({run['state']['total']}): s, s/question, questions/s",
                f"{run['seconds']}, {run['s_per_question']}, {run['questions_per_s']}",
            ),
            (
                "  POST /api/replays s; first turn's end; tail (last turn's end to seen finished), s",
                f"{run['post_s']}; {run['first_turn_end_s']}; {run['tail_last_turn_end_to_seen_finished_s']}",
            ),
            (
                "  created_at to finished_at (Postgres), s; judging every answer here, s",
                f"{run['created_at_to_finished_at_s']}; {run['judging_every_answer_here_s']}",
            ),
            ("  load average (1 min) before / after", " / ".join(map(str, run["load_average_1min_before_and_after"]))),
            ("  s/question by tenth of turn ends", " ".join(map(str, run["s_per_question_by_tenth_of_turn_ends"]))),
            (
                "  CPU ms/question: " + ", ".join(run["cpu_ms_per_question_by_service"]),
                " / ".join(str(v) for v in run["cpu_ms_per_question_by_service"].values()),
            ),
        ]
    c = compared
    rows += [
        (
            f"s/question, {m} (mean of before and after) / {n}",
            f"{results['linear']['small_s_per_question']} / {runs['large']['s_per_question']}",
        ),
        (f"{n} over {m}, per question (target 0.8 to 1.2)", results["linear"]["large_over_small"]),
        ("comparison: questions; changes", f"{c['questions']}; { ({k: v for k, v in c['changes'].items() if v}) }"),
    ]
    for i, p in enumerate(c["passes"]):
        rows.append(
            (
                f"  {'first (cold)' if i == 0 else 'second'}: compare / to_json / to_csv / to_html, s",
                f"{p['compare_s']} / {p['to_json_s']} / {p['to_csv_s']} / {p['to_html_s']}",
            )
        )
    rows += [
        ("  compare + to_html, s (target < 10)", " / ".join(map(str, c["compare_and_html_s"]))),
        ("  compare + all three, s", " / ".join(map(str, c["compare_and_all_three_s"]))),
        ("  HTML bytes (without plotly.js)", f"{c['html_bytes']} ({c['html_bytes_without_plotly_js']})"),
        ("  JSON / CSV bytes", f"{c['passes'][0]['to_json_bytes']} / {c['passes'][0]['to_csv_bytes']}"),
        ("  GET /api/comparisons html / json, s", f"{c['api_html_s']} / {c['api_json_s']}"),
        ("  peak RSS of this process before / after, MB", " / ".join(map(str, c["peak_rss_mb_before_and_after"]))),
        ("  profiled compare + to_html, s; top by own time", c["profile_total_s"]),
    ]
    rows += [
        (f"    {f['function']}", f"{f['own_s']} s own, {f['cumulative_s']} cum, {f['calls']} calls")
        for f in c["profile_top_by_own_time"][:8]
    ]
    rows.append(("end checked", "yes" if not wrong else "; ".join(wrong)))
    report(rows, results, args.out)
    if wrong:
        raise SystemExit("the runs did not end as they should: " + "; ".join(wrong))


if __name__ == "__main__":
    main()
