"""A session's turns form a tree: regenerate and edit make siblings, the
model sees only the path it continues, the API shows and switches the
active path. Through the real worker and the offline model, whose answer
quotes the history it was sent."""

from __future__ import annotations

import uuid

from tests.conftest import new_owner, wait_turn
from tests.test_double_texting import _streaming

LONG = "a long one [[tokens=200]] [[delay=0.05]]"  # 10 s of answer


def _session(client, owner) -> str:
    return client.post("/api/sessions", json={}, headers=owner).get_json()["id"]


def _ask(client, owner, sid: str, message: str, **more) -> dict:
    made = client.post(f"/api/sessions/{sid}/turns", json={"message": message, **more}, headers=owner)
    assert made.status_code == 202, made.get_json()
    return made.get_json()


def _done(client, owner, turn: dict) -> dict:
    ended = wait_turn(client, owner, turn["id"])
    assert ended["status"] == "succeeded", ended
    return ended


def _path(client, owner, sid: str) -> list[dict]:
    return client.get(f"/api/sessions/{sid}/turns", headers=owner).get_json()["items"]


def test_an_edit_and_a_regeneration_are_siblings_and_each_model_sees_only_its_path(client, owner):
    sid = _session(client, owner)
    alpha = _done(client, owner, _ask(client, owner, sid, "alpha"))
    beta = _done(client, owner, _ask(client, owner, sid, "beta"))
    gamma = _done(client, owner, _ask(client, owner, sid, "gamma"))
    assert (alpha["parent_id"], beta["parent_id"], gamma["parent_id"]) == (None, alpha["id"], beta["id"])

    edited = client.post(f"/api/turns/{beta['id']}/edit", json={"message": "beta, asked again"}, headers=owner)
    assert edited.status_code == 202
    edited = _done(client, owner, edited.get_json())
    assert edited["parent_id"] == alpha["id"]
    assert edited["answer"] == (
        'You said: "beta, asked again". Before that you said: "alpha". This is message 2 of our conversation.'
    )
    delta = _done(client, owner, _ask(client, owner, sid, "delta"))  # continues the edited branch
    assert delta["parent_id"] == edited["id"] and "gamma" not in delta["answer"] and "beta, asked" in delta["answer"]
    assert [t["message"] for t in _path(client, owner, sid)] == ["alpha", "beta, asked again", "delta"]

    again = client.post(f"/api/turns/{gamma['id']}/regenerate", headers=owner)
    assert again.status_code == 202
    again = _done(client, owner, again.get_json())
    assert again["parent_id"] == beta["id"]
    assert again["answer"] == gamma["answer"]  # the same question on the same path: the same history
    path = _path(client, owner, sid)
    assert [t["id"] for t in path] == [alpha["id"], beta["id"], again["id"]]
    assert path[1]["siblings"] == [beta["id"], edited["id"]] and path[2]["siblings"] == [gamma["id"], again["id"]]
    assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["active_turn_id"] == again["id"]

    # switching to the edited question's branch takes its newest line
    switched = client.put(f"/api/sessions/{sid}/active", json={"turn_id": edited["id"]}, headers=owner)
    assert switched.status_code == 200 and switched.get_json()["active_turn_id"] == delta["id"]
    assert [t["id"] for t in _path(client, owner, sid)] == [alpha["id"], edited["id"], delta["id"]]
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["alpha", "beta, asked again", "delta"]
    every = client.get(f"/api/sessions/{sid}/turns?branch=all", headers=owner).get_json()["items"]
    assert len(every) == 6
    assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["message_count"] == 12


def test_a_first_question_edited_starts_a_new_root(client, owner):
    sid = _session(client, owner)
    first = _done(client, owner, _ask(client, owner, sid, "first"))
    _done(client, owner, _ask(client, owner, sid, "second"))
    other = _done(
        client,
        owner,
        client.post(f"/api/turns/{first['id']}/edit", json={"message": "other"}, headers=owner).get_json(),
    )
    assert other["parent_id"] is None
    assert other["answer"] == 'You said: "other". This is message 1 of our conversation.'
    assert [t["siblings"] for t in _path(client, owner, sid)] == [[first["id"], other["id"]]]


