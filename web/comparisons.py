"""Comparing runs of a question set: a baseline and a candidate, each one
or more replays (a replay may ask each question several times), matched
question by question through their keys.

Per question: both answers with a word diff, each side's checks, latency,
tokens and tool calls, and the change: `improved` or `regressed` when the
share of samples that passed moved (with two or more samples a side, only
when the 95% confidence interval of that move leaves out zero; else
`noise`), `same`, or `added` / `removed` when one side lacks the question.
Totals: each side's pass rate, p50 and p95 latency and tokens; with two or
more samples of the whole set a side (repeats, or several replays), each
metric's spread over those samples and the 95% confidence interval of its
difference (Welch's t), so a difference inside the noise is called that.
"""

from __future__ import annotations

import difflib
import math
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from shared.models import Replay
from shared.replays import item_rows, result_line

IMPROVED, REGRESSED, SAME, NOISE, ADDED, REMOVED = "improved", "regressed", "same", "noise", "added", "removed"
CHANGES = (REGRESSED, IMPROVED, NOISE, SAME, ADDED, REMOVED)
SIDES = ("baseline", "candidate")
_WORDS = re.compile(r"\s+|[^\s]+")


MAX_RUNS = 20  # replays on one side


def refusal(baseline: list[Replay], candidate: list[Replay]) -> tuple[int, str, dict] | None:
    """Why these sides cannot be compared, as an API error's status,
    message and details; or None."""
    for side, runs in zip(SIDES, (baseline, candidate), strict=True):
        if not runs:
            return 422, f"name at least one {side} replay", {"field": side}
        if len(runs) > MAX_RUNS:
            return 422, f"at most {MAX_RUNS} replays a side", {"field": side}
        unfinished = [r.id for r in runs if r.finished_at is None]
        if unfinished:
            return 409, f"{side} replay {unfinished[0]} has not finished", {"field": side}
    if len({r.set_id for r in baseline + candidate}) > 1:
        return 422, "the replays are runs of different question sets", {"field": "candidate"}
    return None


def compare(db: Session, baseline: list[Replay], candidate: list[Replay]) -> dict[str, Any]:
    """The comparison of two sides' runs (finished replays), as JSON."""
    samples = {side: _samples(db, runs) for side, runs in zip(SIDES, (baseline, candidate), strict=True)}
    keys = list(samples["baseline"]) + [k for k in samples["candidate"] if k not in samples["baseline"]]
    questions = []
    for n, key in enumerate(keys):
        questions.append(_question(key, samples["baseline"].get(key, []), samples["candidate"].get(key, [])))
        _let_others_run(n)
    counts = {change: 0 for change in CHANGES}
    for q in questions:
        counts[q["change"]] += 1
    totals = {side: _totals(samples[side]) for side in SIDES}
    return {
        "baseline": _side(baseline, totals["baseline"]),
        "candidate": _side(candidate, totals["candidate"]),
        "difference": _difference(totals["baseline"], totals["candidate"]),
        "changes": counts,
        "questions": questions,
    }


def _samples(db: Session, runs: list[Replay]) -> dict[str, list[dict[str, Any]]]:
    """Each question's results over the runs, by key, in the first run's
    order; each tagged with its run (replay and repeat)."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for n, (item, turn) in enumerate(item_rows(db, [r.id for r in runs])):
        _let_others_run(n)
        line = result_line(item, turn)
        line["run"] = (item.replay_id, item.repeat)
        by_key[line["key"]].append(line)
    return by_key


def _question(key: str, base: list[dict], cand: list[dict]) -> dict[str, Any]:
    first = (base or cand)[0]
    out: dict[str, Any] = {"key": key, "message": first["message"]}
    out["baseline"], out["candidate"] = _outcome(base), _outcome(cand)
    if not base or not cand:
        out.update(change=REMOVED if base else ADDED, diff=None, pass_change=None, pass_change_ci=None)
        return out
    moved = out["candidate"]["pass_rate"] - out["baseline"]["pass_rate"]
    # `passed` is None only for an item whose turn is gone (its session deleted): not passed
    ci = welch([float(bool(s["passed"])) for s in base], [float(bool(s["passed"])) for s in cand])
    if moved == 0:
        change = SAME
    elif ci is not None and ci[0] <= 0 <= ci[1]:
        change = NOISE
    else:
        change = IMPROVED if moved > 0 else REGRESSED
    out.update(
        change=change,
        diff=word_diff(base[0]["answer"] or "", cand[0]["answer"] or ""),
        pass_change=round(moved, 4),
        pass_change_ci=ci,
    )
    return out


def _outcome(samples: list[dict]) -> dict[str, Any] | None:
    """One side of a question: its first sample's answer, checks and tools,
    and over every sample the share that passed, the median latency and
    the mean tokens."""
    if not samples:
        return None
    first = samples[0]
    latencies = [s["latency_ms"] for s in samples if s["latency_ms"] is not None]
    tokens = [s["tokens"] for s in samples if s["tokens"] is not None]
    return {
        "answer": first["answer"],
        "status": first["status"],
        "checks": first["checks"],
        "tools": first["tools"],
        "samples": len(samples),
        "pass_rate": sum(1 for s in samples if s["passed"]) / len(samples),
        "latency_ms": statistics.median(latencies) if latencies else None,
        "tokens": statistics.fmean(tokens) if tokens else None,
    }


def _totals(samples: dict[str, list[dict]]) -> dict[str, Any]:
    """A side's metrics over every sample, and over each run of the set."""
    every = [s for group in samples.values() for s in group]
    by_run: dict[tuple, list[dict]] = defaultdict(list)
    for s in every:
        by_run[s["run"]].append(s)
    return {"all": _metrics(every), "runs": [_metrics(group) for group in by_run.values()]}


