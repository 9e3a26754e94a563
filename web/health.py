"""Health: database, Redis, the number of live workers, what the workers
last saw of the model and the tool servers, and this web process's SSE
streams. A failing check names where it looked and the setting."""

from __future__ import annotations

import gc

from flask import Blueprint, current_app, jsonify, request
from greenlet import greenlet
from sqlalchemy import text

from shared.broker import get_celery
from shared.db import get_engine
from shared.redis import get_redis
from shared.status import POSTGRES_ERRORS, REDIS_ERRORS, describe_outage, model_status, tool_status

bp = Blueprint("health", __name__)


@bp.get("/api/health")
def health():
    checks: dict[str, object] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except POSTGRES_ERRORS as exc:  # a health check reports, it does not raise
        checks["database"] = f"error: {describe_outage(exc)}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
        model = model_status() or {}
        checks["model"] = {True: "ok", False: "error", None: "unknown"}[model.get("ok")]
        tools = tool_status(current_app.extensions["turnstream.settings"].mcp_servers)
        checks["tools_unavailable"] = [name for name, status in tools.items() if status["ok"] is False]
    except REDIS_ERRORS as exc:
        checks["redis"] = f"error: {describe_outage(exc)}"
    try:
        checks["workers"] = len(get_celery().control.ping(timeout=0.5)) if checks["redis"] == "ok" else 0
    except Exception:
        checks["workers"] = 0
    checks["relay"] = current_app.extensions["turnstream.relay"].stats()  # this process's streams
    if request.args.get("detail"):  # walks the heap: for operators and tests, not probes
        checks["relay"]["greenlets"] = sum(isinstance(o, greenlet) for o in gc.get_objects())
    ok = checks["database"] == "ok" and checks["redis"] == "ok"
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503
