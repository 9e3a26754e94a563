"""The beat sweeper re-sends a queued turn whose task message never arrived."""

from __future__ import annotations

from sqlalchemy import func, update

from shared.db import db_session
from shared.models import ChatSession, Turn
from shared.turns import lock_session, submit_turn
from tasks.sweeper import sweep_turns
from tests.conftest import wait_turn


def test_a_turn_whose_message_was_lost_is_resent_and_runs_once(client, owner, monkeypatch):
    import shared.turns

    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    monkeypatch.setattr(shared.turns, "send_turn", lambda turn_id: None)  # the broker "loses" the message
    with db_session() as db:
        chat = db.get(ChatSession, sid)
        turn, _ = submit_turn(db, lock_session(db, sid, chat.owner_id), "lost in transit")
        turn_id = turn.id
    with db_session() as db:  # make it older than STALE_QUEUED_SECONDS
        db.execute(
            update(Turn).where(Turn.id == turn_id).values(created_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 5))
        )
    assert client.get(f"/api/turns/{turn_id}", headers=owner).get_json()["status"] == "queued"

    assert sweep_turns()["resent"] >= 1
    done = wait_turn(client, owner, turn_id)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
