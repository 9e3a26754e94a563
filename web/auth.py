"""Who is calling: API keys (hashed at rest), the chat page's signed cookie,
or, in local development with AUTH=off, the one local owner."""

from __future__ import annotations

import hashlib
import secrets
import threading

from cachetools import TTLCache
from flask import Blueprint, current_app, g, jsonify, request, session
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from shared.db import db_session
from shared.models import ApiKey, Owner
from web.errors import ApiError
from web.validation import Login, parse_body

bp = Blueprint("auth", __name__)

LOCAL_OWNER = "local"
PUBLIC_ENDPOINTS = {"health.health", "auth.login", "page.index", "static"}

# Keys seen lately (hash -> owner id), so a request does not ask Postgres who
# it is: that lookup was a web process's largest cost per request
# (tests/bench/pipeline.py). A key deleted in the database keeps working for
# up to KNOWN_KEY_SECONDS in each web process; an unknown key is never cached.
KNOWN_KEY_SECONDS = 60
_known_keys: TTLCache[str, str] = TTLCache(maxsize=10_000, ttl=KNOWN_KEY_SECONDS)
_known_keys_lock = threading.Lock()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(owner_name: str, key_name: str = "default") -> str:
    """Make an API key for an owner (created if new). Returns the key; only its
    hash is stored, so this is the one time it can be shown."""
    key = "ts_" + secrets.token_urlsafe(32)
    with db_session() as db:
        owner = get_or_create_owner(db, owner_name)
        db.add(ApiKey(owner_id=owner.id, name=key_name, key_hash=hash_key(key)))
    return key


def owner_for_key(key: str) -> str | None:
    digest = hash_key(key)
    with _known_keys_lock:
        owner_id = _known_keys.get(digest)
    if owner_id is None:
        with db_session() as db:
            owner_id = db.scalar(select(ApiKey.owner_id).where(ApiKey.key_hash == digest))
        if owner_id is not None:
            with _known_keys_lock:
                _known_keys[digest] = owner_id
    return owner_id


def local_owner_id() -> str:
    with db_session() as db:
        return get_or_create_owner(db, LOCAL_OWNER).id


def get_or_create_owner(db, name: str) -> Owner:
    owner = db.scalar(select(Owner).where(Owner.name == name))
    if owner is None:
        try:
            with db.begin_nested():
                owner = Owner(name=name)
                db.add(owner)
        except IntegrityError:  # created concurrently
            owner = db.scalar(select(Owner).where(Owner.name == name))
    return owner


def _presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("X-API-Key") or None


def authenticate() -> None:
    """before_request: set g.owner_id or answer 401."""
    if request.endpoint in PUBLIC_ENDPOINTS or request.endpoint is None:
        return
    settings = current_app.extensions["turnstream.settings"]
    if not settings.auth_enabled:
        if "turnstream.local_owner" not in current_app.extensions:
            current_app.extensions["turnstream.local_owner"] = local_owner_id()
        g.owner_id = current_app.extensions["turnstream.local_owner"]
        return
    key = _presented_key()
    if key is not None:
        owner_id = owner_for_key(key)
        if owner_id is None:
            raise ApiError(401, "unknown API key")
        g.owner_id = owner_id
        return
    if session.get("owner_id"):
        g.owner_id = session["owner_id"]
        return
    raise ApiError(401, "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")


@bp.post("/api/login")
def login():
    """Exchange an API key for the chat page's signed, HttpOnly cookie
    (EventSource cannot send headers)."""
    body = parse_body(Login)
    owner_id = owner_for_key(body.key)
    if owner_id is None:
        raise ApiError(401, "unknown API key")
    session.clear()
    session["owner_id"] = owner_id
    session.permanent = True
    return jsonify({"ok": True})


@bp.post("/api/logout")
def logout():
    session.clear()
    return jsonify({"ok": True})
