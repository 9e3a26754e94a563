"""Several hosts, no sticky sessions: two web hosts and two worker hosts,
each in a network namespace of its own (its own loopback and address on a
bridge, as separate machines on a network have), with its own temporary
folder, started from the Procfile's lines. They share only Postgres, Redis
(RabbitMQ) and the model, which they reach at the bridge's address; a plain
round-robin in front of the web hosts (tests/proxy.py) skips a host that
refuses, as a load balancer's health check would."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select

from shared.db import transaction
from shared.events import ENDING_TYPES
from shared.models import Turn
from shared.turn_states import ENDED
from tests import services
from tests.conftest import TEST_ENV
from tests.proxy import Proxy
from tests.sse import iter_sse
from tests.turns import ended, follow, shown_text, stored

ENV = {
    **TEST_ENV,
    "REDIS_PREFIX": "hosts:",
    "HEARTBEAT_SECONDS": "0.5",
    "STALE_RUNNING_SECONDS": "2",
    "SWEEP_SECONDS": "1",
    "STALE_QUEUED_SECONDS": "3",
}
SLOW = "hosts [[tokens=40]] [[delay=0.05]]"  # 2 s a turn
WEB_PORT = 8000  # every web host's: they are different machines
pytestmark = pytest.mark.broker  # run against RabbitMQ too (deploy/test.sh)


_networks = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Network:
    """A bridge in this namespace, and a namespace per host with a veth on
    it. The shared services listen on this machine's loopback; a forward on
    the bridge's address (the gateway) reaches each."""

    def __init__(self, hosts: list[str]) -> None:
        # Names of their own in each network a test process makes: a
        # namespace deleted a moment ago may still hold its links' names.
        tag = (os.getpid() + 3_000 * next(_networks)) % 10_000
        self.subnet = f"10.{77 + tag // 250 % 100}.{tag % 250}"
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"tsbr{tag}"
        self.namespaces: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self.links: dict[str, str] = {}  # each host's end on the bridge: down, the host is gone
        self.forwards: list[Proxy] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for n, host in enumerate(hosts, start=11):
            ns, veth = f"ts{tag}-{host}", f"ts{tag}v{n}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("link", "set", f"{veth}p", "netns", ns)
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{self.subnet}.{n}/24", "dev", f"{veth}p")
            _ip("netns", "exec", ns, "ip", "link", "set", f"{veth}p", "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self.namespaces[host], self.addresses[host], self.links[host] = ns, f"{self.subnet}.{n}", veth

    def reachable(self, url: str) -> str:
        """The URL of a service on this machine's loopback as the hosts reach
        it: at the gateway, through a forward."""
        parts = urlsplit(url)
        self.forwards.append(Proxy([("127.0.0.1", parts.port)], listen=(self.gateway, parts.port)))
        return url.replace(f"127.0.0.1:{parts.port}", f"{self.gateway}:{parts.port}")

    def close(self) -> None:
        for forward in self.forwards:
            forward.close()
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Hosts:
    def __init__(self, stack: dict) -> None:
        self.stack = stack
        self.net = Network(["web-a", "web-b", "worker-1", "worker-2"])
        shared = {
            name: self.net.reachable(stack["env"][name])
            for name in ("DATABASE_URL", "REDIS_URL", "OPENAI_BASE_URL", "BROKER_URL")
            if name in stack["env"]
        }
        self.host_env = {**stack["env"], **shared}
        self.web: dict[str, services.Proc] = {}
        self.workers: dict[str, services.Proc] = {}
        for name in ("web-a", "web-b"):
            args = services.procfile_args("web")
            self.web[name] = self.start(name, args, PORT=str(WEB_PORT))
        for name in ("worker-1", "worker-2"):
            args = services.procfile_args("worker", "-n", f"{name}@%h")
            self.workers[name] = self.start(name, args, WORKER_CONCURRENCY="8")
        for worker in self.workers.values():
            services.wait_for_worker(worker)
        self.beat = services.start_beat(stack["logdir"], stack["env"], "hosts-beat")  # this machine's
        for host in self.web:
            services.wait_until(lambda h=host: httpx.get(f"{self.web_base(h)}/api/health").status_code == 200, 30, host)
        self.proxy = Proxy([(self.net.addresses[host], WEB_PORT) for host in self.web])
        self.base = f"http://127.0.0.1:{self.proxy.port}"
        from web.auth import create_key

        self.headers = {"Authorization": f"Bearer {create_key(f'hosts-{uuid.uuid4().hex[:8]}')}"}

    def start(self, host: str, args: list[str], **env: str) -> services.Proc:
        """A process on a host: in its namespace, with its own temporary
        folder, as on its own machine."""
        tmp = Path(self.stack["workdir"]) / host / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        ns_args = ["ip", "netns", "exec", self.net.namespaces[host], *args]
        return services.Proc(host, ns_args, self.stack["logdir"], {**self.host_env, "TMPDIR": str(tmp), **env})

    def web_base(self, host: str) -> str:
        return f"http://{self.net.addresses[host]}:{WEB_PORT}"

    def submit(self, n: int, message: str) -> list[str]:
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=10) as http:
            ids = []
            for _ in range(n):
                sid = http.post("/api/sessions", json={}).json()["id"]
                ids.append(http.post(f"/api/sessions/{sid}/turns", json={"message": message}).json()["id"])
            return ids

    def close(self) -> None:
        self.proxy.close()
        for proc in [self.beat, *self.workers.values(), *self.web.values()]:
            proc.stop()
        self.net.close()