METRICS = ("pass_rate", "p50_latency_ms", "p95_latency_ms", "mean_tokens")


def _metrics(samples: list[dict]) -> dict[str, float | None]:
    latencies = sorted(s["latency_ms"] for s in samples if s["latency_ms"] is not None)
    tokens = [s["tokens"] for s in samples if s["tokens"] is not None]
    return {
        "questions": len(samples),
        "pass_rate": sum(1 for s in samples if s["passed"]) / len(samples) if samples else None,
        "p50_latency_ms": _percentile(latencies, 0.50),
        "p95_latency_ms": _percentile(latencies, 0.95),
        "mean_tokens": statistics.fmean(tokens) if tokens else None,
        "total_tokens": sum(tokens),
    }


def _side(runs: list[Replay], totals: dict[str, Any]) -> dict[str, Any]:
    spread = {}
    for metric in METRICS:
        values = [r[metric] for r in totals["runs"] if r[metric] is not None]
        spread[metric] = (
            {"sd": statistics.stdev(values), "min": min(values), "max": max(values)} if len(values) > 1 else None
        )
    return {
        "replays": [r.id for r in runs],
        "assistant": {"id": runs[0].assistant_id, "version": runs[0].assistant_version},
        "set_id": runs[0].set_id,
        "runs_of_set": len(totals["runs"]),
        **totals["all"],
        "spread": spread,
    }


def _difference(base: dict[str, Any], cand: dict[str, Any]) -> dict[str, Any]:
    """Candidate minus baseline for each metric; with two or more runs a
    side, its 95% confidence interval and whether it is inside the noise."""
    out = {}
    for metric in METRICS:
        b, c = base["all"][metric], cand["all"][metric]
        runs = [[r[metric] for r in side["runs"] if r[metric] is not None] for side in (base, cand)]
        ci = welch(*runs) if all(len(values) > 1 for values in runs) else None
        out[metric] = {
            "change": None if b is None or c is None else c - b,
            "ci95": ci,
            "within_noise": None if ci is None else ci[0] <= 0 <= ci[1],
        }
    return out


def _let_others_run(n: int) -> None:
    """Every 500 questions, yield: in the web tier (gevent) a comparison of
    10,000 takes seconds of CPU, and the process's other requests and
    streams go on meanwhile; elsewhere this does nothing."""
    if n % 500 == 499:
        time.sleep(0)  # gevent.sleep under gevent's monkey-patching


def welch(a: Iterable[float], b: Iterable[float]) -> list[float] | None:
    """The 95% confidence interval of mean(b) - mean(a) (Welch's t), or None
    with fewer than two values on a side. With no spread on either side the
    difference is taken as exact."""
    a, b = list(a), list(b)
    if len(a) < 2 or len(b) < 2:
        return None
    # Only comparisons of repeated runs need it (about 2 s to import): the web
    # tier's other requests, and comparisons of one sample a side, do not load it.
    from scipy.stats import t

    diff = statistics.fmean(b) - statistics.fmean(a)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return [round(diff, 6), round(diff, 6)]
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(t.ppf(0.975, df)) * math.sqrt(va + vb)
    return [round(diff - half, 6), round(diff + half, 6)]


def word_diff(before: str, after: str) -> list[list[str]]:
    """[op, text] pieces: "=" in both, "-" only before, "+" only after."""
    a, b = _WORDS.findall(before), _WORDS.findall(after)
    pieces: list[list[str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            pieces.append(["=", "".join(a[i1:i2])])
            continue
        if i2 > i1:
            pieces.append(["-", "".join(a[i1:i2])])
        if j2 > j1:
            pieces.append(["+", "".join(b[j1:j2])])
    return pieces


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
