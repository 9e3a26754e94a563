"""Start the real services the tests (and benchmarks) run against."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(count: int, step: int) -> int:
    """A base port whose next count-1 ports, step apart, are free too (honcho
    gives each process type the base port plus 100 times its place)."""
    for _ in range(100):
        base = random.randrange(20_000, 60_000 - count * step)
        try:
            for n in range(count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + n * step))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports")


def wait_until(check: Callable[[], T], timeout: float, what: str) -> T:
    """Call check until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up in {timeout}s: {last}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Proc:
    """A child process with its output in a log file, stopped on exit."""

    def __init__(self, name: str, args: list[str], logdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = logdir / f"{name}.log"
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        if os.environ.get("TEST_TIER") == "fast":
            raise RuntimeError(f"a fast test started {self.name}: mark it otherwise, or make it need no service")
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, sig: int = 15, timeout: float = 15) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.popen.pid, 9)
            self.popen.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_postgres(workdir: Path, logdir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        "postgres",
        [
            "bash",
            "deploy/postgres.sh",
            str(workdir / "pg"),
            str(port),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
        ],
        logdir,
    )
    wait_until(lambda: port_open(port), 60, "Postgres")
    return proc, port


def start_redis(workdir: Path, logdir: Path, tls_password: str | None = None) -> tuple[Proc, int]:
    """Redis on a free port; with tls_password, as Heroku Redis serves it:
    TLS only, a self-signed certificate, a password."""
    port = free_port()
    args = ["bash", "deploy/redis.sh", str(workdir / "redis"), str(port)]
    if tls_password is not None:
        cert, key = workdir / "redis-cert.pem", workdir / "redis-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=redis-test"]
            + ["-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        args += ["--tls-auth-clients", "no", "--requirepass", tls_password]
    proc = Proc("redis", args, logdir)
    wait_until(lambda: port_open(port), 30, "Redis")
    return proc, port


def start_pgbouncer(workdir: Path, logdir: Path, pg_port: int) -> tuple[Proc, int]:
    port = free_port()
    args = ["bash", "deploy/pgbouncer.sh", str(workdir / "pgbouncer"), str(port), str(pg_port)]
    proc = Proc("pgbouncer", args, logdir)
    wait_until(lambda: port_open(port), 30, "PgBouncer")
    return proc, port


def postgres_under_test() -> str:
    """How the tests reach Postgres: TEST_POSTGRES=pgbouncer (transaction
    pooling), else directly."""
    how = os.environ.get("TEST_POSTGRES", "direct")
    if how not in ("direct", "pgbouncer"):
        raise ValueError(f"TEST_POSTGRES must be direct or pgbouncer, not {how!r}")
    return how


def start_rabbitmq(workdir: Path, logdir: Path) -> tuple[Proc, int]:
    port = free_port()
    # Its distribution port free too: the one rabbitmq.sh derives from PORT
    # may be any other process's ephemeral port on a busy machine.
    env = {**os.environ, "RABBITMQ_DIST_PORT": str(free_port())}
    proc = Proc("rabbitmq", ["bash", "deploy/rabbitmq.sh", str(workdir / "rabbitmq"), str(port)], logdir, env)
    wait_until(lambda: port_open(port), 60, "RabbitMQ")
    return proc, port


def broker_under_test() -> str:
    """The broker the tests run against: TEST_BROKER=rabbitmq, else Redis."""
    broker = os.environ.get("TEST_BROKER", "redis")
    if broker not in ("redis", "rabbitmq"):
        raise ValueError(f"TEST_BROKER must be redis or rabbitmq, not {broker!r}")
    return broker


def start_model(logdir: Path, *extra: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc("model", [sys.executable, "-m", "offline_model", "--port", str(port), *extra], logdir)
    wait_until(lambda: port_open(port), 30, "offline model")
    return proc, port


def start_mcp_http(logdir: Path) -> tuple[Proc, int]:
    """The test kit MCP server over streamable HTTP; its URL ends in /mcp."""
    port = free_port()
    proc = Proc("mcp-http", [sys.executable, "-m", "tests.mcp_tools", "--port", str(port)], logdir)
    wait_until(lambda: port_open(port), 30, "MCP HTTP server")
    return proc, port


def mcp_servers(demo_url: str, http_port: int) -> str:
    """MCP_SERVERS for the tests: the bundled SQL server on the demo data, and
    the test kit both over stdio and over HTTP."""
    return json.dumps(
        {
            "mcpServers": {
                "sql": {"command": sys.executable, "args": ["-m", "tasks.mcp.sql"], "env": {"DATABASE_URL": demo_url}},
                "kit": {"command": sys.executable, "args": ["-m", "tests.mcp_tools"], "cwd": str(ROOT)},
                "web": {"url": f"http://127.0.0.1:{http_port}/mcp", "headers": {"X-Test": "1"}},
            }
        }
    )


def procfile_command(process: str, procfile: str = "Procfile") -> str:
    """The command of one process type in the Procfile, as a platform runs it."""
    for line in (ROOT / procfile).read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == process:
            return command.strip()
    raise KeyError(f"no {process!r} process in {procfile}")


def procfile_args(process: str, *extra: str) -> list[str]:
    """Run the Procfile's line through the shell, as a platform does, with
    extra arguments after it (bash execs the one command: signals reach it)."""
    return ["bash", "-c", procfile_command(process) + ' "$@"', process, *extra]


def start_worker(
    logdir: Path, env: dict[str, str], name: str = "worker", concurrency: int = 8, extra: tuple[str, ...] = ()
) -> Proc:
    args = procfile_args("worker", "-n", f"{name}@%h", *extra)
    return Proc(name, args, logdir, {**env, "WORKER_CONCURRENCY": str(concurrency)})


def start_beat(logdir: Path, env: dict[str, str], name: str = "beat") -> Proc:
    return Proc(name, procfile_args("beat", "--schedule", str(logdir / f"{name}-schedule")), logdir, env)


def start_gunicorn(
    logdir: Path, env: dict[str, str], workers: int = 1, app: str | None = None, name: str = "gunicorn"
) -> tuple[Proc, int]:
    """The Procfile's web process; `app`, another WSGI app under the same
    gunicorn settings (the relay benchmark's baseline)."""
    port = free_port()
    if app is None:
        args = procfile_args("web", "-w", str(workers))
    else:
        args = [str(VENV_BIN / "gunicorn"), "-c", "deploy/gunicorn.conf.py", "-w", str(workers), app]
    proc = Proc(name, args, logdir, {**env, "PORT": str(port)})
    wait_until(lambda: port_open(port), 30, "gunicorn")
    return proc, port


@contextlib.contextmanager
def stack(
    prefix: str,
    env_defaults: dict[str, str],
    model_args: tuple[str, ...],
    mcp: bool = True,
    migrate: bool = True,
    redis_tls_password: str | None = None,
) -> Iterator[dict]:
    """Postgres (behind PgBouncer if TEST_POSTGRES says so), Redis, RabbitMQ
    if TEST_BROKER says so, the offline model
    (and the MCP test servers), migrated
    and set in this process's environment until the end; workers and web are
    the caller's."""
    saved_environ = dict(os.environ)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(workdir, 0o755)  # the postgres account must reach its data folder
    logdir = workdir / "logs"
    logdir.mkdir()
    procs: list[Proc] = []
    try:
        pg, pg_port = start_postgres(workdir, logdir)
        procs.append(pg)
        db_port = pg_port
        if postgres_under_test() == "pgbouncer":
            bouncer, db_port = start_pgbouncer(workdir, logdir, pg_port)
            procs.append(bouncer)
        rd, redis_port = start_redis(workdir, logdir, redis_tls_password)
        procs.append(rd)
        model, model_port = start_model(logdir, *model_args)
        procs.append(model)
        broker, broker_port, broker_env = rd, redis_port, {}
        if broker_under_test() == "rabbitmq":
            broker, broker_port = start_rabbitmq(workdir, logdir)
            procs.append(broker)
            broker_env = {"BROKER_URL": f"amqp://guest:guest@127.0.0.1:{broker_port}//"}
        env = {
            **os.environ,
            **env_defaults,
            "DATABASE_URL": f"postgres://turnstream@127.0.0.1:{db_port}/turnstream",
            "REDIS_URL": (
                f"rediss://:{redis_tls_password}@127.0.0.1:{redis_port}/0"
                if redis_tls_password is not None
                else f"redis://127.0.0.1:{redis_port}/0"
            ),
            "OPENAI_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
            # Assistants' endpoints: the same offline model by another name and
            # key, and a server that is not there.
            "MODEL_ENDPOINTS": json.dumps(
                {
                    "second": {"base_url": f"http://127.0.0.1:{model_port}/v1", "api_key": "second-key"},
                    "nowhere": {"base_url": f"http://127.0.0.1:{free_port()}/v1"},
                }
            ),
            # The venv's commands, as a platform's PATH has its Python's: the
            # Procfile's lines find celery and gunicorn there.
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "MCP_SERVERS": "",
            **broker_env,
        }
        wait_until(lambda: port_open(pg_port), 30, "Postgres")
        demo_url = None
        if mcp:
            from tasks.mcp.sql import make_demo

            mcp_http, mcp_port = start_mcp_http(logdir)
            procs.append(mcp_http)
            demo_url = wait_until(
                lambda: make_demo(f"postgresql://turnstream@127.0.0.1:{pg_port}/turnstream_demo"), 30, "demo database"
            )
            env["MCP_SERVERS"] = mcp_servers(demo_url, mcp_port)
        os.environ.update(env)
        reset_process_singletons()
        from shared.migrate import upgrade

        wait_until(_db_ready, 30, "Postgres accepting connections")
        if migrate:
            upgrade()
        yield {
            "env": env,
            "workdir": workdir,
            "logdir": logdir,
            "procs": procs,
            "postgres": pg,
            "redis": rd,
            "broker": broker,  # Redis, or RabbitMQ with TEST_BROKER=rabbitmq
            "broker_port": broker_port,
            "model_port": model_port,
            "redis_port": redis_port,
            "pg_port": pg_port,
            "db_port": db_port,  # DATABASE_URL's: PgBouncer's with TEST_POSTGRES=pgbouncer, else Postgres's
            "demo_url": demo_url,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()
        # The data (about 70 MB of Postgres per stack) goes; the logs stay.
        for data in ("pg", "redis", "rabbitmq", "pgbouncer"):
            shutil.rmtree(workdir / data, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved_environ)
        reset_process_singletons()


def reset_process_singletons() -> None:
    from shared import broker, config, db, events, redis
    from tasks import model, tools

    config.use_settings(None)
    for fn in (
        db.get_engine,
        db.autocommit_engine,
        db._sessionmaker,
        redis.get_redis,
        broker.get_celery,
        broker._sender_producer,
        model.get_client,
        tools.get_toolbox,
        events.get_publisher,
        events._append_script,
    ):
        fn.cache_clear()


def _db_ready() -> bool:
    from sqlalchemy import text

    from shared.db import get_engine

    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))
    return True


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return sorted(found)


def wait_for_worker(worker: Proc) -> None:
    from shared.broker import get_celery

    def ready():
        if worker.popen.poll() is not None:
            raise RuntimeError(f"{worker.name} exited:\n" + worker.log_tail())
        replies = get_celery().control.ping(timeout=0.5)
        return any(name.startswith(f"{worker.name}@") for reply in replies for name in reply)

    wait_until(ready, 60, "Celery worker")


@contextlib.contextmanager
def sole_worker(stack: dict, name: str, settings: dict[str, str], concurrency: int) -> Iterator[Proc]:
    """A worker of its own, with these settings, the only one taking turns
    while it lasts: the session's worker stops consuming them meanwhile."""
    from shared.broker import get_celery

    control = get_celery().control
    session_worker = next(node for reply in control.ping(timeout=1) for node in reply if node.startswith("worker@"))
    control.cancel_consumer("turns", destination=[session_worker], reply=True)
    worker = None
    try:
        worker = start_worker(stack["logdir"], {**stack["env"], **settings}, name, concurrency=concurrency)
        wait_for_worker(worker)
        yield worker
    finally:
        control.add_consumer("turns", destination=[session_worker], reply=True)
        if worker is not None:
            worker.stop()
