"""Getting turns going again after a worker, a message or Redis was lost.

- Every running turn has a heartbeat key that its worker refreshes
  (tasks/heartbeat.py); it expires STALE_RUNNING_SECONDS after the worker
  stopped. A running turn without one, claimed at least that long ago, goes
  back to `queued` and is sent again; its next claim is a new attempt (capped
  by TURN_MAX_ATTEMPTS). A fresher claim counts as a beat: its worker sets
  the key at its next beat, not in a round trip before every claim.
- A queued turn has a sent mark in Redis for STALE_QUEUED_SECONDS after its
  message went to the broker. One without (its send failed while the broker
  was down, Redis lost the mark with the queue, or it has waited that long
  and its message may be lost: a crash between commit and send, a worker
  that died holding it) is sent again once UNSENT_AFTER old. Sending twice
  is harmless: only one claim wins.
- An unfinished replay with no turn under way waits for an advance message
  that was lost; it is sent again (advancing is idempotent).

Right after Redis restarted every heartbeat is missing for a moment, so
running turns are left alone until Redis has been up for STALE_RUNNING_SECONDS.
The beat sweeper (tasks/sweeper.py) and `flask turns requeue` use these.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.orm import Session

from shared.broker import send_replay_advance, send_turn, sent_key
from shared.config import get_settings
from shared.db import after_commit, transaction
from shared.models import Replay, ReplayItem, Turn
from shared.redis import get_redis, key
from shared.turn_states import ACTIVE, QUEUED, REQUEUE, RUNNING, status_of
from shared.turns import next_queued_turn

log = logging.getLogger(__name__)

BATCH = 500
# A send, with the broker client's own retries, sets its mark well within
# this: a queued turn older than this without one was not sent (or Redis
# lost the mark with its queue). Short, so such turns go within a sweep or
# two of the broker's return, not after STALE_QUEUED_SECONDS.
UNSENT_AFTER = timedelta(seconds=10)


def alive_key(turn_id: str) -> str:
    """Present while a worker runs the turn: refreshed every HEARTBEAT_SECONDS,
    it expires STALE_RUNNING_SECONDS after the worker stopped (tasks/heartbeat.py)."""
    return key("turn", turn_id, "alive")


def claimed_lately() -> ColumnElement[bool]:
    """A turn claimed less than STALE_RUNNING_SECONDS ago: it counts as
    beating until its worker's first beat (NULL for rows claimed before
    the claim was timed, whose workers set the key before claiming)."""
    return Turn.claimed_at > func.now() - timedelta(seconds=get_settings().stale_running_seconds)


def alive(turn_ids: list[str]) -> list[bool]:
    """Whether each turn has a live heartbeat."""
    return _exist([alive_key(turn_id) for turn_id in turn_ids])


def _exist(keys: list[str]) -> list[bool]:
    pipe = get_redis().pipeline(transaction=False)
    for name in keys:
        pipe.exists(name)
    return [bool(n) for n in pipe.execute()]


def requeue_turn(db: Session, turn_id: str, attempt: int) -> bool:
    """Hand a running turn whose worker is gone back to the queue: running ->
    queued, only if attempt `attempt` still holds it, and send it after commit.
    Its next claim counts a new attempt and emits turn.restarted; the old
    attempt, if it still runs somewhere, is stopped by its heartbeat and can
    no longer write."""
    held = and_(Turn.id == turn_id, REQUEUE.allows(status_of(Turn)), Turn.attempts == attempt)
    done = db.execute(update(Turn).where(held).values(status=REQUEUE.target)).rowcount
    if done:
        after_commit(db, send_turn, turn_id)
    return bool(done)


def resend_queued() -> int:
    """Send again (up to BATCH of) the queued turns that are next in their
    session, older than UNSENT_AFTER, with no sent mark."""
    with transaction() as db:
        ids = db.scalars(
            select(Turn.id)
            .where(
                Turn.status == QUEUED,
                Turn.created_at < func.now() - UNSENT_AFTER,
                Turn.id == next_queued_turn(Turn.session_id),
            )
            .order_by(Turn.created_at)
        ).all()
    ids = [turn_id for turn_id, sent in zip(ids, _exist([sent_key(t) for t in ids]), strict=True) if not sent]
    for turn_id in ids[:BATCH]:
        send_turn(turn_id)
    if ids:
        log.warning("sweeper re-sent %d queued turns", min(len(ids), BATCH))
    return min(len(ids), BATCH)


def requeue_stale_running() -> int:
    """Hand back the running turns whose heartbeat expired."""
    if get_redis().info("server")["uptime_in_seconds"] < get_settings().stale_running_seconds:
        return 0
    with transaction() as db:
        rows = db.execute(
            select(Turn.id, Turn.attempts).where(
                Turn.status == RUNNING, func.coalesce(claimed_lately(), False).is_(False)
            )
        ).all()
    stale = [row for row, live in zip(rows, alive([r.id for r in rows]), strict=True) if not live]
    requeued = 0
    for turn_id, attempt in stale:
        with transaction() as db:
            requeued += requeue_turn(db, turn_id, attempt)
    if requeued:
        log.warning("sweeper re-queued %d running turns whose worker stopped beating", requeued)
    return requeued


def resend_stalled_replays() -> int:
    """Advance the unfinished replays older than STALE_QUEUED_SECONDS that have
    no turn queued or running: a turn's end advances its replay, so only a
    replay without one can be waiting on a lost message."""
    age = timedelta(seconds=get_settings().stale_queued_seconds)
    under_way = (
        select(ReplayItem.id)
        .join(Turn, Turn.id == ReplayItem.turn_id)
        .where(ReplayItem.replay_id == Replay.id, Turn.status.in_(ACTIVE))
        .exists()
    )
    with transaction() as db:
        ids = db.scalars(
            select(Replay.id)
            .where(Replay.finished_at.is_(None), Replay.created_at < func.now() - age, ~under_way)
            .limit(BATCH)
        ).all()
    for replay_id in ids:
        send_replay_advance(replay_id)
    if ids:
        log.warning("sweeper advanced %d stalled replays", len(ids))
    return len(ids)
