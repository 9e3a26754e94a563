"""Several hosts, no sticky sessions: two web hosts and two worker hosts,
each its own process group with its own port and its own temporary folder
(as a separate machine has), started from the Procfile's lines, sharing
only Postgres, Redis and the model; a plain round-robin in front of the web
hosts (tests/proxy.py) that skips a host that refuses, as a load balancer's
health check would."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from shared.db import transaction
from shared.events import ENDING_TYPES
from shared.models import ENDED, Message, Turn
from tests import services
from tests.conftest import TEST_ENV
from tests.proxy import Proxy
from tests.sse import iter_sse

ENV = {
    **TEST_ENV,
    "REDIS_PREFIX": "hosts:",
    "HEARTBEAT_SECONDS": "0.5",
    "STALE_RUNNING_SECONDS": "2",
    "SWEEP_SECONDS": "1",
    "STALE_QUEUED_SECONDS": "3",
}
SLOW = "hosts [[tokens=40]] [[delay=0.05]]"  # 2 s a turn
pytestmark = pytest.mark.broker  # run against RabbitMQ too (deploy/test.sh)


class Hosts:
    def __init__(self, stack: dict) -> None:
        self.stack = stack
        self.web: dict[str, tuple[services.Proc, int]] = {}
        self.workers: dict[str, services.Proc] = {}
        for name in ("web-a", "web-b"):
            self.web[name] = services.start_gunicorn(stack["logdir"], self.env(name), name=name)
        for name in ("worker-1", "worker-2"):
            self.workers[name] = services.start_worker(stack["logdir"], self.env(name), name, concurrency=8)
        for worker in self.workers.values():
            services.wait_for_worker(worker)
        self.beat = services.start_beat(stack["logdir"], self.env("beat"), "hosts-beat")
        for host in self.web:
            services.wait_until(lambda h=host: httpx.get(f"{self.web_base(h)}/api/health").status_code == 200, 30, host)
        self.proxy = Proxy([port for _proc, port in self.web.values()])
        self.base = f"http://127.0.0.1:{self.proxy.port}"
        from web.auth import create_key

        self.headers = {"Authorization": f"Bearer {create_key(f'hosts-{uuid.uuid4().hex[:8]}')}"}

    def env(self, host: str) -> dict[str, str]:
        """A host's environment: its own temporary folder, as on its own machine."""
        tmp = Path(self.stack["workdir"]) / host / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {**self.stack["env"], "TMPDIR": str(tmp)}

    def web_base(self, host: str) -> str:
        return f"http://127.0.0.1:{self.web[host][1]}"

    def submit(self, n: int, message: str) -> list[str]:
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=10) as http:
            ids = []
            for _ in range(n):
                sid = http.post("/api/sessions", json={}).json()["id"]
                ids.append(http.post(f"/api/sessions/{sid}/turns", json={"message": message}).json()["id"])
            return ids

    def close(self) -> None:
        self.proxy.close()
        for proc in [self.beat, *self.workers.values(), *(p for p, _ in self.web.values())]:
            proc.stop()


@pytest.fixture(scope="module")
def hosts():
    with services.stack("turnstream-hosts-", ENV, ("--first-token-delay", "0"), mcp=False) as stack:
        h = Hosts(stack)
        yield h
        h.close()


def _follow(base: str, headers: dict, turn_id: str, out: dict, deadline: float) -> None:
    """Follow a turn's stream to its end through `base`, reconnecting with
    Last-Event-ID whenever it breaks; every event kept in order."""
    events: list = []
    out[turn_id] = {"events": events, "reconnects": 0}
    last = None
    while time.monotonic() < deadline:
        try:
            h = {**headers, **({"Last-Event-ID": last} if last else {})}
            with httpx.stream("GET", f"{base}/api/turns/{turn_id}/events", headers=h, timeout=20) as r:
                if r.status_code == 204:
                    return
                for item in iter_sse(r) if r.status_code == 200 else ():
                    if isinstance(item, tuple):
                        continue
                    events.append(item)
                    last = item.id or last
                    if item.event in ENDING_TYPES:
                        return
        except httpx.HTTPError:
            pass
        out[turn_id]["reconnects"] += 1
        time.sleep(0.2)


def _check_streams(ids: list[str], streams: dict) -> dict:
    """Each stream's ids strictly increase (no duplicate) and its deltas
    make the answer Postgres holds (no gap); one answer per turn."""
    with transaction() as db:
        turns = {t.id: t for t in db.scalars(select(Turn).where(Turn.id.in_(ids)))}
        answers = dict(
            db.execute(
                select(Message.turn_id, func.count())
                .where(Message.turn_id.in_(ids), Message.role == "assistant")
                .group_by(Message.turn_id)
            ).all()
        )
    bad = []
    for t in ids:
        events = streams[t]["events"]
        seqs = [e.seq for e in events]
        text = _text(events)
        if seqs != sorted(set(seqs)) or turns[t].status != "succeeded" or text != turns[t].answer:
            bad.append(t)
    return {
        "turns": len(ids),
        "succeeded": sum(1 for t in turns.values() if t.status == "succeeded"),
        "ended": sum(1 for t in turns.values() if t.status in ENDED),
        "duplicated_answers": sum(1 for n in answers.values() if n > 1),
        "streams_with_a_gap_or_duplicate": len(bad),
        "reconnects": sum(s["reconnects"] for s in streams.values()),
    }


