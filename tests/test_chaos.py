"""Chaos: real processes, killed on purpose, every count printed.

The worker is SIGKILLed three times while 100 slow turns run, and restarted.
Its own web (gunicorn -k gevent), beat and workers use the key prefix
"chaos:", apart from the session's worker; Postgres, Redis and the model are
the session's. Each turn has a client following its SSE stream, reconnecting
with Last-Event-ID whenever the stream breaks.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from shared.db import db_session
from shared.models import Message, Turn
from tests import services
from tests.sse import TERMINAL, iter_sse

TURNS = 100
SLOW = "chaos [[tokens=30]] [[delay=0.05]]"  # 1.5 s a turn
CHAOS_ENV = {
    "REDIS_PREFIX": "chaos:",
    "HEARTBEAT_SECONDS": "0.5",
    "STALE_RUNNING_SECONDS": "2",
    "SWEEP_SECONDS": "1",
    "TURN_MAX_ATTEMPTS": "6",  # three kills can hit one turn three times
}


@pytest.fixture
def chaos(stack):
    env = {**stack["env"], **CHAOS_ENV}
    logdir = stack["logdir"]
    web, port = services.start_gunicorn(logdir, env)
    beat = services.start_beat(logdir, env, "chaos-beat")
    procs = [web, beat]
    base = f"http://127.0.0.1:{port}"
    services.wait_until(lambda: httpx.get(f"{base}/api/health", timeout=2).status_code == 200, 30, "chaos web")
    yield {"env": env, "logdir": logdir, "base": base, "procs": procs}
    for proc in reversed(procs):
        proc.stop()


def _follow(base: str, headers: dict, turn_id: str, deadline: float, out: dict) -> None:
    """Follow a turn's events to its end, reconnecting with Last-Event-ID."""
    events: list = []
    last = None
    out[turn_id] = {"events": events, "ended": False, "reconnects": 0}
    while time.monotonic() < deadline:
        h = {**headers, **({"Last-Event-ID": last} if last else {})}
        try:
            with httpx.stream("GET", f"{base}/api/turns/{turn_id}/events", headers=h, timeout=20) as r:
                if r.status_code == 204:
                    out[turn_id]["ended"] = True
                    return
                for item in iter_sse(r):
                    if isinstance(item, tuple):
                        continue
                    events.append((time.monotonic(), item))
                    last = item.id
                    if item.event in TERMINAL:
                        out[turn_id]["ended"] = True
                        return
        except httpx.HTTPError:
            time.sleep(0.2)
        out[turn_id]["reconnects"] += 1


def _beating(ids: list[str]) -> int:
    """Turns with a live heartbeat: what the current worker runs."""
    from shared.redis import get_redis

    pipe = get_redis().pipeline(transaction=False)
    for turn_id in ids:
        pipe.exists(f"{CHAOS_ENV['REDIS_PREFIX']}turn:{turn_id}:alive")
    return sum(pipe.execute())


def test_worker_sigkilled_three_times_loses_and_duplicates_nothing(chaos, stack):
    from web.auth import create_key

    headers = {"Authorization": f"Bearer {create_key(f'chaos-{uuid.uuid4().hex[:8]}')}"}
    base, env, logdir = chaos["base"], chaos["env"], chaos["logdir"]
    with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
        ids = []
        for _ in range(TURNS):
            sid = http.post("/api/sessions", json={}).json()["id"]
            ids.append(http.post(f"/api/sessions/{sid}/turns", json={"message": SLOW}).json()["id"])
    deadline = time.monotonic() + 120
    streams: dict = {}
    followers = [threading.Thread(target=_follow, args=(base, headers, t, deadline, streams)) for t in ids]
    for f in followers:
        f.start()

    kills = []
    worker = services.start_worker(logdir, env, "chaos-worker", concurrency=16)
    chaos["procs"].append(worker)
    for n in range(3):
        services.wait_until(lambda: _beating(ids) >= 8, 60, "the worker to run turns")
        time.sleep(0.7)
        worker.popen.kill()  # SIGKILL: no shutdown, its turns stay "running"
        worker.popen.wait()
        kills.append(time.monotonic())
        time.sleep(0.5)
        worker = services.start_worker(logdir, env, f"chaos-worker-{n + 1}", concurrency=16)
        chaos["procs"].append(worker)
    for f in followers:
        f.join(max(0, deadline - time.monotonic()))

    with db_session() as db:
        statuses = dict(
            db.execute(select(Turn.status, func.count()).where(Turn.id.in_(ids)).group_by(Turn.status)).all()
        )
        answers = dict(
            db.execute(
                select(Message.turn_id, func.count())
                .where(Message.turn_id.in_(ids), Message.role == "assistant")
                .group_by(Message.turn_id)
            ).all()
        )
        stored = dict(db.execute(select(Turn.id, Turn.answer).where(Turn.id.in_(ids))).all())
        attempts = dict(db.execute(select(Turn.id, Turn.attempts).where(Turn.id.in_(ids))).all())
    ended = [t for t in ids if streams[t]["ended"] and streams[t]["events"][-1][1].event == "turn.completed"]
    mismatched = []
    restart_delays = []
    for t in ids:
        events = [e for _at, e in streams[t]["events"]]
        cuts = [i for i, e in enumerate(events) if e.event == "turn.restarted"]
        after = events[cuts[-1] :] if cuts else events
        if "".join(e.data.get("delta", "") for e in after if e.event == "message.delta") != stored[t]:
            mismatched.append(t)
        for at, e in streams[t]["events"]:
            if e.event == "turn.restarted" and e.data["reason"] == "redelivered":
                kill = max((k for k in kills if k < at), default=None)
                if kill is not None:
                    restart_delays.append(at - kill)
    counts = {
        "submitted": TURNS,
        "succeeded": statuses.get("succeeded", 0),
        "failed": statuses.get("failed", 0),
        "duplicated": sum(1 for n in answers.values() if n > 1),
        "lost": TURNS - sum(statuses.get(s, 0) for s in ("succeeded", "failed", "cancelled")),
        "stuck_streams": TURNS - sum(1 for t in ids if streams[t]["ended"]),
        "streams_not_matching_answer": len(mismatched),
        "turns_restarted": sum(1 for a in attempts.values() if a > 1),
        "most_attempts": max(attempts.values()),
        "reconnects": sum(s["reconnects"] for s in streams.values()),
        "restart_after_kill_s_max": round(max(restart_delays, default=0), 1),
    }
    print("\nchaos (worker SIGKILLed x3):", counts)
    assert counts["succeeded"] == TURNS, counts
    assert all(answers.get(t) == 1 for t in ids), counts
    assert len(ended) == TURNS and not mismatched, counts
    assert counts["turns_restarted"] > 0  # the kills did hit running turns
