"""Health: database, Redis, the number of live workers, and this web
process's SSE streams."""

from __future__ import annotations

import gc

from flask import Blueprint, current_app, jsonify, request
from greenlet import greenlet
from sqlalchemy import text

from shared.broker import get_celery
from shared.db import get_engine
from shared.redis import get_redis

bp = Blueprint("health", __name__)


@bp.get("/api/health")
def health():
    checks: dict[str, object] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # a health check reports, it does not raise
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        checks["workers"] = len(get_celery().control.ping(timeout=0.5)) if checks["redis"] == "ok" else 0
    except Exception:
        checks["workers"] = 0
    checks["relay"] = current_app.extensions["turnstream.relay"].stats()  # this process's streams
    if request.args.get("detail"):  # walks the heap: for operators and tests, not probes
        checks["relay"]["greenlets"] = sum(isinstance(o, greenlet) for o in gc.get_objects())
    ok = checks["database"] == "ok" and checks["redis"] == "ok"
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503
