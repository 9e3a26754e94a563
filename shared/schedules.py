"""Schedules: a question set run on a cron expression in a time zone.

Schedules live in Postgres, not in beat: beat only sends `fire_schedules`
every second (tasks/schedules.py), and the worker that runs it takes the
schedules that are due (`FOR UPDATE SKIP LOCKED`, through a partial index on
`next_run_at`). A schedule made, changed or disabled is seen at the next
tick, with no restart of beat, and beat itself keeps no state that a second
beat or a lost schedule file could double or drop. (docs/architecture.md
says why no database scheduler for beat was taken.)

A schedule runs once at a time: when it is due while its last run is still
under way, that occurrence is skipped and counted. Occurrences missed while
nothing ran (every worker down) are not made up: the next run is the next
occurrence after now.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.models import Assistant, QuestionSet, Replay, ReplaySchedule
from shared.question_sets import run_set
from shared.replays import unfinished_items

log = logging.getLogger(__name__)

BATCH = 100  # schedules fired by one tick, at most


class Busy(Exception):
    """The schedule's last run is still under way."""


class OverQuota(Busy):
    """A run would take its owner's unfinished replay questions past their quota."""


def cron_error(cron: str, timezone: str) -> tuple[str, str] | None:
    """(field, why) when the pair cannot schedule anything, else None."""
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return "timezone", f"{timezone!r} is not a time zone (an IANA name, e.g. Europe/Paris)"
    if len(cron.split()) not in (5, 6) or not croniter.is_valid(cron, second_at_beginning=True):
        return "cron", f"{cron!r} is not a cron expression: five fields, or six with seconds first"
    return None


def next_run(cron: str, timezone: str, after: datetime) -> datetime:
    """The first occurrence after `after`, the cron read in `timezone`."""
    start = after.astimezone(ZoneInfo(timezone))
    return croniter(cron, start, second_at_beginning=True).get_next(datetime).astimezone(UTC)


def fire_due(db: Session) -> list[str]:
    """Start a run of every schedule that is due (or skip it, if one is
    under way), and set when each runs next; the replays started."""
    now = db.scalar(select(func.now()))
    due = db.scalars(
        select(ReplaySchedule)
        .where(ReplaySchedule.enabled, ReplaySchedule.next_run_at <= now)
        .order_by(ReplaySchedule.next_run_at)
        .limit(BATCH)
        .with_for_update(skip_locked=True)
    ).all()
    started = []
    for schedule in due:
        try:
            started.append(start_run(db, schedule).id)
        except Busy:
            schedule.skipped += 1
            log.info("schedule %s due while its last run is under way: skipped", schedule.id)
        schedule.next_run_at = next_run(schedule.cron, schedule.timezone, now)
    db.flush()
    return started


def start_run(db: Session, schedule: ReplaySchedule) -> Replay:
    """A run of the schedule's set now (the schedule's row locked by the
    caller); Busy if its last run is under way or its owner's unfinished
    replay questions would pass their quota."""
    if schedule.last_replay_id is not None:
        last = db.get(Replay, schedule.last_replay_id)
        if last is not None and last.finished_at is None:
            raise Busy("its last run is still under way")
    qset = db.scalar(select(QuestionSet).where(QuestionSet.id == schedule.set_id).with_for_update())
    count = qset.size * schedule.repeats
    if unfinished_items(db, schedule.owner_id) + count > get_settings().max_replay_items:
        raise OverQuota("its owner's unfinished replay questions would pass MAX_REPLAY_ITEMS_PER_OWNER")
    assistant = None
    if schedule.assistant_id is not None:
        version = schedule.assistant_version or db.get(Assistant, schedule.assistant_id).latest
        assistant = (schedule.assistant_id, version)
    replay = run_set(db, qset, schedule.concurrency, assistant, schedule.repeats, schedule_id=schedule.id)
    schedule.last_replay_id = replay.id
    return replay
