"""Sends the turns that wait for a model endpoint again when they are due.

A turn whose endpoint's breaker is open waits in the queue with no message
sent (shared/breakers.py keeps it among the breaker's waiting turns, by when
it is to try again). The probe that closes the breaker sends them all at
once; until then this thread, one per worker process and asleep unless a
turn of this process waits, sends each when it is due, and so the first of
them to come due after the cool-down is the probe. Turns whose worker died
meanwhile are the sweeper's: their sent mark runs out.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import redis

from shared.breakers import Breaker
from shared.broker import send_turns

log = logging.getLogger(__name__)


class Waker:
    def __init__(self) -> None:
        self._due: dict[Breaker, float] = {}  # the earliest time (monotonic) a turn of each is due
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def at(self, breaker: Breaker, seconds: float) -> None:
        """A turn waits on `breaker` for `seconds`."""
        when = time.monotonic() + max(seconds, 0.0)
        with self._changed:
            if when < self._due.get(breaker, float("inf")):
                self._due[breaker] = when
                self._changed.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="breaker-waker", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                breaker, when = self._next()
                if time.monotonic() < when:
                    self._changed.wait(when - time.monotonic())
                    continue
                del self._due[breaker]
            try:
                turns, next_in = breaker.due()
            except redis.RedisError as exc:
                log.warning("could not take the turns waiting on %s: %s", breaker.describe(), exc)
                self.at(breaker, 1.0)
                continue
            send_turns(turns)
            if next_in is not None:
                self.at(breaker, next_in)

    def _next(self) -> tuple[Breaker, float]:
        while not self._due:
            self._changed.wait()
        return min(self._due.items(), key=lambda item: item[1])


@functools.cache
def get_waker() -> Waker:
    return Waker()
