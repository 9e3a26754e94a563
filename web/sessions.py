"""Sessions and their messages."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import datetime

from flask import Blueprint, current_app, g, jsonify, request
from sqlalchemy import ColumnElement, Select, and_, any_, bindparam, func, select, tuple_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import Uuid

from shared.branches import Tree, active_leaf
from shared.db import transaction
from shared.events import EventLog
from shared.models import ChatSession, Message, Turn
from shared.redis import key
from shared.turn_states import ACTIVE, ENDED, STATUSES
from shared.turns import cancel_turn
from web import schemas
from web.assistants import chosen
from web.errors import ApiError
from web.limits import limited
from web.openapi import SSE, operation
from web.relay.frames import RETRY, sse_response
from web.relay.hub import Relay
from web.relay.resume import Resume, delivered, last_event_id, parse_seq, prefixed, wait_for_message
from web.relay.snapshots import turn_snapshot
from web.resources import (
    int_arg,
    message_count,
    message_json,
    owned,
    session_json,
    turn_json,
    uuid_arg,
    valid_id,
)
from web.validation import UNSTORABLE, ActiveBranch, SessionCreate, SessionUpdate, parse_body

bp = Blueprint("sessions", __name__)


@bp.post("/api/sessions")
@operation(
    "Start a session, answered by an assistant (its latest, or a pinned version) or the default",
    {201: schemas.Session},
    body=SessionCreate,
    errors=(404,),  # the assistant it names is not the caller's
)
def create_session():
    body = parse_body(SessionCreate)
    with transaction() as db:
        assistant_id, version = chosen(db, body.assistant_id, body.assistant_version) or (None, None)
        chat = ChatSession(
            owner_id=g.owner_id,
            title=body.title,
            meta=body.metadata,
            assistant_id=assistant_id,
            assistant_version=version,
        )
        db.add(chat)
        db.flush()
        db.refresh(chat)
        data = session_json(chat, 0)
    return jsonify(data), 201


# Which sessions a list holds: those a person made (no replay), those
# replays made for their questions, or both.
ORIGINS = ("chat", "replay", "all")


@bp.get("/api/sessions")
@operation(
    "The caller's sessions, newest first; `q` keeps those whose title holds it (any case); `origin=chat` those"
    " of no replay (a chat list), `origin=replay` those replays made, `replay_id` one replay's",
    {200: schemas.SessionPage},
    query={
        "limit": {"type": "integer", "minimum": 1, "maximum": 100},
        "cursor": {"type": "string"},
        "q": {"type": "string", "maxLength": 200},
        "origin": {"enum": list(ORIGINS)},
        "replay_id": {"type": "string", "format": "uuid"},
    },
)
def list_sessions():
    limit = int_arg("limit", 20, 1, 100)
    cursor = _decode_cursor(request.args.get("cursor"))
    search = request.args.get("q", "")
    if len(search) > 200 or UNSTORABLE.search(search):
        raise ApiError(422, "q must be at most 200 characters of text", {"field": "q"})
    origin = request.args.get("origin", "all")
    if origin not in ORIGINS:
        raise ApiError(422, f"origin must be one of {', '.join(ORIGINS)}", {"field": "origin"})
    replay_id = uuid_arg("replay_id")
    query = session_page(g.owner_id, limit, origin=origin, replay_id=replay_id, cursor=cursor, search=search)
    with transaction() as db:
        rows = db.execute(query).all()
    items = [session_json(chat, count) for chat, count in rows[:limit]]
    next_cursor = _encode_cursor(rows[limit - 1][0]) if len(rows) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


def session_page(
    owner_id: str,
    limit: int,
    *,
    origin: str = "all",
    replay_id: str | None = None,
    cursor: tuple[datetime, str] | None = None,
    search: str = "",
) -> Select:
    """A page of the owner's sessions with their message counts, newest
    first, and one row more if another page follows."""
    counts = select(func.count()).select_from(Message).where(Message.session_id == ChatSession.id).scalar_subquery()
    query = (
        select(ChatSession, counts)
        .where(ChatSession.owner_id == owner_id)
        .order_by(ChatSession.created_at.desc(), ChatSession.id.desc())
        .limit(limit + 1)
    )
    # `replay_id IS NULL` is the predicate of the partial index
    # ix_sessions_owner_chats: the chat list reads its page from it however
    # many replay sessions are newer (tests/test_session_plans.py).
    if origin == "chat":
        query = query.where(ChatSession.replay_id.is_(None))
    elif origin == "replay":
        query = query.where(ChatSession.replay_id.is_not(None))
    if replay_id is not None:
        query = query.where(ChatSession.replay_id == replay_id)
    if cursor is not None:
        query = query.where(tuple_(ChatSession.created_at, ChatSession.id) < cursor)
    if search:
        query = query.where(ChatSession.title.icontains(search, autoescape=True))
    return query


@bp.get("/api/sessions/<session_id>")
@operation("A session", {200: schemas.Session})
def get_session(session_id: str):
    with transaction() as db:
        chat = owned(db, ChatSession, session_id)
        return jsonify(session_json(chat, message_count(db, chat.id)))


@bp.patch("/api/sessions/<session_id>")
@operation(
    "Rename a session, replace its metadata, or change who answers its next turns",
    {200: schemas.Session},
    body=SessionUpdate,
)
def update_session(session_id: str):
    body = parse_body(SessionUpdate)
    with transaction() as db:
        chat = owned(db, ChatSession, session_id, lock=True)
        if "assistant_id" in body.model_fields_set:
            chat.assistant_id, chat.assistant_version = chosen(db, body.assistant_id, body.assistant_version) or (
                None,
                None,
            )
        elif "assistant_version" in body.model_fields_set:
            raise ApiError(422, "name assistant_id with assistant_version", {"field": "assistant_version"})
        if "title" in body.model_fields_set:
            chat.title = body.title
        if "metadata" in body.model_fields_set:
            chat.meta = body.metadata or {}
        chat.updated_at = func.now()
        db.flush()
        db.refresh(chat)
        return jsonify(session_json(chat, message_count(db, chat.id)))


@bp.delete("/api/sessions/<session_id>")
@operation("Delete a session; its running turn is cancelled, its queued ones end cancelled", {204: None})
def delete_session(session_id: str):
    with transaction() as db:
        chat = owned(db, ChatSession, session_id, lock=True)
        for turn in db.scalars(select(Turn).where(Turn.session_id == chat.id, Turn.status.in_(ACTIVE))):
            cancel_turn(db, turn, send_next=False)  # every turn of the session goes with it
        db.delete(chat)
    return "", 204


BRANCH = {"branch": {"enum": ["active", "all"]}}


@bp.get("/api/sessions/<session_id>/messages")
@operation(
    "A session's messages, oldest first: those of its active path, or (`branch=all`) of every branch",
    {200: schemas.MessageList},
    query=BRANCH,
)
def list_messages(session_id: str):
    every = _every_branch()
    with transaction() as db:
        chat = owned(db, ChatSession, session_id)
        query = (
            select(Message)
            .join(Turn, Turn.id == Message.turn_id)
            .where(Message.session_id == chat.id)
            .order_by(Turn.number, Message.role.desc())
        )
        if not every:
            tree = Tree.of(db, chat.id)
            query = query.where(_on_path(tree.path(active_leaf(chat, tree))))
        messages = db.scalars(query).all()
        return jsonify({"items": [message_json(m) for m in messages]})


@bp.get("/api/sessions/<session_id>/turns")
@operation(
    "A session's turns with their questions, in the order they run: those of its active path (what a chat page"
    " shows), or (`branch=all`) of every branch; `status=queued`: its queue, whatever the branch",
    {200: schemas.SessionTurnPage},
    query={
        "limit": {"type": "integer", "minimum": 1, "maximum": 100},
        "cursor": {"type": "string"},
        "status": {"enum": list(STATUSES)},
        **BRANCH,
    },
)
def list_turns(session_id: str):
    limit = int_arg("limit", 100, 1, 100)
    after = _int_cursor(request.args.get("cursor"))
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(422, f"status must be one of {', '.join(STATUSES)}", {"field": "status"})
    every = _every_branch() or status is not None
    with transaction() as db:
        chat = owned(db, ChatSession, session_id)
        tree = Tree.of(db, chat.id)
        query = (
            select(Turn, Message.content)
            .join(Message, and_(Message.turn_id == Turn.id, Message.role == "user"))
            .where(Turn.session_id == chat.id, Turn.number > after)
            .order_by(Turn.number)
            .limit(limit + 1)
        )
        if status is not None:
            query = query.where(Turn.status == status)
        if not every:
            query = query.where(_on_path(tree.path(active_leaf(chat, tree))))
        rows = db.execute(query).all()
        items = [
            turn_json(turn) | {"message": question, "siblings": tree.siblings(turn.id)}
            for turn, question in rows[:limit]
        ]
    next_cursor = str(rows[limit - 1][0].number) if len(rows) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.put("/api/sessions/<session_id>/active")
@operation(
    "Switch the session's active path to a turn's branch: its newest line below that turn",
    {200: schemas.Session},
    body=ActiveBranch,
)
def switch_branch(session_id: str):
    body = parse_body(ActiveBranch)
    with transaction() as db:
        chat = owned(db, ChatSession, session_id, lock=True)
        tree = Tree.of(db, chat.id)
        if body.turn_id not in tree.nodes:
            raise ApiError(422, "turn_id: not a turn of this session", {"field": "turn_id"})
        chat.active_turn_id = tree.leaf_under(body.turn_id)
        db.flush()
        db.refresh(chat)
        return jsonify(session_json(chat, message_count(db, chat.id)))


def _on_path(path: list[str]) -> ColumnElement[bool]:
    """A turn is on `path`: one array parameter, however long the path (a
    list of them makes the driver parse a new statement per length)."""
    return Turn.id == any_(bindparam("path", path, type_=ARRAY(Uuid(as_uuid=False))))


def _every_branch() -> bool:
    branch = request.args.get("branch", "active")
    if branch not in ("active", "all"):
        raise ApiError(422, "branch must be active or all", {"field": "branch"})
    return branch == "all"


@bp.get("/api/sessions/<session_id>/events")
@operation(
    "Follow a session: the events of its running turn, then of each turn after it (ids `<turn id>:<seq>`)",
    {200: SSE},
    headers={"Last-Event-ID": {"type": "string"}},
)
@limited("rate_limit_streams")
def session_events(session_id: str):
    """Follow a session: the events of whatever turn runs in it, then of each
    turn after it, as they come, so a second tab or device can join. Each
    id is `<turn id>:<seq>`; a reconnect with it resumes there."""
    resume, after = _position(last_event_id())
    with transaction() as db:
        chat = owned(db, ChatSession, session_id)
        ours = select(Turn.id).where(Turn.id == resume, Turn.session_id == chat.id)
        if resume is not None and db.scalar(ours) is None:
            raise ApiError(422, "Last-Event-ID names no turn of this session", {"field": "after"})
    relay = current_app.extensions["turnstream.relay"]
    return sse_response(_follow(relay, chat.id, resume, after), relay.ping_seconds)


def _position(raw: str) -> tuple[str | None, int]:
    """A session stream's Last-Event-ID: `<turn id>:<seq>`, or "0" for none."""
    if raw == "0":
        return None, 0
    turn_id, sep, seq = raw.partition(":")
    if not sep:
        raise ApiError(422, "Last-Event-ID must be <turn id>:<seq> on a session stream", {"field": "after"})
    return valid_id(turn_id), parse_seq(seq)


