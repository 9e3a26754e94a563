"""Heartbeats of the turns a worker process runs.

Every running turn has a key in Redis (`shared.recovery.alive_key`) that
this process sets every HEARTBEAT_SECONDS and that expires after
STALE_RUNNING_SECONDS. A worker that dies (SIGKILL, a lost machine) stops
refreshing, and the sweeper hands its turns back to the queue. Until the
first beat after a claim, the claim's time (`claimed_at`) stands for it:
the sweeper leaves a turn claimed less than STALE_RUNNING_SECONDS ago alone.

The same beat asks Postgres whether each attempt still owns its turn. One
that does not (the sweeper or an operator re-queued it) is stopped like a
cancelled one; its finish then writes nothing, since the guard on the attempt
number fails. So two attempts of a turn never stream for long side by side.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time

import kombu.exceptions
import redis
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from shared.config import get_settings
from shared.db import transaction
from shared.events import EventLog
from shared.models import Turn
from shared.recovery import alive_key, requeue_turn
from shared.redis import get_redis
from shared.status import record_worker
from shared.turn_states import QUEUED

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self) -> None:
        self._runs: dict[tuple[str, int], EventLog] = {}  # (turn id, attempt) -> its event log
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="turn-heartbeat", daemon=True)
        self._thread.start()

    def track(self, turn_id: str, attempt: int, events: EventLog) -> None:
        with self._lock:
            self._runs[turn_id, attempt] = events

    def forget(self, turn_id: str, attempt: int) -> None:
        """The attempt ended: stop beating. The key is left to expire, since
        a newer attempt elsewhere may be beating it (if this attempt's finish
        did not land, the sweeper re-queues the turn after the expiry)."""
        with self._lock:
            self._runs.pop((turn_id, attempt), None)

    def running(self) -> dict[tuple[str, int], EventLog]:
        with self._lock:
            return dict(self._runs)

    def hand_back_all(self) -> int:
        """Put every turn this process runs back in the queue, and stop its
        attempt (it can no longer write). Returns how many were handed back.
        A hand-back that fails halfway is finished by the next beat (the
        attempt lost its turn) or by the sweeper (the turn is still running)."""
        handed = 0
        for (turn_id, attempt), events in self.running().items():
            try:
                with transaction() as db:
                    if not requeue_turn(db, turn_id, attempt):
                        continue
            except (SQLAlchemyError, redis.RedisError, kombu.exceptions.OperationalError) as exc:
                log.warning("turn %s: could not hand it back (%s)", turn_id, exc)
                continue
            events.cancelled = True
            handed += 1
        return handed

    def _run(self) -> None:
        settings = get_settings()
        name = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            record_worker(name)  # for health: this process is alive, busy or not
            time.sleep(settings.heartbeat_seconds)
            runs = self.running()
            if not runs:
                continue
            try:
                pipe = get_redis().pipeline(transaction=False)
                for turn_id, _attempt in runs:
                    pipe.set(alive_key(turn_id), 1, ex=settings.stale_running_seconds)
                pipe.execute()
                self._stop_lost(runs)
            except (redis.RedisError, SQLAlchemyError) as exc:
                log.warning("heartbeat of %d turns failed: %s", len(runs), exc)

    @staticmethod
    def _stop_lost(runs: dict[tuple[str, int], EventLog]) -> None:
        """Stop the attempts that lost their turn: handed back (queued), or
        taken over by a newer attempt. One that just finished its own turn
        is not lost."""
        ids = list({turn_id for turn_id, _attempt in runs})
        with transaction() as db:
            owned = {
                (turn_id, attempt)
                for turn_id, attempt in db.execute(
                    select(Turn.id, Turn.attempts).where(Turn.id.in_(ids), Turn.status != QUEUED)
                )
            }
        for (turn_id, attempt), events in runs.items():
            if (turn_id, attempt) not in owned and not events.cancelled:
                log.warning("turn %s attempt %d no longer owns the turn: stopping it", turn_id, attempt)
                events.cancelled = True


@functools.cache
def get_heartbeat() -> Heartbeat:
    return Heartbeat()
