"""A message sent while a turn of its session runs: besides waiting behind
it (enqueue) or being refused (reject), it can interrupt the running turn,
which ends keeping its answer so far in the history the new one sees, or
roll it back, as if it and its question had never been sent. Through the
real worker and model."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from shared.db import transaction
from shared.events import EventLog
from shared.models import Message, Turn
from tests.conftest import wait_turn

pytestmark = pytest.mark.broker  # run against RabbitMQ too (deploy/test.sh)

LONG = "the first question [[tokens=200]] [[delay=0.05]]"  # 10 s of answer


def _session(client, owner) -> str:
    return client.post("/api/sessions", json={}, headers=owner).get_json()["id"]


def _send(client, owner, sid: str, message: str, multitask: str = "enqueue") -> dict:
    made = client.post(f"/api/sessions/{sid}/turns", json={"message": message, "multitask": multitask}, headers=owner)
    assert made.status_code == 202, made.get_json()
    return made.get_json()


def _streaming(turn_id: str, timeout: float = 20, sign: str = "message.delta") -> None:
    log = EventLog("turn", turn_id)
    deadline = time.monotonic() + timeout
    while not any(e.type == sign for e in log.read_after(0)):
        assert time.monotonic() < deadline, f"turn {turn_id} did not show {sign}"
        time.sleep(0.02)


def _history(sid: str) -> list[tuple[str, str, str]]:
    """The session's messages as the next turn's model would read them."""
    with transaction() as db:
        rows = db.execute(
            select(Turn.id, Message.role, Message.content)
            .join(Message, Message.turn_id == Turn.id)
            .where(Turn.session_id == sid)
            .order_by(Turn.number, Message.role.desc())
        ).all()
    return [(turn_id, role, content) for turn_id, role, content in rows]


def test_interrupt_ends_the_running_turn_keeping_its_answer_for_the_next(client, owner):
    sid = _session(client, owner)
    first = _send(client, owner, sid, LONG)
    _streaming(first["id"])
    second = _send(client, owner, sid, "never mind, this instead", "interrupt")

    stopped = wait_turn(client, owner, first["id"])
    assert stopped["status"] == "interrupted" and stopped["answer"].startswith("You said:")
    assert len(stopped["answer"].split()) < 200  # cut short
    events = EventLog("turn", first["id"]).read_after(0)
    assert events[-1].type == "turn.interrupted" and events[-1].data["answer"] == stopped["answer"]
    shown = "".join(e.data["delta"] for e in events if e.type == "message.delta")
    assert shown == stopped["answer"]  # what clients saw is what was kept

    done = wait_turn(client, owner, second["id"])
    assert done["status"] == "succeeded"
    assert 'Before that you said: "the first question".' in done["answer"]
    assert _history(sid) == [
        (first["id"], "user", LONG),
        (first["id"], "assistant", stopped["answer"]),
        (second["id"], "user", "never mind, this instead"),
        (second["id"], "assistant", done["answer"]),
    ]


def test_an_interrupt_stops_a_turn_whose_model_is_silent(client, owner):
    """The model sent its headers and then nothing (thinking, or stalled):
    the worker's wait for its next bytes ends at the interrupt, not at
    OPENAI_TIMEOUT (10 s in the tests)."""
    sid = _session(client, owner)
    first = _send(client, owner, sid, "think it over [[fault=stall]]")
    _streaming(first["id"], sign="turn.started")
    time.sleep(0.5)  # into the silent part
    asked = time.monotonic()
    second = _send(client, owner, sid, "never mind", "interrupt")
    log = EventLog("turn", first["id"])
    while (end := log.last_event()) is None or end.type != "turn.interrupted":
        assert time.monotonic() - asked < 5, log.read_after(0)
        time.sleep(0.02)
    print(f"stopped {time.monotonic() - asked:.2f} s after the interrupt")
    assert wait_turn(client, owner, first["id"])["status"] == "interrupted"
    assert wait_turn(client, owner, second["id"])["status"] == "succeeded"


def test_rollback_removes_the_running_turn_and_its_question(client, owner):
    sid = _session(client, owner)
    first = _send(client, owner, sid, LONG)
    _streaming(first["id"])
    second = _send(client, owner, sid, "start over", "rollback")

    done = wait_turn(client, owner, second["id"])
    assert done["status"] == "succeeded" and "This is message 1 of our conversation." in done["answer"]
    assert "the first question" not in done["answer"]
    assert client.get(f"/api/turns/{first['id']}", headers=owner).status_code == 404
    assert EventLog("turn", first["id"]).last_event().type == "turn.rolled_back"
    time.sleep(0.5)  # the old attempt has stopped by now; its end must have written nothing
    assert _history(sid) == [(second["id"], "user", "start over"), (second["id"], "assistant", done["answer"])]
    turns = client.get(f"/api/sessions/{sid}/turns", headers=owner).get_json()["items"]
    assert [t["id"] for t in turns] == [second["id"]]


@pytest.mark.parametrize("how", ["interrupt", "rollback"])
def test_a_turn_waiting_for_a_person_gives_way_at_once(client, owner, how):
    made = client.post(
        "/api/assistants",
        json={
            "name": f"careful-{how}-{time.monotonic_ns()}",
            "tools": {"kit": ["shout"]},
            "approval": {"policy": "always"},
        },
        headers=owner,
    ).get_json()
    sid = client.post("/api/sessions", json={"assistant_id": made["id"]}, headers=owner).get_json()["id"]
    first = _send(client, owner, sid, '[[call=kit__shout {"text": "wait"}]]')
    deadline = time.monotonic() + 20
    while client.get(f"/api/turns/{first['id']}", headers=owner).get_json()["status"] != "waiting":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [ask] = client.get(f"/api/turns/{first['id']}/approvals", headers=owner).get_json()["items"]
    second = _send(client, owner, sid, "something else", how)
    done = wait_turn(client, owner, second["id"])
    assert done["status"] == "succeeded"
    late = client.post(f"/api/turns/{first['id']}/approvals/{ask['id']}", json={"decision": "approve"}, headers=owner)
    if how == "interrupt":
        assert client.get(f"/api/turns/{first['id']}", headers=owner).get_json()["status"] == "interrupted"
        assert late.status_code == 409  # it no longer waits: nothing runs
        assert "This is message 2 of our conversation." in done["answer"]
    else:
        assert late.status_code == 404 and "This is message 1 of our conversation." in done["answer"]
    assert (
        EventLog("turn", first["id"]).last_event().type
        == f"turn.{'interrupted' if how == 'interrupt' else 'rolled_back'}"
    )


def test_interrupts_and_rollbacks_under_load_answer_every_message_once(client, owner):
    sessions = [_session(client, owner) for _ in range(24)]
    firsts = [_send(client, owner, sid, f"first {i} [[tokens=60]] [[delay=0.05]]") for i, sid in enumerate(sessions)]
    for turn in firsts:
        _streaming(turn["id"])

    def second(i: int) -> dict:
        how = "interrupt" if i % 2 == 0 else "rollback"
        return _send(client.application.test_client(), owner, sessions[i], f"second {i}", how)

    with ThreadPoolExecutor(8) as pool:
        seconds = list(pool.map(second, range(len(sessions))))
    for i, (sid, first, new) in enumerate(zip(sessions, firsts, seconds, strict=True)):
        done = wait_turn(client, owner, new["id"], timeout=60)
        assert done["status"] == "succeeded", done
        history = _history(sid)
        answers = [turn_id for turn_id, role, _ in history if role == "assistant"]
        assert len(answers) == len(set(answers))  # never two answers to one question
        if i % 2 == 0:
            old = wait_turn(client, owner, first["id"])
            assert old["status"] in ("interrupted", "succeeded")  # it may have ended first
            assert [role for _, role, _ in history] == ["user", "assistant", "user", "assistant"], history
        else:
            gone = client.get(f"/api/turns/{first['id']}", headers=owner)
            if gone.status_code == 200:  # it ended before the rollback came: nothing left to take back
                assert gone.get_json()["status"] == "succeeded"
            else:
                assert [turn_id for turn_id, _, _ in history] == [new["id"], new["id"]], history


def test_the_sessions_queue_is_listed_and_send_now_runs_a_queued_turn_next(client, owner):
    sid = _session(client, owner)
    running = _send(client, owner, sid, LONG)
    _streaming(running["id"])
    queued = [_send(client, owner, sid, f"queued {i}") for i in range(3)]
    listed = client.get(f"/api/sessions/{sid}/turns?status=queued", headers=owner).get_json()["items"]
    assert [t["id"] for t in listed] == [t["id"] for t in queued]
    assert client.get(f"/api/sessions/{sid}/turns?status=later", headers=owner).status_code == 422
    cancelled = client.post(f"/api/turns/{queued[0]['id']}/cancel", headers=owner).get_json()
    assert cancelled["status"] == "cancelled"

    sent = client.post(f"/api/turns/{queued[2]['id']}/send-now", headers=owner)
    assert sent.status_code == 202 and sent.get_json()["number"] == 3  # ahead of the queued, behind the cancelled
    assert wait_turn(client, owner, running["id"])["status"] == "interrupted"
    now, later = wait_turn(client, owner, queued[2]["id"]), wait_turn(client, owner, queued[1]["id"])
    assert now["status"] == later["status"] == "succeeded"
    assert now["started_at"] < later["started_at"]
    assert 'You said: "queued 1". Before that you said: "queued 2".' in later["answer"]  # it saw the one sent now
    # the question taken out of the queue before it ran is no part of the conversation
    assert 'You said: "queued 2". Before that you said: "the first question".' in now["answer"]
    assert "queued 0" not in now["answer"] + later["answer"]
    turns = client.get(f"/api/sessions/{sid}/turns", headers=owner).get_json()["items"]
    assert [(t["message"], t["status"]) for t in turns] == [
        (LONG, "interrupted"),
        ("queued 0", "cancelled"),
        ("queued 2", "succeeded"),
        ("queued 1", "succeeded"),
    ]
    again = client.post(f"/api/turns/{queued[2]['id']}/send-now", headers=owner)
    assert again.status_code == 409 and "queued" in again.get_json()["error"]["message"]
