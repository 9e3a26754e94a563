"""Input a hostile or careless client sends: every case answers a 4xx in the
documented error shape, and writes nothing."""

from __future__ import annotations

import base64
import json
import threading
import uuid

import pytest

from tests.test_api import _error

DEEP = "[" * 5000 + "]" * 5000


def _post(client, path: str, raw: str | bytes, headers: dict):
    return client.post(path, data=raw, headers={**headers, "Content-Type": "application/json"})


def _sessions(client, owner) -> int:
    return len(client.get("/api/sessions?limit=100", headers=owner).get_json()["items"])


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ('{"title": "a\\u0000b"}', 422),
        ('{"metadata": {"k": "a\\u0000"}}', 422),
        ('{"metadata": {"a\\u0000": 1}}', 422),
        ('{"metadata": {"k": NaN}}', 400),
        ('{"metadata": {"k": Infinity}}', 400),
        ('{"metadata": {"k": "\\ud800"}}', 422),
        ('{"metadata": ' + DEEP + "}", 400),
        ('{"metadata": ' + "[" * 40 + "]" * 40 + "}", 400),
        (b'{"title": "\xff"}', 400),  # not UTF-8
    ],
)
def test_a_session_body_postgres_cannot_store_is_refused(client, owner, raw, status):
    before = _sessions(client, owner)
    _error(_post(client, "/api/sessions", raw, owner), status, "validation_error" if status == 422 else "bad_request")
    assert _sessions(client, owner) == before


@pytest.mark.parametrize("message", ["a\x00b", "\ud800"])
def test_a_message_postgres_cannot_store_is_refused(client, owner, message):
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    raw = json.dumps({"message": message})  # escaped as \u0000 and \ud800, as a client would send them
    _error(_post(client, f"/api/sessions/{sid}/turns", raw, owner), 422, "validation_error")
    _error(_post(client, "/api/chat", raw, owner), 422, "validation_error")
    assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["message_count"] == 0


def test_a_deep_body_is_refused_before_authentication_too(client):
    _error(_post(client, "/api/login", '{"key": ' + DEEP + "}", {}), 400, "bad_request")


def test_a_cursor_of_any_shape_is_refused(client, owner):
    for payload in (DEEP, '{"a": 1}', "[1, 2, 3]", '["2026-01-01", ["x"]]', "null"):
        cursor = base64.urlsafe_b64encode(payload.encode()).decode()
        _error(client.get(f"/api/sessions?cursor={cursor}", headers=owner), 422, "validation_error")


@pytest.mark.parametrize("after", [str(2**64), "9" * 5000, "-1", "1e3"])
def test_a_last_event_id_out_of_range_is_refused(client, owner, after):
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    turn = client.post(f"/api/sessions/{sid}/turns", json={"message": "hi"}, headers=owner).get_json()
    _error(client.get(turn["events_url"], headers={**owner, "Last-Event-ID": after}), 422, "validation_error")
    _error(
        client.get(f"/api/sessions/{sid}/events", headers={**owner, "Last-Event-ID": f"{turn['id']}:{after}"}),
        422,
        "validation_error",
    )


def _race(client, owner: dict, sids: list[str], key: str) -> list[int]:
    """The same Idempotency-Key sent to each session at the same moment."""
    start = threading.Barrier(len(sids))
    got = []

    def send(sid: str) -> None:
        start.wait()
        headers = {**owner, "Idempotency-Key": key}
        got.append(client.post(f"/api/sessions/{sid}/turns", json={"message": "once"}, headers=headers).status_code)

    threads = [threading.Thread(target=send, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_one_idempotency_key_sent_at_once_to_two_sessions_is_one_turn_and_a_409(client, owner):
    for _ in range(5):  # the race is narrow: try it a few times
        sids = [client.post("/api/sessions", json={}, headers=owner).get_json()["id"] for _ in range(2)]
        assert sorted(_race(client, owner, sids, uuid.uuid4().hex)) == [202, 409]
        turns = [len(client.get(f"/api/sessions/{sid}/turns", headers=owner).get_json()["items"]) for sid in sids]
        assert sorted(turns) == [0, 1]


def test_a_failing_statement_keeps_its_parameters_out_of_the_error(stack):
    from sqlalchemy import text

    from shared.db import get_engine

    secret = f"my secret message {uuid.uuid4()}"
    with pytest.raises(Exception) as failed, get_engine().connect() as conn:
        conn.execute(text("SELECT CAST(:m AS text), 1 / 0"), {"m": secret})
    assert secret not in str(failed.value) and "hidden" in str(failed.value)
