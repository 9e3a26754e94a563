"""One chat turn end to end: web -> Postgres -> Celery -> model -> Redis -> Postgres."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from shared.db import transaction
from shared.events import EventLog
from shared.models import Message
from tests.conftest import wait_turn

pytestmark = pytest.mark.broker  # run against RabbitMQ too (deploy/test.sh)


def _session(client, owner) -> str:
    return client.post("/api/sessions", json={"title": "t"}, headers=owner).get_json()["id"]


def test_turn_streams_deltas_that_concatenate_to_the_stored_answer(client, owner):
    sid = _session(client, owner)
    response = client.post(f"/api/sessions/{sid}/turns", json={"message": "hello there"}, headers=owner)
    assert response.status_code == 202
    turn = response.get_json()
    assert turn["status"] == "queued" and turn["events_url"] == f"/api/turns/{turn['id']}/events"

    done = wait_turn(client, owner, turn["id"])
    assert done["status"] == "succeeded", done
    assert done["answer"].startswith('You said: "hello there".')
    assert done["usage"]["completion_tokens"] > 0 and done["attempts"] == 1

    events = EventLog("turn", turn["id"]).read_after(0)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "turn.started" and events[-1].type == "turn.completed"
    assert "".join(e.data["delta"] for e in events if e.type == "message.delta") == done["answer"]
    assert all(e.data["turn_id"] == turn["id"] for e in events)

    with transaction() as db:
        answers = db.scalar(
            select(func.count()).select_from(Message).where(Message.turn_id == turn["id"], Message.role == "assistant")
        )
    assert answers == 1


def test_second_turn_answer_shows_the_model_saw_the_first(client, owner):
    sid = _session(client, owner)
    first = client.post(f"/api/sessions/{sid}/turns", json={"message": "my name is Ada"}, headers=owner).get_json()
    second = client.post(f"/api/sessions/{sid}/turns", json={"message": "what is my name?"}, headers=owner).get_json()
    assert wait_turn(client, owner, first["id"])["status"] == "succeeded"
    done = wait_turn(client, owner, second["id"])
    assert 'Before that you said: "my name is Ada".' in done["answer"]
    assert "This is message 2 of our conversation." in done["answer"]

    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [(m["role"], m["turn_id"]) for m in messages] == [
        ("user", first["id"]),
        ("assistant", first["id"]),
        ("user", second["id"]),
        ("assistant", second["id"]),
    ]
    assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["message_count"] == 4


def test_turns_of_one_session_run_one_at_a_time_in_order(client, owner):
    sid = _session(client, owner)
    ids = [
        client.post(f"/api/sessions/{sid}/turns", json={"message": f"q{i} [[delay=0.01]]"}, headers=owner).get_json()[
            "id"
        ]
        for i in range(4)
    ]
    turns = [wait_turn(client, owner, t) for t in ids]
    assert all(t["status"] == "succeeded" for t in turns)
    for earlier, later in zip(turns, turns[1:], strict=False):
        assert earlier["finished_at"] <= later["started_at"], (earlier, later)
    # each answer quotes the question before it: the history was complete and ordered
    for i, t in enumerate(turns[1:], 1):
        assert f'Before that you said: "q{i - 1}".' in t["answer"]


def test_multitask_reject_answers_409_while_a_turn_runs(client, owner):
    sid = _session(client, owner)
    running = client.post(f"/api/sessions/{sid}/turns", json={"message": "slow [[delay=0.05]]"}, headers=owner)
    rejected = client.post(
        f"/api/sessions/{sid}/turns", json={"message": "again", "multitask": "reject"}, headers=owner
    )
    assert rejected.status_code == 409
    assert rejected.get_json()["error"]["code"] == "conflict"
    wait_turn(client, owner, running.get_json()["id"])
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["slow [[delay=0.05]]"]


def test_idempotency_key_returns_the_same_turn_and_rejects_another_body(client, owner):
    sid = _session(client, owner)
    headers = {**owner, "Idempotency-Key": "abc-1"}
    first = client.post(f"/api/sessions/{sid}/turns", json={"message": "once"}, headers=headers)
    again = client.post(f"/api/sessions/{sid}/turns", json={"message": "once"}, headers=headers)
    other = client.post(f"/api/sessions/{sid}/turns", json={"message": "twice"}, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert other.status_code == 409
    wait_turn(client, owner, first.get_json()["id"])
    assert client.get(f"/api/sessions/{sid}", headers=owner).get_json()["message_count"] == 2


def test_cancel_a_queued_turn_never_runs_it_and_the_next_one_still_runs(client, owner):
    sid = _session(client, owner)
    slow = client.post(f"/api/sessions/{sid}/turns", json={"message": "slow [[delay=0.02]]"}, headers=owner)
    queued = client.post(f"/api/sessions/{sid}/turns", json={"message": "skip me"}, headers=owner).get_json()
    after = client.post(f"/api/sessions/{sid}/turns", json={"message": "after"}, headers=owner).get_json()
    response = client.post(f"/api/turns/{queued['id']}/cancel", headers=owner)
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"
    assert wait_turn(client, owner, slow.get_json()["id"])["status"] == "succeeded"
    done = wait_turn(client, owner, after["id"])
    assert done["status"] == "succeeded"
    assert wait_turn(client, owner, queued["id"])["attempts"] == 0
    assert [e.type for e in EventLog("turn", queued["id"]).read_after(0)] == ["turn.cancelled"]
    # cancelling a finished turn is a no-op answering 200
    assert client.post(f"/api/turns/{after['id']}/cancel", headers=owner).status_code == 200


def test_cancel_a_running_turn_stops_it_and_keeps_the_partial_text(client, owner):
    sid = _session(client, owner)
    turn = client.post(
        f"/api/sessions/{sid}/turns", json={"message": "long [[tokens=400]] [[delay=0.02]]"}, headers=owner
    ).get_json()
    log = EventLog("turn", turn["id"])
    import time

    deadline = time.monotonic() + 10
    while not any(e.type == "message.delta" for e in log.read_after(0)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.post(f"/api/turns/{turn['id']}/cancel", headers=owner).status_code == 202
    done = wait_turn(client, owner, turn["id"])
    assert done["status"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] or done["answer"]
    events = log.read_after(0)
    assert events[-1].type == "turn.cancelled"
    deltas = "".join(e.data["delta"] for e in events if e.type == "message.delta")
    assert done["answer"] == deltas and len(deltas.split()) < 400


def test_model_error_fails_the_turn_with_a_clear_code(client, owner):
    sid = _session(client, owner)
    turn = client.post(f"/api/sessions/{sid}/turns", json={"message": "boom [[fault=500]]"}, headers=owner).get_json()
    done = wait_turn(client, owner, turn["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "model_unavailable"
    events = EventLog("turn", turn["id"]).read_after(0)
    assert events[-1].type == "turn.failed" and events[-1].data["error"]["code"] == "model_unavailable"
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [m["role"] for m in messages] == ["user"]


def test_a_turn_submitted_while_the_last_one_ends_is_sent_once_that_end_commits(client, owner, monkeypatch):
    """Submission and completion race under the session lock: the turn that
    ends sends the next queued one, and a turn submitted after that end
    committed must see the session free and send itself. A submit that
    waited for the lock must read the session after the wait (an earlier
    snapshot still shows the ended turn running, and nobody sends)."""
    import threading
    import time

    from sqlalchemy import update

    import shared.turns
    from shared.db import autocommit_engine, get_engine
    from shared.models import ChatSession, Turn
    from shared.turns import lock_session, next_queued, submit_turn

    sent: list[str] = []
    monkeypatch.setattr(shared.turns, "send_turn", sent.append)  # no worker runs these turns
    sid = _session(client, owner)
    with transaction() as db:
        owner_id = db.get(ChatSession, sid).owner_id
        first, _ = submit_turn(db, sid, owner_id, "first")
    assert sent == [first.id]
    with get_engine().connect() as db:
        db.execute(update(Turn).where(Turn.id == first.id).values(status="running"))
        db.commit()

    submitted: dict[str, str] = {}

    def submit() -> None:  # as the web submits: the one statement in autocommit
        with autocommit_engine().connect() as conn:
            turn, _ = submit_turn(conn, sid, owner_id, "second")
            submitted["id"] = turn.id

    # The first turn ends: session locked, turn succeeded, nothing queued to send yet.
    ending = get_engine().connect()
    try:
        assert lock_session(ending, sid, owner_id) is not None
        ending.execute(update(Turn).where(Turn.id == first.id).values(status="succeeded"))
        assert next_queued(ending, sid) is None
        waiting = threading.Thread(target=submit)
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive(), "the submit should wait for the session lock"
        ending.commit()
    finally:
        ending.close()
    waiting.join(10)
    assert sent == [first.id, submitted["id"]]
    with transaction() as db:  # leave nothing queued for the sweeper
        db.execute(update(Turn).where(Turn.session_id == sid, Turn.status == "queued").values(status="cancelled"))


def test_deleting_a_session_ends_its_running_turn_as_cancelled(client, owner):
    """The worker stops, finds the session gone when it records the end,
    and still ends the stream."""
    from tests.services import wait_until

    sid = _session(client, owner)
    turn_id = client.post(
        f"/api/sessions/{sid}/turns", json={"message": "long [[tokens=60]] [[delay=0.05]]"}, headers=owner
    ).get_json()["id"]
    log = EventLog("turn", turn_id)
    wait_until(lambda: any(e.type == "message.delta" for e in log.read_after(0)), 10, "first delta")
    assert client.delete(f"/api/sessions/{sid}", headers=owner).status_code == 204
    wait_until(lambda: any(e.ending for e in log.read_after(0)), 10, "the end of the stream")
    assert log.read_after(0)[-1].type == "turn.cancelled"
    assert client.get(f"/api/turns/{turn_id}", headers=owner).status_code == 404


def _queued_behind(client, owner, monkeypatch, n: int) -> tuple[str, list[str], list[str]]:
    """A session with n turns that stay queued (none is sent to a worker);
    returns its id, the turns' ids and the list that catches later sends."""
    import shared.turns

    sent: list[str] = []
    monkeypatch.setattr(shared.turns, "send_turn", sent.append)
    sid = _session(client, owner)
    turns = [
        client.post(f"/api/sessions/{sid}/turns", json={"message": f"q{i}"}, headers=owner).get_json()["id"]
        for i in range(n)
    ]
    assert sent == [turns[0]]  # only the first may run; it never reached a worker
    sent.clear()
    return sid, turns, sent


def test_cancelling_the_first_of_two_queued_turns_sends_the_second(client, owner, monkeypatch):
    sid, (first, second), sent = _queued_behind(client, owner, monkeypatch, 2)
    monkeypatch.undo()  # the real sender from here: a worker must run the second turn
    assert client.post(f"/api/turns/{first}/cancel", headers=owner).status_code == 202
    assert wait_turn(client, owner, second)["status"] == "succeeded"


def test_deleting_a_session_whose_turn_waits_in_line_sends_nothing_and_logs_no_error(
    client, owner, monkeypatch, caplog
):
    sid, turns, sent = _queued_behind(client, owner, monkeypatch, 3)
    with caplog.at_level("WARNING"):
        assert client.delete(f"/api/sessions/{sid}", headers=owner).status_code == 204
    assert sent == []  # nothing comes after a deleted session's turns
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
    for turn_id in turns:
        assert [e.type for e in EventLog("turn", turn_id).read_after(0)] == ["turn.cancelled"]
        assert client.get(f"/api/turns/{turn_id}", headers=owner).status_code == 404
