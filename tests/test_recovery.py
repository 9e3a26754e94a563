"""Turns whose worker stopped: heartbeats, the sweeper, the attempt cap, an
attempt that lost its turn, and the operator's `flask turns` commands.

A "dead worker" here is this test process claiming a turn and never running
it: the turn is `running` with no heartbeat, as after a SIGKILL. The real
worker (the session's) then runs the next attempt. test_chaos.py kills real
workers.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import func, update

from shared.db import transaction
from shared.events import EventLog
from shared.models import ChatSession, Turn
from shared.recovery import alive, alive_key
from shared.redis import get_redis
from shared.turns import submit_turn
from tasks.sweeper import sweep_turns
from tasks.turn import claim_turn
from tests.conftest import wait_turn
from tests.services import wait_until

pytestmark = pytest.mark.broker  # run against RabbitMQ too (deploy/test.sh)


def _orphan(client, owner, message: str, attempts: int = 0, claimed_ago: float = 3.0) -> tuple[str, str]:
    """A turn claimed `claimed_ago` seconds ago by a worker that died at
    once: running, no heartbeat (STALE_RUNNING_SECONDS is 2 here)."""
    import shared.turns

    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    send = shared.turns.send_turn
    shared.turns.send_turn = lambda turn_id: None  # the dead worker took the message with it
    try:
        with transaction() as db:
            chat = db.get(ChatSession, sid)
            turn, _ = submit_turn(db, sid, chat.owner_id, message)
            turn_id = turn.id
    finally:
        shared.turns.send_turn = send
    if attempts:
        with transaction() as db:
            db.execute(update(Turn).where(Turn.id == turn_id).values(attempts=attempts))
    assert claim_turn(turn_id) is not None
    _claimed_ago(turn_id, claimed_ago)
    return sid, turn_id


def _claimed_ago(turn_id: str, seconds: float) -> None:
    with transaction() as db:
        db.execute(update(Turn).where(Turn.id == turn_id).values(claimed_at=func.now() - timedelta(seconds=seconds)))


def test_a_fresh_claim_counts_as_a_beat_until_stale_running_seconds(client, owner):
    """A worker sets a turn's heartbeat at its first beat after the claim,
    not in a round trip before it: until then the claim's time stands in."""
    _sid, turn_id = _orphan(client, owner, "just claimed", claimed_ago=0)
    assert alive([turn_id]) == [False]
    sweep_turns()
    assert client.get(f"/api/turns/{turn_id}", headers=owner).get_json()["status"] == "running"
    _claimed_ago(turn_id, 3)  # its worker never beat
    sweep_turns()
    done = wait_turn(client, owner, turn_id)
    assert done["status"] == "succeeded" and done["attempts"] == 2


def test_a_dead_workers_turn_is_requeued_by_the_sweeper_and_answered_once(client, owner):
    sid, turn_id = _orphan(client, owner, "who picks this up")
    assert alive([turn_id]) == [False]
    assert sweep_turns()["requeued"] >= 1
    done = wait_turn(client, owner, turn_id)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    types = [e.type for e in EventLog("turn", turn_id).read_after(0)]
    assert types[:2] == ["turn.restarted", "turn.started"] and types[-1] == "turn.completed"
    assert sweep_turns()["requeued"] == 0 or client.get(f"/api/turns/{turn_id}", headers=owner).get_json() == done


def test_a_running_turn_with_a_heartbeat_is_left_alone(client, owner):
    _sid, turn_id = _orphan(client, owner, "still here")
    get_redis().set(alive_key(turn_id), 1, ex=30)  # as its worker's heartbeat would
    sweep_turns()
    assert client.get(f"/api/turns/{turn_id}", headers=owner).get_json()["status"] == "running"
    get_redis().delete(alive_key(turn_id))  # the worker dies
    sweep_turns()
    assert wait_turn(client, owner, turn_id)["status"] == "succeeded"


