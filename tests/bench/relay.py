"""Relay benchmark: Turnstream's SSE relay beside a flask-sse baseline.

    python -m tests.bench.relay [--sizes 1000,5000,10000] [--seconds 8] [--webs 1] [--out .bench/relay.json]

Starts Postgres and Redis, then two web servers under the same gunicorn
configuration (`-k gevent`, one worker process each, `--webs` for more, summed
below): Turnstream's app, and
flask-sse as its documentation sets it up (tests/bench/flask_sse_app.py).
Each figure is measured on both, one server at a time, in the same run:

1. Idle streams: N = 1,000, 5,000, 10,000 open at once (one turn, or one
   channel, per stream). Redis connections the web process holds (CLIENT
   LIST, matched to the process's sockets), its RSS per stream, and how
   many subscriptions remain 2 pings after every client went away.
2. Delivery latency, from PUBLISH to the client's receipt (the publisher
   writes its clock into each event), p50 and p99:
   (a) 1,000 streams on 1,000 turns, 20 events/s each (20,000 events/s);
   (b) 1,000 clients on one turn, 10 events/s (10,000 deliveries/s).
3. The most events per second one web process relays to 1,000 streams with
   p99 under 100 ms (and every event delivered), raising the rate in steps.
4. A frozen client (stops reading, small receive buffer) among 100 on one
   turn: the other clients' latency with and without it.

Events are PUBLISHed directly (the relay's input), with consecutive seqs, so
the figures are the web process's, not the worker's. The client is asyncio
in this process; the publisher is its own process. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import resource
import socket
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests import bench, services
from tests.bench.pipeline import ms, p, tree_cpu
from tests.bench.report import report

ENV = {
    **bench.ENV,
    "REDIS_PREFIX": "relay:",
    # Short pings so vanished clients are found within the run; 15 s in production.
    "SSE_PING_SECONDS": "5",
    "WEB_WORKER_CONNECTIONS": "20000",
}
DELTA = "x" * 40  # a few tokens of text
SETTLE = 1.5  # seconds after the publisher stops for the last events to land
# Streams starting at once while a scenario sets up: a steady ramp, not a
# reconnect storm (which the tests cover). A Turnstream stream has started
# when its `retry:` came; flask-sse sends nothing before its first event, so
# its connections count as started once open.
CONNECTING = 50


@dataclass
class Server:
    """One web server under test, and how its clients and publisher address it."""

    name: str
    app: str | None
    env: dict
    webs: int = 1
    proc: services.Proc | None = None
    port: int = 0
    channel_of: dict = field(default_factory=dict)

    def start(self, logdir: Path) -> None:
        self.proc, self.port = services.start_gunicorn(
            logdir, self.env, workers=self.webs, app=self.app, name=self.name
        )
        services.wait_until(lambda: _get(self.port, self.health_path) != 0, 30, self.name)

    def restart(self, logdir: Path) -> None:
        self.proc.stop()
        self.start(logdir)

    @property
    def turnstream(self) -> bool:
        return self.name == "turnstream"

    @property
    def health_path(self) -> str:
        return "/not-found"  # any answer says it serves (/api/health would open Celery connections)

    def worker_pids(self) -> list[int]:
        """gunicorn's web processes (its workers), which share the port."""
        return services.children(self.proc.popen.pid)


class Setup:
    """The turns (Turnstream) and channel names (flask-sse) a run uses:
    every scenario takes fresh ones, so no stream of an earlier one lingers."""

    def __init__(self, turns: list[str], key: str, prefix: str) -> None:
        self.turns, self.key, self.prefix, self.used = turns, key, prefix, 0

    def take(self, n: int) -> list[str]:
        ids = self.turns[self.used : self.used + n]
        if len(ids) < n:
            raise SystemExit("the benchmark ran out of turns; raise TURNS")
        self.used += n
        return ids

    def channel(self, server: Server, ident: str) -> bytes:
        return f"{self.prefix}turn:{ident}".encode() if server.turnstream else f"bench:{ident}".encode()

    def request(self, server: Server, ident: str) -> bytes:
        if server.turnstream:
            path, auth = f"/api/turns/{ident}/events", f"Authorization: Bearer {self.key}\r\n"
        else:
            path, auth = f"/stream?channel=bench:{ident}", ""
        return f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n{auth}\r\n".encode()


