"""Lookups scoped to the caller, and the JSON shapes of API objects."""

from __future__ import annotations

import base64
import re
import uuid
from datetime import datetime
from typing import Any

from flask import g, request, url_for
from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.exc import IntegrityError
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


# A UUID as the document's `format: uuid` has it: not every spelling
# uuid.UUID takes (braces, a `urn:uuid:` prefix, no hyphens).
_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def uuid_arg(name: str) -> str | None:
    """An id as a query argument, a filter: malformed is the documented 422
    (a path's id is a resource, and 404s: `valid_id`)."""
    raw = request.args.get(name)
    if raw is None:
        return None
    if not _UUID.fullmatch(raw):
        raise ApiError(422, f"{name} must be a UUID", {"field": name})
    return raw.lower()


def iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def session_json(chat: ChatSession, message_count: int) -> dict[str, Any]:
    return {
        "id": chat.id,
        "title": chat.title,
        "metadata": chat.meta,
        "assistant_id": chat.assistant_id,
        "assistant_version": chat.assistant_version,
        "active_turn_id": chat.active_turn_id,
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
        "parent_id": turn.parent_id,
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


def time_cursor(at: datetime, ident: str) -> str:
    """A page's cursor: the time and id of its last row (a list in time order)."""
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{ident}".encode()).decode().rstrip("=")


def parse_time_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    """A `time_cursor`'s time and id (a webhook delivery's `msg_…`, else a uuid), or the documented 422."""
    if not cursor:
        return None
    try:
        at, ident = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|", 1)
        return datetime.fromisoformat(at), ident if ident.startswith("msg_") else valid_id(ident)
    except (ValueError, ApiError):
        raise ApiError(422, "cursor is not one this API handed out", {"field": "cursor"}) from None


def newest_first(db: Session, query: Select, model: type, limit: int) -> tuple[list[Any], str | None]:
    """A page of `query`'s rows, newest first (by `created_at`, then id),
    after the request's `cursor`; and the next page's cursor, or None."""
    after = parse_time_cursor(request.args.get("cursor"))
    if after is not None:
        query = query.where(tuple_(model.created_at, model.id) < after)
    rows = db.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).all()
    last = rows[limit - 1] if len(rows) > limit else None
    return list(rows[:limit]), time_cursor(last.created_at, last.id) if last else None


def flush_named(db: Session, what: str, name: str) -> None:
    """Flush a named object's row: 409 if its owner has another `what` of that name."""
    try:
        with db.begin_nested():
            db.flush()
    except IntegrityError:
        raise ApiError(409, f"you have {what} named {name!r} already", {"field": "name"}) from None
