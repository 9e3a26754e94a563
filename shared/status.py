"""What is up and what is not, said so a person knows what to check.

Postgres and Redis: where each is (host and port, from the settings) and a
one-line description of a failure to reach it, naming the setting, for the
CLI, the worker's start and the health check. The model and the MCP tool
servers: what the workers last saw of them, kept in Redis (they are reached
from the workers only) for web's `/api/info`, health and the chat page.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import kombu.exceptions
import psycopg
import redis
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from shared.config import get_settings
from shared.redis import get_redis, key

log = logging.getLogger(__name__)

# Errors that mean a dependency could not be reached (not a bug of ours).
POSTGRES_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)


def postgres_location() -> str:
    url = make_url(get_settings().database_url)
    return f"{url.host or 'localhost'}:{url.port or 5432}"


def location(url: str) -> str:
    """host:port of a Redis or RabbitMQ URL (a socket's path for unix://)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or (5672 if parts.scheme.startswith('amqp') else 6379)}"


def describe_outage(exc: BaseException) -> str | None:
    """One line for an error reaching Postgres, Redis or RabbitMQ: where,
    the setting, and the reason; None for any other error."""
    settings = get_settings()
    if isinstance(exc, POSTGRES_ERRORS):
        return f"could not reach Postgres at {postgres_location()} (DATABASE_URL): {_reason(exc)}"
    if isinstance(exc, kombu.exceptions.OperationalError) and settings.rabbitmq:
        return f"could not reach RabbitMQ at {location(settings.broker_url)} (BROKER_URL): {_reason(exc)}"
    if isinstance(exc, REDIS_ERRORS):
        return f"could not reach Redis at {location(settings.redis_url)} (REDIS_URL): {_reason(exc)}"
    return None


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    reason = lines[0] if lines else type(inner).__name__
    return reason if len(reason) <= 200 else reason[:199] + "…"


# What the workers last saw. Hashes, so each side writes only its part.
def _model_key() -> str:
    return key("status", "model")


def _tools_key() -> str:
    return key("status", "tools")


def _workers_key() -> str:
    return key("status", "workers")


def record_model(**fields: Any) -> None:
    """Merge what a worker saw of the model (ok, error, offline) into its status."""
    values = {name: json.dumps(value) for name, value in fields.items()}
    values["at"] = json.dumps(time.time())
    _best_effort(lambda: get_redis().hset(_model_key(), mapping=values), "the model's")


def record_tool_server(name: str, error: str | None, tools: int = 0) -> None:
    """A worker opened a tool server (error None, with its number of tools) or failed to."""
    status = json.dumps({"ok": error is None, "error": error, "tools": tools, "at": time.time()})
    _best_effort(lambda: get_redis().hset(_tools_key(), name, status), f"MCP server {name!r}'s")


def _best_effort(write: Callable[[], object], whose: str) -> None:
    """A status is for people to read: a turn never fails because Redis could not take it."""
    try:
        write()
    except REDIS_ERRORS as exc:
        log.warning("could not record %s status: %s", whose, exc)


def model_status() -> dict[str, Any] | None:
    """{ok, error, offline, at} as the workers last saw the model, or None if none has said."""
    raw = get_redis().hgetall(_model_key())
    return {k.decode(): json.loads(v) for k, v in raw.items()} or None


def tool_status(configured: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Each configured tool server's status as a worker last saw it: {ok, error, tools, at},
    or ok None for a server no worker has opened yet."""
    seen = {k.decode(): json.loads(v) for k, v in get_redis().hgetall(_tools_key()).items()}
    unknown = {"ok": None, "error": None, "tools": 0, "at": None}
    return {name: seen.get(name, unknown) for name in configured}


def record_worker(name: str) -> None:
    """A worker process is alive (its heartbeat, every HEARTBEAT_SECONDS);
    entries older than STALE_RUNNING_SECONDS are dropped as it writes."""
    now = time.time()

    def write() -> None:
        pipe = get_redis().pipeline(transaction=False)
        pipe.zadd(_workers_key(), {name: now})
        pipe.zremrangebyscore(_workers_key(), "-inf", now - get_settings().stale_running_seconds)
        pipe.execute()

    _best_effort(write, "a worker's")


def workers_alive() -> int:
    """Worker processes that beat within STALE_RUNNING_SECONDS: one cheap
    read, where asking the workers (a Celery broadcast) waits for replies."""
    return get_redis().zcount(_workers_key(), time.time() - get_settings().stale_running_seconds, "+inf")