def payload(turnstream: bool, ident: bytes, seq: int, now: float) -> bytes:
    """A message.delta as each server expects it on its channel; both carry
    the same JSON, ending with the publisher's clock `"t":`."""
    body = b'{"seq":%d,"turn_id":"%s","type":"message.delta","delta":"%s","t":%.6f}' % (
        seq,
        ident,
        DELTA.encode(),
        now,
    )
    if turnstream:
        return body
    # flask-sse publishes {"data", "type", "id"} and sends `data` as is.
    return b'{"data": "%s", "type": "message.delta", "id": %d}' % (body.replace(b'"', b'\\"'), seq)


def publish(port: int, turnstream: bool, channels: list[bytes], idents: list[bytes], rate: float, seconds: float, out):
    """Publisher process: `rate` events/s round-robin over the channels, seqs
    1, 2, 3 … per channel, pipelined on one raw connection; puts the count."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=lambda: all(iter(lambda: sock.recv(1 << 16), b"")), daemon=True).start()
    seqs = [0] * len(channels)
    sent = i = 0
    start = time.time()
    while (now := time.time()) < start + seconds:
        due = int((now - start) * rate) - sent
        parts = []
        for _ in range(due):
            c = i % len(channels)
            i += 1
            seqs[c] += 1
            body = payload(turnstream, idents[c], seqs[c], time.time())
            channel = channels[c]
            parts.append(
                b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(channel), channel, len(body), body)
            )
        if parts:
            sock.sendall(b"".join(parts))
            sent += due
        time.sleep(0.002)
    out.put(sent)


class Sse(asyncio.Protocol):
    """One SSE client: counts events and records each one's latency."""

    def __init__(self, request: bytes, latencies: list[float], frozen: bool = False) -> None:
        self.request, self.latencies, self.frozen = request, latencies, frozen
        self.buf = b""
        self.events = 0
        self.ready = False  # Turnstream sends `retry:` once it subscribed
        self.head = b""  # what came before it
        self.started = asyncio.get_running_loop().create_future()  # ready, or closed before
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.frozen:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.ready:
            self.head += data
            self.ready = b"\nretry:" in self.head
            if self.ready and not self.started.done():
                self.started.set_result(True)
        if self.frozen:  # from the first bytes on, it never reads again
            self.transport.pause_reading()
            return
        buf = self.buf + data if self.buf else data
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.buf = buf
            return
        self.buf = buf[cut + 2 :]
        at = buf.find(b'"t":', 0, cut)
        while at >= 0:
            end = buf.find(b"}", at)
            self.latencies.append(now - float(buf[at + 4 : end]))
            self.events += 1
            at = buf.find(b'"t":', end, cut)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if not self.started.done():
            self.started.set_result(False)


async def connect(server: Server, setup: Setup, idents: list[str], latencies: list[float], frozen: int = 0):
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECTING)

    async def one(n: int, ident: str) -> Sse:
        async with gate:
            _t, proto = await loop.create_connection(
                lambda: Sse(setup.request(server, ident), latencies, n < frozen), "127.0.0.1", server.port
            )
            if server.turnstream:
                await asyncio.wait([proto.started], timeout=30)
            return proto

    return await asyncio.gather(*(one(n, ident) for n, ident in enumerate(idents)))


def subscribers(r: redis.Redis, channels: list[bytes]) -> int:
    total = 0
    for at in range(0, len(channels), 1000):
        total += sum(count for _name, count in r.pubsub_numsub(*channels[at : at + 1000]))
    return total


