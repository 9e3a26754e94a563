"""A person approves tool calls before they run: the turn waits with no
worker holding it, each call is decided on its own, and the turn goes on
once every call of the step is decided. Through the real worker, model
(its `[[call=…]]` directives make parallel calls) and MCP test kit."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
import redis
from sqlalchemy import func, select, update

from shared.db import transaction
from shared.events import EventLog
from shared.models import ToolApproval, Turn
from tests import services
from tests.conftest import TEST_ENV, new_owner, wait_turn

THREE = " ".join(f'[[call=kit__shout {{"text": "{word}"}}]]' for word in ("one", "two", "three"))


def _assistant(client, owner, **approval) -> str:
    body = {
        "name": f"a-{uuid.uuid4().hex[:8]}",
        "tools": {"kit": ["shout", "nap"], "sql": ["*"]},
        "approval": {"policy": "always", **approval},
    }
    made = client.post("/api/assistants", json=body, headers=owner)
    assert made.status_code == 201, made.get_json()
    return made.get_json()["id"]


def _submit(client, owner, message: str, session_id: str | None = None, **session) -> dict:
    if session_id is None:
        session_id = client.post("/api/sessions", json=session, headers=owner).get_json()["id"]
    return client.post(f"/api/sessions/{session_id}/turns", json={"message": message}, headers=owner).get_json()


def _waiting(client, owner, turn_id: str, count: int, timeout: float = 20) -> list[dict]:
    """The turn's pending calls once it waits on `count` of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        turn = client.get(f"/api/turns/{turn_id}", headers=owner).get_json()
        if turn["status"] == "waiting":
            items = client.get(f"/api/turns/{turn_id}/approvals", headers=owner).get_json()["items"]
            pending = [a for a in items if a["status"] == "pending"]
            if len(pending) == count:
                return pending
        assert turn["status"] not in ("succeeded", "failed", "cancelled"), turn
        time.sleep(0.05)
    raise AssertionError(f"turn {turn_id} did not wait on {count} calls: {turn}")


def _decide(client, owner, turn_id: str, request_id: str, **body):
    return client.post(f"/api/turns/{turn_id}/approvals/{request_id}", json=body, headers=owner)


def test_parallel_calls_are_approved_edited_and_rejected_each_on_its_own(client, owner):
    turn = _submit(client, owner, THREE, assistant_id=_assistant(client, owner))
    asked = _waiting(client, owner, turn["id"], 3)
    by_text = {a["arguments"]["text"]: a for a in asked}
    assert set(by_text) == {"one", "two", "three"} and {a["name"] for a in asked} == {"kit__shout"}
    types = [e.type for e in EventLog("turn", turn["id"]).read_after(0)]
    assert types.count("tool.approval_required") == 3 and types[-1] == "turn.waiting" and "tool.started" not in types

    approved = _decide(client, owner, turn["id"], by_text["one"]["id"], decision="approve")
    assert approved.status_code == 200 and approved.get_json()["status"] == "approved"
    assert client.get(f"/api/turns/{turn['id']}", headers=owner).get_json()["status"] == "waiting"  # two to go
    edited = _decide(client, owner, turn["id"], by_text["two"]["id"], decision="approve", arguments={"text": "edited"})
    assert edited.get_json()["decided_arguments"] == {"text": "edited"}
    rejected = _decide(client, owner, turn["id"], by_text["three"]["id"], decision="reject", message="not that one")
    assert rejected.get_json()["status"] == "rejected"

    done = wait_turn(client, owner, turn["id"])
    assert done["status"] == "succeeded", done
    # the model got every call's answer: two results and the person's refusal
    assert "kit__shout returned: ONE." in done["answer"] and "kit__shout returned: EDITED." in done["answer"]
    assert "This call was not run: the person declined it: not that one." in done["answer"]
    tools = {t["call_id"]: t for t in done["tools"]}
    assert len(tools) == 3
    two = tools[by_text["two"]["call_id"]]
    assert two["arguments"] == {"text": "edited"} and two["approval"]["status"] == "approved"
    assert two["approval"]["decided_by"].startswith("key ") and two["approval"]["decided_at"]
    three = tools[by_text["three"]["call_id"]]
    assert not three["ok"] and three["approval"]["message"] == "not that one"
    events = EventLog("turn", turn["id"]).read_after(0)
    assert [e.data["status"] for e in events if e.type == "tool.approval_decided"] == [
        "approved",
        "approved",
        "rejected",
    ]
    assert sum(e.type == "tool.started" for e in events) == 2  # the rejected call never ran
    resumed = [e for e in events if e.type == "turn.resumed"]
    assert len(resumed) == 1 and resumed[0].data["text"] == ""


