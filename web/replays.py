"""Batch replays over HTTP: submit many questions, follow progress, fetch results."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context
from sqlalchemy import select

from shared.db import transaction
from shared.events import EventLog
from shared.models import Assistant, ChatSession, Message, QuestionSet, Replay, Turn
from shared.overrides.gunicorn_direct_write import writable_socket
from shared.question_sets import run_set
from shared.replays import create_replay, item_rows, result_line, summary, unfinished_items
from web import schemas
from web.assistants import chosen
from web.comparisons import SIDES, compare, refusal
from web.errors import ApiError
from web.limits import limited, quota_exceeded
from web.openapi import NDJSON, SSE, operation
from web.relay.frames import sse_response
from web.relay.resume import Resume, last_event_id, parse_seq
from web.relay.snapshots import replay_snapshot
from web.reports import html_pieces, to_csv
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
    if sum(source is not None for source in (body.questions, body.from_sessions, body.set_id)) != 1:
        raise ApiError(422, "give exactly one of questions, from_sessions or set_id", {"field": "questions"})
    if body.repeats != 1 and body.set_id is None:
        raise ApiError(422, "repeats needs a set_id", {"field": "repeats"})
    with transaction() as db:
        qset = None
        if body.questions is not None:
            questions = [q.model_dump() for q in body.questions]
            for q in questions:
                if len(q["message"]) > settings.max_message_chars:
                    raise ApiError(422, "a question is too long", {"field": "questions.message"})
                if q["session_id"] is not None:
                    q["session_id"] = owned(db, ChatSession, q["session_id"]).id
            count = len(questions)
        elif body.from_sessions is not None:
            questions = _questions_from_sessions(db, body.from_sessions)
            count = len(questions)
        else:
            qset = owned(db, QuestionSet, body.set_id, lock=True)  # a delete of the set waits
            count = qset.size * body.repeats
        if count > MAX_QUESTIONS:
            raise ApiError(
                422,
                f"a replay holds at most {MAX_QUESTIONS} questions",
                {"field": "repeats" if qset else "from_sessions"},
            )
        waiting = unfinished_items(db, g.owner_id)
        if waiting + count > settings.max_replay_items:
            raise quota_exceeded(
                f"this key's replays would hold {waiting + count} unfinished questions, more than"
                f" {settings.max_replay_items} (MAX_REPLAY_ITEMS_PER_OWNER); wait for some to end"
            )
        assistant = _fixed_version(db, chosen(db, body.assistant_id, body.assistant_version))
        if qset is not None:
            replay = run_set(db, qset, body.concurrency, assistant, body.repeats)
        else:
            replay = create_replay(db, g.owner_id, questions, body.concurrency, assistant)
        db.flush()
        db.refresh(replay)
        data = summary(db, replay)
    return jsonify(data), 202


def _fixed_version(db, assistant: tuple[str, int | None] | None) -> tuple[str, int] | None:
    """One version answers a whole replay: the one chosen, else the latest now."""
    if assistant is not None and assistant[1] is None:
        return assistant[0], db.get(Assistant, assistant[0]).latest
    return assistant


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
        lines = [json.dumps(result_line(item, turn)) + "\n" for item, turn in item_rows(db, [replay.id])]
    return Response(lines, mimetype="application/x-ndjson")


@bp.get("/api/comparisons")
@operation(
    "Compare runs of a question set, question by question: a baseline and a candidate, each one or more replays",
    {200: (schemas.Comparison, "text/csv", "text/html")},
    query={
        "baseline": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "candidate": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "format": {"type": "string", "enum": ["json", "csv", "html"]},
    },
    errors=(404, 409),  # a replay not the caller's
)
def comparison():
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv", "html"):
        raise ApiError(422, "format is json, csv or html", {"field": "format"})
    with transaction() as db:
        sides = [[owned(db, Replay, i) for i in request.args.getlist(side)] for side in SIDES]
        refused = refusal(*sides)
        if refused:
            raise ApiError(*refused)
        data = compare(db, *sides)
    if fmt == "csv":
        return Response(to_csv(data), mimetype="text/csv", headers=_attachment("comparison.csv"))
    if fmt == "html":
        pieces, nonce = html_pieces(data)
        response = Response(stream_with_context(pieces), mimetype="text/html")
        # The report's scripts are inline, each with this nonce; what it shows (answers) runs nothing.
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src data:;"
            " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return response
    return jsonify(data)


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


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
