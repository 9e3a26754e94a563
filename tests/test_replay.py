"""Batch replay through the CLI and the API."""

from __future__ import annotations

import json
import time

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
