"""Firing schedules (shared/schedules.py): beat sends `fire_schedules` every
second, on the maintenance queue; it is one query when nothing is due."""

from __future__ import annotations

from celery import shared_task

from shared.broker import FIRE_SCHEDULES
from shared.db import transaction
from shared.schedules import fire_due
from tasks.base import TurnstreamTask


@shared_task(name=FIRE_SCHEDULES, base=TurnstreamTask, send_events=False)
def fire_schedules() -> int:
    """Start the runs that are due; how many. Two ticks at once take
    different schedules (skip locked), and a run's first questions are sent
    when its transaction commits."""
    with transaction() as db:
        return len(fire_due(db))
