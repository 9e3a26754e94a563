"""What every answer carries for the browser: a content security policy the
page lives within, no framing, no sniffing, no referrer, HSTS in
production, CORS for listed origins only; and health, cheap and public,
with its costly details for a key or this machine."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from shared.config import get_settings, use_settings
from tests.test_api import _error


@pytest.fixture
def app_with(stack):
    from web import create_app

    made = []

    def make(**changes):
        made.append(create_app(replace(get_settings(), **changes)))
        return made[-1].test_client()

    yield make
    for app in made:
        app.extensions["turnstream.relay"].close()
    use_settings(None)


@pytest.mark.parametrize("path", ["/", "/evals"])  # the chat page, the evaluations page
def test_the_page_runs_no_inline_script_and_cannot_be_framed(client, path):
    page = client.get(path)
    assert page.status_code == 200  # served without a key: the page signs in itself
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy
    html = page.get_data(as_text=True)
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer" and page.headers["X-Frame-Options"] == "DENY"


def test_the_api_answers_as_data_never_a_document(client, owner):
    response = client.get("/api/sessions", headers=owner)
    assert response.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Strict-Transport-Security" not in response.headers  # development


def test_production_asks_for_https_from_now_on(app_with):
    client = app_with(env="production")
    assert client.get("/api/health").headers["Strict-Transport-Security"].startswith("max-age=31536000")


def test_a_listed_origin_may_call_with_a_key_and_others_may_not(app_with, owner):
    client = app_with(allowed_origins=("https://chat.example.com",))
    preflight = client.options(
        "/api/sessions",
        headers={
            "Origin": "https://chat.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "Origin" in preflight.headers.get("Vary", "")
    real = client.post("/api/sessions", json={}, headers={**owner, "Origin": "https://chat.example.com"})
    assert real.status_code == 201 and real.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
    assert "X-Request-ID" in real.headers["Access-Control-Expose-Headers"]
    other = client.post("/api/sessions", json={}, headers={**owner, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers and "Origin" in other.headers.get("Vary", "")
    no_origin = client.get("/api/sessions", headers=owner)
    assert "Origin" in no_origin.headers.get("Vary", "")  # a cache must not serve one origin's answer to another


def test_a_listed_origin_may_rename_a_session_across_origins(app_with, owner):
    """A rename is a PATCH: the browser asks first (a preflight naming the
    method), and sends it only if the answer allows that method. Every other
    method of the API is allowed too, from the routes themselves."""
    origin = "https://chat.example.com"
    client = app_with(allowed_origins=(origin,))
    session = client.post("/api/sessions", json={"title": "before"}, headers=owner).get_json()
    preflight = client.options(
        f"/api/sessions/{session['id']}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    allowed = {method.strip() for method in preflight.headers.get("Access-Control-Allow-Methods", "").split(",")}
    assert "PATCH" in allowed
    assert {"authorization", "content-type"} <= {
        header.strip().lower() for header in preflight.headers["Access-Control-Allow-Headers"].split(",")
    }
    api = {
        method
        for rule in client.application.url_map.iter_rules()
        if rule.rule.startswith("/api")
        for method in rule.methods
    }
    assert api <= allowed
    renamed = client.patch(
        f"/api/sessions/{session['id']}", json={"title": "after"}, headers={**owner, "Origin": origin}
    )
    assert renamed.status_code == 200 and renamed.headers["Access-Control-Allow-Origin"] == origin
    assert renamed.get_json()["title"] == "after"
    assert client.get(f"/api/sessions/{session['id']}", headers=owner).get_json()["title"] == "after"


@pytest.mark.fast
def test_origins_are_trimmed_and_checked():
    from shared.config import ConfigError, Settings

    dev = {"TURNSTREAM_ENV": "development"}
    origins = Settings.from_env({**dev, "ALLOWED_ORIGINS": " https://a.example/ , http://b.example:8080"})
    assert origins.allowed_origins == ("https://a.example", "http://b.example:8080")
    with pytest.raises(ConfigError, match="not an origin"):
        Settings.from_env({**dev, "ALLOWED_ORIGINS": "https://a.example/chat"})


def test_health_details_need_a_key_or_this_machine(client, owner):
    away = {"REMOTE_ADDR": "203.0.113.9"}
    _error(client.get("/api/health?detail=1", environ_base=away), 401, "unauthorized")
    plain = client.get("/api/health", environ_base=away).get_json()["checks"]
    assert "greenlets" not in plain["relay"] and plain["workers"] >= 1
    assert (
        "greenlets"
        in client.get("/api/health?detail=1", headers=owner, environ_base=away).get_json()["checks"]["relay"]
    )
    assert "greenlets" in client.get("/api/health?detail=1").get_json()["checks"]["relay"]  # 127.0.0.1


def test_health_counts_workers_from_their_heartbeats_without_asking_them(client, monkeypatch):
    from shared.broker import get_celery

    def no_broadcast(*args, **kwargs):
        raise AssertionError("health broadcast to the workers")

    monkeypatch.setattr(type(get_celery().control), "ping", no_broadcast)
    assert client.get("/api/health").get_json()["checks"]["workers"] >= 1
