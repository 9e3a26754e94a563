"""The replay task: start the next questions of a batch."""

from __future__ import annotations

from celery import shared_task

from shared import logs
from shared.broker import ADVANCE_REPLAY
from shared.db import transaction
from shared.replays import advance
from tasks.base import TurnstreamTask


@shared_task(name=ADVANCE_REPLAY, base=TurnstreamTask)
def advance_replay(replay_id: str) -> None:
    """Idempotent: it starts only what the replay's concurrency allows."""
    logs.bind(replay_id=replay_id)
    with transaction() as db:
        advance(db, replay_id)