def test_a_decision_for_the_wrong_turn_or_owner_twice_or_after_the_end_changes_nothing(client, owner, stack):
    from web.auth import create_key

    assistant = _assistant(client, owner)
    turn = _submit(client, owner, '[[call=kit__shout {"text": "a"}]]', assistant_id=assistant)
    other = _submit(client, owner, '[[call=kit__shout {"text": "b"}]]', assistant_id=assistant)
    [ask] = _waiting(client, owner, turn["id"], 1)
    [other_ask] = _waiting(client, owner, other["id"], 1)
    stranger = {"Authorization": f"Bearer {create_key(f'owner-{uuid.uuid4().hex[:12]}')}"}
    assert _decide(client, stranger, turn["id"], ask["id"], decision="approve").status_code == 404
    assert _decide(client, owner, turn["id"], other_ask["id"], decision="approve").status_code == 404
    bad = _decide(client, owner, turn["id"], ask["id"], decision="approve", arguments={"text": 5})
    assert bad.status_code == 422 and bad.get_json()["error"]["details"]["field"] == "arguments.text"
    assert _decide(client, owner, turn["id"], ask["id"], decision="reject", always=True).status_code == 422
    assert client.get(f"/api/turns/{turn['id']}/approvals", headers=owner).get_json()["items"][0]["status"] == "pending"

    assert _decide(client, owner, turn["id"], ask["id"], decision="approve").status_code == 200
    twice = _decide(client, owner, turn["id"], ask["id"], decision="reject")
    assert twice.status_code == 409 and "already approved" in twice.get_json()["error"]["message"]
    assert wait_turn(client, owner, turn["id"])["status"] == "succeeded"

    assert client.post(f"/api/turns/{other['id']}/cancel", headers=owner).get_json()["status"] == "cancelled"
    late = _decide(client, owner, other["id"], other_ask["id"], decision="approve")
    assert late.status_code == 409 and "cancelled" in late.get_json()["error"]["message"]
    with transaction() as db:
        assert db.get(ToolApproval, other_ask["id"]).status == "pending"
        assert db.get(Turn, other["id"]).status == "cancelled"


def test_always_for_this_session_lets_the_tool_run_without_asking_again(client, owner):
    assistant = _assistant(client, owner)
    first = _submit(client, owner, '[[call=kit__shout {"text": "x"}]]', assistant_id=assistant)
    [ask] = _waiting(client, owner, first["id"], 1)
    assert _decide(client, owner, first["id"], ask["id"], decision="approve", always=True).status_code == 200
    assert wait_turn(client, owner, first["id"])["status"] == "succeeded"

    again = _submit(client, owner, '[[call=kit__shout {"text": "y"}]]', first["session_id"])
    done = wait_turn(client, owner, again["id"])
    assert done["status"] == "succeeded" and "kit__shout returned: Y." in done["answer"]
    assert client.get(f"/api/turns/{again['id']}/approvals", headers=owner).get_json()["items"] == []
    elsewhere = _submit(client, owner, '[[call=kit__shout {"text": "z"}]]', assistant_id=assistant)
    _waiting(client, owner, elsewhere["id"], 1)  # another session asks again


def test_read_only_tools_run_without_asking_when_the_policy_lets_them(client, owner):
    assistant = _assistant(client, owner, read_only_without_asking=True)
    turn = _submit(client, owner, '[[call=sql__list_tables]] [[call=kit__shout {"text": "w"}]]', assistant_id=assistant)
    [ask] = _waiting(client, owner, turn["id"], 1)
    assert ask["name"] == "kit__shout"  # the SQL server's tools say they only read
    assert _decide(client, owner, turn["id"], ask["id"], decision="approve").status_code == 200
    done = wait_turn(client, owner, turn["id"])
    assert {t["name"] for t in done["tools"]} == {"sql__list_tables", "kit__shout"} and all(
        t["ok"] for t in done["tools"]
    )


def test_only_the_tools_the_policy_names_ask(client, owner):
    assistant = _assistant(client, owner, policy="tools", tools=["kit__nap"])
    plain = wait_turn(client, owner, _submit(client, owner, THREE, assistant_id=assistant)["id"])
    assert plain["status"] == "succeeded" and "kit__shout returned: THREE." in plain["answer"]
    napping = _submit(client, owner, '[[call=kit__nap {"seconds": 0}]]', assistant_id=assistant)
    _waiting(client, owner, napping["id"], 1)


def test_a_call_nobody_decides_is_rejected_at_its_deadline_and_the_turn_goes_on(client, owner):
    from shared.approvals import expire_overdue

    turn = _submit(client, owner, '[[call=kit__shout {"text": "late"}]]', assistant_id=_assistant(client, owner))
    [ask] = _waiting(client, owner, turn["id"], 1)
    assert (
        expire_overdue() == 0 or client.get(f"/api/turns/{turn['id']}", headers=owner).get_json()["status"] == "waiting"
    )
    with transaction() as db:  # as if APPROVAL_TIMEOUT_SECONDS had passed
        db.execute(update(ToolApproval).where(ToolApproval.id == ask["id"]).values(deadline=func.now()))
    assert expire_overdue() >= 1
    done = wait_turn(client, owner, turn["id"])
    assert done["status"] == "succeeded" and "no one approved it in time" in done["answer"]
    [row] = client.get(f"/api/turns/{turn['id']}/approvals", headers=owner).get_json()["items"]
    assert (row["status"], row["decided_by"]) == ("expired", "sweeper")


