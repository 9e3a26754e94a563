"""Assistants: who answers, versioned, chosen per session. Their API and
the turns they answer, through the real worker, model and tool servers
(the offline model's `[[echo=setup]]` answers with the instructions, model,
sampling and tools it was given)."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
from sqlalchemy import func, select

from shared.db import transaction
from shared.models import Assistant, AssistantVersion, ChatSession, Turn
from tests.conftest import wait_turn

ECHO = "[[echo=setup]]"


def _make(client, owner, **profile) -> dict:
    body = {"name": f"a-{uuid.uuid4().hex[:8]}", **profile}
    response = client.post("/api/assistants", json=body, headers=owner)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def _ask(client, owner, message: str, **session) -> dict:
    sid = client.post("/api/sessions", json=session, headers=owner).get_json()["id"]
    turn = client.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner).get_json()
    return wait_turn(client, owner, turn["id"])


def _setup(answer: str) -> dict:
    """What `[[echo=setup]]` said the model was given."""
    found = re.fullmatch(r"System: (.*)\. Model: (.*)\. Temperature: (.*)\. Max tokens: (.*)\. Tools: (.*)\.", answer)
    assert found, answer
    system, model, temperature, max_tokens, tools = found.groups()
    return {
        "system": json.loads(system),
        "model": model,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "tools": json.loads(tools),
    }


def _assistants_of(owner_headers, client) -> int:
    return len(client.get("/api/assistants", headers=owner_headers).get_json()["items"])


def test_a_turn_on_an_assistant_gets_its_instructions_sampling_and_only_its_tools(client, owner):
    a = _make(
        client,
        owner,
        instructions="You are A. Answer in French.",
        temperature=0.25,
        max_tokens=500,
        tools={"kit": ["shout", "nap"], "sql": ["*"]},
    )
    done = _ask(client, owner, ECHO, assistant_id=a["id"])
    assert done["status"] == "succeeded", done
    seen = _setup(done["answer"])
    assert seen["system"] == ["You are A. Answer in French."]
    assert (seen["temperature"], seen["max_tokens"], seen["model"]) == ("0.25", "500", "turnstream-offline")
    assert seen["tools"] == ["kit__nap", "kit__shout", "sql__describe_table", "sql__list_tables", "sql__query"]
    assert (done["assistant_id"], done["assistant_version"]) == (a["id"], 1)

    plain = _ask(client, owner, ECHO)  # the default assistant: every configured tool, no instructions
    seen = _setup(plain["answer"])
    assert seen["system"] == [] and seen["temperature"] == "None" and seen["max_tokens"] == "None"
    assert {"kit__explode", "sql__query"} <= set(seen["tools"]) and any(t.startswith("web__") for t in seen["tools"])
    assert (plain["assistant_id"], plain["assistant_version"]) == (None, None)


def test_an_assistant_with_no_tools_is_offered_none_and_its_budget_cuts_the_answer(client, owner):
    a = _make(client, owner, max_tokens=4)
    done = _ask(client, owner, "a question long enough to need more than four tokens", assistant_id=a["id"])
    assert done["status"] == "succeeded" and done["usage"]["completion_tokens"] == 4
    assert _setup(_ask(client, owner, ECHO, assistant_id=_make(client, owner)["id"])["answer"])["tools"] == []


def test_a_tool_outside_the_assistants_allowlist_is_never_run(stack):
    """The model may name a tool it was not offered: the call is refused,
    whatever other turns of the process were offered."""
    from shared.assistants import Profile
    from shared.config import get_settings
    from tasks.tools import Toolbox

    settings = get_settings()
    toolbox = Toolbox(settings.mcp_servers, settings.tool_timeout)
    try:
        everything = toolbox.offer(Profile(None, None, "default", "", "default", "m"))
        kit_only = toolbox.offer(Profile("x", 1, "kit", "", "default", "m", tools={"kit": ["shout"]}))
        assert [s["function"]["name"] for s in kit_only.specs] == ["kit__shout"]
        args = json.dumps({"sql": "SELECT 1"})
        refused, shouted = toolbox.call_all(kit_only, [("sql__query", args), ("kit__shout", '{"text": "hi"}')], bool)
        assert not refused.ok and "no tool named 'sql__query'" in refused.output
        assert shouted.ok and shouted.output == "HI"
        [ran] = toolbox.call_all(everything, [("sql__query", args)], bool)
        assert ran.ok
    finally:
        toolbox.close()


def test_a_session_pinned_to_version_1_keeps_it_after_version_2_is_made(client, owner):
    a = _make(client, owner, instructions="version one")
    pinned = client.post("/api/sessions", json={"assistant_id": a["id"], "assistant_version": 1}, headers=owner)
    pinned = pinned.get_json()
    assert (pinned["assistant_id"], pinned["assistant_version"]) == (a["id"], 1)
    follows = client.post("/api/sessions", json={"assistant_id": a["id"]}, headers=owner).get_json()

    v2 = client.put(
        f"/api/assistants/{a['id']}", json={"name": a["name"], "instructions": "version two"}, headers=owner
    )
    assert v2.status_code == 200 and (v2.get_json()["version"], v2.get_json()["latest"]) == (2, 2)

    def ask(sid):
        turn = client.post(f"/api/sessions/{sid}/turns", json={"message": ECHO}, headers=owner).get_json()
        return wait_turn(client, owner, turn["id"])

    old, new = ask(pinned["id"]), ask(follows["id"])
    assert _setup(old["answer"])["system"] == ["version one"] and old["assistant_version"] == 1
    assert _setup(new["answer"])["system"] == ["version two"] and new["assistant_version"] == 2

    # a rollback moves sessions that follow the latest, not pinned ones
    back = client.post(f"/api/assistants/{a['id']}/latest", json={"version": 1}, headers=owner)
    assert back.status_code == 200 and back.get_json()["instructions"] == "version one"
    assert _setup(ask(follows["id"])["answer"])["system"] == ["version one"]


def test_versions_stay_readable_and_an_update_replaces_the_whole_profile(client, owner):
    a = _make(client, owner, instructions="one", temperature=1, tools={"kit": ["shout"]}, metadata={"team": "x"})
    assert (a["version"], a["latest"], a["versions"], a["temperature"]) == (1, 1, 1, 1.0)
    path = f"/api/assistants/{a['id']}"
    replaced = client.put(path, json={"name": "renamed", "instructions": "two"}, headers=owner).get_json()
    assert replaced["name"] == "renamed" and replaced["version"] == 2
    assert replaced["temperature"] is None and replaced["tools"] == {} and replaced["metadata"] == {}  # nothing kept

    items = client.get(f"{path}/versions", headers=owner).get_json()["items"]
    assert [(v["version"], v["instructions"]) for v in items] == [(2, "two"), (1, "one")]
    first = client.get(f"{path}/versions/1", headers=owner).get_json()
    assert first["tools"] == {"kit": ["shout"]} and first["metadata"] == {"team": "x"} and first["latest"] == 2
    assert client.get(f"{path}/versions/3", headers=owner).status_code == 404
    page = client.get(f"{path}/versions?limit=1", headers=owner).get_json()
    assert [v["version"] for v in page["items"]] == [2]
    nxt = client.get(f"{path}/versions?limit=1&cursor={page['next_cursor']}", headers=owner).get_json()
    assert [v["version"] for v in nxt["items"]] == [1] and nxt["next_cursor"] is None

    refused = client.post(f"{path}/latest", json={"version": 3}, headers=owner)
    assert refused.status_code == 422 and refused.get_json()["error"]["details"]["field"] == "version"
    assert client.get(path, headers=owner).get_json()["version"] == 2


@pytest.mark.parametrize(
    ("profile", "field", "words"),
    [
        ({"endpoint": "elsewhere"}, "endpoint", "not configured (MODEL_ENDPOINTS)"),
        ({"endpoint": "second"}, "model", "model is required"),
        ({"tools": {"nosuch": ["x"]}}, "tools", "no MCP server 'nosuch'"),
        ({"approval": {"policy": "tools", "tools": ["nosuch__x"]}}, "approval.tools", "no configured MCP server"),
        ({"instructions": "x" * 20_001}, "instructions", "at most 20000 characters"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"endpoint": "http://evil.example/v1"}, "endpoint", "not configured"),
    ],
)
def test_bad_profiles_are_refused_and_write_nothing(client, owner, profile, field, words):
    response = client.post("/api/assistants", json={"name": "bad", **profile}, headers=owner)
    error = response.get_json()["error"]
    assert response.status_code == 422 and error["details"]["field"] == field and words in error["message"], error
    assert _assistants_of(owner, client) == 0
    a = _make(client, owner, instructions="kept")
    replaced = client.put(f"/api/assistants/{a['id']}", json={"name": a["name"], **profile}, headers=owner)
    assert replaced.status_code == 422
    assert client.get(f"/api/assistants/{a['id']}", headers=owner).get_json()["versions"] == 1


def test_a_name_is_the_owners_once(client, owner, stack):
    from web.auth import create_key

    a = _make(client, owner)
    again = client.post("/api/assistants", json={"name": a["name"]}, headers=owner)
    assert again.status_code == 409 and again.get_json()["error"]["details"]["field"] == "name"
    other = _make(client, owner)
    clash = client.put(f"/api/assistants/{other['id']}", json={"name": a["name"]}, headers=owner)
    assert clash.status_code == 409
    assert client.get(f"/api/assistants/{other['id']}", headers=owner).get_json()["versions"] == 1
    stranger = {"Authorization": f"Bearer {create_key(f'owner-{uuid.uuid4().hex[:12]}')}"}
    assert client.post("/api/assistants", json={"name": a["name"]}, headers=stranger).status_code == 201


def test_another_owners_assistant_is_not_found_anywhere(client, owner, stack):
    from web.auth import create_key

    a = _make(client, owner)
    stranger = {"Authorization": f"Bearer {create_key(f'owner-{uuid.uuid4().hex[:12]}')}"}
    path = f"/api/assistants/{a['id']}"
    for method, url, body in [
        ("get", path, None),
        ("put", path, {"name": "mine"}),
        ("delete", path, None),
        ("get", f"{path}/versions", None),
        ("get", f"{path}/versions/1", None),
        ("post", f"{path}/latest", {"version": 1}),
        ("post", "/api/sessions", {"assistant_id": a["id"]}),
        ("post", "/api/replays", {"questions": [{"message": "q"}], "assistant_id": a["id"]}),
        ("post", "/api/chat", {"message": "q", "assistant_id": a["id"]}),
    ]:
        response = getattr(client, method)(url, json=body, headers=stranger)
        assert response.status_code == 404, (method, url, response.get_json())
    with transaction() as db:
        assert db.scalar(select(func.count()).select_from(ChatSession).where(ChatSession.assistant_id == a["id"])) == 0
    sid = client.post("/api/sessions", json={}, headers=stranger).get_json()["id"]
    moved = client.patch(f"/api/sessions/{sid}", json={"assistant_id": a["id"]}, headers=stranger)
    assert moved.status_code == 404
    assert client.get(f"/api/sessions/{sid}", headers=stranger).get_json()["assistant_id"] is None


def test_a_session_names_only_a_version_the_assistant_has(client, owner):
    a = _make(client, owner)
    response = client.post("/api/sessions", json={"assistant_id": a["id"], "assistant_version": 2}, headers=owner)
    assert response.status_code == 422 and response.get_json()["error"]["details"]["field"] == "assistant_version"
    alone = client.post("/api/sessions", json={"assistant_version": 1}, headers=owner)
    assert alone.status_code == 422
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    chosen = client.patch(f"/api/sessions/{sid}", json={"assistant_id": a["id"]}, headers=owner).get_json()
    assert (chosen["assistant_id"], chosen["assistant_version"]) == (a["id"], None)
    back = client.patch(f"/api/sessions/{sid}", json={"assistant_id": None}, headers=owner).get_json()
    assert back["assistant_id"] is None


def test_deleting_waits_for_its_turns_and_leaves_its_sessions_to_the_default(client, owner):
    a = _make(client, owner, instructions="soon gone")
    sid = client.post("/api/sessions", json={"assistant_id": a["id"]}, headers=owner).get_json()["id"]
    slow = client.post(f"/api/sessions/{sid}/turns", json={"message": "[[first=3]] slow"}, headers=owner).get_json()
    refused = client.delete(f"/api/assistants/{a['id']}", headers=owner)
    assert refused.status_code == 409 and "queued or running" in refused.get_json()["error"]["message"]
    assert client.get(f"/api/assistants/{a['id']}", headers=owner).status_code == 200
    assert wait_turn(client, owner, slow["id"])["status"] == "succeeded"

    assert client.delete(f"/api/assistants/{a['id']}", headers=owner).status_code == 204
    with transaction() as db:
        assert db.get(Assistant, a["id"]) is None
        assert (
            db.scalar(
                select(func.count()).select_from(AssistantVersion).where(AssistantVersion.assistant_id == a["id"])
            )
            == 0
        )
        assert db.get(Turn, slow["id"]).assistant_id == a["id"]  # the record of what answered stays
    session = client.get(f"/api/sessions/{sid}", headers=owner).get_json()
    assert (session["assistant_id"], session["assistant_version"]) == (None, None)
    after = client.post(f"/api/sessions/{sid}/turns", json={"message": ECHO}, headers=owner).get_json()
    assert _setup(wait_turn(client, owner, after["id"])["answer"])["system"] == []


def test_a_named_endpoint_answers_with_its_model_and_its_failure_names_it(client, owner):
    second = _make(client, owner, endpoint="second", model="other-model")
    done = _ask(client, owner, ECHO, assistant_id=second["id"])
    assert done["status"] == "succeeded" and _setup(done["answer"])["model"] == "other-model"
    assert done["model"] == "other-model"

    nowhere = _make(client, owner, endpoint="nowhere", model="m")
    failed = _ask(client, owner, "hello", assistant_id=nowhere["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_unavailable"
    assert "MODEL_ENDPOINTS['nowhere']" in failed["error"]["message"]
    # the default endpoint's health is not the assistant's
    assert client.get("/api/info", headers=owner).get_json()["model_status"]["ok"] is True


def test_a_replay_runs_every_question_on_one_version_of_an_assistant(client, owner):
    a = _make(client, owner, instructions="replayed")
    questions = [{"message": f"{ECHO} {i}"} for i in range(3)]
    replay = client.post(
        "/api/replays", json={"questions": questions, "assistant_id": a["id"], "concurrency": 2}, headers=owner
    ).get_json()
    assert (replay["assistant_id"], replay["assistant_version"]) == (a["id"], 1)  # the latest, fixed now
    client.put(f"/api/assistants/{a['id']}", json={"name": a["name"], "instructions": "later"}, headers=owner)
    assert client.delete(f"/api/assistants/{a['id']}", headers=owner).status_code == 409  # under way
    deadline = time.monotonic() + 30
    while client.get(f"/api/replays/{replay['id']}", headers=owner).get_json()["status"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    lines = [
        json.loads(line) for line in client.get(f"/api/replays/{replay['id']}/results", headers=owner).data.splitlines()
    ]
    assert [_setup(line["answer"])["system"] for line in lines] == [["replayed"]] * 3
    with transaction() as db:
        versions = db.scalars(select(Turn.assistant_version).where(Turn.id.in_([line["turn_id"] for line in lines])))
        assert set(versions) == {1}


def test_choosing_an_assistant_while_it_is_deleted_is_a_404_or_a_session_left_to_the_default(app, owner):
    """The choice key-share locks the assistant: a delete waits for it and
    then clears it, or comes first and the choice is a 404; never a
    dangling reference (a 500 from the foreign key)."""
    from concurrent.futures import ThreadPoolExecutor

    client = app.test_client()
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(20):
            a = _make(client, owner)
            patch = pool.submit(
                lambda a=a: app.test_client().patch(
                    f"/api/sessions/{sid}", json={"assistant_id": a["id"]}, headers=owner
                )
            )
            gone = pool.submit(lambda a=a: app.test_client().delete(f"/api/assistants/{a['id']}", headers=owner))
            assert (patch.result().status_code, gone.result().status_code) in ((200, 204), (404, 204))
            assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["assistant_id"] is None
