"""A web process's Redis connections stay bounded under a burst of requests,
the rate limiter's included (docs/architecture.md, invariant 6): a real
gunicorn -k gevent with rate limits on, a thousand requests at once, and
Redis's CLIENT LIST sampled meanwhile."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import pytest
import redis

from shared.config import get_settings
from tests import services
from tests.test_relay import running_turn
from web.auth import create_key, lookup_key

BURST = 1000
TURN_STREAMS, SESSION_STREAMS, QUEUED_SUBMITS, SENT_SUBMITS = 300, 200, 230, 20
# Sessions the queued submissions spread over, so that few wait on one
# session's row lock while holding a database connection.
QUEUED_SESSIONS = 50
LISTS = BURST - TURN_STREAMS - SESSION_STREAMS - QUEUED_SUBMITS - SENT_SUBMITS
# Every limited request is counted, per key and per address, and none is
# refused: each runs the limiter's script twice.
HIGH = "100000/minute"
MOST_NEW_CONNECTIONS = 10


@pytest.fixture(scope="module")
def limited_web(stack):
    """A gunicorn of its own (one worker process) with rate limits on; yields
    its base URL, its port and its worker's pid."""
    env = {
        **stack["env"],
        "RATE_LIMITS": "on",
        **{f"RATE_LIMIT_{name}": HIGH for name in ("SUBMIT", "SUBMIT_ADDRESS", "STREAMS", "STREAMS_ADDRESS")},
    }
    proc, port = services.start_gunicorn(stack["logdir"], env, name="web-limited")
    stack["procs"].append(proc)
    base = f"http://127.0.0.1:{port}"
    services.wait_until(lambda: httpx.get(f"{base}/api/health", timeout=2).status_code == 200, 30, "web")
    yield base, port, services.children(proc.popen.pid)[0]
    proc.stop()


