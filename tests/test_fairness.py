"""Fairness between owners: one owner's burst cannot take every worker
thread while another owner's turn waits. An owner runs at most
MAX_RUNNING_TURNS_PER_OWNER turns at once; its other turns are held back,
without a message, and sent as its running ones end."""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import func, select

from shared.db import transaction
from shared.models import Turn
from tests import services
from tests.conftest import wait_turn
from tests.test_shutdown import _submit
from web.auth import create_key, lookup_key

SLOW = "busy [[tokens=20]] [[delay=0.15]]"  # 3 s a turn


def _running(owner_id: str) -> int:
    with transaction() as db:
        return db.scalar(select(func.count()).where(Turn.owner_id == owner_id, Turn.status == "running"))


def test_one_owner_cannot_take_every_thread_while_anothers_turn_waits(stack, client):
    with services.sole_worker(stack, "fair-worker", {"MAX_RUNNING_TURNS_PER_OWNER": "2"}, concurrency=4):
        keys = [create_key(f"fair-{uuid.uuid4().hex[:8]}") for _ in range(2)]
        busy, other = ({"Authorization": f"Bearer {k}"} for k in keys)
        busy_id = lookup_key(keys[0]).owner_id

        seen, done = [], threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.append(_running(busy_id))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            burst = [_submit(client, busy, SLOW) for _ in range(6)]  # more than the worker's 4 threads
            time.sleep(0.3)
            theirs = _submit(client, other, "my turn")
            answered = wait_turn(client, other, theirs, timeout=30)
            finished = [wait_turn(client, busy, t, timeout=60) for t in burst]
        finally:
            done.set()
            watcher.join()
    assert answered["status"] == "succeeded"
    # Not behind the burst: it started while the busy owner's first two ran,
    # before any of its others could (each waited for one of those to end).
    with transaction() as db:
        started = dict(db.execute(select(Turn.id, Turn.started_at).where(Turn.id.in_([theirs, *burst]))).all())
    held_back = sorted(started[t] for t in burst)[2:]
    assert started[theirs] < held_back[0], (started[theirs], held_back)
    assert max(seen) == 2, seen  # never more than its share, and it used it
    assert all(t["status"] == "succeeded" and t["attempts"] == 1 for t in finished)  # held back, none lost
