"""The Celery app both tiers use, and the thin functions that send work.

The web tier sends tasks by name through this module and never imports the
worker's code; the worker registers its tasks on the same app (tasks/).
"""

from __future__ import annotations

import functools

from celery import Celery

from shared.config import get_settings
from shared.redis import get_redis, key

RUN_TURN = "tasks.run_turn"
ADVANCE_REPLAY = "tasks.advance_replay"
SWEEP_TURNS = "tasks.sweep_turns"


@functools.cache
def get_celery() -> Celery:
    """Built on first use from celeryconfig.py plus the environment's values."""
    settings = get_settings()
    app = Celery("turnstream")
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.broker_url
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "global_keyprefix": settings.redis_prefix,
    }
    app.conf.beat_schedule = {"sweep-turns": {"task": SWEEP_TURNS, "schedule": settings.sweep_seconds}}
    return app


def send_turn(turn_id: str) -> None:
    """Send a turn to the workers. Call only after its row has committed."""
    get_celery().send_task(RUN_TURN, args=[turn_id])
    get_redis().set(sent_key(turn_id), 1, ex=get_settings().stale_queued_seconds)


def sent_key(turn_id: str) -> str:
    """Present for STALE_QUEUED_SECONDS after the turn was sent, so the
    sweeper does not send again a turn that waits in a long queue. It lives
    in the broker's Redis: when Redis loses the queue, it loses these too."""
    return key("turn", turn_id, "sent")


def send_replay_advance(replay_id: str) -> None:
    get_celery().send_task(ADVANCE_REPLAY, args=[replay_id])