def redis_connections(r: redis.Redis, pid: int, redis_port: int) -> tuple[int, int]:
    """Redis's clients (CLIENT LIST): those that are sockets of process
    `pid`, and all of them."""
    clients = r.client_list()
    inodes = set()
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            target = os.readlink(f"{fds}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    remote = f":{redis_port:04X} "
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            for line in lines:
                if remote in line:  # cheaply, before the split: most lines are the burst's own sockets
                    cols = line.split()
                    if cols[2].endswith(remote.strip()) and cols[9] in inodes:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return sum(1 for c in clients if int(c["addr"].rsplit(":", 1)[1]) in ports), len(clients)


def limit_hits(r: redis.Redis, owner_id: str) -> dict[str, int]:
    """How many requests of the owner each of its rate limits counted (the
    moving window's list, one entry per hit)."""
    return {
        key.decode().split("/")[1]: r.llen(key)
        for key in r.scan_iter(match=f"{get_settings().redis_prefix}limits:*/owner:{owner_id}/*", count=1000)
    }


async def request(port: int, method: str, path: str, headers: dict, body: bytes = b"", until: bytes = b"") -> tuple:
    """One request on a connection of its own, in plain HTTP/1.1 over
    asyncio (httpx's CPU per request, a thousand times over, slows the
    server the test shares the machine with). Returns the status and the
    body read to its end; or, with `until`, read until it holds those
    bytes, and the connection, left open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)
    status = int((await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1])
    if not until or status != 200:
        got = await reader.read()
        writer.close()
        return status, got, None
    got = b""
    while until not in got and (chunk := await reader.read(65536)):
        got += chunk
    return status, got, writer


async def burst(port: int, headers: dict, done_turn: str, quiet: str, queued: list[str], sent: list[str]) -> list:
    """BURST requests at once, of every kind that reaches Redis: streams of
    an ended turn (read to their end), session streams (held open until
    every request has answered), turns submitted (most behind a running
    turn, some sent to the worker), and session lists. Returns what went
    wrong."""
    failures: list = []
    answered = 0
    all_answered = asyncio.Event()

    def count() -> None:
        nonlocal answered
        answered += 1
        if answered == BURST:
            all_answered.set()

    async def call(what: str, path: str, ok: int, expect: bytes = b"", body: bytes = b"") -> None:
        method, extra = ("POST", {"Content-Type": "application/json"}) if body else ("GET", {})
        status, got, _ = await request(port, method, path, {**headers, **extra}, body)
        count()
        if status != ok or expect not in got:
            failures.append((what, status, got[-200:]))

    async def session_stream() -> None:
        status, got, writer = await request(port, "GET", f"/api/sessions/{quiet}/events", headers, until=b"retry:")
        count()
        if writer is None or b"retry:" not in got:
            failures.append(("session stream", status, got[-200:]))
        if writer is not None:
            await all_answered.wait()  # held open through the burst
            writer.close()

    def submit(session_id: str, n: int):
        return call("submit", f"/api/sessions/{session_id}/turns", 202, body=b'{"message": "burst %d"}' % n)

    calls = (
        [call("turn stream", f"/api/turns/{done_turn}/events", 200, b"turn.completed") for _ in range(TURN_STREAMS)]
        + [session_stream() for _ in range(SESSION_STREAMS)]
        + [submit(queued[n % len(queued)], n) for n in range(QUEUED_SUBMITS)]
        + [submit(session_id, n) for n, session_id in enumerate(sent)]
        + [call("list", "/api/sessions", 200) for _ in range(LISTS)]
    )
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(outcome, BaseException):
            failures.append(("error", repr(outcome)))
    return failures


def test_a_burst_of_a_thousand_requests_adds_at_most_ten_redis_connections_and_fails_none(limited_web, stack):
    base, port, pid = limited_web
    key = create_key("burst")
    headers = {"Authorization": f"Bearer {key}"}
    r = redis.Redis(port=stack["redis_port"])
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:

        def new_session() -> str:
            return http.post("/api/sessions", json={}).json()["id"]

        done_session, quiet = new_session(), new_session()
        sent = [new_session() for _ in range(SENT_SUBMITS)]
        done_turn = http.post(f"/api/sessions/{done_session}/turns", json={"message": "hi"}).json()["id"]
        services.wait_until(
            lambda: http.get(f"/api/turns/{done_turn}").json()["status"] == "succeeded", 30, "the first turn"
        )
        # Sessions with a turn running and no worker behind it: turns
        # submitted there wait behind it, unsent.
        queued = [http.get(f"/api/turns/{running_turn(headers)}").json()["session_id"] for _ in range(QUEUED_SESSIONS)]
        # One request of each kind first: what a process opens once is open.
        assert http.get(f"/api/turns/{done_turn}/events").status_code == 200
        assert http.post(f"/api/sessions/{queued[0]}/turns", json={"message": "first"}).status_code == 202

        owner_id = str(lookup_key(key).owner_id)
        hits_before = limit_hits(r, owner_id)
        before, before_all = redis_connections(r, pid, stack["redis_port"])
        samples: list[tuple[int, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(redis_connections(r, pid, stack["redis_port"]))
                time.sleep(0.2)  # reading the system's TCP table costs a good part of a sample

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            failures = asyncio.run(burst(port, headers, done_turn, quiet, queued, sent))
        finally:
            stop.set()
            sampler.join()
        seconds = time.monotonic() - started
        samples.append(redis_connections(r, pid, stack["redis_port"]))
        hits = limit_hits(r, owner_id)
        for session_id in queued:  # their queued turns go, unrun
            http.delete(f"/api/sessions/{session_id}")

    most, most_all = max(n for n, _ in samples), max(n for _, n in samples)
    print(
        f"\n{BURST} requests in {seconds:.1f} s: the web process's Redis connections {before} -> at most {most};"
        f" all of Redis's clients {before_all} -> at most {most_all} ({len(samples)} samples)"
    )
    assert failures == [], failures[:10]
    assert most - before <= MOST_NEW_CONNECTIONS, (before, most)
    # The limiter counted every request: none was let through with the limits lifted.
    limited = ("rate_limit_streams", "rate_limit_submit")
    counted = {name: hits.get(name, 0) - hits_before.get(name, 0) for name in limited}
    assert counted == {
        "rate_limit_streams": TURN_STREAMS + SESSION_STREAMS,
        "rate_limit_submit": QUEUED_SUBMITS + SENT_SUBMITS,
    }
