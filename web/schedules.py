"""Replay schedules over HTTP: a question set run on a cron expression in a
time zone (shared/schedules.py); enable, disable, run now, its runs."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import transaction
from shared.models import QuestionSet, Replay, ReplaySchedule
from shared.replays import summary
from shared.schedules import Busy, OverQuota, cron_error, next_run, start_run
from web import schemas
from web.assistants import chosen
from web.errors import ApiError
from web.limits import quota_exceeded
from web.openapi import operation
from web.resources import int_arg, iso, newest_first, owned
from web.validation import MAX_QUESTIONS, ScheduleCreate, ScheduleUpdate, parse_body

bp = Blueprint("schedules", __name__)
PAGE = {"limit": {"type": "integer", "minimum": 1, "maximum": 100}, "cursor": {"type": "string"}}


def schedule_json(schedule: ReplaySchedule) -> dict[str, Any]:
    return {
        "id": schedule.id,
        "set_id": schedule.set_id,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "assistant_id": schedule.assistant_id,
        "assistant_version": schedule.assistant_version,
        "concurrency": schedule.concurrency,
        "repeats": schedule.repeats,
        "enabled": schedule.enabled,
        "next_run_at": iso(schedule.next_run_at),
        "last_replay_id": schedule.last_replay_id,
        "skipped": schedule.skipped,
        "created_at": iso(schedule.created_at),
        "updated_at": iso(schedule.updated_at),
    }


@bp.post("/api/schedules")
@operation(
    "Run a question set on a cron expression in a time zone",
    {201: schemas.Schedule},
    body=ScheduleCreate,
    errors=(404,),  # a set or an assistant not the caller's
)
def create():
    body = parse_body(ScheduleCreate)
    with transaction() as db:
        qset = owned(db, QuestionSet, body.set_id)
        schedule = ReplaySchedule(
            owner_id=g.owner_id,
            set_id=qset.id,
            cron=body.cron,
            timezone=body.timezone,
            concurrency=body.concurrency,
            repeats=body.repeats,
            enabled=body.enabled,
        )
        schedule.assistant_id, schedule.assistant_version = chosen(db, body.assistant_id, body.assistant_version) or (
            None,
            None,
        )
        _settled(db, schedule, qset)
        db.add(schedule)
        db.flush()
        db.refresh(schedule)
        return jsonify(schedule_json(schedule)), 201


@bp.get("/api/schedules")
@operation("The caller's schedules, newest first", {200: schemas.SchedulePage}, query=PAGE)
def list_schedules():
    limit = int_arg("limit", 50, 1, 100)
    with transaction() as db:
        query = select(ReplaySchedule).where(ReplaySchedule.owner_id == g.owner_id)
        rows, next_cursor = newest_first(db, query, ReplaySchedule, limit)
        return jsonify({"items": [schedule_json(s) for s in rows], "next_cursor": next_cursor})


@bp.get("/api/schedules/<schedule_id>")
@operation("A schedule", {200: schemas.Schedule})
def get(schedule_id: str):
    with transaction() as db:
        return jsonify(schedule_json(owned(db, ReplaySchedule, schedule_id)))


@bp.patch("/api/schedules/<schedule_id>")
@operation(
    "Change a schedule: its cron, time zone, assistant, concurrency, repeats, or whether it is enabled",
    {200: schemas.Schedule},
    body=ScheduleUpdate,
)
def update(schedule_id: str):
    body = parse_body(ScheduleUpdate)
    named = body.model_fields_set
    with transaction() as db:
        schedule = owned(db, ReplaySchedule, schedule_id, lock=True)
        for name in ("cron", "timezone", "concurrency", "repeats", "enabled"):
            value = getattr(body, name)
            if name in named and value is not None:
                setattr(schedule, name, value)
        if "assistant_id" in named:
            choice = chosen(db, body.assistant_id, body.assistant_version)
            schedule.assistant_id, schedule.assistant_version = choice or (None, None)
        elif "assistant_version" in named:
            if schedule.assistant_id is None:
                raise ApiError(422, "assistant_version needs an assistant_id", {"field": "assistant_version"})
            schedule.assistant_version = chosen(db, schedule.assistant_id, body.assistant_version)[1]
        _settled(db, schedule, db.get(QuestionSet, schedule.set_id))
        schedule.updated_at = func.now()
        db.flush()
        db.refresh(schedule)
        return jsonify(schedule_json(schedule))


@bp.delete("/api/schedules/<schedule_id>")
@operation("Delete a schedule (its runs stay, and one under way goes on)", {204: None})
def delete(schedule_id: str):
    with transaction() as db:
        db.delete(owned(db, ReplaySchedule, schedule_id, lock=True))
    return "", 204


@bp.post("/api/schedules/<schedule_id>/run")
@operation(
    "Run the schedule's set now, whether it is enabled or not (409 while its last run is under way)",
    {202: schemas.Replay},
    errors=(409, 429),
)
def run_now(schedule_id: str):
    with transaction() as db:
        schedule = owned(db, ReplaySchedule, schedule_id, lock=True)
        try:
            replay = start_run(db, schedule)
        except OverQuota as exc:
            raise quota_exceeded(f"not run: {exc}") from None
        except Busy as exc:
            raise ApiError(409, f"not run: {exc}") from None
        db.flush()
        db.refresh(replay)
        return jsonify(summary(db, replay)), 202


@bp.get("/api/schedules/<schedule_id>/runs")
@operation("A schedule's runs (replays), newest first", {200: schemas.ReplayPage}, query=PAGE)
def runs(schedule_id: str):
    limit = int_arg("limit", 20, 1, 100)
    with transaction() as db:
        schedule = owned(db, ReplaySchedule, schedule_id)
        rows, next_cursor = newest_first(db, select(Replay).where(Replay.schedule_id == schedule.id), Replay, limit)
        return jsonify({"items": [summary(db, r) for r in rows], "next_cursor": next_cursor})


def _settled(db: Session, schedule: ReplaySchedule, qset: QuestionSet) -> None:
    """Check the schedule as it now stands (422 at fault) and set when it
    runs next: the next occurrence from now while enabled, else never."""
    error = cron_error(schedule.cron, schedule.timezone)
    if error:
        raise ApiError(422, error[1], {"field": error[0]})
    if qset.size * schedule.repeats > MAX_QUESTIONS:
        raise ApiError(422, f"a run would hold more than {MAX_QUESTIONS} questions", {"field": "repeats"})
    now = db.scalar(select(func.now()))
    schedule.next_run_at = next_run(schedule.cron, schedule.timezone, now) if schedule.enabled else None
