"""The browser chat page and the little it needs to know about the server."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, render_template

bp = Blueprint("page", __name__)


@bp.get("/")
def index():
    settings = current_app.extensions["turnstream.settings"]
    return render_template("index.html", settings=settings)


@bp.get("/api/info")
def info():
    settings = current_app.extensions["turnstream.settings"]
    return jsonify(
        {"model": settings.openai_model, "offline_model": settings.offline_model, "auth": settings.auth_enabled}
    )
