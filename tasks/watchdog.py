"""Restart a worker whose Celery consumer went quiet.

Celery's Redis consumer can stay connected yet never take a message again
after the broker came back from a restart (reported as celery/celery#8091,
#9054 and #10302; rare, and not reproducible on demand, so this watches for
its effect rather than fixing a cause); on RabbitMQ a worker's consumer can
stop taking messages under a flood of them when publisher confirms are on
the connections its threads share (shared/broker.py keeps those to the
sender's own). The process looks healthy, so nothing restarts it, and every
turn waits. This watch notices the state that cannot happen otherwise:
messages waiting in the queue, threads free, and nothing received for
WORKER_STALL_SECONDS. It then hands back the turns it runs and exits with a
failure, for the process manager to start a new worker (Heroku restarts a
crashed dyno; systemd with `Restart=always`; Kubernetes' restartPolicy). The
worker starts it once its consumer is ready, and tells it of every message
received (tasks/worker.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.worker import state

from shared.config import get_settings
from shared.redis import get_redis, key

log = logging.getLogger(__name__)


class ConsumerWatch:
    def __init__(
        self,
        waiting: Callable[[], int],
        threads: int,
        stall_seconds: float,
        on_stall: Callable[[], Any],
        consuming: Callable[[], bool] = lambda: True,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self.waiting = waiting  # how many messages wait in the queue (waiting_messages)
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
            asked = time.monotonic()
            try:
                waiting = self.waiting()
            except Exception as exc:  # noqa: BLE001 - never restart a worker for the watch's own failure
                log.debug("could not count the waiting messages: %s", exc)
                self.reset()  # the broker is away: give the consumer time to reconnect once it is back
                continue
            if time.monotonic() - asked > 1:
                self.reset()  # the broker was slow to answer: the consumer too may have waited on it
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


def waiting_messages(app: Celery, queue: str) -> Callable[[], int]:
    """A count of the messages waiting in a queue, read apart from the
    consumer: the length of its list in Redis; on RabbitMQ, the queue's
    ready messages (not those delivered and unacknowledged), from a passive
    declare on a connection of the count's own, opened again after a failure."""
    if not get_settings().rabbitmq:
        name = key(queue)  # kombu's global_keyprefix + the queue name
        return lambda: get_redis().llen(name)
    held: list = []

    def count() -> int:
        if not held:
            held.append(app.connection_for_read())
        conn = held[0]
        try:
            if len(held) == 1:
                conn.connect()  # one try: a broker away is an error here, not a wait
                held.append(conn.channel())
            return held[1].queue_declare(queue, passive=True).message_count
        except Exception:
            held.clear()
            conn.release()
            raise

    return count