def test_branches_keep_idempotency_and_refuse_what_is_not_theirs(client, owner):
    sid = _session(client, owner)
    first = _done(client, owner, _ask(client, owner, sid, "first"))
    key = {"Idempotency-Key": "regen-1", **owner}
    made = client.post(f"/api/turns/{first['id']}/regenerate", headers=key)
    repeated = client.post(f"/api/turns/{first['id']}/regenerate", headers=key)
    assert (made.status_code, repeated.status_code) == (202, 200)
    assert made.get_json()["id"] == repeated.get_json()["id"]
    reused = client.post(f"/api/turns/{first['id']}/edit", json={"message": "x"}, headers=key)
    assert reused.status_code == 409 and "Idempotency-Key" in reused.get_json()["error"]["message"]
    _done(client, owner, made.get_json())

    stranger = new_owner("stranger")
    assert client.post(f"/api/turns/{first['id']}/regenerate", headers=stranger).status_code == 404
    assert client.post(f"/api/turns/{first['id']}/edit", json={"message": "x"}, headers=stranger).status_code == 404
    assert client.put(f"/api/sessions/{sid}/active", json={"turn_id": first["id"]}, headers=stranger).status_code == 404
    elsewhere = _done(client, owner, _ask(client, owner, _session(client, owner), "elsewhere"))
    wrong = client.put(f"/api/sessions/{sid}/active", json={"turn_id": elsewhere["id"]}, headers=owner)
    assert wrong.status_code == 422 and wrong.get_json()["error"]["details"]["field"] == "turn_id"
    assert client.put(f"/api/sessions/{sid}/active", json={"turn_id": "nope"}, headers=owner).status_code == 422
    assert client.post(f"/api/turns/{first['id']}/edit", json={"message": "  "}, headers=owner).status_code == 422
    assert client.get(f"/api/sessions/{sid}/turns?branch=some", headers=owner).status_code == 422

    running = _ask(client, owner, sid, LONG)
    busy = client.post(f"/api/turns/{running['id']}/regenerate", headers=owner)
    assert busy.status_code == 409 and "has ended" in busy.get_json()["error"]["message"]
    client.post(f"/api/turns/{running['id']}/cancel", headers=owner)
    wait_turn(client, owner, running["id"])


def test_an_edit_that_interrupts_a_turn_of_another_branch_runs_once_on_its_own_path(client, owner):
    sid = _session(client, owner)
    first = _done(client, owner, _ask(client, owner, sid, "first"))
    running = _ask(client, owner, sid, LONG)
    _streaming(running["id"])
    edit = client.post(
        f"/api/turns/{first['id']}/edit", json={"message": "first, again", "multitask": "interrupt"}, headers=owner
    )
    assert edit.status_code == 202
    edited = _done(client, owner, edit.get_json())
    assert wait_turn(client, owner, running["id"])["status"] == "interrupted"
    assert edited["answer"] == 'You said: "first, again". This is message 1 of our conversation.'
    assert [t["message"] for t in _path(client, owner, sid)] == ["first, again"]


def test_a_rolled_back_turn_leaves_what_followed_it_on_its_parent(client, owner):
    sid = _session(client, owner)
    first = _done(client, owner, _ask(client, owner, sid, "first"))
    running = _ask(client, owner, sid, LONG)
    _streaming(running["id"])  # a rollback takes the turn that runs
    queued = _ask(client, owner, sid, "queued behind it")
    assert queued["parent_id"] == running["id"]
    newer = _ask(client, owner, sid, "instead", multitask="rollback")
    assert client.get(f"/api/turns/{running['id']}", headers=owner).status_code == 404
    queued, newer = _done(client, owner, queued), _done(client, owner, newer)
    assert queued["parent_id"] == first["id"] and newer["parent_id"] == queued["id"]
    assert newer["answer"] == (
        'You said: "instead". Before that you said: "queued behind it". This is message 3 of our conversation.'
    )
    assert [t["message"] for t in _path(client, owner, sid)] == ["first", "queued behind it", "instead"]


def _branched(client, owner) -> tuple[str, dict, dict, dict]:
    """first -> second (its answer called a tool) and first -> second, edited."""
    sid = _session(client, owner)
    first = _done(client, owner, _ask(client, owner, sid, "first"))
    second = _done(client, owner, _ask(client, owner, sid, "second"))
    edited = client.post(f"/api/turns/{second['id']}/edit", json={"message": "second, edited"}, headers=owner)
    return sid, first, second, _done(client, owner, edited.get_json())


