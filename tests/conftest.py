"""Real services for the whole test session: Postgres, Redis, the offline
model, a Celery worker subprocess and (for streaming) gunicorn -k gevent.

Tests isolate by data, not by rollback: each test makes its own owner, so
the worker (another process) sees committed rows and no test sees another's.
"""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

from shared.turn_states import ENDED
from tests import services

# Settings the test session runs with; nothing is read until a fixture asks.
TEST_ENV = {
    "TURNSTREAM_ENV": "development",
    "AUTH": "on",
    "REDIS_PREFIX": "test:",
    "OPENAI_API_KEY": "offline",
    "OPENAI_MAX_RETRIES": "2",
    "OPENAI_TIMEOUT": "10",
    "SSE_PING_SECONDS": "1",
    "CHAT_WAIT_SECONDS": "20",
    "SECRET_KEY": "test-secret-" + "x" * 32,
    "KEY_CACHE_SECONDS": "1",
    "TOOL_TIMEOUT_SECONDS": "2",
    "MAX_TOOL_ROUNDS": "3",
    "HEARTBEAT_SECONDS": "0.5",
    "STALE_RUNNING_SECONDS": "2",
    # The suite sends far more than a person would from one address and key;
    # tests/test_limits.py turns limits on in apps of its own.
    "RATE_LIMITS": "off",
    # Tests make the model and the tools fail on purpose, many in a row:
    # breakers would open and hold the next tests' turns. tests/test_breakers.py
    # runs them on a stack of its own.
    "BREAKER_MIN_FAILURES": "1000000",
    # and a turn whose model failed fails at once, with the model's error,
    # rather than wait in the queue for it to come back.
    "MODEL_WAIT_SECONDS": "0",
    "MAX_STREAMS_PER_OWNER": "100000",
    "MAX_ACTIVE_TURNS_PER_OWNER": "100000",
    # Many workers and beats share this machine: each that exports its
    # metrics is given a port of its own.
    "WORKER_METRICS_PORT": "0",
    "BEAT_METRICS_PORT": "0",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test marked fast must need no service: one that asks for them is
    refused before anything runs (one that starts its own fails at its
    first process, tests/services.py)."""
    for item in items:
        if item.get_closest_marker("fast") and "stack" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} is marked fast but uses the services (the stack fixture)")


@pytest.fixture(scope="session")
def stack():
    """Start every service once; yields the environment the processes share."""
    model_args = ("--first-token-delay", "0", "--token-delay", "0.002")
    with services.stack("turnstream-test-", TEST_ENV, model_args) as info:
        info["worker_metrics_port"] = services.free_port()
        worker = services.start_worker(
            info["logdir"], {**info["env"], "WORKER_METRICS_PORT": str(info["worker_metrics_port"])}
        )
        info["procs"].append(worker)
        services.wait_for_worker(worker)
        info["worker"] = worker
        yield info


@pytest.fixture(scope="session")
def app(stack):
    from web import create_app

    app = create_app()
    yield app
    app.extensions["turnstream.relay"].close()


@pytest.fixture
def new_relay(stack):
    """Relays of their own (a web process's hub), closed after the test."""
    from shared.redis import new_redis
    from web.relay.hub import Relay

    made = []

    def make(ping_seconds: float = 30):
        made.append(Relay(new_redis, ping_seconds))
        return made[-1]

    yield make
    for relay in made:
        relay.close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def owner(stack):
    """A fresh owner with an API key; returns request headers for it."""
    return new_owner()


@pytest.fixture
def fresh_database(stack, request):
    """A database of its own on the stack's Postgres, at no revision, named
    after the test: (its URL for psycopg, the environment naming it)."""
    import psycopg

    name = "fresh_" + re.sub(r"\W", "_", request.node.name.lower())[:50]
    base = f"postgresql://turnstream@127.0.0.1:{stack['db_port']}"
    with psycopg.connect(f"{base}/turnstream", autocommit=True) as db:
        db.execute(f"DROP DATABASE IF EXISTS {name}")
        db.execute(f"CREATE DATABASE {name}")
    yield (
        f"{base}/{name}",
        {**stack["env"], "DATABASE_URL": f"postgres://turnstream@127.0.0.1:{stack['db_port']}/{name}"},
    )
    with psycopg.connect(f"{base}/turnstream", autocommit=True) as db:
        db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def new_owner(label: str = "owner") -> dict:
    """Request headers for a fresh owner's new API key (on the stack in use)."""
    from web.auth import create_key

    return {"Authorization": f"Bearer {create_key(f'{label}-{uuid.uuid4().hex[:12]}')}"}


@pytest.fixture(scope="session")
def web_server(stack):
    """A real gunicorn -k gevent serving the app; yields its base URL."""
    proc, port = services.start_gunicorn(stack["logdir"], stack["env"])
    stack["procs"].append(proc)
    base = f"http://127.0.0.1:{port}"
    services.wait_until(lambda: httpx.get(f"{base}/api/health", timeout=2).status_code == 200, 30, "web")
    yield base
    proc.stop()


@pytest.fixture(scope="session")
def library_web_server(stack):
    """The same gunicorn with every override of a library's internals off
    (LIBRARY_OVERRIDES=none): the relay reads through redis-py's PubSub and
    writes every frame through the response."""
    proc, port = services.start_gunicorn(stack["logdir"], {**stack["env"], "LIBRARY_OVERRIDES": "none"}, name="web-lib")
    stack["procs"].append(proc)
    base = f"http://127.0.0.1:{port}"
    services.wait_until(lambda: httpx.get(f"{base}/api/health", timeout=2).status_code == 200, 30, "web")
    yield base
    proc.stop()


@pytest.fixture(params=["overrides", "library"])
def any_web_server(request):
    """Each web server in turn: the session's (with the overrides, unless LIBRARY_OVERRIDES
    says otherwise), and one with none."""
    name = "web_server" if request.param == "overrides" else "library_web_server"
    return request.param, request.getfixturevalue(name)


@pytest.fixture
def http(web_server):
    with httpx.Client(base_url=web_server, timeout=30) as c:
        yield c


def wait_turn(client, headers: dict, turn_id: str, timeout: float = 30) -> dict:
    """Poll a turn until it reaches a terminal state and its log holds the
    terminal event (appended just after the end commits, so Postgres can
    say it first); returns its JSON."""
    from shared.events import EventLog

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        turn = client.get(f"/api/turns/{turn_id}", headers=headers).get_json()
        if turn["status"] in ENDED:
            end = EventLog("turn", turn_id).last_event()
            if end is not None and end.ending:
                return turn
        time.sleep(0.05)
    raise AssertionError(f"turn {turn_id} did not finish, with its terminal event logged, in {timeout}s: {turn}")
