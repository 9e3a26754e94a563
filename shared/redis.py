"""The process's Redis client, built on first use, and the `Batcher` that
lets many callers share its round trips."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
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


class Batcher:
    """Work handed in by many threads (greenlets under gevent) and done in
    batches, in the order it came: `handle` gets a batch of items and
    returns one result (or exception) per item.

    Nothing waits for a batch to fill. An item submitted `inline` that
    finds nothing queued or in flight is handled at once by its caller: a
    lone caller pays no hand-off to another thread (which, in a busy
    process, first waits for the interpreter lock). Other items, and items
    that come while a batch is in flight, queue up, and the batcher's own
    thread handles them together, after it. That thread is long-lived, so
    per-thread state (Celery's, under gevent, is per greenlet) is built once.
    """

    def __init__(
        self,
        handle: Callable[[list], list],
        name: str,
        max_batch: int = 500,
        prepare: Callable[[list], list] | None = None,
    ) -> None:
        self.handle = handle
        self.name = name
        self.max_batch = max_batch
        # Rewrites a batch of (item, future or None) before it is handled.
        self.prepare = prepare
        self._queue: queue.SimpleQueue[tuple[Any, Future | None]] = queue.SimpleQueue()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self._handling = threading.Lock()  # held while a batch is handled: one at a time, in order
        self._count = threading.Lock()
        self._pending = 0  # items queued or being handled
        # Figures for tests and benchmarks (racy by a count or two across threads).
        self.submitted = self.handled = self.batches = 0

    def submit(self, item: Any, wait: bool = True, inline: bool = False) -> Any:
        """Hand in an item; with `wait`, its result (or raise its exception).
        An item not waited for keeps its exception to itself (`handle`
        records it where its caller will look). `inline`: the caller may
        handle it, if the batcher is idle (for a caller that waits anyway,
        or whose next step is quick)."""
        self.submitted += 1
        with self._count:
            idle = self._pending == 0
            self._pending += 1
        if inline and idle:
            try:
                with self._handling:
                    result = self._handle([item])[0]
            finally:
                self._done(1)
            if wait and isinstance(result, Exception):
                raise result
            return result if wait else None
        if self._thread is None:
            with self._start:  # started on first use: a forked process gets its own
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                    self._thread.start()
        future = Future() if wait else None
        self._queue.put((item, future))
        return future.result() if future is not None else None

    def _handle(self, items: list) -> list:
        try:
            results = self.handle(items)
        except Exception as exc:  # noqa: BLE001 - each caller gets the error; the batcher lives on
            results = [exc] * len(items)
        self.batches += 1
        self.handled += len(items)
        return results

    def _done(self, n: int) -> None:
        with self._count:
            self._pending -= n

    def _run(self) -> None:
        while True:
            taken = take_batch(self._queue, self.max_batch)
            batch = self.prepare(taken) if self.prepare is not None else taken
            try:
                with self._handling:
                    results = self._handle([item for item, _future in batch])
            finally:
                self._done(len(taken))
            for (_item, future), result in zip(batch, results, strict=True):
                if future is None:
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class Pipelined(redis.Redis):
    """A client whose commands, from any number of greenlets, go to Redis
    together: a command that finds the client idle goes at once, and a
    `Batcher` sends whatever queued meanwhile as one pipeline and hands each
    caller its reply.

    A gevent process runs thousands of streams over a few connections. A
    command holding a pooled connection holds it until its greenlet runs
    again, after every other runnable greenlet: in a connect storm of 10,000
    streams that made each connection serve one command per scheduler pass,
    and most streams gave up waiting for one. Batched, a pass serves every
    command queued."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batcher = Batcher(self._send, "redis-pipelined")

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return self.batcher.submit((args, options), inline=True)

    def _send(self, commands: list[tuple[tuple, dict]]) -> list:
        pipe = self.pipeline(transaction=False)
        for args, options in commands:
            pipe.execute_command(*args, **options)
        return pipe.execute(raise_on_error=False)


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
