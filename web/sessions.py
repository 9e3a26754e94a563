"""Sessions and their messages."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from flask import Blueprint, g, jsonify, request
from sqlalchemy import func, select, tuple_

from shared.db import db_session
from shared.models import ACTIVE, ChatSession, Message, Turn
from shared.turns import cancel_turn
from web.errors import ApiError
from web.resources import message_count, message_json, owned, session_json
from web.validation import SessionCreate, parse_body

bp = Blueprint("sessions", __name__)


@bp.post("/api/sessions")
def create_session():
    body = parse_body(SessionCreate)
    with db_session() as db:
        chat = ChatSession(owner_id=g.owner_id, title=body.title, meta=body.metadata)
        db.add(chat)
        db.flush()
        db.refresh(chat)
        data = session_json(chat, 0)
    return jsonify(data), 201


@bp.get("/api/sessions")
def list_sessions():
    limit = _int_arg("limit", 20, 1, 100)
    cursor = _decode_cursor(request.args.get("cursor"))
    counts = select(func.count()).select_from(Message).where(Message.session_id == ChatSession.id).scalar_subquery()
    query = (
        select(ChatSession, counts)
        .where(ChatSession.owner_id == g.owner_id)
        .order_by(ChatSession.created_at.desc(), ChatSession.id.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
        query = query.where(tuple_(ChatSession.created_at, ChatSession.id) < cursor)
    with db_session() as db:
        rows = db.execute(query).all()
    items = [session_json(chat, count) for chat, count in rows[:limit]]
    next_cursor = _encode_cursor(rows[limit - 1][0]) if len(rows) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.get("/api/sessions/<session_id>")
def get_session(session_id: str):
    with db_session() as db:
        chat = owned(db, ChatSession, session_id)
        return jsonify(session_json(chat, message_count(db, chat.id)))


@bp.delete("/api/sessions/<session_id>")
def delete_session(session_id: str):
    with db_session() as db:
        chat = owned(db, ChatSession, session_id, lock=True)
        for turn in db.scalars(select(Turn).where(Turn.session_id == chat.id, Turn.status.in_(ACTIVE))):
            cancel_turn(db, turn)
        db.delete(chat)
    return "", 204


@bp.get("/api/sessions/<session_id>/messages")
def list_messages(session_id: str):
    with db_session() as db:
        chat = owned(db, ChatSession, session_id)
        messages = db.scalars(
            select(Message)
            .join(Turn, Turn.id == Message.turn_id)
            .where(Message.session_id == chat.id)
            .order_by(Turn.number, Message.role.desc())
        ).all()
        return jsonify({"items": [message_json(m) for m in messages]})


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"{name} must be a whole number", {"field": name}) from None
    if not lo <= value <= hi:
        raise ApiError(422, f"{name} must be between {lo} and {hi}", {"field": name})
    return value


def _encode_cursor(chat: ChatSession) -> str:
    raw = json.dumps([chat.created_at.isoformat(), chat.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None):
    if not cursor:
        return None
    try:
        created_at, ident = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), str(uuid.UUID(ident))
    except (ValueError, TypeError, AttributeError):
        raise ApiError(422, "cursor is not one this API handed out", {"field": "cursor"}) from None