@pytest.fixture(scope="module")
def hosts():
    with (
        services.stack("turnstream-hosts-", ENV, ("--first-token-delay", "0"), mcp=False) as stack,
        contextlib.closing(Hosts(stack)) as h,
    ):
        yield h


def _check_streams(ids: list[str], streams: dict) -> dict:
    """Each stream's ids strictly increase (no duplicate) and it shows the
    answer Postgres holds (no gap); one answer per turn."""
    turns, answers = stored(ids)
    bad = []
    for t in ids:
        events = [e for _at, e in streams[t]["events"]]
        seqs = [e.seq for e in events]
        if seqs != sorted(set(seqs)) or turns[t].status != "succeeded" or shown_text(events) != turns[t].answer:
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
    streams[turn_id] = {"events": [(0, e) for e in first + out], "reconnects": 1}
    counts = _check_streams([turn_id], streams)
    print("\nhosts (a stream moved from web-a to web-b):", counts)
    assert counts["streams_with_a_gap_or_duplicate"] == 0 and counts["succeeded"] == 1, counts
    assert out and out[0].seq == first[-1].seq + 1


def test_a_web_host_killed_mid_stream_loses_no_client_that_reconnects(hosts):
    ids = hosts.submit(16, "hosts [[tokens=100]] [[delay=0.05]]")  # 5 s each, all running at once
    streams: dict = {}
    deadline = time.monotonic() + 90
    followers = [threading.Thread(target=follow, args=(hosts.base, hosts.headers, t, deadline, streams)) for t in ids]
    for f in followers:
        f.start()
    # Every client streaming (each connected, through either host) before the kill.
    services.wait_until(lambda: all(streams.get(t, {}).get("events") for t in ids), 30, "every stream to carry events")
    killed = hosts.web.pop("web-a")
    killed.stop(9)  # the whole host at once: no shutdown, its streams cut
    for f in followers:
        f.join(max(0, deadline - time.monotonic()))
    counts = _check_streams(ids, streams)
    print("\nhosts (web-a SIGKILLed mid-stream):", counts)
    assert counts["streams_with_a_gap_or_duplicate"] == 0 and counts["succeeded"] == 16, counts
    assert counts["reconnects"] >= 4, counts  # the kill cut the streams web-a held (about half)


def test_turns_spread_over_both_worker_hosts_and_a_killed_one_is_recovered(hosts):
    ids = hosts.submit(40, SLOW)
    services.wait_until(lambda: len(_ran_by(hosts, ids)) == 2, 30, "both worker hosts to run turns")
    spread = {name: len(turns) for name, turns in _ran_by(hosts, ids).items()}
    hosts.workers["worker-1"].stop(9)  # mid-turn: its turns stay "running"
    services.wait_until(lambda: ended(ids) == len(ids), 90, "every turn to end")
    counts = _check_streams(ids, {t: {"events": [(0, e) for e in _events(hosts, t)], "reconnects": 0} for t in ids})
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


def _events(hosts: Hosts, turn_id: str) -> list:
    """The whole stream of an ended turn, read again."""
    with httpx.stream("GET", f"{hosts.base}/api/turns/{turn_id}/events", headers=hosts.headers, timeout=20) as r:
        return [e for e in iter_sse(r) if not isinstance(e, tuple)]
