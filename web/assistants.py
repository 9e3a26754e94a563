"""Assistants: create, read, replace (a new version), roll back, delete; and
the checks every caller of an assistant (sessions, replays, the CLI) uses."""

from __future__ import annotations

import base64
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request
from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from shared.config import DEFAULT_ENDPOINT, Settings
from shared.db import transaction
from shared.models import Assistant, AssistantVersion, ChatSession, Replay, ReplaySchedule, Turn
from shared.turn_states import ACTIVE
from web import schemas
from web.errors import ApiError
from web.openapi import operation
from web.resources import flush_named, int_arg, iso, owned, valid_id
from web.validation import UNSTORABLE, AssistantBody, LatestVersion, parse_body

bp = Blueprint("assistants", __name__)


def profile_columns(body: AssistantBody, settings: Settings) -> dict[str, Any]:
    """A version's columns from a checked body; a 422 names what the
    operator's configuration or limits refuse."""
    if len(body.instructions) > settings.max_prompt_chars:
        raise ApiError(
            422, f"instructions must be at most {settings.max_prompt_chars} characters", {"field": "instructions"}
        )
    if body.endpoint not in settings.model_endpoints:
        known = ", ".join(sorted(settings.model_endpoints))
        raise ApiError(
            422,
            f"endpoint {body.endpoint!r} is not configured (MODEL_ENDPOINTS): one of {known}",
            {"field": "endpoint"},
        )
    if body.model is None and body.endpoint != DEFAULT_ENDPOINT:
        raise ApiError(422, f"model is required with endpoint {body.endpoint!r}", {"field": "model"})
    for server in body.tools:
        if server not in settings.mcp_servers:
            raise ApiError(422, f"tools: no MCP server {server!r} is configured (MCP_SERVERS)", {"field": "tools"})
    for name in body.approval.tools:
        server = name.partition("__")[0]
        if server not in settings.mcp_servers:
            raise ApiError(
                422,
                f"approval.tools: {name!r} names no configured MCP server (tools are <server>__<tool>)",
                {"field": "approval.tools"},
            )
    return {
        "instructions": body.instructions,
        "endpoint": body.endpoint,
        "model": body.model or settings.openai_model,
        "temperature": body.temperature,
        "max_tokens": body.max_tokens,
        "tools": {server: sorted(set(tools)) for server, tools in body.tools.items()},
        "approval": body.approval.model_dump(),
        "meta": body.metadata,
    }


def create_assistant(db: Session, owner_id: str, body: AssistantBody, settings: Settings) -> Assistant:
    """A new assistant at version 1 (409 if the owner has one of that name)."""
    columns = profile_columns(body, settings)
    assistant = Assistant(owner_id=owner_id, name=body.name, latest=1, versions=1)
    db.add(assistant)
    flush_named(db, "an assistant", body.name)
    db.add(AssistantVersion(assistant_id=assistant.id, version=1, **columns))
    db.flush()
    return assistant


def replace_assistant(db: Session, assistant: Assistant, body: AssistantBody, settings: Settings) -> None:
    """The whole profile replaced: a new version, made the latest. Call
    with the assistant's row locked."""
    columns = profile_columns(body, settings)
    assistant.name = body.name
    assistant.versions += 1
    assistant.latest = assistant.versions
    assistant.updated_at = func.now()
    flush_named(db, "an assistant", body.name)
    db.add(AssistantVersion(assistant_id=assistant.id, version=assistant.versions, **columns))
    db.flush()


