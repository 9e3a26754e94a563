"""`Batcher`: work from many threads (greenlets under gevent) done in
batches, for the Redis clients that share round trips (the web's commands,
the worker's events, task sends)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


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
