"""The beat-scheduled sweeper: re-send turns whose task went missing.

Sending a turn twice is harmless (only one claim wins), so the sweeper may be
generous. This first version covers queued turns whose message was lost
(broker data loss, a crash between commit and send); running turns whose
worker died are recovered by redelivery (acks_late).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from sqlalchemy import func, select

from shared.broker import send_turn
from shared.config import get_settings
from shared.db import db_session
from shared.models import Turn
from shared.turns import is_next_in_session
from tasks.turn import TurnstreamTask

log = logging.getLogger(__name__)


@shared_task(name="tasks.sweep_turns", base=TurnstreamTask)
def sweep_turns() -> int:
    """Re-send queued turns that are first in their session and older than
    STALE_QUEUED_SECONDS. Returns how many were re-sent."""
    age = timedelta(seconds=get_settings().stale_queued_seconds)
    with db_session() as db:
        ids = db.scalars(
            select(Turn.id)
            .where(
                Turn.status == "queued",
                Turn.created_at < func.now() - age,
                is_next_in_session(),
            )
            .limit(500)
        ).all()
    for turn_id in ids:
        send_turn(turn_id)
    if ids:
        log.warning("sweeper re-sent %d queued turns", len(ids))
    return len(ids)
