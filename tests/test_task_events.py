"""What Flower shows: each turn's real outcome, read from Celery's task events
as Flower receives them (celery.events.state.State is what Flower builds on)."""

from __future__ import annotations

import threading
import time

import pytest
from celery.events.state import State

from shared.broker import SWEEP_TURNS, get_celery
from shared.events import EventLog
from tests.conftest import wait_turn
from tests.services import wait_until


@pytest.fixture
def task_events():
    """Celery's task events as Flower gets them, while the test runs."""
    app = get_celery()
    state = State()
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": state.event})
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        time.sleep(1)  # the receiver's queue is bound to the events exchange
        try:
            yield state
        finally:
            receiver.should_stop = True
            thread.join(5)


def _submit(client, owner, message: str, **session) -> str:
    sid = client.post("/api/sessions", json=session, headers=owner).get_json()["id"]
    return client.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner).get_json()["id"]


def _tasks_of(state: State, turn_id: str) -> list:
    return [t for t in list(state.tasks.values()) if turn_id in (t.args or "")]


def _ended(state: State, turn_id: str):
    found = [t for t in _tasks_of(state, turn_id) if t.state in ("SUCCESS", "FAILURE")]
    return found[-1] if found else None


def test_flower_shows_failed_and_cancelled_turns_as_failed_tasks_naming_turn_and_code(
    stack, client, owner, task_events
):
    failed = _submit(client, owner, "no luck [[fault=503]]")
    cancelled = _submit(client, owner, "long [[tokens=300]] [[delay=0.02]]")
    succeeded = _submit(client, owner, "fine")
    helper = client.post("/api/assistants", json={"name": "helper"}, headers=owner).get_json()
    client.put(f"/api/assistants/{helper['id']}", json={"name": "helper"}, headers=owner)
    assisted = _submit(client, owner, "fine too", assistant_id=helper["id"])
    log = EventLog("turn", cancelled)
    wait_until(lambda: any(e.type == "message.delta" for e in log.read_after(0)), 10, "the long turn to stream")
    assert client.post(f"/api/turns/{cancelled}/cancel", headers=owner).status_code == 202
    for turn_id in (failed, cancelled, succeeded, assisted):
        wait_turn(client, owner, turn_id)
        wait_until(lambda t=turn_id: _ended(task_events, t), 10, f"the task event of turn {turn_id}")

    task = _ended(task_events, failed)
    assert task.state == "FAILURE" and task.name == "tasks.run_turn"
    assert f"turn {failed} failed on default" in task.exception and "model_unavailable" in task.exception
    task = _ended(task_events, cancelled)
    assert task.state == "FAILURE" and f"turn {cancelled} cancelled" in task.exception
    task = _ended(task_events, succeeded)
    assert task.state == "SUCCESS" and f"turn {succeeded} succeeded on default" in task.result
    task = _ended(task_events, assisted)  # the assistant and version it ran with
    assert task.state == "SUCCESS" and f"turn {assisted} succeeded on helper v2" in task.result
    # the turn's row is already final: nothing is retried because the task failed
    assert [t.state for t in _tasks_of(task_events, failed)] == ["FAILURE"]
    # an expected failure: one line in the worker's log, no traceback
    lines = [line for line in stack["worker"].log_path.read_text().splitlines() if f"turn {failed} failed" in line]
    assert lines and all("raised expected: TurnFailed(" in line for line in lines), lines


def test_the_sweeper_stays_out_of_flowers_task_list(stack, task_events):
    get_celery().send_task(SWEEP_TURNS)
    worker_log = stack["worker"].log_path
    seen = worker_log.read_text().count(f"Task {SWEEP_TURNS}[")
    wait_until(lambda: worker_log.read_text().count(f"Task {SWEEP_TURNS}[") > seen, 10, "the sweeper to run")
    time.sleep(0.5)
    assert [t for t in task_events.tasks.values() if t.name == SWEEP_TURNS] == []
