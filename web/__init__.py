"""The web tier: `web.create_app()` (gunicorn `"web:create_app()"`, `flask --app web`)."""

from __future__ import annotations

import functools
from datetime import timedelta

from flask import Flask, request
from werkzeug.middleware.proxy_fix import ProxyFix

from shared import logs, tracing
from shared.config import Settings, cookie_signing_key, get_settings, use_settings
from shared.db import run_again_while_away

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class App(Flask):
    """Flask, with the steps of a request that need Postgres run again while
    it is away (a restart, a failover), each on its own: it waits for the
    server instead of answering 503 (shared/db.run_again_while_away). They
    are authentication (create_app) and the view, if the request wrote
    nothing yet or is a safe one. The other steps run once: the request's
    id, span and log context, and its rate-limit count, which a view run
    again does not count again (web/limits.py). One cut at its COMMIT
    answers 503: whether it landed is unknown (a turn's Idempotency-Key
    makes sending it again safe)."""

    def dispatch_request(self):
        """The view, run again while Postgres is away, unless a write it
        sent may have landed (see the class)."""
        return run_again_while_away(super().dispatch_request, writes=request.method not in SAFE_METHODS)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app with `settings` (else the environment's), which
    become the process's: shared code reads them too. Fails fast on bad
    settings; opens no connection: engines, Redis clients and the relay
    start on first use."""
    from shared.redis import new_redis
    from web import (
        approvals,
        assistants,
        auth,
        cli,
        context,
        headers,
        health,
        limits,
        metrics,
        openapi,
        page,
        question_sets,
        replay_cli,
        replays,
        schedules,
        sessions,
        shares,
        turns,
        webhooks,
    )
    from web.errors import register_error_handlers
    from web.relay.hub import Relay

    if settings is None:
        settings = get_settings()
    else:
        use_settings(settings)
    app = App(__name__)
    app.config.update(
        SECRET_KEY=cookie_signing_key(settings),
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.env == "production",
        # The cookie's lifetime is the login's, counted from the login: it is
        # set once, not slid forward by every request.
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=settings.login_seconds),
        SESSION_REFRESH_EACH_REQUEST=False,
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False
    app.extensions["turnstream.settings"] = settings
    app.extensions["turnstream.relay"] = Relay(new_redis, settings.sse_ping_seconds)
    app.extensions["turnstream.callers"] = auth.RememberedCallers(settings.key_cache_seconds)
    if settings.forwarded_hops:  # the client's address and scheme as the platform's proxies saw them
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.forwarded_hops, x_proto=settings.forwarded_hops)
    logs.configure(settings.log_format)
    tracing.configure("turnstream-web")
    context.init_app(app)  # first: every later step's lines carry the request's id
    register_error_handlers(app)
    # Authentication alone runs again while Postgres is away, not the steps
    # before it; whatever the method: it only reads (or makes the local
    # owner's row, once and for all).
    app.before_request(functools.partial(run_again_while_away, auth.authenticate, writes=False))
    limits.init_app(app, settings)  # after authentication: per-key limits count the caller it found
    modules = (
        approvals, assistants, auth, cli, health, metrics, openapi, page,
        question_sets, replay_cli, replays, schedules, sessions, shares, turns, webhooks,
    )  # fmt: skip
    for module in modules:
        app.register_blueprint(module.bp)
    headers.init_app(app, settings)
    return app