def test_past_the_attempt_cap_the_turn_fails_with_a_clear_code(client, owner):
    sid, turn_id = _orphan(client, owner, "doomed", attempts=2)  # the claim makes it 3, the cap
    sweep_turns()
    done = wait_turn(client, owner, turn_id)
    assert done["status"] == "failed" and done["attempts"] == 4
    assert done["error"]["code"] == "attempts_exhausted"
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [m["role"] for m in messages] == ["user"]
    assert EventLog("turn", turn_id).read_after(0)[-1].type == "turn.failed"


def test_the_worker_heartbeats_a_running_turn_and_stops_at_the_end(client, owner):
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    turn_id = client.post(
        f"/api/sessions/{sid}/turns", json={"message": "slow [[tokens=40]] [[delay=0.1]]"}, headers=owner
    ).get_json()["id"]
    wait_until(lambda: alive([turn_id])[0], 10, "a heartbeat")
    time.sleep(2.5)  # past STALE_RUNNING_SECONDS: only refreshing keeps it
    assert alive([turn_id]) == [True]
    assert sweep_turns()["requeued"] == 0
    assert wait_turn(client, owner, turn_id)["attempts"] == 1
    wait_until(lambda: not alive([turn_id])[0], 5, "the heartbeat to expire")


def test_an_attempt_that_lost_its_turn_stops_and_only_the_new_one_answers(app, client, owner):
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    turn_id = client.post(
        f"/api/sessions/{sid}/turns", json={"message": "long [[tokens=60]] [[delay=0.05]]"}, headers=owner
    ).get_json()["id"]
    log = EventLog("turn", turn_id)
    wait_until(lambda: any(e.type == "message.delta" for e in log.read_after(0)), 10, "first delta")
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["turns", "list", "--status", "running"])
    assert turn_id in listed.output and "alive" in listed.output.split(turn_id)[1].splitlines()[0]
    refused = runner.invoke(args=["turns", "requeue", turn_id])
    assert "alive" in refused.output
    forced = runner.invoke(args=["turns", "requeue", "--force", turn_id])
    assert "re-queued" in forced.output, forced.output
    done = wait_turn(client, owner, turn_id, timeout=30)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    events = log.read_after(0)
    restarted = max(i for i, e in enumerate(events) if e.type == "turn.restarted")
    after = "".join(e.data["delta"] for e in events[restarted:] if e.type == "message.delta")
    assert after == done["answer"]  # the old attempt stopped: nothing of it after the restart
    assert events[-1].type == "turn.completed"
    assert [e.type for e in events].count("turn.completed") == 1


def test_a_turn_whose_event_log_is_lost_runs_again_and_its_stream_says_so(http, owner):
    """Redis losing its data mid-turn, for one turn: its log vanishes."""
    from tests.sse import read_events

    sid = http.post("/api/sessions", json={}, headers=owner).json()["id"]
    turn = http.post(
        f"/api/sessions/{sid}/turns", json={"message": "lost log [[tokens=40]] [[delay=0.05]]"}, headers=owner
    ).json()
    log = EventLog("turn", turn["id"])

    def lose_the_log(n: int) -> None:
        if n == 5:
            get_redis().delete(log.seq_key, log.stream_key, log.attempt_key)

    _, events = read_events(http, turn["events_url"], headers=owner, on_event=lose_the_log)
    types = [e.event for e in events]
    assert types[-1] == "turn.completed", types
    snap = types.index("turn.snapshot")  # the gap is reported, not skipped
    assert types[snap + 1] == "turn.restarted" and events[snap + 1].data["attempt"] == 2
    seqs = [e.seq for e in events if e.event != "turn.snapshot"]
    assert seqs == sorted(set(seqs))  # never reused
    assert seqs[snap] == 2**20 + 1  # the new attempt's log starts above every old seq
    after = "".join(e.data["delta"] for e in events[snap:] if e.event == "message.delta")
    done = http.get(f"/api/turns/{turn['id']}", headers=owner).json()
    assert done["status"] == "succeeded" and done["attempts"] == 2 and after == done["answer"]
    messages = http.get(f"/api/sessions/{sid}/messages", headers=owner).json()["items"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
