"""Turns: submit, read, follow (SSE), cancel; and /api/chat for simple clients."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError

from shared.db import autocommit_engine, transaction
from shared.events import STOP_INTERRUPT, STOP_ROLLBACK, EventLog
from shared.models import ChatSession, Message, Turn
from shared.overrides.gunicorn_direct_write import writable_socket
from shared.turn_states import ENDED, QUEUED
from shared.turns import (
    BranchRefused,
    TurnConflict,
    active_turns,
    cancel_turn,
    give_way,
    lock_session,
    send_now,
    submit_turn,
)
from web import schemas
from web.assistants import chosen
from web.errors import ApiError
from web.limits import limited, open_streams, quota_exceeded
from web.openapi import SSE, operation
from web.relay.frames import sse_response, synthetic
from web.relay.resume import Resume, delivered, last_event_id, parse_seq
from web.relay.snapshots import turn_snapshot
from web.resources import owned, turn_json, valid_id
from web.validation import ChatRequest, Regenerate, TurnCreate, parse_body

bp = Blueprint("turns", __name__)


@bp.post("/api/sessions/<session_id>/turns")
@operation(
    "Submit a turn: the message is answered by a worker, after any turn before it in the session",
    {202: schemas.Turn, 200: schemas.Turn},
    body=TurnCreate,
    headers={"Idempotency-Key": {"type": "string", "maxLength": 200}},
    errors=(409,),
)
@limited("rate_limit_submit")
def create_turn(session_id: str):
    settings = current_app.extensions["turnstream.settings"]
    body = parse_body(TurnCreate, settings.max_message_chars)
    return _submitted(valid_id(session_id), body.message, body.multitask, body.model_dump())


@bp.post("/api/turns/<turn_id>/regenerate")
@operation(
    "Answer a turn's question again: a sibling turn (a new branch) with the same question, made the active path",
    {202: schemas.Turn, 200: schemas.Turn},
    body=Regenerate,
    headers={"Idempotency-Key": {"type": "string", "maxLength": 200}},
    errors=(409,),
)
@limited("rate_limit_submit")
def regenerate(turn_id: str):
    body = parse_body(Regenerate) if request.content_length else Regenerate()
    with transaction() as db:
        turn = owned(db, Turn, turn_id)
        if turn.status not in ENDED:
            raise ApiError(409, f"only an answer that has ended is regenerated; this turn is {turn.status}")
        question = db.scalar(select(Message.content).where(Message.turn_id == turn.id, Message.role == "user"))
    hashed = {"regenerate": turn.id, **body.model_dump()}
    return _submitted(turn.session_id, question, body.multitask, hashed, branch=(turn.parent_id,))


@bp.post("/api/turns/<turn_id>/edit")
@operation(
    "Ask a turn's question otherwise: a sibling turn (a new branch) with the new question, made the active path",
    {202: schemas.Turn, 200: schemas.Turn},
    body=TurnCreate,
    headers={"Idempotency-Key": {"type": "string", "maxLength": 200}},
    errors=(409,),
)
@limited("rate_limit_submit")
def edit(turn_id: str):
    settings = current_app.extensions["turnstream.settings"]
    body = parse_body(TurnCreate, settings.max_message_chars)
    with transaction() as db:
        turn = owned(db, Turn, turn_id)
    hashed = {"edit": turn.id, **body.model_dump()}
    return _submitted(turn.session_id, body.message, body.multitask, hashed, branch=(turn.parent_id,))


def _submitted(session_id: str, message: str, multitask: str, hashed: dict, branch: tuple | None = None):
    """Submit a turn (following the active path, or `branch`'s turn) under
    the request's Idempotency-Key; the answer to the POST."""
    settings = current_app.extensions["turnstream.settings"]
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and len(key) > 200:
        raise ApiError(422, "Idempotency-Key must be at most 200 characters", {"field": "Idempotency-Key"})
    request_hash = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()
    gives_way = multitask in (STOP_INTERRUPT, STOP_ROLLBACK)
    # One statement (one round trip) in autocommit; a message that makes the
    # running turn give way does that under the same session lock.
    with transaction() if gives_way else autocommit_engine().connect() as conn:
        _within_quota(conn, settings.max_active_turns)
        try:
            submitted = submit_turn(
                conn,
                session_id,
                g.owner_id,
                message,
                multitask=multitask,
                idempotency_key=key,
                request_hash=request_hash,
                branch=branch,
            )
        except TurnConflict as exc:
            raise ApiError(409, str(exc)) from None
        except BranchRefused as exc:  # the turn it follows was removed meanwhile (a rollback)
            raise ApiError(409, str(exc)) from None
        except IntegrityError:
            if key is None:
                raise
            # The same key sent at the same moment for two sessions: each
            # locked its own session, found no turn with the key, and one
            # insert lost on the key's unique index.
            raise ApiError(409, "Idempotency-Key is in use by a request at the same moment") from None
        if gives_way and submitted is not None and submitted[1]:
            give_way(conn, submitted[0].session_id, g.owner_id, multitask)
    if submitted is None:
        raise ApiError(404, "no such session")
    turn, created = submitted
    return jsonify(turn_json(turn)), 202 if created else 200


@bp.get("/api/turns/<turn_id>")
@operation("A turn", {200: schemas.Turn})
def get_turn(turn_id: str):
    with transaction() as db:
        return jsonify(turn_json(owned(db, Turn, turn_id)))


@bp.post("/api/turns/<turn_id>/cancel")
@operation("Cancel a turn (200: it had already ended)", {202: schemas.Turn, 200: schemas.Turn})
def cancel(turn_id: str):
    with transaction() as db:
        turn = owned(db, Turn, turn_id)
        if turn.status in ENDED:
            return jsonify(turn_json(turn)), 200
        if lock_session(db, turn.session_id, g.owner_id) is None:
            raise ApiError(404, "no such turn")
        db.refresh(turn)
        cancel_turn(db, turn)
        data = turn_json(turn)
    return jsonify(data), 202


@bp.post("/api/turns/<turn_id>/send-now")
@operation(
    "Send a queued turn now: it goes ahead of its session's other queued turns, and the turn running (or"
    " waiting for a person) is interrupted for it, keeping its answer so far",
    {202: schemas.Turn},
    errors=(409,),
)
def send_turn_now(turn_id: str):
    with transaction() as db:
        turn = owned(db, Turn, turn_id)
        if lock_session(db, turn.session_id, g.owner_id) is None:
            raise ApiError(404, "no such turn")
        db.refresh(turn)
        if turn.status != QUEUED:
            raise ApiError(409, f"only a queued turn can be sent now; this one is {turn.status}")
        send_now(db, turn, g.owner_id)
        data = turn_json(turn)
    return jsonify(data), 202


# Every SSE connect (and reconnect) reads only this: the turn's status, if
# the caller owns it. A Core statement in autocommit, with no ORM session and
# no transaction around it: a reconnect storm is made of these.
_OWNED_STATUS = select(Turn.status).where(Turn.id == bindparam("turn_id"), Turn.owner_id == bindparam("owner_id"))


@bp.get("/api/turns/<turn_id>/events")
@operation(
    "A turn's events after `Last-Event-ID` (or `after`), live until its last (204: all were delivered)",
    {200: SSE, 204: None},
    query={"after": {"type": "integer", "minimum": 0}},
    headers={"Last-Event-ID": {"type": "string"}},
)
@limited("rate_limit_streams")
def turn_events(turn_id: str):
    after = parse_seq(last_event_id())
    turn_id = valid_id(turn_id)
    with autocommit_engine().connect() as conn:
        status = conn.scalar(_OWNED_STATUS, {"turn_id": turn_id, "owner_id": g.owner_id})
    if status is None:
        raise ApiError(404, "no such turn")
    events = EventLog("turn", turn_id)
    if delivered(events, status in ENDED, after):
        return "", 204  # the browser stops retrying
    return _sse(events, after, turn_id, ended=status in ENDED)


@bp.post("/api/chat")
@operation(
    "Ask in one call (a new session unless `session_id`): the answer (JSON), or with `stream` the turn's events;"
    " 202 with the Turn if it is still running after CHAT_WAIT_SECONDS",
    {200: (schemas.ChatAnswer, SSE), 202: schemas.Turn},
    body=ChatRequest,
    errors=(404,),
)
@limited("rate_limit_submit")
def chat():
    settings = current_app.extensions["turnstream.settings"]
    body = parse_body(ChatRequest, settings.max_message_chars)
    if body.stream:
        open_streams().check(g.owner_id)  # before anything is written
    with autocommit_engine().connect() as conn:
        _within_quota(conn, settings.max_active_turns)
    if body.session_id is not None:
        if body.assistant_id is not None:
            raise ApiError(
                422,
                "assistant_id chooses a new session's assistant: send it without session_id",
                {"field": "assistant_id"},
            )
        with autocommit_engine().connect() as conn:
            submitted = submit_turn(conn, valid_id(body.session_id), g.owner_id, body.message)
        if submitted is None:
            raise ApiError(404, "no such session")
        session_id = submitted[0].session_id
    else:  # a new session and its first turn, in one transaction
        with transaction() as db:
            assistant_id = (chosen(db, body.assistant_id, None) or (None,))[0]
            chat_session = ChatSession(owner_id=g.owner_id, title=body.message[:80], meta={}, assistant_id=assistant_id)
            db.add(chat_session)
            db.flush()
            submitted = submit_turn(db, chat_session.id, g.owner_id, body.message)
            session_id = chat_session.id
    turn_id = submitted[0].id
    events = EventLog("turn", turn_id)
    if body.stream:
        accepted = json.dumps({"seq": 0, "type": "turn.accepted", "turn_id": turn_id, "session_id": session_id})
        return _sse(events, 0, turn_id, ended=False, first=synthetic("turn.accepted", accepted))
    relay = current_app.extensions["turnstream.relay"]
    sub = relay.subscribe(events.channel)
    try:
        if not any(e.ending for e in events.read_after(0)):
            _wait_for_end(relay, sub, settings.chat_wait_seconds)
    finally:
        relay.unsubscribe(sub)
    with transaction() as db:
        turn = db.get(Turn, turn_id)
        if turn is None:
            raise ApiError(404, "the session was deleted while its turn ran")
        if turn.status not in ENDED:
            return jsonify(turn_json(turn)), 202
        return jsonify(
            {
                "response": turn.answer,
                "session_id": session_id,
                "turn_id": turn_id,
                "status": turn.status,
                "error": turn.error,
                "usage": turn.usage,
                "tools": turn.tools or [],
            }
        )


def _within_quota(conn, most: int) -> None:
    """429 if the caller has MAX_ACTIVE_TURNS_PER_OWNER turns queued or running."""
    if active_turns(conn, g.owner_id) >= most:
        raise quota_exceeded(
            f"this key has {most} turns queued or running (MAX_ACTIVE_TURNS_PER_OWNER); wait for some to end"
        )


def _wait_for_end(relay, sub, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        relay.wake_at(sub, deadline)
        batch = sub.take()
        if sub.ended or any(item.ending for item in batch):
            return  # ended: the answer is read from Postgres as it stands


def _sse(events: EventLog, after: int, turn_id: str, ended: bool, first: bytes = b"") -> Response:
    relay = current_app.extensions["turnstream.relay"]
    sock = writable_socket(request.environ)
    frames = Resume(relay, events, after, lambda: turn_snapshot(turn_id), ended, sock).frames()
    if first:
        frames = _after_first(first, frames)
    return sse_response(frames, relay.ping_seconds)


def _after_first(first: bytes, frames: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from frames