def chosen(db: Session, assistant_id: str | None, version: int | None) -> tuple[str, int | None] | None:
    """A body's choice of assistant: the caller's (404 if not), with a
    version it has (422 if not); None for the default assistant."""
    if assistant_id is None:
        if version is not None:
            raise ApiError(422, "assistant_version needs an assistant_id", {"field": "assistant_version"})
        return None
    # Key-share locked to the end of the caller's transaction: a delete of
    # it waits, then finds (and clears) what this one made point to it.
    assistant = db.scalar(
        select(Assistant)
        .where(Assistant.id == valid_id(assistant_id), Assistant.owner_id == g.owner_id)
        .with_for_update(key_share=True)
    )
    if assistant is None:
        raise ApiError(404, "no such assistant")
    if version is not None and version > assistant.versions:
        raise ApiError(422, f"the assistant has versions 1 to {assistant.versions}", {"field": "assistant_version"})
    return assistant.id, version


def assistant_json(assistant: Assistant, version: AssistantVersion) -> dict[str, Any]:
    return {
        "id": assistant.id,
        "name": assistant.name,
        "version": version.version,
        "latest": assistant.latest,
        "versions": assistant.versions,
        "instructions": version.instructions,
        "endpoint": version.endpoint,
        "model": version.model,
        "temperature": version.temperature,
        "max_tokens": version.max_tokens,
        "tools": version.tools,
        "approval": version.approval,
        "metadata": version.meta,
        "created_at": iso(assistant.created_at),
        "updated_at": iso(assistant.updated_at),
        "version_created_at": iso(version.created_at),
    }


def _version(db: Session, assistant: Assistant, number: int | None = None) -> AssistantVersion:
    found = db.get(AssistantVersion, (assistant.id, number or assistant.latest))
    if found is None:
        raise ApiError(404, "no such version")
    return found


def _settings() -> Settings:
    return current_app.extensions["turnstream.settings"]


@bp.post("/api/assistants")
@operation(
    "Make an assistant: who answers a session's turns (version 1)",
    {201: schemas.Assistant},
    body=AssistantBody,
    errors=(409,),
)
def create():
    body = parse_body(AssistantBody)
    with transaction() as db:
        assistant = create_assistant(db, g.owner_id, body, _settings())
        db.refresh(assistant)
        data = assistant_json(assistant, _version(db, assistant))
    return jsonify(data), 201


