"""Sessions CRUD, ownership, and every documented error in its one shape."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.conftest import wait_turn
from web.auth import create_key


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


def test_session_crud_and_cursor_pagination(client, owner):
    ids = [
        client.post("/api/sessions", json={"title": f"s{i}", "metadata": {"i": i}}, headers=owner).get_json()["id"]
        for i in range(5)
    ]
    got = client.get(f"/api/sessions/{ids[0]}", headers=owner).get_json()
    assert got["title"] == "s0" and got["metadata"] == {"i": 0} and got["message_count"] == 0
    assert got["created_at"].endswith("+00:00")

    seen, cursor = [], None
    while True:
        url = "/api/sessions?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=owner).get_json()
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once

    assert client.delete(f"/api/sessions/{ids[0]}", headers=owner).status_code == 204
    _error(client.get(f"/api/sessions/{ids[0]}", headers=owner), 404, "not_found")


def test_a_session_is_renamed_and_found_by_its_title(client, owner):
    titles = ["Quarterly sales", "sales: 100% done", "Holiday plans", "under_score"]
    ids = [client.post("/api/sessions", json={"title": t}, headers=owner).get_json()["id"] for t in titles]
    renamed = client.patch(f"/api/sessions/{ids[2]}", json={"title": "More SALES talk"}, headers=owner)
    assert renamed.status_code == 200 and renamed.get_json()["title"] == "More SALES talk"
    assert renamed.get_json()["updated_at"] > renamed.get_json()["created_at"]

    def found(q: str) -> list[str]:
        page = client.get("/api/sessions", query_string={"q": q}, headers=owner).get_json()
        return [s["title"] for s in page["items"]]

    assert found("sales") == ["More SALES talk", "sales: 100% done", "Quarterly sales"]  # any case, newest first
    assert found("100%") == ["sales: 100% done"]  # % and _ are themselves, not patterns
    assert found("r_s") == ["under_score"]
    assert found("e_s") == []  # as a pattern it would match "More SALES"
    assert found("") == list(reversed(["Quarterly sales", "sales: 100% done", "More SALES talk", "under_score"]))

    # A PATCH changes the fields it names and no other.
    client.patch(f"/api/sessions/{ids[0]}", json={"metadata": {"pinned": True}}, headers=owner)
    got = client.get(f"/api/sessions/{ids[0]}", headers=owner).get_json()
    assert got["title"] == "Quarterly sales" and got["metadata"] == {"pinned": True}
    assert client.patch(f"/api/sessions/{ids[0]}", json={"title": None}, headers=owner).get_json()["title"] is None

    _error(client.patch(f"/api/sessions/{ids[0]}", json={"title": "x" * 201}, headers=owner), 422, "validation_error")
    _error(client.patch(f"/api/sessions/{ids[0]}", json={"name": "x"}, headers=owner), 422, "validation_error")
    _error(client.get("/api/sessions", query_string={"q": "a\x00b"}, headers=owner), 422, "validation_error")
    _error(client.get("/api/sessions", query_string={"q": "x" * 201}, headers=owner), 422, "validation_error")
    other = {"X-API-Key": create_key(f"other-{uuid.uuid4().hex[:8]}")}
    _error(client.patch(f"/api/sessions/{ids[0]}", json={"title": "mine"}, headers=other), 404, "not_found")
    assert client.get(f"/api/sessions/{ids[0]}", headers=owner).get_json()["title"] is None


def test_a_sessions_turns_list_each_question_with_its_outcome(client, owner):
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    asked = ["first [[tokens=3]]", "second [[fault=400]]", "third [[tokens=2]]"]
    turns = [client.post(f"/api/sessions/{sid}/turns", json={"message": m}, headers=owner).get_json() for m in asked]
    for turn in turns:
        wait_turn(client, owner, turn["id"])
    seen, cursor = [], None
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/api/sessions/{sid}/turns", query_string=query, headers=owner)
        assert page.status_code == 200, page.get_json()
        seen += page.get_json()["items"]
        cursor = page.get_json()["next_cursor"]
        if cursor is None:
            break
    assert [t["message"] for t in seen] == asked
    assert [t["number"] for t in seen] == [1, 2, 3]
    assert [t["status"] for t in seen] == ["succeeded", "failed", "succeeded"]
    assert seen[1]["error"]["message"] and seen[1]["answer"] is None
    assert seen[0]["model"] == "turnstream-offline" and seen[0]["usage"]["completion_tokens"] > 0
    one = client.get(f"/api/turns/{seen[0]['id']}", headers=owner).get_json()
    assert seen[0] == {**one, "message": asked[0], "siblings": [one["id"]]}
    _error(client.get(f"/api/sessions/{sid}/turns?cursor=-1", headers=owner), 422, "validation_error")
    other = {"X-API-Key": create_key(f"other-{uuid.uuid4().hex[:8]}")}
    _error(client.get(f"/api/sessions/{sid}/turns", headers=other), 404, "not_found")


def test_another_owners_session_is_404_exactly_like_a_missing_one(client, owner):
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    other = {"X-API-Key": create_key(f"other-{uuid.uuid4().hex[:8]}")}
    missing = _error(client.get(f"/api/sessions/{uuid.uuid4()}", headers=other), 404, "not_found")
    foreign = _error(client.get(f"/api/sessions/{sid}", headers=other), 404, "not_found")
    assert missing == foreign
    _error(client.get(f"/api/sessions/{sid}/messages", headers=other), 404, "not_found")
    _error(client.post(f"/api/sessions/{sid}/turns", json={"message": "x"}, headers=other), 404, "not_found")
    _error(client.delete(f"/api/sessions/{sid}", headers=other), 404, "not_found")
    assert sid not in [s["id"] for s in client.get("/api/sessions", headers=other).get_json()["items"]]
    turn = client.post(f"/api/sessions/{sid}/turns", json={"message": "mine"}, headers=owner).get_json()
    for path in (f"/api/turns/{turn['id']}", turn["events_url"]):
        foreign = _error(client.get(path, headers=other), 404, "not_found")
        assert foreign == _error(
            client.get(path.replace(turn["id"], str(uuid.uuid4())), headers=other), 404, "not_found"
        )


def test_credentials_are_required_and_checked(client, owner):
    _error(client.get("/api/sessions"), 401, "unauthorized")
    _error(client.get("/api/sessions", headers={"Authorization": "Bearer ts_nope"}), 401, "unauthorized")
    assert client.get("/api/sessions", headers=owner).status_code == 200
    assert client.get("/api/health").status_code == 200  # public


def test_login_sets_a_signed_httponly_cookie_that_authenticates(client, owner):
    key = owner["Authorization"].split()[1]
    _error(client.post("/api/login", json={"key": "wrong"}), 401, "unauthorized")
    response = client.post("/api/login", json={"key": key})
    assert response.status_code == 200
    assert "HttpOnly" in response.headers["Set-Cookie"]
    assert client.get("/api/sessions").status_code == 200


def _copied_cookie(client, app) -> str:
    """The login cookie as a thief would copy it."""
    return client.get_cookie(app.config["SESSION_COOKIE_NAME"]).value


def test_logout_ends_the_login_on_the_server_not_only_in_the_browser(app, owner):
    key = owner["Authorization"].split()[1]
    browser = app.test_client()
    assert browser.post("/api/login", json={"key": key}).status_code == 200
    cookie = _copied_cookie(browser, app)
    thief = app.test_client()
    thief.set_cookie(app.config["SESSION_COOKIE_NAME"], cookie)
    assert thief.get("/api/sessions").status_code == 200
    assert browser.post("/api/logout").status_code == 200
    _error(thief.get("/api/sessions"), 401, "unauthorized")  # at once, in the process that served the logout
    _error(browser.get("/api/sessions"), 401, "unauthorized")


def test_a_login_has_an_absolute_lifetime(app, owner):
    from sqlalchemy import update

    from shared.db import transaction
    from shared.models import Login

    browser = app.test_client()
    response = browser.post("/api/login", json={"key": owner["Authorization"].split()[1]})
    assert "Expires=" in response.headers["Set-Cookie"]
    for _ in range(3):  # using it does not slide it forward: no new cookie
        used = browser.get("/api/sessions")
        assert used.status_code == 200 and "Set-Cookie" not in used.headers
    with transaction() as db:  # its time passes
        db.execute(update(Login).where(Login.owner_id == _owner_id(owner)).values(expires_at=Login.created_at))
    time.sleep(1.1)  # KEY_CACHE_SECONDS in the tests
    _error(browser.get("/api/sessions"), 401, "unauthorized")


def test_a_revoked_key_and_its_logins_stop_working(app, owner):
    key = owner["Authorization"].split()[1]
    browser = app.test_client()
    assert browser.post("/api/login", json={"key": key}).status_code == 200
    assert browser.get("/api/sessions").status_code == 200
    runner = app.test_cli_runner()
    listed = runner.invoke(app.cli, ["keys", "list"], catch_exceptions=False).output
    line = next(line for line in listed.splitlines() if key[:10] in line)
    assert line.endswith("active") and key not in listed  # the prefix shows, never the key
    revoked = runner.invoke(app.cli, ["keys", "revoke", key[:10]], catch_exceptions=False)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    time.sleep(1.1)  # KEY_CACHE_SECONDS in the tests
    _error(app.test_client().get("/api/sessions", headers=owner), 401, "unauthorized")
    _error(browser.get("/api/sessions"), 401, "unauthorized")
    _error(app.test_client().post("/api/login", json={"key": key}), 401, "unauthorized")
    line = next(line for line in runner.invoke(app.cli, ["keys", "list"]).output.splitlines() if key[:10] in line)
    assert "revoked" in line
    again = runner.invoke(app.cli, ["keys", "revoke", key[:10]])
    assert again.exit_code == 1 and "no active key matches" in again.output


def _owner_id(owner: dict) -> str:
    from sqlalchemy import select

    from shared.db import transaction
    from shared.models import ApiKey
    from web.auth import hash_key

    with transaction() as db:
        return db.scalar(select(ApiKey.owner_id).where(ApiKey.key_hash == hash_key(owner["Authorization"].split()[1])))


def _finished(client, owner: dict, replay_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (replay := client.get(f"/api/replays/{replay_id}", headers=owner).get_json())["status"] != "finished":
        assert time.monotonic() < deadline, replay
        time.sleep(0.05)
    return replay


def _listed(client, owner: dict, **query) -> list[str]:
    """Every session of the list with these arguments, page by page, newest first."""
    seen, cursor = [], None
    while True:
        after = {"cursor": cursor} if cursor else {}
        page = client.get("/api/sessions", query_string={"limit": 2, **query, **after}, headers=owner)
        assert page.status_code == 200, page.get_json()
        seen += [s["id"] for s in page.get_json()["items"]]
        if (cursor := page.get_json()["next_cursor"]) is None:
            return seen


def test_a_replays_sessions_are_kept_out_of_the_chat_list_and_listed_as_the_replays(client, owner):
    chats = [client.post("/api/sessions", json={"title": f"chat {i}"}, headers=owner).get_json()["id"] for i in (0, 1)]
    # A question may name a session of the owner's: asked there, it leaves it a chat.
    questions = [{"message": "in my chat", "session_id": chats[0]}] + [{"message": f"q{i}"} for i in range(3)]
    replay = client.post("/api/replays", json={"questions": questions}, headers=owner).get_json()
    other = client.post("/api/replays", json={"questions": [{"message": "elsewhere"}]}, headers=owner).get_json()
    _finished(client, owner, replay["id"]), _finished(client, owner, other["id"])
    results = client.get(f"/api/replays/{replay['id']}/results", headers=owner).get_data(as_text=True)
    by_turn = [
        client.get(f"/api/turns/{json.loads(line)['turn_id']}", headers=owner).get_json()["session_id"]
        for line in results.splitlines()
    ]
    assert by_turn[0] == chats[0]
    made = by_turn[1:]
    # Labelled with a replay's id in its metadata, a chat is still a chat.
    client.patch(f"/api/sessions/{chats[1]}", json={"metadata": {"replay_id": replay["id"]}}, headers=owner)
    chat = client.post("/api/chat", json={"message": "hello"}, headers=owner).get_json()["session_id"]

    assert _listed(client, owner, origin="chat") == [chat, chats[1], chats[0]]
    replays = _listed(client, owner, origin="replay")
    assert set(replays) == set(made) | set(_listed(client, owner, replay_id=other["id"])) and len(replays) == 4
    # (made in one transaction, at one time: in the order of their ids)
    assert sorted(_listed(client, owner, origin="replay", replay_id=replay["id"])) == sorted(made)
    assert sorted(_listed(client, owner, replay_id=replay["id"].upper())) == sorted(made)
    assert _listed(client, owner, origin="chat", replay_id=replay["id"]) == []
    assert _listed(client, owner) == _listed(client, owner, origin="all")  # the default: every session, as before
    assert set(_listed(client, owner)) == {chat, *chats, *replays}
    # Opened by its id, a replay's session is what it was, its metadata too.
    opened = client.get(f"/api/sessions/{made[0]}", headers=owner).get_json()
    assert opened["metadata"] == {"replay_id": replay["id"]} and opened["message_count"] == 2
    assert client.get(f"/api/sessions/{made[0]}/turns", headers=owner).get_json()["items"][0]["message"] == "q0"
    # Another owner's replay lists nothing of this owner's.
    assert _listed(client, {"X-API-Key": create_key(f"other-{uuid.uuid4().hex[:8]}")}, replay_id=replay["id"]) == []


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "{not json", "content_type": "application/json"}, 400, "bad_request"),
        ({"data": "[1, 2]", "content_type": "application/json"}, 400, "bad_request"),
        ({"data": "message=hi", "content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
        ({"json": {}}, 422, "validation_error"),
        ({"json": {"message": ""}}, 422, "validation_error"),
        ({"json": {"message": "   "}}, 422, "validation_error"),
        ({"json": {"message": 42}}, 422, "validation_error"),
        ({"json": {"message": "hi", "multitask": "sometimes"}}, 422, "validation_error"),
        ({"json": {"message": "hi", "surprise": 1}}, 422, "validation_error"),
        ({"json": {"message": "x" * 300_000}}, 413, "payload_too_large"),
    ],
)
def test_bad_turn_input_gets_a_clear_4xx_and_writes_nothing(client, owner, kwargs, status, code):
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    error = _error(client.post(f"/api/sessions/{sid}/turns", headers=owner, **kwargs), status, code)
    if status == 422:
        assert error["details"]["field"]
    assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["message_count"] == 0


def test_validation_error_names_the_field(client, owner):
    error = _error(client.post("/api/sessions", json={"title": 5}, headers=owner), 422, "validation_error")
    assert error["details"]["field"] == "title"


@pytest.mark.parametrize(
    "path", ["/api/sessions/not-a-uuid", "/api/turns/123", "/api/replays/x", "/api/turns/%00/events", "/api/nowhere"]
)
def test_unknown_or_malformed_ids_are_404(client, owner, path):
    _error(client.get(path, headers=owner), 404, "not_found")


def test_wrong_method_is_405(client, owner):
    _error(client.put("/api/sessions", headers=owner), 405, "method_not_allowed")


def test_bad_query_values_are_422(client, owner):
    _error(client.get("/api/sessions?limit=0", headers=owner), 422, "validation_error")
    _error(client.get("/api/sessions?limit=abc", headers=owner), 422, "validation_error")
    _error(client.get("/api/sessions?cursor=garbage", headers=owner), 422, "validation_error")
    for query, field in [
        ("origin=chats", "origin"),
        ("origin=", "origin"),
        ("origin=CHAT", "origin"),
        ("replay_id=not-a-uuid", "replay_id"),
        ("replay_id=", "replay_id"),
        (f"replay_id={uuid.uuid4().hex}", "replay_id"),  # a spelling the document's format: uuid refuses
        (f"origin=chat&replay_id={{{uuid.uuid4()}}}", "replay_id"),
    ]:
        error = _error(client.get(f"/api/sessions?{query}", headers=owner), 422, "validation_error")
        assert error["details"] == {"field": field}, query
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    turn = client.post(f"/api/sessions/{sid}/turns", json={"message": "x"}, headers=owner).get_json()
    _error(client.get(f"{turn['events_url']}?after=-1", headers=owner), 422, "validation_error")


def test_health_reports_database_redis_and_workers(client):
    body = client.get("/api/health").get_json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == "ok" and body["checks"]["redis"] == "ok"
    assert body["checks"]["workers"] >= 1


def test_chat_without_stream_waits_for_the_answer(client, owner):
    response = client.post("/api/chat", json={"message": "plain client"}, headers=owner)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["response"].startswith('You said: "plain client".')
    follow = client.post("/api/chat", json={"message": "and again", "session_id": body["session_id"]}, headers=owner)
    assert 'Before that you said: "plain client".' in follow.get_json()["response"]
    assert follow.get_json()["session_id"] == body["session_id"]


def test_chat_page_is_served_with_its_script_and_a_place_for_notices(client):
    page = client.get("/")
    assert page.status_code == 200
    assert b'id="notices"' in page.data and b"chat.js" in page.data
    assert client.get("/static/chat.js").status_code == 200
