"""The browser pages (chat, evaluations) and the little they need to know about the server."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, current_app, jsonify, render_template, send_from_directory

from shared.status import model_status, tool_status
from web import schemas
from web.openapi import operation

bp = Blueprint("page", __name__)


@bp.get("/")
def index():
    settings = current_app.extensions["turnstream.settings"]
    return render_template("index.html", settings=settings)


@bp.get("/evals")
def evals():
    """The evaluations page: a question set's runs, run now, compared. Like
    the chat page it holds no data itself (public); it signs in and reads
    the API."""
    return render_template("evals.html")


@bp.get("/favicon.ico")
def favicon():
    """Browsers ask for it whatever the page links; the page's own icon answers."""
    return send_from_directory(current_app.static_folder, "favicon.svg", mimetype="image/svg+xml", max_age=86400)


@bp.get("/api/info")
@operation("The model and the tool servers, as the workers last saw them", {200: schemas.Info})
def info():
    """The model and the tools as the workers last saw them: the offline
    model is named only when a worker found it answering."""
    settings = current_app.extensions["turnstream.settings"]
    model = model_status() or {}
    return jsonify(
        {
            "model": settings.openai_model,
            "offline_model": bool(model.get("offline")),
            "model_status": {"ok": model.get("ok"), "error": model.get("error"), "checked_at": _iso(model.get("at"))},
            "tools": [
                {"name": name, "ok": s["ok"], "error": s["error"], "tools": s["tools"], "checked_at": _iso(s["at"])}
                for name, s in tool_status(settings.mcp_servers).items()
            ],
            "auth": settings.auth_enabled,
        }
    )


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()
