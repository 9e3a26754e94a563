"""The beat sweeper re-sends a queued turn whose task message never arrived,
and leaves alone one that was sent lately (it may be waiting in a queue)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, update

from shared.broker import sent_key
from shared.db import transaction
from shared.models import ChatSession, Replay, Turn
from shared.recovery import resend_queued
from shared.redis import get_redis
from shared.turns import submit_turn
from tasks.sweeper import sweep_turns
from tests.conftest import wait_turn

pytestmark = pytest.mark.broker  # run against RabbitMQ too (deploy/test.sh)


def test_a_turn_whose_message_was_lost_is_resent_and_runs_once(client, owner, monkeypatch):
    import shared.turns

    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    monkeypatch.setattr(shared.turns, "send_turn", lambda turn_id: None)  # the broker "loses" the message
    with transaction() as db:
        chat = db.get(ChatSession, sid)
        turn, _ = submit_turn(db, sid, chat.owner_id, "lost in transit")
        turn_id = turn.id
    _age(turn_id, 30)
    assert client.get(f"/api/turns/{turn_id}", headers=owner).get_json()["status"] == "queued"

    get_redis().set(sent_key(turn_id), 1, ex=30)  # as if sent a moment ago
    resend_queued()
    time.sleep(1)
    assert client.get(f"/api/turns/{turn_id}", headers=owner).get_json()["status"] == "queued"
    get_redis().delete(sent_key(turn_id))  # the mark expired: not sent within STALE_QUEUED_SECONDS
    assert sweep_turns()["resent"] >= 1
    assert get_redis().exists(sent_key(turn_id))
    done = wait_turn(client, owner, turn_id)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_a_replay_whose_advance_was_lost_is_advanced_and_finishes(client, owner, monkeypatch):
    import shared.replays

    monkeypatch.setattr(shared.replays, "send_replay_advance", lambda replay_id: None)  # lost
    body = {"questions": [{"message": f"stalled {i}"} for i in range(3)], "concurrency": 2}
    replay = client.post("/api/replays", json=body, headers=owner).get_json()
    with transaction() as db:  # older than STALE_QUEUED_SECONDS, and nothing of it under way
        db.execute(
            update(Replay)
            .where(Replay.id == replay["id"])
            .values(created_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 5))
        )
    time.sleep(0.5)
    assert client.get(f"/api/replays/{replay['id']}", headers=owner).get_json()["status"] == "running"
    assert sweep_turns()["replays"] >= 1  # the worker's advance (not patched) takes it from here
    deadline = time.monotonic() + 30
    while client.get(f"/api/replays/{replay['id']}", headers=owner).get_json()["status"] != "finished":
        assert time.monotonic() < deadline, "the replay never finished"
        time.sleep(0.1)
    final = client.get(f"/api/replays/{replay['id']}", headers=owner).get_json()
    assert final["succeeded"] == 3 and final["failed"] == 0


def test_a_turn_whose_send_failed_is_resent_at_the_first_sweep_past_unsent_after(client, owner, monkeypatch):
    """The broker was down when it was submitted (or Redis lost the queue
    with the marks): it need not wait STALE_QUEUED_SECONDS."""
    import shared.turns
    from shared.recovery import UNSENT_AFTER

    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    monkeypatch.setattr(shared.turns, "send_turn", lambda turn_id: None)  # the send failed: no message, no mark
    with transaction() as db:
        chat = db.get(ChatSession, sid)
        turn, _ = submit_turn(db, sid, chat.owner_id, "sent while the broker was down")
        turn_id = turn.id
    sweep_turns()
    assert not get_redis().exists(sent_key(turn_id))  # younger than UNSENT_AFTER: its send may be under way
    time.sleep(0.5)
    assert client.get(f"/api/turns/{turn_id}", headers=owner).get_json()["status"] == "queued"

    _age(turn_id, UNSENT_AFTER.total_seconds() + 1)
    assert sweep_turns()["resent"] >= 1
    assert get_redis().exists(sent_key(turn_id))
    done = wait_turn(client, owner, turn_id)
    assert done["status"] == "succeeded" and done["attempts"] == 1


def _age(turn_id: str, seconds: float) -> None:
    """Make a turn as old as if submitted `seconds` ago."""
    with transaction() as db:
        db.execute(
            update(Turn)
            .where(Turn.id == turn_id)
            .values(created_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, seconds))
        )