def test_a_stream_started_on_one_web_host_resumes_on_the_other_with_no_gap(hosts):
    (turn_id,) = hosts.submit(1, SLOW)
    first: list = []
    with httpx.stream("GET", f"{hosts.web_base('web-a')}/api/turns/{turn_id}/events", headers=hosts.headers) as r:
        for item in iter_sse(r):
            if not isinstance(item, tuple):
                first.append(item)
                if sum(e.event == "message.delta" for e in first) == 5:
                    break
    streams: dict = {}
    h = {**hosts.headers, "Last-Event-ID": first[-1].id}
    out: list = []
    with httpx.stream("GET", f"{hosts.web_base('web-b')}/api/turns/{turn_id}/events", headers=h, timeout=20) as r:
        for item in iter_sse(r):
            if not isinstance(item, tuple):
                out.append(item)
                if item.event in ENDING_TYPES:
                    break
    streams[turn_id] = {"events": first + out, "reconnects": 1}
    counts = _check_streams([turn_id], streams)
    print("\nhosts (a stream moved from web-a to web-b):", counts)
    assert counts["streams_with_a_gap_or_duplicate"] == 0 and counts["succeeded"] == 1, counts
    assert out and out[0].seq == first[-1].seq + 1


def test_a_web_host_killed_mid_stream_loses_no_client_that_reconnects(hosts):
    ids = hosts.submit(20, SLOW)
    streams: dict = {}
    deadline = time.monotonic() + 90
    followers = [threading.Thread(target=_follow, args=(hosts.base, hosts.headers, t, streams, deadline)) for t in ids]
    for f in followers:
        f.start()
    time.sleep(1)
    killed, _port = hosts.web.pop("web-a")
    killed.stop(9)  # the whole host at once: no shutdown, its streams cut
    for f in followers:
        f.join(max(0, deadline - time.monotonic()))
    counts = _check_streams(ids, streams)
    print("\nhosts (web-a SIGKILLed mid-stream):", counts)
    assert counts["streams_with_a_gap_or_duplicate"] == 0 and counts["succeeded"] == 20, counts
    assert counts["reconnects"] > 0, counts  # the kill did cut streams


def test_turns_spread_over_both_worker_hosts_and_a_killed_one_is_recovered(hosts):
    ids = hosts.submit(40, SLOW)
    services.wait_until(lambda: len(_ran_by(hosts, ids)) == 2, 30, "both worker hosts to run turns")
    spread = {name: len(turns) for name, turns in _ran_by(hosts, ids).items()}
    hosts.workers["worker-1"].stop(9)  # mid-turn: its turns stay "running"
    services.wait_until(lambda: _ended(ids) == len(ids), 90, "every turn to end")
    counts = _check_streams(ids, {t: {"events": _events(hosts, t), "reconnects": 0} for t in ids})
    with transaction() as db:
        restarted = db.scalar(select(func.count()).where(Turn.id.in_(ids), Turn.attempts > 1))
    counts |= {"started_on": spread, "restarted_after_the_kill": restarted}
    print("\nhosts (worker-1 SIGKILLed mid-turn):", counts)
    assert min(spread.values()) > 0, counts
    assert counts["succeeded"] == 40 and counts["duplicated_answers"] == 0, counts
    assert counts["streams_with_a_gap_or_duplicate"] == 0 and restarted > 0, counts


def _ran_by(hosts: Hosts, ids: list[str]) -> dict[str, set[str]]:
    """Which worker host's log names each turn (its lines carry turn_id)."""
    found = {}
    for name, proc in hosts.workers.items():
        text = proc.log_path.read_text(errors="replace")
        turns = {t for t in ids if t in text}
        if turns:
            found[name] = turns
    return found


def _ended(ids: list[str]) -> int:
    with transaction() as db:
        return db.scalar(select(func.count()).where(Turn.id.in_(ids), Turn.status.in_(ENDED)))


def _events(hosts: Hosts, turn_id: str) -> list:
    """The whole stream of an ended turn, read again."""
    with httpx.stream("GET", f"{hosts.base}/api/turns/{turn_id}/events", headers=hosts.headers, timeout=20) as r:
        return [e for e in iter_sse(r) if not isinstance(e, tuple)]


def _text(events: list) -> str:
    """The answer a client shows: the text of the latest attempt (a
    turn.restarted drops what came before; a turn.snapshot replaces it)."""
    cuts = [i for i, e in enumerate(events) if e.event in ("turn.restarted", "turn.snapshot")]
    after = events[cuts[-1] :] if cuts else events
    text = after[0].data.get("text", "") if after and after[0].event == "turn.snapshot" else ""
    return text + "".join(e.data.get("delta", "") for e in after if e.event == "message.delta")
