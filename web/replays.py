"""Batch replays over HTTP: submit many questions, follow progress, fetch results."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy import select

from shared.db import transaction
from shared.events import EventLog
from shared.models import Assistant, ChatSession, Message, Replay, Turn
from shared.overrides.gunicorn_direct_write import writable_socket
from shared.replays import create_replay, item_rows, summary, unfinished_items
from web import schemas
from web.assistants import chosen
from web.errors import ApiError
from web.limits import limited, quota_exceeded
from web.openapi import NDJSON, SSE, operation
from web.relay.frames import sse_response
from web.relay.resume import Resume, last_event_id, parse_seq
from web.relay.snapshots import replay_snapshot
from web.resources import owned, valid_id
from web.validation import MAX_QUESTIONS, ReplayCreate, parse_body

bp = Blueprint("replays", __name__)


@bp.post("/api/replays")
@operation(
    "Replay many questions, each as a turn, so many at a time",
    {202: schemas.Replay},
    body=ReplayCreate,
    errors=(404,),  # a session it names is not the caller's
)
@limited("rate_limit_replays")
def create():
    settings = current_app.extensions["turnstream.settings"]
    body = parse_body(ReplayCreate, None)
    if (body.questions is None) == (body.from_sessions is None):
        raise ApiError(422, "give exactly one of questions or from_sessions", {"field": "questions"})
    with transaction() as db:
        if body.questions is not None:
            questions = [q.model_dump() for q in body.questions]
            for q in questions:
                if len(q["message"]) > settings.max_message_chars:
                    raise ApiError(422, "a question is too long", {"field": "questions.message"})
                if q["session_id"] is not None:
                    q["session_id"] = owned(db, ChatSession, q["session_id"]).id
        else:
            questions = _questions_from_sessions(db, body.from_sessions)
        if len(questions) > MAX_QUESTIONS:
            raise ApiError(422, f"a replay holds at most {MAX_QUESTIONS} questions", {"field": "from_sessions"})
        waiting = unfinished_items(db, g.owner_id)
        if waiting + len(questions) > settings.max_replay_items:
            raise quota_exceeded(
                f"this key's replays would hold {waiting + len(questions)} unfinished questions, more than"
                f" {settings.max_replay_items} (MAX_REPLAY_ITEMS_PER_OWNER); wait for some to end"
            )
        assistant = chosen(db, body.assistant_id, body.assistant_version)
        if assistant is not None and assistant[1] is None:  # one version answers the whole replay
            assistant = (assistant[0], db.get(Assistant, assistant[0]).latest)
        replay = create_replay(db, g.owner_id, questions, body.concurrency, assistant)
        db.flush()
        db.refresh(replay)
        data = summary(db, replay)
    return jsonify(data), 202


@bp.get("/api/replays/<replay_id>")
@operation("A replay's progress", {200: schemas.Replay})
def get(replay_id: str):
    with transaction() as db:
        replay = owned(db, Replay, replay_id)
        return jsonify(summary(db, replay))


@bp.get("/api/replays/<replay_id>/results")
@operation("A replay's results, one line per question", {200: NDJSON})
def results(replay_id: str):
    with transaction() as db:
        replay = owned(db, Replay, replay_id)
        lines = [json.dumps(result_line(item, turn)) + "\n" for item, turn in item_rows(db, replay.id)]
    return Response(lines, mimetype="application/x-ndjson")


@bp.get("/api/replays/<replay_id>/events")
@operation("A replay's progress events", {200: SSE}, headers={"Last-Event-ID": {"type": "string"}})
@limited("rate_limit_streams")
def events(replay_id: str):
    relay = current_app.extensions["turnstream.relay"]
    after = parse_seq(last_event_id())
    with transaction() as db:
        replay = owned(db, Replay, replay_id)
    log = EventLog("replay", replay.id)
    stream = Resume(relay, log, after, lambda: replay_snapshot(replay.id), sock=writable_socket(request.environ))
    return sse_response(stream.frames(), relay.ping_seconds)


def result_line(item, turn: Turn | None) -> dict:
    latency = None
    if turn is not None and turn.finished_at and turn.created_at:
        latency = round((turn.finished_at - turn.created_at).total_seconds() * 1000)
    return {
        "index": item.index,
        "message": item.message,
        "status": turn.status if turn else "pending",
        "answer": turn.answer if turn else None,
        "error": turn.error if turn else None,
        "turn_id": item.turn_id,
        "latency_ms": latency,
    }


def _questions_from_sessions(db, session_ids: list[str]) -> list[dict]:
    """Replay the user messages of earlier sessions, in order, each in a new session."""
    questions = []
    for sid in session_ids:
        chat = owned(db, ChatSession, valid_id(sid))
        rows = db.scalars(
            select(Message.content)
            .join(Turn, Turn.id == Message.turn_id)
            .where(Message.session_id == chat.id, Message.role == "user")
            .order_by(Turn.number)
        ).all()
        questions.extend({"message": content, "session_id": None} for content in rows)
    if not questions:
        raise ApiError(422, "those sessions hold no questions", {"field": "from_sessions"})
    return questions
