"""A Postgres failover, as a managed database does one: the primary's host
drops off the network without a word (no FIN, no RST: its link goes down),
a synchronous standby at another address is promoted, and the database's
name points at it. A web host and a worker host (each its own network
namespace, whose /etc/hosts the test rewrites, as DNS changes) keep serving
clients and running turns meanwhile, at the default recovery settings: a
statement on a connection to the vanished primary times out (shared/db.py's
TCP settings) and runs again on a new connection, which resolves the name
again."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import select

from shared.db import transaction
from shared.models import ChatSession
from tests import services
from tests.conftest import TEST_ENV
from tests.test_hosts import Network
from tests.turns import ended, follow, keep_sending, shown_text, stored

DB_NAME = "db.turnstream.test"
REDIS_NAME = "redis.turnstream.test"
WEB_PORT = 8000
SLOW = "failover [[tokens=40]] [[delay=0.1]]"  # 4 s a turn
# What a deployment runs with: the recovery settings' defaults.
ENV = {k: v for k, v in TEST_ENV.items() if k not in ("HEARTBEAT_SECONDS", "STALE_RUNNING_SECONDS")}
# Trust on the test's private bridge, for clients and for the standby's
# replication connection.
HBA = "local all all trust\nhost all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust\n"
AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]


def _bindir() -> Path:
    return sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))[-1]


class Failover:
    def __init__(self, stack: dict) -> None:
        self.stack = stack
        self.workdir = Path(stack["workdir"])
        self.net = Network(["db-a", "db-b", "redis-a", "redis-b", "web", "worker"])
        self.postgres: dict[str, services.Proc] = {}
        self.names = {DB_NAME: "db-a", REDIS_NAME: "redis-a"}  # what each name points at
        self.procs: list[services.Proc] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        stack = self.stack
        self.hba = self.workdir / "failover-hba.conf"
        self.hba.write_text(HBA)
        self.hba.chmod(0o644)
        # `ip netns exec` mounts /etc/netns/NAME/hosts over the machine's
        # /etc/hosts; rewritten in place, it is that host's DNS.
        self.etc = [Path("/etc/netns") / self.net.namespaces[host] for host in ("web", "worker")]
        self.point_name_at(DB_NAME, "db-a")
        self.redis = {host: self.start_redis(host) for host in ("redis-a", "redis-b")}
        self.postgres["db-a"] = self.start_postgres("db-a")
        services.wait_until(lambda: self.query("db-a", "SELECT 1"), 60, "the primary")
        following = lambda: self.redis_info("redis-b").get("master_link_status") == "up"  # noqa: E731
        services.wait_until(following, 30, "the Redis replica following")
        self.use()
        from shared.migrate import upgrade

        upgrade()
        self.base_backup("db-a", "db-b")
        self.postgres["db-b"] = self.start_postgres("db-b")
        streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        services.wait_until(lambda: self.query("db-a", streaming)[0][0] == 1, 60, "the standby streaming")
        # Synchronous: a COMMIT answers once the standby has it, so no
        # write a client saw succeed is lost in the failover.
        self.query("db-a", "ALTER SYSTEM SET synchronous_standby_names = '*'", "SELECT pg_reload_conf()")
        self.env = {
            **stack["env"],
            **{
                name: self.net.reachable(stack["env"][name])
                for name in ("OPENAI_BASE_URL", "BROKER_URL")
                if name in stack["env"]
            },
            "DATABASE_URL": f"postgres://turnstream@{DB_NAME}:5432/turnstream",
            "REDIS_URL": f"redis://{REDIS_NAME}:6379/0",
        }
        self.start("web", "failover-web", services.procfile_args("web"), PORT=str(WEB_PORT))
        worker = self.start("worker", "failover-worker", services.procfile_args("worker", "-n", "failover-worker@%h"))
        self.start("worker", "failover-beat", services.procfile_args("beat", "--schedule", str(self.workdir / "beat")))
        self.base = f"http://{self.net.addresses['web']}:{WEB_PORT}"
        services.wait_until(lambda: httpx.get(f"{self.base}/api/health").status_code == 200, 30, "web")
        services.wait_for_worker(worker)
        from web.auth import create_key

        self.headers = {"Authorization": f"Bearer {create_key(f'failover-{uuid.uuid4().hex[:8]}')}"}

    def start(self, host: str, name: str, args: list[str], **env: str) -> services.Proc:
        ns_args = ["ip", "netns", "exec", self.net.namespaces[host], *args]
        proc = services.Proc(name, ns_args, self.stack["logdir"], {**self.env, **env})
        self.procs.append(proc)
        return proc

    def start_postgres(self, host: str) -> services.Proc:
        args = ["bash", "deploy/postgres.sh", str(self.workdir / host), "5432"]
        for option in (f"listen_addresses={self.net.addresses[host]}", f"hba_file={self.hba}", "fsync=off"):
            args += ["-c", option]
        return services.Proc(host, ["ip", "netns", "exec", self.net.namespaces[host], *args], self.stack["logdir"])

    def base_backup(self, primary: str, standby: str) -> None:
        """The standby's data folder: a copy of the primary's, set to follow it."""
        data = self.workdir / standby
        data.mkdir(mode=0o700)
        shutil.chown(data, "postgres", "postgres")
        source = ["-h", self.net.addresses[primary], "-p", "5432", "-U", "turnstream"]
        options = ["-D", str(data), "-R", "-X", "stream", "-c", "fast"]
        subprocess.run([*AS_POSTGRES, str(_bindir() / "pg_basebackup"), *source, *options], check=True, timeout=120)
        # The primary's socket lock came with its folder (deploy/postgres.sh
        # keeps the socket there); the standby's own replaces it.
        (data / ".s.PGSQL.5432.lock").unlink(missing_ok=True)

    def start_redis(self, host: str) -> services.Proc:
        args = ["bash", "deploy/redis.sh", str(self.workdir / host), "6379"]
        args += ["--bind", self.net.addresses[host], "--protected-mode", "no"]
        if host == "redis-b":
            args += ["--replicaof", self.net.addresses["redis-a"], "6379"]
        return services.Proc(host, ["ip", "netns", "exec", self.net.namespaces[host], *args], self.stack["logdir"])

    def redis_info(self, host: str) -> dict:
        try:
            return redis.Redis(host=self.net.addresses[host], port=6379, socket_timeout=3).info("replication")
        except redis.RedisError:
            return {}

    def url(self, host: str) -> str:
        return f"postgres://turnstream@{self.net.addresses[host]}:5432/turnstream"

    def query(self, host: str, *statements: str) -> list:
        try:
            with psycopg.connect(self.url(host), autocommit=True, connect_timeout=3) as conn:
                rows: list = []
                for statement in statements:
                    cur = conn.execute(statement)
                    rows = cur.fetchall() if cur.description else []
                return rows
        except psycopg.OperationalError:
            return []

    def use(self) -> None:
        """This test process reaches Postgres and Redis where the names point."""
        os.environ["DATABASE_URL"] = self.url(self.names[DB_NAME])
        os.environ["REDIS_URL"] = f"redis://{self.net.addresses[self.names[REDIS_NAME]]}:6379/0"
        services.reset_process_singletons()

    def point_name_at(self, name: str, host: str) -> None:
        self.names[name] = host
        lines = ["127.0.0.1 localhost", *(f"{self.net.addresses[h]} {n}" for n, h in self.names.items())]
        for etc in self.etc:
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(lines) + "\n")
        self.use()

    def close(self) -> None:
        for proc in [*reversed(self.procs), *self.postgres.values(), *getattr(self, "redis", {}).values()]:
            proc.stop()
        self.net.close()
        for etc in getattr(self, "etc", []):
            shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture(scope="module")
def failover():
    with (
        services.stack("turnstream-failover-", ENV, ("--first-token-delay", "0"), mcp=False) as stack,
        contextlib.closing(Failover(stack)) as f,
    ):
        yield f


class Streaming:
    """Turns, each in a session of its own, each followed by a client to its
    end (reconnecting with Last-Event-ID), and what came of them."""

    def __init__(self, failover: Failover, n: int, bound: float) -> None:
        base, headers = failover.base, failover.headers
        with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
            self.sids = [http.post("/api/sessions", json={}).json()["id"] for _ in range(n)]
            self.ids = [http.post(f"/api/sessions/{s}/turns", json={"message": SLOW}).json()["id"] for s in self.sids]
        self.deadline = time.monotonic() + bound
        self.streams: dict = {}
        self.followers = [
            threading.Thread(target=follow, args=(base, headers, t, self.deadline, self.streams)) for t in self.ids
        ]
        for f in self.followers:
            f.start()

    def counts(self, unfollowed: list[str]) -> dict:
        """Once the followers are done: the turns' ends, with those of the
        `unfollowed` ones, and what the streams showed."""
        for f in self.followers:
            f.join(max(1, self.deadline - time.monotonic()))
        turns, answers = stored(self.ids + unfollowed)
        shown = {t: shown_text([e for _at, e in self.streams[t]["events"]]) for t in self.ids}
        return {
            "turns": len(turns),
            "succeeded": sum(1 for t in turns.values() if t.status == "succeeded"),
            "restarted": sum(1 for t in turns.values() if t.attempts > 1),
            "duplicated_answers": sum(1 for n in answers.values() if n > 1),
            "stuck_streams": sum(1 for t in self.ids if not self.streams[t]["ended"]),
            "streams_not_matching_answer": sum(1 for t in self.ids if shown[t] != turns[t].answer),
            "longest_turn_s": round(
                max((t.finished_at - t.created_at).total_seconds() for t in turns.values() if t.finished_at), 1
            ),
        }


def _assert_every_turn_ran_once(counts: dict) -> None:
    assert counts["succeeded"] == counts["turns"] and counts["duplicated_answers"] == 0, counts
    assert counts["stuck_streams"] == 0 and counts["streams_not_matching_answer"] == 0, counts


def test_no_request_fails_and_nothing_is_lost_across_a_failover_to_a_standby(failover):
    results: list[tuple] = []
    stop = threading.Event()
    turns = Streaming(failover, 8, bound=120)
    clients = [
        threading.Thread(target=keep_sending, args=(failover.base, failover.headers, sid, stop, results))
        for sid in turns.sids
    ]
    try:
        for c in clients:
            c.start()
        time.sleep(2)  # the turns are streaming
        gone = time.monotonic()
        subprocess.run(["ip", "link", "set", failover.net.links["db-a"], "down"], check=True)
        time.sleep(1)
        assert failover.query("db-b", "SELECT pg_promote()") == [(True,)]
        failover.point_name_at(DB_NAME, "db-b")
        switched = time.monotonic()
        time.sleep(20)  # past the dead connections' timeout, and their requests' second runs
    finally:
        stop.set()
        for c in clients:
            c.join(60)
    created = [sid for _a, _b, _s, sid in results if sid is not None]
    with transaction() as db:
        kept = set(db.scalars(select(ChatSession.id).where(ChatSession.id.in_(created))))
    failed = [s for _a, _b, s, _id in results if s not in (200, 201)]
    waited = [ended - started for started, ended, _s, _id in results if started < switched and ended > gone]
    counts = {
        "requests": len(results),
        "after_the_switch": sum(1 for started, *_ in results if started > switched),
        "met_the_failover": len(waited),
        "longest_wait_s": round(max(waited, default=0), 2),
        "failed": len(failed),
        "statuses": sorted({str(s) for _a, _b, s, _id in results}),
        "sessions_created": len(created),
        "created_but_lost": len(set(created) - kept),
        **turns.counts([]),
    }
    print("\nfailover (primary vanished, standby promoted, name moved; 8 clients, 8 turns):", counts)
    assert counts["met_the_failover"] >= 8 and counts["after_the_switch"] > 100, counts
    # Only a POST cut at its COMMIT may fail, with a 503: whether it landed
    # is unknown. A write answered 201 was on the standby before the answer.
    assert set(failed) <= {503} and len(failed) <= 8, counts
    assert counts["created_but_lost"] == 0, counts
    _assert_every_turn_ran_once(counts)


def test_every_turn_ends_and_every_stream_matches_across_a_redis_failover(failover):
    """Redis (broker, event logs, heartbeats) fails over the same way to its
    replica, which replicates asynchronously: what the replica missed is
    recovered as after Redis lost its data (docs/operations.md). Turns
    submitted meanwhile are answered 202 and run."""
    during: list = []
    stop = threading.Event()

    def submit() -> None:
        with httpx.Client(base_url=failover.base, headers=failover.headers, timeout=60) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    sid = http.post("/api/sessions", json={}).json()["id"]
                    r = http.post(f"/api/sessions/{sid}/turns", json={"message": SLOW})
                    outcome = (r.status_code, r.json()["id"] if r.status_code == 202 else None)
                except httpx.HTTPError as exc:
                    outcome = (type(exc).__name__, None)
                during.append((*outcome, time.monotonic() - started))
                time.sleep(0.3)

    turns = Streaming(failover, 8, bound=150)
    submitter = threading.Thread(target=submit)
    submitter.start()
    try:
        time.sleep(2)  # the turns are streaming
        subprocess.run(["ip", "link", "set", failover.net.links["redis-a"], "down"], check=True)
        time.sleep(1)
        promoted = redis.Redis(host=failover.net.addresses["redis-b"], port=6379, socket_timeout=3)
        promoted.replicaof("NO", "ONE")
        failover.point_name_at(REDIS_NAME, "redis-b")
        time.sleep(10)
    finally:
        stop.set()
        submitter.join(60)
    sent_during = [t for _s, t, _took in during if t is not None]
    every = turns.ids + sent_during
    services.wait_until(lambda: ended(every) == len(every), 120, "every turn to end")
    counts = {
        "submitted_during": len(during),
        "failed_submits": sum(1 for s, _t, _took in during if s != 202),
        "longest_submit_s": round(max((took for _s, _t, took in during), default=0), 1),
        **turns.counts(sent_during),
    }
    print("\nfailover (Redis vanished, replica promoted, name moved; 8 turns streaming, submits going on):", counts)
    assert counts["failed_submits"] == 0 and counts["submitted_during"] > 0, counts
    _assert_every_turn_ran_once(counts)
