"""A turn's or a replay's state from Postgres, sent as one synthetic event
to a client whose events the log no longer holds (trimmed, expired, lost
with Redis). Session streams follow turns, so they use the turn's."""

from __future__ import annotations

import json
from typing import NamedTuple

from shared.db import transaction
from shared.models import Replay, Turn
from shared.replays import summary
from shared.turn_states import ENDED
from web.relay.frames import synthetic


class Snapshot(NamedTuple):
    frame: bytes
    ended: bool  # nothing more will come


def _snapshot(type_: str, data: dict, ended: bool) -> Snapshot:
    data = {"seq": 0, "type": type_, **data}
    return Snapshot(synthetic(type_, json.dumps(data)), ended)


def turn_snapshot(turn_id: str) -> Snapshot | None:
    with transaction() as db:
        turn = db.get(Turn, turn_id)
        if turn is None:
            return None
        data = {"turn_id": turn_id, "status": turn.status, "text": turn.answer or ""}
        if turn.error:
            data["error"] = turn.error
    return _snapshot("turn.snapshot", data, turn.status in ENDED)


def replay_snapshot(replay_id: str) -> Snapshot:
    with transaction() as db:
        state = summary(db, db.get(Replay, replay_id))
    return _snapshot("replay.snapshot", {"replay_id": replay_id, **state}, state["status"] == "finished")
