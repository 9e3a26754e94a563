"""Who is calling: API keys (hashed at rest), the chat page's login cookie,
or, in local development with AUTH=off, the one local owner.

A key or a login that was checked lately is remembered for KEY_CACHE_SECONDS
in each web process, so a request does not ask Postgres who it is (that
lookup was a web process's largest cost per request). A revoked key, and the
logins made from it, stop working within that time; a logout at once in the
process that served it and within that time in the others. Nothing unknown
or ended is remembered.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cachetools import TTLCache
from flask import Blueprint, current_app, g, jsonify, request, session
from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from shared import logs
from shared.config import is_loopback
from shared.db import autocommit_engine, transaction
from shared.models import ApiKey, Login, Owner
from web import schemas
from web.errors import ApiError
from web.limits import by_address, rate_limits
from web.openapi import operation
from web.validation import Login as LoginBody
from web.validation import parse_body

bp = Blueprint("auth", __name__)

LOCAL_OWNER = "local"
PUBLIC_ENDPOINTS = {
    "health.health",
    "metrics.scrape",  # it checks for itself: a key, or this machine
    "auth.login",
    "auth.logout",
    "page.index",
    "page.evals",  # like the chat page: no data in it, it signs in (POST /api/login)
    "page.favicon",
    # a share's link is its own credential (256 random bits): anyone holding it reads that snapshot, nothing more
    "shares.shared_json",
    "shares.shared_page",
    "static",
    "openapi.document",
    "openapi.docs",
}
KEY_PREFIX_CHARS = 10  # "ts_" and 7 characters of the key: enough to tell keys apart, useless to guess it


@dataclass(frozen=True)
class Caller:
    owner_id: str
    key_id: str
    expires_at: datetime | None = None  # a login's end, checked even when remembered


class RememberedCallers:
    """Callers checked lately, by key hash or login id (one per app, for
    KEY_CACHE_SECONDS); thread- and greenlet-safe."""

    def __init__(self, seconds: float) -> None:
        self._cache: TTLCache[str, Caller] = TTLCache(maxsize=10_000, ttl=seconds)
        self._lock = threading.Lock()

    def get(self, ident: str) -> Caller | None:
        with self._lock:
            return self._cache.get(ident)

    def put(self, ident: str, caller: Caller) -> None:
        with self._lock:
            self._cache[ident] = caller

    def forget(self, ident: str) -> None:
        with self._lock:
            self._cache.pop(ident, None)


def remembered() -> RememberedCallers:
    return current_app.extensions["turnstream.callers"]


_KEY = select(ApiKey.id, ApiKey.owner_id).where(ApiKey.key_hash == bindparam("digest"), ApiKey.revoked_at.is_(None))
_LOGIN = (
    select(Login.key_id, Login.owner_id, Login.expires_at)
    .join(ApiKey, ApiKey.id == Login.key_id)
    .where(
        Login.id == bindparam("login_id"),
        Login.ended_at.is_(None),
        Login.expires_at > func.now(),
        ApiKey.revoked_at.is_(None),
    )
)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(owner_name: str, key_name: str = "default") -> str:
    """Make an API key for an owner (created if new). Returns the key; only its
    hash is stored, so this is the one time it can be shown."""
    key = "ts_" + secrets.token_urlsafe(32)
    with transaction() as db:
        owner = get_or_create_owner(db, owner_name)
        db.add(ApiKey(owner_id=owner.id, name=key_name, key_hash=hash_key(key), prefix=key[:KEY_PREFIX_CHARS]))
    return key


def revoke_keys(db, refs: list[str]) -> list[ApiKey]:
    """Revoke the keys named by id or by prefix (as `keys list` shows them);
    returns those revoked now."""
    ids = []
    for ref in refs:
        try:
            ids.append(str(uuid.UUID(ref)))
        except ValueError:
            continue
    named = or_(ApiKey.id.in_(ids), ApiKey.prefix.in_(refs))
    revoke = update(ApiKey).where(named, ApiKey.revoked_at.is_(None)).values(revoked_at=func.now())
    return list(db.scalars(revoke.returning(ApiKey)))


def lookup_key(key: str) -> Caller | None:
    """Whose key this is, asked of Postgres: None for an unknown or revoked key."""
    with autocommit_engine().connect() as conn:
        row = conn.execute(_KEY, {"digest": hash_key(key)}).one_or_none()
    return None if row is None else Caller(owner_id=row.owner_id, key_id=row.id)


def caller_for_key(key: str) -> Caller | None:
    """lookup_key, remembered by the app for a while."""
    digest = hash_key(key)
    caller = remembered().get(digest)
    if caller is None:
        caller = lookup_key(key)
        if caller is not None:
            remembered().put(digest, caller)
    return caller


def caller_for_login(login_id: str) -> Caller | None:
    caller = remembered().get(login_id)
    if caller is None:
        with autocommit_engine().connect() as conn:
            row = conn.execute(_LOGIN, {"login_id": login_id}).one_or_none()
        if row is None:
            return None
        caller = Caller(owner_id=row.owner_id, key_id=row.key_id, expires_at=row.expires_at)
        remembered().put(login_id, caller)
    if caller.expires_at is not None and caller.expires_at <= datetime.now(UTC):
        remembered().forget(login_id)
        return None
    return caller


def local_owner_id() -> str:
    with transaction() as db:
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
    """before_request: set g.owner_id or answer 401. A CORS preflight
    (OPTIONS) carries no credentials by design, and does nothing."""
    if request.endpoint in PUBLIC_ENDPOINTS or request.endpoint is None or request.method == "OPTIONS":
        return
    settings = current_app.extensions["turnstream.settings"]
    if not settings.auth_enabled:
        if "turnstream.local_owner" not in current_app.extensions:
            current_app.extensions["turnstream.local_owner"] = local_owner_id()
        g.owner_id = current_app.extensions["turnstream.local_owner"]
        g.caller = LOCAL_OWNER
        return
    g.owner_id = presented_owner()
    logs.bind(owner_id=g.owner_id)
    if g.owner_id is None:
        raise ApiError(401, "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")


def presented_owner() -> str | None:
    """The owner of the request's API key or login cookie; None if it
    presents neither, 401 if what it presents is unknown or ended."""
    key = _presented_key()
    if key is not None:
        caller = caller_for_key(key)
        if caller is None:
            raise ApiError(401, "unknown or revoked API key")
        g.caller = f"key {caller.key_id}"  # who acted, where the record says (a tool call's decision)
        return caller.owner_id
    login_id = session.get("login")
    if login_id:
        caller = caller_for_login(login_id)
        if caller is None:
            session.clear()
            raise ApiError(401, "your login has ended: sign in again with an API key")
        g.caller = f"key {caller.key_id}"
        return caller.owner_id
    return None


def require_operator(what: str) -> None:
    """What only an operator may see: a request with an API key (or a
    login), or one from this machine (a scraper beside the server)."""
    if not is_loopback(request.remote_addr or "") and presented_owner() is None:
        raise ApiError(401, f"{what} needs an API key, or a request from this machine")


@bp.post("/api/login")
@operation(
    "Exchange an API key for the chat page's login cookie",
    {200: schemas.Ok},
    body=LoginBody,
    errors=(401,),
    public=True,
)
def login():
    """Exchange an API key for the chat page's signed, HttpOnly cookie
    (EventSource cannot send headers). The cookie names a login on the
    server, which ends at logout or after LOGIN_SECONDS, whatever happens.
    Attempts are limited per client address and per key prefix, so keys
    cannot be guessed from one address or spread over many."""
    rate_limits().check("rate_limit_login_address", by_address())
    body = parse_body(LoginBody)
    rate_limits().check("rate_limit_login", f"key:{body.key[:KEY_PREFIX_CHARS]}")
    caller = caller_for_key(body.key)
    if caller is None:
        raise ApiError(401, "unknown or revoked API key")
    lifetime = timedelta(seconds=current_app.extensions["turnstream.settings"].login_seconds)
    with transaction() as db:
        made = Login(key_id=caller.key_id, owner_id=caller.owner_id, expires_at=datetime.now(UTC) + lifetime)
        db.add(made)
        db.flush()
        login_id = made.id
    session.clear()
    session["login"] = login_id
    session.permanent = True
    return jsonify({"ok": True})


@bp.post("/api/logout")
@operation("End the login on the server", {200: schemas.Ok}, public=True)
def logout():
    """End the login on the server, not only the browser's copy of its cookie."""
    login_id = session.get("login")
    if login_id:
        with transaction() as db:
            db.execute(update(Login).where(Login.id == login_id, Login.ended_at.is_(None)).values(ended_at=func.now()))
        remembered().forget(login_id)
    session.clear()
    return jsonify({"ok": True})