async def wait_subscribed(r: redis.Redis, channels: list[bytes], expected: int) -> int:
    """Wait until Redis counts `expected` subscriptions on the channels, or
    until the count stops growing for 15 s; returns the count."""
    best, since = -1, time.monotonic()
    while (got := subscribers(r, channels)) < expected:
        if got > best:
            best, since = got, time.monotonic()
        elif time.monotonic() - since > 15:
            return got
        await asyncio.sleep(0.2)
    return got


async def wait_ready(server: Server, r: redis.Redis, channels: list[bytes], clients: list[Sse]) -> None:
    """Until every client is subscribed: Turnstream says so (its `retry:`
    comes after the subscription); flask-sse sends nothing before its first
    event, so Redis counts its subscriptions (one per client)."""
    if server.turnstream:
        deadline = time.monotonic() + 120
        while not all(c.ready for c in clients):
            if time.monotonic() > deadline:
                late = [c for c in clients if not c.ready]
                for c in late[:5]:
                    print(f"  not started: open {c.transport is not None}, received {c.head[:300]!r}")
                raise SystemExit(f"turnstream: {len(clients) - len(late)} of {len(clients)} streams started")
            await asyncio.sleep(0.1)
    elif (got := await wait_subscribed(r, channels, len(clients))) < len(clients):
        raise SystemExit(f"{server.name}: {got} of {len(clients)} subscriptions")


def close(streams: list[Sse]) -> None:
    for s in streams:
        if s.transport is not None:
            s.transport.close()


