"""The process's Redis client, built on first use."""

from __future__ import annotations

import functools

import redis

from shared.config import get_settings


@functools.cache
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_keepalive=True,
    )


def key(*parts: str) -> str:
    """A Redis key under the configured prefix: key("turn", id, "events")."""
    return get_settings().redis_prefix + ":".join(parts)
