"""Rate limits and quotas, in apps of their own with small ones (the suite's
own settings lift them): 429 in the documented shape, Retry-After for a rate
limit, and nothing written."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import pytest
import redis
from flask import Flask

from shared.config import get_settings, use_settings
from tests import services
from tests.test_api import _error
from web.auth import create_key
from web.limits import RateLimits


@pytest.fixture
def limited_app(stack):
    """An app factory with the given settings changed; the process's
    settings are restored after."""
    from web import create_app

    made = []

    def make(**changes):
        app = create_app(replace(get_settings(), **changes))
        made.append(app)
        return app.test_client()

    yield make
    for app in made:
        app.extensions["turnstream.relay"].close()
    use_settings(None)


def _key() -> dict:
    return {"Authorization": f"Bearer {create_key(f'limits-{uuid.uuid4().hex[:8]}')}"}


def _address() -> dict:
    """A client address of its own: per-address counts start at zero."""
    return {"REMOTE_ADDR": f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}


def test_submissions_over_the_limit_answer_429_with_retry_after_and_write_nothing(limited_app):
    client = limited_app(rate_limits_enabled=True, rate_limit_submit="3/minute")
    owner, address = _key(), _address()
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    for n in range(3):
        turn = client.post(f"/api/sessions/{sid}/turns", json={"message": f"q{n}"}, headers=owner, environ_base=address)
        assert turn.status_code == 202
    over = client.post(f"/api/sessions/{sid}/turns", json={"message": "one more"}, headers=owner, environ_base=address)
    error = _error(over, 429, "rate_limited")
    assert "RATE_LIMIT_SUBMIT" in error["message"] and 1 <= int(over.headers["Retry-After"]) <= 60
    _error(
        client.post("/api/chat", json={"message": "and here"}, headers=owner, environ_base=address), 429, "rate_limited"
    )
    assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["message_count"] <= 6  # 3 turns at most
    other = _key()  # another key is not held back by this one's count
    other_sid = client.post("/api/sessions", json={}, headers=other).get_json()["id"]
    assert client.post(f"/api/sessions/{other_sid}/turns", json={"message": "x"}, headers=other).status_code == 202


def test_one_address_is_limited_across_keys(limited_app):
    client = limited_app(rate_limits_enabled=True, rate_limit_submit_address="2/minute")
    address = _address()
    codes = []
    for _ in range(3):
        owner = _key()
        codes.append(client.post("/api/chat", json={"message": "hi"}, headers=owner, environ_base=address).status_code)
    assert codes[-1] == 429 and all(c in (200, 202) for c in codes[:2]), codes


def test_guessing_logins_is_stopped_per_address_and_per_key_prefix(limited_app):
    client = limited_app(rate_limits_enabled=True, rate_limit_login_address="5/minute", rate_limit_login="3/minute")
    address = _address()
    codes = [
        client.post("/api/login", json={"key": f"ts_{uuid.uuid4().hex}"}, environ_base=address).status_code
        for _ in range(8)
    ]
    assert codes == [401] * 5 + [429] * 3
    prefix = f"ts_{uuid.uuid4().hex[:7]}"  # one key's prefix, guessed from many addresses
    codes = [
        client.post("/api/login", json={"key": prefix + uuid.uuid4().hex}, environ_base=_address()).status_code
        for _ in range(5)
    ]
    assert codes == [401] * 3 + [429] * 2


def test_stream_opens_are_limited_per_key(limited_app):
    client = limited_app(rate_limits_enabled=True, rate_limit_streams="2/minute")
    owner = _key()
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    url = f"/api/sessions/{sid}/events"
    opened = [client.get(url, headers=owner, buffered=False) for _ in range(2)]
    assert [r.status_code for r in opened] == [200, 200]
    _error(client.get(url, headers=owner), 429, "rate_limited")
    for r in opened:
        r.close()


def test_with_redis_away_the_limits_are_lifted_rather_than_every_request_failed(stack, monkeypatch, caplog):
    # The limiter counts through the process's client (shared.redis.get_redis): here one whose Redis is gone.
    away = redis.BlockingConnectionPool(port=services.free_port(), socket_connect_timeout=1)
    monkeypatch.setattr("web.limits.get_redis", lambda: redis.Redis(connection_pool=away))
    limits = RateLimits(replace(get_settings(), rate_limits_enabled=True, rate_limit_submit="1/minute"))
    with caplog.at_level(logging.WARNING, logger="web.limits"):
        for _ in range(3):  # three requests, twice over the limit were they counted: no 429, no error
            with Flask(__name__).test_request_context():
                limits.check("rate_limit_submit", "owner:someone")
    assert caplog.text.count("rate limit rate_limit_submit not checked") == 3


def test_no_more_active_turns_than_the_quota(limited_app):
    client = limited_app(max_active_turns=2)
    owner = _key()
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    slow = "hold [[first=3]]"  # the first runs for a while; the next waits behind it
    for _ in range(2):
        assert client.post(f"/api/sessions/{sid}/turns", json={"message": slow}, headers=owner).status_code == 202
    error = _error(
        client.post(f"/api/sessions/{sid}/turns", json={"message": "x"}, headers=owner), 429, "quota_exceeded"
    )
    assert "MAX_ACTIVE_TURNS_PER_OWNER" in error["message"]
    _error(client.post("/api/chat", json={"message": "x", "stream": True}, headers=owner), 429, "quota_exceeded")
    assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["message_count"] == 2


def test_no_more_open_streams_than_the_quota_and_a_closed_one_frees_its_place(limited_app):
    client = limited_app(max_streams=1)
    owner = _key()
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    url = f"/api/sessions/{sid}/events"
    first = client.get(url, headers=owner, buffered=False)
    assert first.status_code == 200
    error = _error(client.get(url, headers=owner), 429, "quota_exceeded")
    assert "MAX_STREAMS_PER_OWNER" in error["message"]
    before = client.get("/api/sessions", headers=owner).get_json()["items"]
    _error(client.post("/api/chat", json={"message": "x", "stream": True}, headers=owner), 429, "quota_exceeded")
    assert client.get("/api/sessions", headers=owner).get_json()["items"] == before  # no session made for it
    first.close()
    second = client.get(url, headers=owner, buffered=False)
    assert second.status_code == 200
    second.close()


def test_replays_hold_no_more_unfinished_questions_than_the_quota(limited_app):
    client = limited_app(max_replay_items=5)
    owner = _key()
    questions = [{"message": f"q{n} [[first=2]]"} for n in range(4)]
    assert (
        client.post("/api/replays", json={"questions": questions, "concurrency": 1}, headers=owner).status_code == 202
    )
    over = client.post("/api/replays", json={"questions": questions[:2]}, headers=owner)
    assert "MAX_REPLAY_ITEMS_PER_OWNER" in _error(over, 429, "quota_exceeded")["message"]
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    client.post(f"/api/sessions/{sid}/turns", json={"message": "asked once"}, headers=owner)
    # questions taken from sessions count too
    over = client.post("/api/replays", json={"from_sessions": [sid, sid]}, headers=owner)
    _error(over, 429, "quota_exceeded")