async def deliver(
    server: Server,
    setup: Setup,
    r: redis.Redis,
    redis_port: int,
    *,
    streams: int,
    turns: int,
    rate: float,
    seconds: float,
    frozen: int = 0,
) -> dict:
    """`streams` clients spread over `turns` turns; `rate` events/s for
    `seconds`. Latency of the clients that read, and the share delivered."""
    idents = setup.take(turns)
    channels = [setup.channel(server, t) for t in idents]
    latencies: list[float] = []
    clients = await connect(server, setup, [idents[n % turns] for n in range(streams)], latencies, frozen)
    await wait_ready(server, r, channels, clients)
    out = multiprocessing.get_context("spawn").Queue()
    pub = multiprocessing.get_context("spawn").Process(
        target=publish,
        args=(redis_port, server.turnstream, channels, [t.encode() for t in idents], rate, seconds, out),
    )
    pids = server.worker_pids()
    cpu_before = sum(tree_cpu(pid) for pid in pids)
    pub.start()
    sent = await asyncio.get_running_loop().run_in_executor(None, out.get)
    pub.join()
    await asyncio.sleep(SETTLE)
    cpu = sum(tree_cpu(pid) for pid in pids) - cpu_before
    close(clients)
    freed = None
    if server.turnstream:
        # The next scenario starts once these streams are gone: a thousand
        # clients leaving at once is its own event, not part of the next figure.
        left = time.monotonic()
        while subscribers(r, channels) and time.monotonic() - left < 4 * float(ENV["SSE_PING_SECONDS"]):
            await asyncio.sleep(0.1)
        freed = round(time.monotonic() - left, 1)
    readers = [c for c in clients if not c.frozen]
    expected = sent * len(readers) / turns  # round-robin: each channel gets sent/turns events, give or take one
    got = sum(c.events for c in readers)
    lat = latencies or [float("nan")]
    return {
        "streams": streams,
        "turns": turns,
        "events_per_s": rate,
        "deliveries_per_s": round(rate * streams / turns),
        "p50_ms": ms(statistics.median(lat)),
        "p99_ms": ms(p(lat, 99)),
        "max_ms": ms(max(lat)),
        "published": sent,
        "received": got,
        "delivered_share": round(got / expected, 4) if expected else None,
        "web_cpu_us_per_delivery": round(cpu / got * 1e6, 1) if got else None,
        "web_cpu_share": round(cpu / (seconds + SETTLE), 2),
        "seconds_to_free_streams_after_clients_left": freed,
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def redis_connections(r: redis.Redis, pid: int, redis_port: int) -> int:
    """Connections in Redis's CLIENT LIST that are sockets of process `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == redis_port:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return sum(1 for c in r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports)


async def idle(server: Server, setup: Setup, r: redis.Redis, redis_port: int, sizes: list[int], ping: float) -> dict:
    """Open streams up to each size; Redis connections and RSS per stream;
    then close them all and count what remains subscribed 2 pings later."""
    pids = server.worker_pids()
    base_rss = sum(rss_bytes(pid) for pid in pids)
    clients: list[Sse] = []
    channels: list[bytes] = []
    figures = {}
    for size in sizes:
        idents = setup.take(size - len(clients))
        channels += [setup.channel(server, t) for t in idents]
        clients += await connect(server, setup, idents, [])
        opened = await wait_subscribed(r, channels, size)
        await asyncio.sleep(2)
        rss = sum(rss_bytes(pid) for pid in pids)
        figures[size] = {
            "streams_open": opened,
            "redis_connections": sum(redis_connections(r, pid, redis_port) for pid in pids),
            "rss_mb": round(rss / 2**20, 1),
            "rss_kb_per_stream": round((rss - base_rss) / opened / 1024, 1),
        }
        print(f"  {server.name}: {size} idle streams: {figures[size]}", flush=True)
        if opened < size:
            break  # it cannot hold more (a file limit, most likely): see its log
    close(clients)
    await asyncio.sleep(2 * ping + 1)
    figures["subscribed_2_pings_after_clients_left"] = subscribers(r, channels)
    return figures


async def max_rate(server: Server, setup: Setup, r: redis.Redis, redis_port: int, seconds: float) -> dict:
    """Raise the rate to 1,000 streams until p99 passes 100 ms or events go missing."""
    best, steps = None, []
    for rate in (1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000):
        step = await deliver(server, setup, r, redis_port, streams=1000, turns=1000, rate=rate, seconds=seconds)
        steps.append(step)
        print(f"  {server.name}: {rate} events/s: p99 {step['p99_ms']} ms, delivered {step['delivered_share']}")
        if step["p99_ms"] >= 100 or (step["delivered_share"] or 0) < 0.99:
            break
        best = rate
    return {"events_per_s": best, "steps": steps}


async def measure(server: Server, setup: Setup, r: redis.Redis, redis_port: int, args, logdir: Path) -> dict:
    print(f"{server.name}: idle streams …", flush=True)
    results = {"idle": await idle(server, setup, r, redis_port, args.sizes, float(ENV["SSE_PING_SECONDS"]))}
    server.restart(logdir)  # flask-sse never notices clients that left: start both afresh
    run = {"r": r, "redis_port": redis_port, "seconds": args.seconds}
    print(f"{server.name}: (a) 1,000 streams on 1,000 turns, 20 events/s each …", flush=True)
    results["a"] = await deliver(server, setup, **run, streams=1000, turns=1000, rate=20_000)
    print(f"  {results['a']}", flush=True)
    print(f"{server.name}: (b) 1,000 clients on one turn, 10 events/s …", flush=True)
    results["b"] = await deliver(server, setup, **run, streams=1000, turns=1, rate=10)
    print(f"  {results['b']}", flush=True)
    print(f"{server.name}: the most events/s with p99 under 100 ms …", flush=True)
    results["max"] = await max_rate(server, setup, r, redis_port, args.seconds)
    print(f"{server.name}: a frozen client among 100 …", flush=True)
    results["unfrozen"] = await deliver(server, setup, **run, streams=100, turns=1, rate=50)
    results["frozen"] = await deliver(server, setup, **run, streams=100, turns=1, rate=50, frozen=1)
    return results


def make_turns(n: int) -> tuple[list[str], str]:
    """n running turns of one owner, and that owner's API key."""
    from sqlalchemy import insert, update

    from shared.db import transaction
    from shared.models import ChatSession, Turn
    from web.auth import create_key, lookup_key

    key = create_key(f"bench-{uuid.uuid4().hex[:8]}")
    owner_id = lookup_key(key).owner_id
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with transaction() as db:
        chat = ChatSession(owner_id=owner_id, title="relay bench", meta={}, turn_count=n)
        db.add(chat)
        db.flush()
        rows = [{"id": t, "session_id": chat.id, "owner_id": owner_id, "number": i + 1} for i, t in enumerate(ids)]
        db.execute(insert(Turn), rows)  # queued, as every turn starts; then claimed by no worker
        db.execute(update(Turn).where(Turn.id.in_(ids)).values(status="running"))
    return ids, key


def _get(port: int, path: str) -> int:
    import httpx

    try:
        with httpx.stream("GET", f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status_code
    except httpx.HTTPError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000", help="idle stream counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each latency run")
    parser.add_argument("--only", choices=("turnstream", "flask-sse"), help="measure one server")
    parser.add_argument("--webs", type=int, default=1, help="web processes per server (gunicorn workers, one port)")
    parser.add_argument("--out", default=".bench/relay.json")
    args = parser.parse_args()
    args.sizes = [int(n) for n in args.sizes.split(",")]
    logging.basicConfig(level=logging.WARNING)
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))  # the hard limit, inherited by every service
    with services.stack("turnstream-bench-relay-", ENV, ("--first-token-delay", "0"), mcp=False) as info:
        logdir, env, redis_port = info["logdir"], info["env"], info["redis_port"]
        r = redis.Redis(port=redis_port)
        r.config_set("maxclients", files - 32)  # flask-sse holds one connection per stream
        turns, key = make_turns(max(args.sizes) + 12_000)
        servers = [
            Server("flask-sse", "tests.bench.flask_sse_app:app", env, args.webs),
            Server("turnstream", None, env, args.webs),  # the Procfile's web line
        ]
        results = {}
        for server in servers:
            if args.only and server.name != args.only:
                continue
            server.start(logdir)
            setup = Setup(turns, key, ENV["REDIS_PREFIX"])  # flask-sse only borrows the ids as channel names
            try:
                results[server.name] = asyncio.run(measure(server, setup, r, redis_port, args, logdir))
            finally:
                server.proc.stop()
    rows_of(results, args)


