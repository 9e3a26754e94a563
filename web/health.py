"""Health, public and cheap, for a platform's probes: database, Redis, the
worker processes alive, what the workers last saw of the model and the tool
servers, the breakers not closed, and this web process's SSE streams. A
failing check names where it looked and the setting. `?detail=1` adds each
breaker's state and what is costly to gather (a walk of the heap), for a
caller with a key or on this machine."""

from __future__ import annotations

import gc

from flask import Blueprint, current_app, jsonify, request
from greenlet import greenlet
from sqlalchemy import text

from shared import breakers
from shared.db import get_engine
from shared.redis import get_redis
from shared.status import (
    POSTGRES_ERRORS,
    REDIS_ERRORS,
    describe_outage,
    model_status,
    tool_status,
    workers_alive,
)
from web import schemas
from web.auth import require_operator
from web.openapi import operation

bp = Blueprint("health", __name__)


@bp.get("/api/health")
@operation(
    "Whether Postgres and Redis answer, and what the workers last saw",
    {200: schemas.Health, 503: schemas.Health},
    query={"detail": {"type": "string", "description": "any value: add what is costly to gather"}},
    errors=(401,),
    public=True,
)
def health():
    detail = bool(request.args.get("detail"))
    if detail:
        require_operator("?detail=1")
    checks: dict[str, object] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except POSTGRES_ERRORS as exc:  # a health check reports, it does not raise
        checks["database"] = f"error: {describe_outage(exc)}"
    checks["workers"] = 0
    try:
        get_redis().ping()
        checks["redis"] = "ok"
        checks["workers"] = workers_alive()
        model = model_status() or {}
        checks["model"] = {True: "ok", False: "error", None: "unknown"}[model.get("ok")]
        tools = tool_status(current_app.extensions["turnstream.settings"].mcp_servers)
        checks["tools_unavailable"] = [name for name, status in tools.items() if status["ok"] is False]
        found = breakers.states()
        checks["breakers_open"] = [name for name, state in found.items() if state["state"] != breakers.CLOSED]
        if detail:
            checks["breakers"] = found
    except REDIS_ERRORS as exc:
        checks["redis"] = f"error: {describe_outage(exc)}"
    checks["relay"] = current_app.extensions["turnstream.relay"].stats()  # this process's streams
    if detail:
        checks["relay"]["greenlets"] = sum(isinstance(o, greenlet) for o in gc.get_objects())
    ok = checks["database"] == "ok" and checks["redis"] == "ok"
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503