def _follow(relay: Relay, session_id: str, resume: str | None, after: int) -> Iterator[bytes]:
    sub = relay.subscribe(key("session", session_id))  # first: no turn accepted from now on is missed
    try:
        yield RETRY
        number = None  # the number of the last turn followed
        while True:
            turn = _next_turn(session_id, number, resume, after)
            if isinstance(turn, int):  # nothing to follow yet: wait for an accepted turn
                number = turn
                if not (yield from wait_for_message(relay, sub)):
                    return
                continue
            turn_id, number, ended = turn
            start, resume, after = (after if turn_id == resume else 0), None, 0
            frames = Resume(relay, EventLog("turn", turn_id), start, lambda t=turn_id: turn_snapshot(t), ended).frames()
            if (yield from prefixed(frames, f"{turn_id}:".encode())) is None:
                return  # the stream had to end: the client resumes from its Last-Event-ID
    finally:
        relay.unsubscribe(sub)


def _next_turn(session_id: str, number: int | None, resume: str | None, after: int) -> tuple[str, int, bool] | int:
    """The turn to follow next, as (id, number, ended); or, if there is none
    yet, the number after which to look when a turn is accepted.

    A resumed stream continues its turn unless all of it was delivered; a new
    one starts with the session's running (or first queued) turn; after
    that, turns follow in order."""
    query = select(Turn.id, Turn.number, Turn.status).where(Turn.session_id == session_id).order_by(Turn.number)
    with transaction() as db:
        if resume is not None:
            row = db.execute(query.where(Turn.id == resume)).one()
            if not delivered(EventLog("turn", row.id), row.status in ENDED, after):
                return row.id, row.number, row.status in ENDED
            number = row.number
        if number is None:
            row = db.execute(query.where(Turn.status.in_(ACTIVE)).limit(1)).first()
            if row is None:
                return db.scalar(select(ChatSession.turn_count).where(ChatSession.id == session_id)) or 0
        else:
            row = db.execute(query.where(Turn.number > number).limit(1)).first()
            if row is None:
                return number
    return row.id, row.number, row.status in ENDED


def _int_cursor(cursor: str | None) -> int:
    """A turn list's cursor: the number of the last turn of the page before."""
    if not cursor:
        return 0
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 9:
        raise ApiError(422, "cursor is not one this API handed out", {"field": "cursor"})
    return int(cursor)


def _encode_cursor(chat: ChatSession) -> str:
    raw = json.dumps([chat.created_at.isoformat(), chat.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None):
    if not cursor:
        return None
    try:
        created_at, ident = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), str(uuid.UUID(ident))
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise ApiError(422, "cursor is not one this API handed out", {"field": "cursor"}) from None