def test_a_waiting_turn_holds_its_session_and_frees_its_owners_place(client, owner):
    assistant = _assistant(client, owner)
    turn = _submit(client, owner, '[[call=kit__shout {"text": "q"}]]', assistant_id=assistant)
    [ask] = _waiting(client, owner, turn["id"], 1)
    behind = _submit(client, owner, "after it", turn["session_id"])
    other = wait_turn(client, owner, _submit(client, owner, "another session")["id"])
    assert other["status"] == "succeeded"  # the worker is not held by the waiting turn
    time.sleep(0.5)
    assert client.get(f"/api/turns/{behind['id']}", headers=owner).get_json()["status"] == "queued"
    _decide(client, owner, turn["id"], ask["id"], decision="approve")
    assert wait_turn(client, owner, behind["id"])["status"] == "succeeded"
    with transaction() as db:
        assert db.scalar(select(Turn.number).where(Turn.id == behind["id"])) == 2


# A worker of its own, to kill: the session's stack's worker would take the turn too.
@pytest.fixture(scope="module")
def own_stack():
    env = {**TEST_ENV, "REDIS_PREFIX": "approvals:", "TURN_MAX_ATTEMPTS": "2"}
    with services.stack("turnstream-approvals-", env, ("--first-token-delay", "0")) as info:
        yield info


def _own_worker(own_stack, name: str):
    """A client of the app on the module's own stack, an owner and a worker."""
    from web import create_app

    worker = services.start_worker(own_stack["logdir"], own_stack["env"], name)
    own_stack["procs"].append(worker)
    services.wait_for_worker(worker)
    return create_app().test_client(), new_owner("own"), worker


def test_a_pause_survives_redis_losing_its_data(own_stack):
    """Redis emptied while the turn waits (the broker's queues, the event
    log, the held places, the heartbeats): the pause is Postgres's, so the
    decision still resumes it, and the approved call runs once."""
    client, owner, worker = _own_worker(own_stack, "approvals-flush")
    turn = _submit(client, owner, '[[call=kit__shout {"text": "kept"}]]', assistant_id=_assistant(client, owner))
    (asked,) = _waiting(client, owner, turn["id"], 1)
    redis.Redis(port=own_stack["redis_port"]).flushall()
    assert _decide(client, owner, turn["id"], asked["id"], decision="approve").status_code == 200
    done = wait_turn(client, owner, turn["id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert [(t["name"], t["ok"]) for t in done["tools"]] == [("kit__shout", True)]
    assert done["answer"].count("returned: KEPT") == 1
    with transaction() as db:
        assert db.get(Turn, turn["id"]).attempts == 2  # the first, paused; the resumed one
    worker.stop()  # the next test's worker must be the only one


def test_a_pause_survives_a_worker_sigkill_and_no_decided_call_runs_twice(own_stack):
    """Killed while waiting: nothing is lost (the pause is in Postgres).
    Killed while the approved calls run: the next attempt answers them as
    interrupted and never runs them again."""
    from shared.recovery import requeue_stale_running

    client, owner, worker = _own_worker(own_stack, "approvals-1")
    env = own_stack["env"]
    turn = _submit(
        client,
        owner,
        '[[call=kit__nap {"seconds": 3}]] [[call=kit__shout {"text": "s"}]]',
        assistant_id=_assistant(client, owner),
    )
    asked = _waiting(client, owner, turn["id"], 2)
    os.killpg(worker.popen.pid, signal.SIGKILL)  # no worker at all while it waits
    worker.popen.wait()
    second = services.start_worker(own_stack["logdir"], env, "approvals-2")
    own_stack["procs"].append(second)
    services.wait_for_worker(second)
    for ask in asked:
        assert _decide(client, owner, turn["id"], ask["id"], decision="approve").status_code == 200
    log = EventLog("turn", turn["id"])
    services.wait_until(lambda: any(e.type == "tool.started" for e in log.read_after(0)), 20, "the calls to start")
    os.killpg(second.popen.pid, signal.SIGKILL)  # while the nap runs
    second.popen.wait()
    third = services.start_worker(own_stack["logdir"], env, "approvals-3")
    own_stack["procs"].append(third)
    services.wait_for_worker(third)
    services.wait_until(lambda: requeue_stale_running() or None, 30, "the sweeper to hand the turn back")
    done = wait_turn(client, owner, turn["id"], timeout=60)
    assert done["status"] == "succeeded", done
    events = log.read_after(0)
    started = [e.data["call_id"] for e in events if e.type == "tool.started"]
    assert sorted(started) == sorted(a["call_id"] for a in asked)  # each started once, by the killed attempt
    assert done["answer"].count("stopped before it reported back") == 2
    assert len(done["tools"]) == 2 and not any(t["ok"] for t in done["tools"])
    with transaction() as db:
        turn_row = db.get(Turn, turn["id"])
        assert (turn_row.attempts, turn_row.resumes) == (3, 1)
    assert json.dumps(done["tools"]).count('"approved"') == 2
