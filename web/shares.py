"""Sharing a session read-only: a link to a snapshot of one of its paths
(no key needed to read it), listed and revoked by its owner; and a
session's export as JSON (its tree) or Markdown (its active path)."""

from __future__ import annotations

import secrets
from typing import Any

from flask import Blueprint, Response, g, jsonify, render_template, request, url_for
from sqlalchemy import select

from shared.branches import Tree
from shared.db import transaction
from shared.models import ChatSession, Share
from web import schemas
from web.errors import ApiError
from web.openapi import operation
from web.resources import iso, owned
from web.transcripts import export, markdown, snapshot
from web.validation import ShareCreate, parse_body

bp = Blueprint("shares", __name__)


def share_json(share: Share) -> dict[str, Any]:
    return {
        "id": share.id,
        "session_id": share.session_id,
        "turn_id": share.turn_id,
        "include_tools": share.include_tools,
        "url": url_for("shares.shared_page", token=share.id),
        "api_url": url_for("shares.shared_json", token=share.id),
        "created_at": iso(share.created_at),
    }


@bp.post("/api/sessions/<session_id>/shares")
@operation(
    "Share a path of the session read-only: a link to a snapshot of it, anyone with the link can read",
    {201: schemas.Share},
    body=ShareCreate,
)
def create(session_id: str):
    body = parse_body(ShareCreate)
    with transaction() as db:
        chat = owned(db, ChatSession, session_id)
        data = export(db, chat)
        leaf = body.turn_id
        if leaf is not None and leaf not in Tree.of(db, chat.id).nodes:
            raise ApiError(422, "turn_id: not a turn of this session", {"field": "turn_id"})
        leaf = leaf or (data["active_path"][-1] if data["active_path"] else None)
        share = Share(
            id=secrets.token_urlsafe(32),
            session_id=chat.id,
            owner_id=g.owner_id,
            turn_id=leaf,
            include_tools=body.include_tools,
            snapshot=snapshot(data, leaf, body.include_tools),
        )
        db.add(share)
        db.flush()
        db.refresh(share)
        return jsonify(share_json(share)), 201


@bp.get("/api/sessions/<session_id>/shares")
@operation("The session's share links, newest first", {200: schemas.ShareList})
def list_shares(session_id: str):
    with transaction() as db:
        chat = owned(db, ChatSession, session_id)
        shares = db.scalars(select(Share).where(Share.session_id == chat.id).order_by(Share.created_at.desc()))
        return jsonify({"items": [share_json(s) for s in shares]})


@bp.delete("/api/shares/<share_id>")
@operation("Revoke a share link: it reads as not found from now on", {204: None})
def revoke(share_id: str):
    with transaction() as db:
        share = db.scalar(select(Share).where(Share.id == share_id, Share.owner_id == g.owner_id))
        if share is None:
            raise ApiError(404, "no such share")
        db.delete(share)
    return "", 204


@bp.get("/api/shared/<token>")
@operation("A shared snapshot, read with its link's secret (no key)", {200: schemas.SharedChat}, public=True)
def shared_json(token: str):
    return jsonify(_shared(token).snapshot)


@bp.get("/shared/<token>")
def shared_page(token: str):
    """The shared snapshot as a page anyone with the link can read."""
    return render_template("shared.html", chat=_shared(token).snapshot)


def _shared(token: str) -> Share:
    with transaction() as db:
        share = db.get(Share, token) if len(token) <= 100 else None
        if share is None:
            raise ApiError(404, "no such share, or it was revoked")
        db.expunge(share)
        return share


@bp.get("/api/sessions/<session_id>/export")
@operation(
    "Export a session: `format=json` its whole tree (every branch), `markdown` its active path",
    {200: (schemas.SessionExport, "text/markdown")},
    query={"format": {"enum": ["json", "markdown"]}, "turn_id": {"type": "string"}},
)
def export_session(session_id: str):
    """`turn_id` (Markdown): the path to that turn instead of the active one,
    as a page that shows another branch than the server's asks."""
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "markdown"):
        raise ApiError(422, "format is json or markdown", {"field": "format"})
    leaf = request.args.get("turn_id")
    with transaction() as db:
        chat = owned(db, ChatSession, session_id)
        data = export(db, chat)
    if leaf is not None and leaf not in {t["id"] for t in data["turns"]}:
        raise ApiError(422, "turn_id: not a turn of this session", {"field": "turn_id"})
    name = f"session-{chat.id}"
    if fmt == "markdown":
        headers = {"Content-Disposition": f'attachment; filename="{name}.md"'}
        return Response(markdown(data, leaf), mimetype="text/markdown", headers=headers)
    response = jsonify(data)
    response.headers["Content-Disposition"] = f'attachment; filename="{name}.json"'
    return response