def test_a_share_shows_only_the_path_shared_to_anyone_until_revoked(client, owner, app):
    sid, first, second, edited = _branched(client, owner)
    other = _session(client, owner)
    made = client.post(f"/api/sessions/{sid}/shares", json={}, headers=owner)
    assert made.status_code == 201
    share = made.get_json()
    anyone = app.test_client()  # no key, no login
    shared = anyone.get(share["api_url"])
    assert shared.status_code == 200
    assert [m["content"] for m in shared.get_json()["messages"]] == [
        "first",
        first["answer"],
        "second, edited",
        edited["answer"],
    ]
    assert 'second"' not in shared.text and other not in shared.text and sid not in shared.text
    page = anyone.get(share["url"])
    assert page.status_code == 200 and "second, edited" in page.text and "text/html" in page.content_type
    # an older path, chosen by its leaf, is its own snapshot; a later change of the session is not in it
    older = client.post(f"/api/sessions/{sid}/shares", json={"turn_id": second["id"]}, headers=owner).get_json()
    _done(client, owner, _ask(client, owner, sid, "after sharing"))
    assert [m["content"] for m in anyone.get(older["api_url"]).get_json()["messages"]][::2] == ["first", "second"]
    assert "after sharing" not in anyone.get(share["api_url"]).text
    listed = client.get(f"/api/sessions/{sid}/shares", headers=owner).get_json()["items"]
    assert {s["id"] for s in listed} == {share["id"], older["id"]}

    stranger = new_owner("stranger")
    assert client.delete(f"/api/shares/{share['id']}", headers=stranger).status_code == 404
    assert client.post(f"/api/sessions/{sid}/shares", json={}, headers=stranger).status_code == 404
    bad = client.post(f"/api/sessions/{sid}/shares", json={"turn_id": str(uuid.uuid4())}, headers=owner)
    assert bad.status_code == 422
    assert client.delete(f"/api/shares/{share['id']}", headers=owner).status_code == 204
    assert anyone.get(share["api_url"]).status_code == 404 and anyone.get(share["url"]).status_code == 404
    assert anyone.get(older["api_url"]).status_code == 200
    assert anyone.get("/api/shared/not-a-share").status_code == 404


def test_tool_outputs_are_shared_only_when_chosen(client, owner, app):
    sid = _session(client, owner)
    _done(client, owner, _ask(client, owner, sid, "list tables"))  # the offline model calls the SQL tool
    plain = client.post(f"/api/sessions/{sid}/shares", json={}, headers=owner).get_json()
    with_tools = client.post(f"/api/sessions/{sid}/shares", json={"include_tools": True}, headers=owner).get_json()
    anyone = app.test_client()
    answer = anyone.get(plain["api_url"]).get_json()["messages"][1]
    assert "tools" not in answer
    calls = anyone.get(with_tools["api_url"]).get_json()["messages"][1]["tools"]
    assert calls[0]["name"].endswith("list_tables") and calls[0]["output"]
    assert set(calls[0]) == {"name", "arguments", "output", "ok"}  # no one's approval, no timing


def test_the_export_holds_the_whole_tree_and_its_markdown_is_the_active_path(client, owner, app):
    sid, first, second, edited = _branched(client, owner)
    data = client.get(f"/api/sessions/{sid}/export", headers=owner).get_json()
    assert data["format"] == "turnstream.session/1"
    assert [(t["id"], t["parent_id"], t["question"]) for t in data["turns"]] == [
        (first["id"], None, "first"),
        (second["id"], first["id"], "second"),
        (edited["id"], first["id"], "second, edited"),
    ]
    assert data["active_path"] == [first["id"], edited["id"]]
    md = client.get(f"/api/sessions/{sid}/export?format=markdown", headers=owner)
    assert md.mimetype == "text/markdown"
    assert "second, edited" in md.text and "**You:**\n\nsecond\n" not in md.text and edited["answer"] in md.text
    # the round trip: the JSON alone rebuilds every path the API shows, and the Markdown
    from web.transcripts import markdown, path_of

    assert markdown(data) == md.text
    for leaf in (second["id"], edited["id"]):
        client.put(f"/api/sessions/{sid}/active", json={"turn_id": leaf}, headers=owner)
        shown = [(t["id"], t["message"], t["answer"]) for t in _path(client, owner, sid)]
        assert [(t["id"], t["question"], t["answer"]) for t in path_of(data, leaf)] == shown
    out = app.test_cli_runner().invoke(args=["sessions", "export", sid, "--format", "markdown"])
    assert out.exit_code == 0 and "second" in out.output
    as_json = app.test_cli_runner().invoke(args=["sessions", "export", sid])
    import json

    assert json.loads(as_json.output)["turns"] == data["turns"]
    older = client.get(f"/api/sessions/{sid}/export?format=markdown&turn_id={second['id']}", headers=owner)
    assert older.text == markdown(data, second["id"]) and "**You:**\n\nsecond\n" in older.text
    assert client.get(f"/api/sessions/{sid}/export?format=pdf", headers=owner).status_code == 422
    assert client.get(f"/api/sessions/{sid}/export?turn_id={uuid.uuid4()}", headers=owner).status_code == 422
    assert client.get(f"/api/sessions/{sid}/export", headers=new_owner("x")).status_code == 404
