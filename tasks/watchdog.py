"""Restart a worker whose Celery consumer went quiet.

Celery's Redis consumer can stay connected yet never take a message again
after the broker came back from a restart (reported as celery/celery#8091,
#9054 and #10302; this project's Redis chaos test met it once on a loaded CI
machine, and not in eight runs here). The process looks healthy, so nothing
restarts it, and every turn waits. This watch notices the state that cannot
happen otherwise: messages waiting in the queue, threads free, and nothing
received for WORKER_STALL_SECONDS. It then hands back the turns it runs and
exits with a failure, for the process manager to start a new worker (Heroku
restarts a crashed dyno; systemd with `Restart=always`; Kubernetes'
restartPolicy).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.signals import task_received
from celery.worker import state

from shared.config import get_settings
from shared.redis import get_redis, key

log = logging.getLogger(__name__)


class ConsumerWatch:
    def __init__(
        self,
        queue: str,
        threads: int,
        stall_seconds: float,
        on_stall: Callable[[], Any],
        consuming: Callable[[], bool] = lambda: True,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self.queue_key = key(queue)  # kombu's global_keyprefix + the queue name
        self.threads = threads
        self.stall_seconds = stall_seconds
        self.on_stall = on_stall
        self.consuming = consuming  # False while an operator cancelled the queue's consumer
        self.exit = exit
        self.quiet_since = time.monotonic()
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="consumer-watch", daemon=True).start()

    def reset(self) -> None:
        """A message arrived (or the quiet has a reason): count from now."""
        self.quiet_since = time.monotonic()

    def stalled(self, waiting: int, reserved: int) -> bool:
        quiet = time.monotonic() - self.quiet_since
        return waiting > 0 and reserved < self.threads and quiet > self.stall_seconds

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(min(5.0, self.stall_seconds / 2)):
            if not self.consuming():
                self.reset()  # paused on purpose: count from when it resumes
                continue
            try:
                waiting = get_redis().llen(self.queue_key)
            except redis.RedisError:
                self.reset()  # Redis is away: give the consumer time to reconnect once it is back
                continue
            reserved = len(state.reserved_requests)
            if self.stalled(waiting, reserved):
                log.error(
                    "no message taken for %.0f s while %d wait and %d of %d threads are free: "
                    "the consumer is stuck; handing back running turns and exiting for a restart",
                    time.monotonic() - self.quiet_since,
                    waiting,
                    self.threads - reserved,
                    self.threads,
                )
                self.on_stall()
                self.exit(1)  # not SystemExit: a stuck consumer may not shut down cleanly
                return


_watch: ConsumerWatch | None = None


def watch_consumer(consumer: Any, on_stall: Callable[[], Any]) -> None:
    """Start watching a worker's consumer (the sender of `worker_ready`):
    with Redis as the broker, whose consumer is the one seen stuck."""
    global _watch
    if get_settings().rabbitmq:
        return
    queue = consumer.app.conf.task_default_queue

    def consuming() -> bool:
        tasks = consumer.task_consumer  # replaced on every reconnect
        return tasks is None or any(q.name == queue for q in tasks.queues)

    stall = get_settings().worker_stall_seconds
    log.info(
        "watching the consumer of queue %r (consuming: %s): stuck after %.0f s without a message",
        queue,
        consuming(),  # here first, so a fault in it shows at start-up
        stall,
    )
    _watch = ConsumerWatch(queue, consumer.pool.limit, stall, on_stall, consuming)


@task_received.connect
def _note_received(**_: Any) -> None:
    if _watch is not None:
        _watch.reset()
