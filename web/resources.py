"""Lookups scoped to the caller, and the JSON shapes of API objects."""

from __future__ import annotations

import uuid
from typing import Any

from flask import g, request, url_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.models import ChatSession, Message, Turn
from web.errors import ApiError


def valid_id(value: str) -> str:
    """An id from a URL or body; a malformed one is simply not found."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise ApiError(404, "no such resource") from None


def owned(db: Session, model: type, ident: str, *, lock: bool = False) -> Any:
    """The caller's object, or 404 exactly as if it did not exist."""
    query = select(model).where(model.id == valid_id(ident), model.owner_id == g.owner_id)
    if lock:
        query = query.with_for_update()
    obj = db.scalar(query)
    if obj is None:
        raise ApiError(404, f"no such {model.__tablename__.rstrip('s').replace('_', ' ')}")
    return obj


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    """A whole-number query argument in [lo, hi], or the documented 422."""
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


def iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def session_json(chat: ChatSession, message_count: int) -> dict[str, Any]:
    return {
        "id": chat.id,
        "title": chat.title,
        "metadata": chat.meta,
        "assistant_id": chat.assistant_id,
        "assistant_version": chat.assistant_version,
        "created_at": iso(chat.created_at),
        "updated_at": iso(chat.updated_at),
        "message_count": message_count,
    }


def message_count(db: Session, session_id: str) -> int:
    return db.scalar(select(func.count()).select_from(Message).where(Message.session_id == session_id)) or 0


def message_json(message: Message) -> dict[str, Any]:
    data = {
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "turn_id": message.turn_id,
        "created_at": iso(message.created_at),
    }
    if message.tool_calls:
        data["tool_calls"] = message.tool_calls
    return data


def turn_json(turn: Turn) -> dict[str, Any]:
    return {
        "id": turn.id,
        "session_id": turn.session_id,
        "number": turn.number,
        "status": turn.status,
        "model": turn.model,
        "assistant_id": turn.assistant_id,
        "assistant_version": turn.assistant_version,
        "answer": turn.answer,
        "error": turn.error,
        "usage": turn.usage or {"prompt_tokens": 0, "completion_tokens": 0},
        "tools": turn.tools or [],
        "attempts": turn.attempts,
        "created_at": iso(turn.created_at),
        "started_at": iso(turn.started_at),
        "finished_at": iso(turn.finished_at),
        "events_url": url_for("turns.turn_events", turn_id=turn.id),
    }
