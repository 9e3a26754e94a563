"""The process's Redis client, built on first use."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any

import redis
from gevent import monkey

from shared.config import get_settings

log = logging.getLogger(__name__)


OPTIONS = {"health_check_interval": 30, "socket_connect_timeout": 5, "socket_keepalive": True}


@functools.cache
def get_redis() -> redis.Redis:
    """The process's client, over at most REDIS_POOL_SIZE connections: callers
    beyond that wait for one, so a web process holds a few connections
    whatever its number of streams. Under gevent (the web process) its
    commands are pipelined together (`Pipelined`)."""
    settings = get_settings()
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_pool_size, timeout=10, **OPTIONS
    )
    client_class = Pipelined if monkey.is_module_patched("socket") else redis.Redis
    return client_class(connection_pool=pool)


def take_batch(source: queue.SimpleQueue, most: int) -> list:
    """Wait for one item, then take whatever else is queued already."""
    batch = [source.get()]
    try:
        while len(batch) < most:
            batch.append(source.get_nowait())
    except queue.Empty:
        pass
    return batch


class Pipelined(redis.Redis):
    """A client whose commands, from any number of greenlets, go to Redis
    together: one sender takes whatever is queued, sends it as one pipeline
    and hands each caller its reply.

    A gevent process runs thousands of streams over a few connections. A
    command holding a pooled connection holds it until its greenlet runs
    again, after every other runnable greenlet: in a connect storm of 10,000
    streams that made each connection serve one command per scheduler pass,
    and most streams gave up waiting for one. Batched, a pass serves every
    command queued."""

    MAX_BATCH = 500

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._queue: queue.SimpleQueue[tuple[tuple, dict, Future]] = queue.SimpleQueue()
        self._start = threading.Lock()
        self._sender: threading.Thread | None = None
        self.commands = self.batches = 0  # figures for tests and benchmarks

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if self._sender is None:
            with self._start:
                if self._sender is None:
                    self._sender = threading.Thread(target=self._send, name="redis-pipelined", daemon=True)
                    self._sender.start()
        future: Future = Future()
        self._queue.put((args, options, future))
        return future.result()

    def _send(self) -> None:
        while True:
            batch = take_batch(self._queue, self.MAX_BATCH)
            self.commands += len(batch)
            self.batches += 1
            try:
                pipe = self.pipeline(transaction=False)
                for args, options, _future in batch:
                    pipe.execute_command(*args, **options)
                replies = pipe.execute(raise_on_error=False)
            except Exception as exc:  # noqa: BLE001 - each caller gets the error; the sender lives on
                replies = [exc] * len(batch)
            for (_args, _options, future), reply in zip(batch, replies, strict=True):
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)


def new_redis() -> redis.Redis:
    """A client of its own, for a connection held for good (the relay's
    Pub/Sub). RESP2: a message is a plain reply there, where RESP3 (redis-py's
    default) sends each through its push-notification handlers. No read
    timeout: a quiet channel is not a dead connection (keepalive finds those)."""
    return redis.Redis.from_url(get_settings().redis_url, protocol=2, socket_timeout=None, **OPTIONS)


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