def rows_of(results: dict, args) -> None:
    names = list(results)
    for name in names:
        f = results[name]
        f["frozen_delay_p99_ms"] = round(f["frozen"]["p99_ms"] - f["unfrozen"]["p99_ms"], 2)

    def row(label: str, get) -> tuple[str, str]:
        return label, "  |  ".join(f"{name}: {get(results[name])}" for name in names)

    def idle(size: int, figure: str):
        return lambda f: f["idle"][size][figure] if size in f["idle"] else "-"

    rows = []
    for size in args.sizes:
        rows.append(row(f"{size} idle streams: streams open", idle(size, "streams_open")))
        rows.append(row(f"{size} idle streams: Redis connections", idle(size, "redis_connections")))
        rows.append(row(f"{size} idle streams: KB RSS per stream", idle(size, "rss_kb_per_stream")))
    left = "subscribed_2_pings_after_clients_left"
    rows.append(row("subscriptions left 2 pings after clients left", lambda f: f["idle"][left]))
    for name, label in (("a", "(a) 1,000 turns x 20 ev/s"), ("b", "(b) 1,000 clients, 1 turn, 10 ev/s")):
        rows.append(row(f"{label}: p50 / p99 ms", lambda f, n=name: f"{f[n]['p50_ms']} / {f[n]['p99_ms']}"))
        rows.append(row(f"{label}: share delivered", lambda f, n=name: f[n]["delivered_share"]))
    rows.append(row("most events/s to 1,000 streams with p99 < 100 ms", lambda f: f["max"]["events_per_s"]))
    rows.append(
        row(
            "100 clients on 1 turn, 50 ev/s: p99 ms without / with a frozen client",
            lambda f: f"{f['unfrozen']['p99_ms']} / {f['frozen']['p99_ms']}",
        )
    )
    rows.append(row("delay a frozen client adds to the others' p99, ms", lambda f: f["frozen_delay_p99_ms"]))
    report(rows, results, args.out)


if __name__ == "__main__":
    main()