@bp.get("/api/assistants")
@operation(
    "The caller's assistants by name, each at its latest version",
    {200: schemas.AssistantPage},
    query={"limit": {"type": "integer", "minimum": 1, "maximum": 100}, "cursor": {"type": "string"}},
)
def list_assistants():
    limit = int_arg("limit", 50, 1, 100)
    after = _decode_name(request.args.get("cursor"))
    query = (
        select(Assistant, AssistantVersion)
        .join(
            AssistantVersion,
            (AssistantVersion.assistant_id == Assistant.id) & (AssistantVersion.version == Assistant.latest),
        )
        .where(Assistant.owner_id == g.owner_id)
        .order_by(Assistant.name)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(Assistant.name > after)
    with transaction() as db:
        rows = db.execute(query).all()
        items = [assistant_json(a, v) for a, v in rows[:limit]]
    next_cursor = _encode_name(rows[limit - 1][0].name) if len(rows) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.get("/api/assistants/<assistant_id>")
@operation("An assistant at its latest version", {200: schemas.Assistant})
def get(assistant_id: str):
    with transaction() as db:
        assistant = owned(db, Assistant, assistant_id)
        return jsonify(assistant_json(assistant, _version(db, assistant)))


@bp.put("/api/assistants/<assistant_id>")
@operation(
    "Replace an assistant's whole profile: a new version, made its latest",
    {200: schemas.Assistant},
    body=AssistantBody,
    errors=(409,),
)
def replace(assistant_id: str):
    body = parse_body(AssistantBody)
    with transaction() as db:
        assistant = owned(db, Assistant, assistant_id, lock=True)
        replace_assistant(db, assistant, body, _settings())
        db.refresh(assistant)
        data = assistant_json(assistant, _version(db, assistant))
    return jsonify(data)


@bp.delete("/api/assistants/<assistant_id>")
@operation(
    "Delete an assistant and its versions (409 while a turn or replay of it is under way); its sessions go on"
    " with the default assistant",
    {204: None},
    errors=(409,),
)
def delete(assistant_id: str):
    with transaction() as db:
        # The row lock waits for a turn being accepted with it (submit_turn()
        # key-share locks it), so that turn is seen below.
        assistant = owned(db, Assistant, assistant_id, lock=True)
        busy = select(exists().where(Turn.status.in_(ACTIVE), Turn.assistant_id == assistant.id))
        if db.scalar(busy):
            raise ApiError(409, "a turn of this assistant is queued or running; cancel it or wait for it to end")
        replaying = select(exists().where(Replay.assistant_id == assistant.id, Replay.finished_at.is_(None)))
        if db.scalar(replaying):
            raise ApiError(409, "a replay of this assistant is under way; wait for it to finish")
        for model in (ChatSession, Replay):
            db.execute(
                update(model)
                .where(model.assistant_id == assistant.id)
                .values(assistant_id=None, assistant_version=None)
            )
        # A schedule of it stops rather than go on with another assistant.
        db.execute(
            update(ReplaySchedule)
            .where(ReplaySchedule.assistant_id == assistant.id)
            .values(assistant_id=None, assistant_version=None, enabled=False, next_run_at=None)
        )
        db.delete(assistant)
    return "", 204


@bp.get("/api/assistants/<assistant_id>/versions")
@operation(
    "An assistant's versions, newest first",
    {200: schemas.AssistantPage},
    query={"limit": {"type": "integer", "minimum": 1, "maximum": 100}, "cursor": {"type": "string"}},
)
def list_versions(assistant_id: str):
    limit = int_arg("limit", 20, 1, 100)
    before = _decode_version(request.args.get("cursor"))
    with transaction() as db:
        assistant = owned(db, Assistant, assistant_id)
        query = (
            select(AssistantVersion)
            .where(AssistantVersion.assistant_id == assistant.id)
            .order_by(AssistantVersion.version.desc())
            .limit(limit + 1)
        )
        if before is not None:
            query = query.where(AssistantVersion.version < before)
        versions = db.scalars(query).all()
        items = [assistant_json(assistant, v) for v in versions[:limit]]
    next_cursor = str(versions[limit - 1].version) if len(versions) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.get("/api/assistants/<assistant_id>/versions/<version>")
@operation("An assistant at one of its versions", {200: schemas.Assistant})
def get_version(assistant_id: str, version: str):
    if not version.isascii() or not version.isdigit() or len(version) > 9 or int(version) < 1:
        raise ApiError(404, "no such version")
    with transaction() as db:
        assistant = owned(db, Assistant, assistant_id)
        return jsonify(assistant_json(assistant, _version(db, assistant, int(version))))


@bp.post("/api/assistants/<assistant_id>/latest")
@operation(
    "Make an earlier (or later) version the latest: a rollback; sessions that pin none run with it",
    {200: schemas.Assistant},
    body=LatestVersion,
)
def set_latest(assistant_id: str):
    body = parse_body(LatestVersion)
    with transaction() as db:
        assistant = owned(db, Assistant, assistant_id, lock=True)
        if body.version > assistant.versions:
            raise ApiError(422, f"the assistant has versions 1 to {assistant.versions}", {"field": "version"})
        assistant.latest = body.version
        assistant.updated_at = func.now()
        db.flush()
        db.refresh(assistant)
        data = assistant_json(assistant, _version(db, assistant))
    return jsonify(data)


def _encode_name(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_name(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        name = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        name = "\x00"
    if UNSTORABLE.search(name):
        raise ApiError(422, "cursor is not one this API handed out", {"field": "cursor"})
    return name


def _decode_version(cursor: str | None) -> int | None:
    if not cursor:
        return None
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 9:
        raise ApiError(422, "cursor is not one this API handed out", {"field": "cursor"})
    return int(cursor)
