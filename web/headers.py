"""Response headers every answer carries: a content security policy with no
inline script, no framing, no MIME sniffing, no referrer, HSTS in
production; and CORS for the origins ALLOWED_ORIGINS lists (flask-cors)."""

from __future__ import annotations

from flask import Flask, Response
from flask_cors import CORS

from shared.config import Settings

# The chat page loads its own script, style and icon, and talks to this
# server only; nothing inline, nothing remote, never inside a frame.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Everything else is data, never a document.
DATA_POLICY = "default-src 'none'; frame-ancestors 'none'"
HSTS = "max-age=31536000; includeSubDomains"

# What a browser client may send and read across origins.
CORS_REQUEST_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "Last-Event-ID"]
CORS_RESPONSE_HEADERS = ["X-Request-ID", "Retry-After"]


def api_methods(app: Flask) -> list[str]:
    """Every method a route under /api answers, read from the app's URL
    map, so a method added to the API is allowed across origins without a
    second list to keep. Call it once the API's blueprints are registered."""
    methods = {
        method for rule in app.url_map.iter_rules() if rule.rule.startswith("/api") for method in rule.methods or ()
    }
    if not methods:
        raise RuntimeError("set up CORS after the API's blueprints: it allows the methods their routes answer")
    return sorted(methods | {"OPTIONS"})


def init_app(app: Flask, settings: Settings) -> None:
    production = settings.env == "production"

    @app.after_request
    def _secure(response: Response) -> Response:
        headers = response.headers
        policy = PAGE_POLICY if response.mimetype == "text/html" else DATA_POLICY
        headers.setdefault("Content-Security-Policy", policy)
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "no-referrer")
        if production:
            headers.setdefault("Strict-Transport-Security", HSTS)
        # Every answer may differ by Origin (CORS), so no cache may hand one
        # origin's to another; flask-cors says so only with several origins.
        if "origin" not in {value.lower() for value in response.vary}:
            response.vary.add("Origin")
        return response

    # Registered after: flask-cors's after_request runs before ours (Flask
    # runs them in reverse), and a preflight is answered without a key (auth
    # lets OPTIONS through). A preflight is allowed the methods the API's
    # routes answer (api_methods), which are registered by now.
    CORS(
        app,
        resources={r"/api/*": {"origins": list(settings.allowed_origins)}},
        allow_headers=CORS_REQUEST_HEADERS,
        expose_headers=CORS_RESPONSE_HEADERS,
        methods=api_methods(app),
        max_age=600,
        vary_header=True,
    )
