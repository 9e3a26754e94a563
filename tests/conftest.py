"""Real services for the whole test session: Postgres, Redis, the offline
model, a Celery worker subprocess and (for streaming) gunicorn -k gevent.

Tests isolate by data, not by rollback: each test makes its own owner, so
the worker (another process) sees committed rows and no test sees another's.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests import services

# Settings the test session runs with; nothing is read until a fixture asks.
_ENV_DEFAULTS = {
    "TURNSTREAM_ENV": "development",
    "AUTH": "on",
    "REDIS_PREFIX": "test:",
    "OPENAI_API_KEY": "offline",
    "OPENAI_MAX_RETRIES": "2",
    "OPENAI_TIMEOUT": "10",
    "SSE_PING_SECONDS": "1",
    "CHAT_WAIT_SECONDS": "20",
    "SECRET_KEY": "test-secret",
    "TOOL_TIMEOUT_SECONDS": "2",
    "MAX_TOOL_ROUNDS": "3",
}


@pytest.fixture(scope="session")
def stack():
    """Start every service once; yields the environment the processes share."""
    workdir = Path(tempfile.mkdtemp(prefix="turnstream-test-"))
    os.chmod(workdir, 0o755)  # the postgres account must reach its data folder
    logdir = workdir / "logs"
    logdir.mkdir()
    procs: list[services.Proc] = []
    try:
        pg, pg_port = services.start_postgres(workdir, logdir)
        procs.append(pg)
        rd, redis_port = services.start_redis(workdir, logdir)
        procs.append(rd)
        model, model_port = services.start_model(logdir, "--first-token-delay", "0", "--token-delay", "0.002")
        procs.append(model)
        mcp_http, mcp_port = services.start_mcp_http(logdir)
        procs.append(mcp_http)
        database_url = f"postgres://turnstream@127.0.0.1:{pg_port}/turnstream"
        services.wait_until(lambda: services.port_open(pg_port), 30, "Postgres")
        from tasks.mcp.sql import make_demo

        demo_url = services.wait_until(
            lambda: make_demo(f"postgresql://turnstream@127.0.0.1:{pg_port}/turnstream_demo"), 30, "demo database"
        )
        env = {
            **os.environ,
            **_ENV_DEFAULTS,
            "DATABASE_URL": database_url,
            "MCP_SERVERS": services.mcp_servers(demo_url, mcp_port),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
            "PYTHONPATH": str(services.ROOT),
        }
        os.environ.update(env)
        _reset_process_singletons()
        from shared.migrate import upgrade

        services.wait_until(_db_ready, 30, "Postgres accepting connections")
        upgrade()
        worker = services.start_worker(logdir, env)
        procs.append(worker)
        _wait_for_worker(worker)
        yield {
            "env": env,
            "workdir": workdir,
            "logdir": logdir,
            "procs": procs,
            "model_port": model_port,
            "redis_port": redis_port,
            "worker": worker,
            "pg_port": pg_port,
            "demo_url": demo_url,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def _reset_process_singletons() -> None:
    from shared import broker, config, db, redis
    from tasks import model, tools

    for fn in (
        config.get_settings,
        db.get_engine,
        db._sessionmaker,
        redis.get_redis,
        broker.get_celery,
        model.get_client,
        tools.get_toolbox,
    ):
        fn.cache_clear()


def _db_ready() -> bool:
    from sqlalchemy import text

    from shared.db import get_engine

    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))
    return True


def _wait_for_worker(worker: services.Proc) -> None:
    from shared.broker import get_celery

    def ready():
        if worker.popen.poll() is not None:
            raise RuntimeError("worker exited:\n" + worker.log_tail())
        return get_celery().control.ping(timeout=0.5)

    services.wait_until(ready, 60, "Celery worker")


@pytest.fixture(scope="session")
def app(stack):
    from web import create_app

    return create_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def owner(stack):
    """A fresh owner with an API key; returns request headers for it."""
    from web.auth import create_key

    key = create_key(f"owner-{uuid.uuid4().hex[:12]}")
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def web_server(stack):
    """A real gunicorn -k gevent serving the app; yields its base URL."""
    proc, port = services.start_gunicorn(stack["logdir"], stack["env"])
    stack["procs"].append(proc)
    base = f"http://127.0.0.1:{port}"
    services.wait_until(lambda: httpx.get(f"{base}/api/health", timeout=2).status_code == 200, 30, "web")
    yield base
    proc.stop()


@pytest.fixture
def http(web_server):
    with httpx.Client(base_url=web_server, timeout=30) as c:
        yield c


def wait_turn(client, headers: dict, turn_id: str, timeout: float = 30) -> dict:
    """Poll a turn until it reaches a terminal state; returns its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        turn = client.get(f"/api/turns/{turn_id}", headers=headers).get_json()
        if turn["status"] in ("succeeded", "failed", "cancelled"):
            return turn
        time.sleep(0.05)
    raise AssertionError(f"turn {turn_id} did not finish in {timeout}s: {turn}")
