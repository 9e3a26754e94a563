"""Question sets over HTTP: store questions with their expectations, read
them, replace them, list a set's runs."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify
from sqlalchemy import exists, select

from shared.db import transaction
from shared.models import QuestionSet, Replay
from shared.question_sets import questions_of, set_json, store_questions
from shared.replays import summary
from web import schemas
from web.errors import ApiError
from web.openapi import operation
from web.resources import flush_named, int_arg, newest_first, owned
from web.validation import QuestionSetBody, parse_body

bp = Blueprint("question_sets", __name__)
PAGE = {"limit": {"type": "integer", "minimum": 1, "maximum": 100}, "cursor": {"type": "string"}}


@bp.post("/api/sets")
@operation(
    "Store a question set: questions with their keys and expectations",
    {201: schemas.QuestionSet},
    body=QuestionSetBody,
    errors=(409,),
)
def create():
    body = parse_body(QuestionSetBody)
    with transaction() as db:
        qset = QuestionSet(owner_id=g.owner_id, name=body.name, description=body.description, size=0)
        db.add(qset)
        flush_named(db, "a question set", body.name)
        store_questions(db, qset, _questions(body))
        db.flush()
        db.refresh(qset)
        return jsonify(set_json(qset)), 201


@bp.get("/api/sets")
@operation("The caller's question sets, newest first", {200: schemas.QuestionSetPage}, query=PAGE)
def list_sets():
    limit = int_arg("limit", 50, 1, 100)
    with transaction() as db:
        rows, next_cursor = newest_first(
            db, select(QuestionSet).where(QuestionSet.owner_id == g.owner_id), QuestionSet, limit
        )
        return jsonify({"items": [set_json(s) for s in rows], "next_cursor": next_cursor})


@bp.get("/api/sets/<set_id>")
@operation("A question set with its questions", {200: schemas.QuestionSet})
def get(set_id: str):
    with transaction() as db:
        qset = owned(db, QuestionSet, set_id)
        return jsonify(set_json(qset, questions_of(db, qset.id)))


@bp.put("/api/sets/<set_id>")
@operation(
    "Replace a question set's name, description and questions (runs made before keep theirs)",
    {200: schemas.QuestionSet},
    body=QuestionSetBody,
    errors=(409,),
)
def replace(set_id: str):
    body = parse_body(QuestionSetBody)
    with transaction() as db:
        qset = owned(db, QuestionSet, set_id, lock=True)
        qset.name, qset.description = body.name, body.description
        flush_named(db, "a question set", body.name)
        store_questions(db, qset, _questions(body))
        db.flush()
        db.refresh(qset)
        return jsonify(set_json(qset))


@bp.delete("/api/sets/<set_id>")
@operation(
    "Delete a question set and its schedules (409 while a run of it is under way); its runs stay",
    {204: None},
    errors=(409,),
)
def delete(set_id: str):
    with transaction() as db:
        qset = owned(db, QuestionSet, set_id, lock=True)  # a run being made of it waits (run_set reads it locked)
        if db.scalar(select(exists().where(Replay.set_id == qset.id, Replay.finished_at.is_(None)))):
            raise ApiError(409, "a run of this set is under way; wait for it to finish")
        db.delete(qset)
    return "", 204


@bp.get("/api/sets/<set_id>/runs")
@operation("A set's runs (replays), newest first", {200: schemas.ReplayPage}, query=PAGE)
def runs(set_id: str):
    limit = int_arg("limit", 20, 1, 100)
    with transaction() as db:
        qset = owned(db, QuestionSet, set_id)
        rows, next_cursor = newest_first(db, select(Replay).where(Replay.set_id == qset.id), Replay, limit)
        return jsonify({"items": [summary(db, r) for r in rows], "next_cursor": next_cursor})


def _questions(body: QuestionSetBody) -> list[dict[str, Any]]:
    return set_questions(body, current_app.extensions["turnstream.settings"].max_message_chars)


def set_questions(body: QuestionSetBody, max_message_chars: int) -> list[dict[str, Any]]:
    """The body's questions as stored; a 422 for one longer than a message may be."""
    questions = []
    for i, q in enumerate(body.questions):
        if len(q.message) > max_message_chars:
            raise ApiError(
                422, f"a question is longer than {max_message_chars} characters", {"field": f"questions.{i}.message"}
            )
        questions.append({"message": q.message, "key": q.key, "expect": q.expect.stored() if q.expect else None})
    return questions
