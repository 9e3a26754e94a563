"""Batch replay through the CLI and the API."""

from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import contextmanager

from sqlalchemy import delete, event, func, select, update
from sqlalchemy.orm import Session

from shared.turn_states import STOP, SUCCEED
from tests.conftest import wait_turn


def test_replay_command_writes_one_result_per_question(app, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"message": f"question {i}"}) for i in range(6)) + "\n")
    out = tmp_path / "results.jsonl"
    result = app.test_cli_runner().invoke(
        args=["replay", str(questions), "--out", str(out), "--concurrency", "3", "--owner", "replayer"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(6))
    assert all(line["status"] == "succeeded" for line in lines)
    assert [line["answer"] for line in lines] == [
        f'You said: "question {i}". This is message 1 of our conversation.' for i in range(6)
    ]
    assert all(line["latency_ms"] >= 0 and line["turn_id"] for line in lines)


def test_replay_command_exits_non_zero_when_a_question_fails(app, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"message": "fine"}\n{"message": "broken [[fault=500]]"}\n')
    out = tmp_path / "results.jsonl"
    result = app.test_cli_runner().invoke(args=["replay", str(questions), "--out", str(out)])
    assert result.exit_code == 1
    statuses = [json.loads(line)["status"] for line in out.read_text().splitlines()]
    assert statuses == ["succeeded", "failed"]


def test_replay_command_rejects_a_bad_file(app, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"message": "fine"}\nnot json\n')
    result = app.test_cli_runner().invoke(args=["replay", str(questions), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "line 2" in result.output


def test_replay_api_respects_concurrency_and_reports_results(client, owner):
    body = {"questions": [{"message": f"r{i} [[delay=0.005]]"} for i in range(5)], "concurrency": 2}
    response = client.post("/api/replays", json=body, headers=owner)
    assert response.status_code == 202
    replay = response.get_json()
    assert replay["total"] == 5 and replay["status"] == "running"
    deadline = time.monotonic() + 30
    while client.get(f"/api/replays/{replay['id']}", headers=owner).get_json()["status"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    final = client.get(f"/api/replays/{replay['id']}", headers=owner).get_json()
    assert (final["succeeded"], final["failed"]) == (5, 0) and final["finished_at"]
    results = client.get(f"/api/replays/{replay['id']}/results", headers=owner)
    assert results.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in results.get_data(as_text=True).splitlines()]
    assert [line["message"] for line in lines] == [q["message"] for q in body["questions"]]
    turns = [wait_turn(client, owner, line["turn_id"]) for line in lines]
    # never more than 2 running at once: at every start, at most one other turn was in flight
    for t in turns:
        overlapping = [o for o in turns if o is not t and o["started_at"] < t["started_at"] < o["finished_at"]]
        assert len(overlapping) <= 1


def test_replay_api_rejects_bad_bodies(client, owner):
    assert client.post("/api/replays", json={"questions": []}, headers=owner).status_code == 422
    assert client.post("/api/replays", json={}, headers=owner).status_code == 422
    r = client.post("/api/replays", json={"questions": [{"message": "x"}], "concurrency": 0}, headers=owner)
    assert r.status_code == 422


def _advance_counted(db, replay_id: str) -> dict[str, int]:
    """Run `advance` and count what it asked of Postgres: statements and the
    rows they returned. (Rows Postgres read depend on the planner's view of
    a test database's small tables; tests/bench/replay.py reports them.)"""
    from shared.db import get_engine
    from shared.replays import advance

    counts = {"statements": 0, "rows": 0}
    me = threading.get_ident()

    def before(conn, cursor, statement, parameters, context, executemany):
        if threading.get_ident() == me:
            counts["statements"] += 1

    def after(conn, cursor, statement, parameters, context, executemany):
        if threading.get_ident() == me and cursor.description is not None:
            counts["rows"] += max(cursor.rowcount, 0)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        advance(db, replay_id)
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
    return counts


@contextmanager
def _rolled_back():
    """A session whose work is rolled back: no turn is sent, and nothing is
    left for the worker or the sweeper."""
    from shared.db import get_engine

    with Session(get_engine()) as db:
        try:
            yield db
        finally:
            db.rollback()


def _new_replay(db, size: int, concurrency: int) -> str:
    from shared.replays import create_replay
    from web.auth import get_or_create_owner

    owner = get_or_create_owner(db, f"replayer-{uuid.uuid4().hex[:12]}")
    replay = create_replay(db, owner.id, [{"message": f"q{i}"} for i in range(size)], concurrency)
    db.flush()
    return replay.id


def _turns(db, replay_id: str) -> list[str | None]:
    from shared.models import ReplayItem

    return list(
        db.scalars(select(ReplayItem.turn_id).where(ReplayItem.replay_id == replay_id).order_by(ReplayItem.index))
    )


def _end(db, turn_id: str, transition) -> None:
    """Claim the turn, then end it by `transition`, as a worker would."""
    from shared.models import Turn
    from shared.turn_states import CLAIM

    db.execute(update(Turn).where(Turn.id == turn_id).values(status=CLAIM.target, attempts=1))
    db.execute(update(Turn).where(Turn.id == turn_id).values(status=transition.target, finished_at=func.now()))


def _bookkeeping(size: int) -> dict[str, dict[str, int]]:
    """What a replay's first advance and one turn's end ask of Postgres."""
    with _rolled_back() as db:
        replay_id = _new_replay(db, size, 3)
        start = _advance_counted(db, replay_id)
        _end(db, _turns(db, replay_id)[0], SUCCEED)
        turn_end = _advance_counted(db, replay_id)
        started = sum(1 for turn_id in _turns(db, replay_id) if turn_id)
    assert started == 4  # three at the start, one more at the turn's end
    return {"start": start, "turn_end": turn_end}


def test_advance_asks_postgres_the_same_whatever_the_replay_size(stack):
    small, large = _bookkeeping(10), _bookkeeping(1000)
    for step in ("start", "turn_end"):
        assert small[step]["statements"] == large[step]["statements"]
        assert small[step]["rows"] == large[step]["rows"]


def test_advance_counts_each_turn_once_and_finishes_once(stack):
    from shared.models import ChatSession, Replay, Turn
    from shared.replays import advance, summary

    with _rolled_back() as db:
        replay_id = _new_replay(db, 3, 2)
        advance(db, replay_id)
        advance(db, replay_id)  # sent twice: nothing more starts
        first, second, third = _turns(db, replay_id)
        assert first and second and third is None
        _end(db, first, SUCCEED)
        _end(db, second, STOP)
        advance(db, replay_id)
        advance(db, replay_id)
        state = summary(db, db.get(Replay, replay_id))
        assert (state["status"], state["succeeded"], state["failed"]) == ("running", 1, 1)
        third = _turns(db, replay_id)[2]
        # its session deleted while it runs: its turn goes with it, and it counts as failed
        session_id = db.scalar(select(Turn.session_id).where(Turn.id == third))
        db.execute(delete(ChatSession).where(ChatSession.id == session_id))
        advance(db, replay_id)
        done = summary(db, db.get(Replay, replay_id))
        assert (done["status"], done["total"], done["succeeded"], done["failed"]) == ("finished", 3, 1, 2)
        advance(db, replay_id)  # finished: nothing changes
        assert summary(db, db.get(Replay, replay_id)) == done
        assert _turns(db, replay_id) == [first, second, None]  # not asked again
