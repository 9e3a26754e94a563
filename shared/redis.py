"""The process's Redis clients, built on first use, and its keys."""

from __future__ import annotations

import functools
import logging
import socket

import redis
from gevent import monkey

from shared import overrides
from shared.config import DEAD_SERVER_SECONDS, KEEPALIVE_COUNT, KEEPALIVE_INTERVAL_SECONDS, get_settings

log = logging.getLogger(__name__)


# A command on a connection to a Redis gone without a word fails after
# DEAD_SERVER_SECONDS, and the client's next connection finds the server the
# name points at now (shared/config.py says why). The broker's connections
# (kombu's) get the same options.
TCP_OPTIONS = {
    socket.TCP_USER_TIMEOUT: DEAD_SERVER_SECONDS * 1000,  # ms
    socket.TCP_KEEPIDLE: DEAD_SERVER_SECONDS,
    socket.TCP_KEEPINTVL: KEEPALIVE_INTERVAL_SECONDS,
    socket.TCP_KEEPCNT: KEEPALIVE_COUNT,
}
OPTIONS = {
    "health_check_interval": 30,
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    "socket_keepalive_options": TCP_OPTIONS,
}


@functools.cache
def get_redis() -> redis.Redis:
    """The process's client, over at most REDIS_POOL_SIZE connections: callers
    beyond that wait for one, so a web process holds a few connections
    whatever its number of streams. Under gevent (the web process) its
    commands are pipelined together (shared/overrides/redis_pipelined.py)."""
    settings = get_settings()
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_pool_size, timeout=10, **OPTIONS
    )
    if monkey.is_module_patched("socket") and overrides.enabled("redis_pipelined"):
        from shared.overrides.redis_pipelined import Pipelined

        return Pipelined(connection_pool=pool)
    return redis.Redis(connection_pool=pool)


def new_redis() -> redis.Redis:
    """A client of its own, for the one connection it holds for good (the
    relay's Pub/Sub; a command sent on it besides fails rather than opens
    another). RESP2: a message is a plain reply there, where RESP3 (redis-py's
    default) sends each through its push-notification handlers. No read
    timeout: a quiet channel is not a dead connection (TCP_OPTIONS' keepalive finds those)."""
    url = get_settings().redis_url
    return redis.Redis.from_url(url, protocol=2, socket_timeout=None, max_connections=1, **OPTIONS)


def key(*parts: str) -> str:
    """A Redis key under the configured prefix: key("turn", id, "events")."""
    return get_settings().redis_prefix + ":".join(parts)


def check_eviction_policy() -> None:
    """Warn unless Redis refuses writes when full (`noeviction`): it holds the
    queue and the event logs, and evicting either loses turns or events."""
    try:
        policy = get_redis().config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError:  # CONFIG is disabled on many hosted Redis plans
        return
    except redis.RedisError as exc:
        log.warning("could not check Redis's maxmemory-policy: %s", exc)
        return
    if policy != "noeviction":
        log.warning("Redis maxmemory-policy is %r; set it to noeviction, or queued turns may be evicted", policy)
