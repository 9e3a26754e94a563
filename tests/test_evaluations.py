"""Question sets, their runs, comparisons of runs, and schedules, on the
shared stack (the offline model answers; a real beat fires schedules)."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime

import pytest

from tests import services
from tests.conftest import new_owner

# The offline model echoes the assistant's instructions with [[echo=setup]],
# so what an assistant's version says decides whether an answer passes.
REFUND = {"key": "refund", "message": "[[echo=setup]] How long do refunds take?", "expect": {"contains": "30 days"}}
CALM = {"key": "calm", "message": "Hello there", "expect": {"not_contains": "sorry", "max_tokens": 100000}}
TERSE = {"key": "terse", "message": "[[echo=setup]] Be brief", "expect": {"contains": "Be terse"}}


def _set(client, owner, questions, name="support") -> dict:
    response = client.post("/api/sets", json={"name": name, "questions": questions}, headers=owner)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def _assistant(client, owner, instructions: str) -> dict:
    response = client.post("/api/assistants", json={"name": "support", "instructions": instructions}, headers=owner)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def _new_version(client, owner, assistant: dict, instructions: str) -> int:
    body = {"name": assistant["name"], "instructions": instructions}
    response = client.put(f"/api/assistants/{assistant['id']}", json=body, headers=owner)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["version"]


def _run(client, owner, set_id: str, assistant_id: str | None = None, version: int | None = None, **more) -> str:
    body = {"set_id": set_id, "assistant_id": assistant_id, "assistant_version": version, **more}
    response = client.post("/api/replays", json=body, headers=owner)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def _finished(client, owner, replay_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        replay = client.get(f"/api/replays/{replay_id}", headers=owner).get_json()
        if replay["status"] == "finished":
            return replay
        assert time.monotonic() < deadline, replay
        time.sleep(0.1)


def test_a_set_is_stored_read_replaced_and_refused_when_malformed(client, owner):
    made = _set(client, owner, [REFUND, {"message": "no key here"}])
    assert made["size"] == 2 and "questions" not in made
    shown = client.get(f"/api/sets/{made['id']}", headers=owner).get_json()
    assert [q["key"] for q in shown["questions"]] == ["refund", "2"]  # keyed by place when not given
    assert shown["questions"][0]["expect"] == {"contains": "30 days"}
    bad = [
        ({"name": "x", "questions": [{"message": "q", "expect": {"regex": "("}}]}, "questions.0.expect.regex"),
        ({"name": "x", "questions": [{"message": "q", "expect": {"contain": "a"}}]}, "questions.0.expect.contain"),
        ({"name": "x", "questions": [{"message": "a", "key": "k"}, {"message": "b", "key": "k"}]}, None),
        ({"name": "x", "questions": []}, "questions"),
    ]
    for body, field in bad:
        response = client.post("/api/sets", json=body, headers=owner)
        assert response.status_code == 422, body
        assert response.get_json()["error"]["details"]["field"] == field
    assert client.post("/api/sets", json={"name": "support", "questions": [CALM]}, headers=owner).status_code == 409
    listed = client.get("/api/sets", headers=owner).get_json()["items"]
    assert [s["name"] for s in listed] == ["support"]  # the refused ones left nothing
    replaced = client.put(f"/api/sets/{made['id']}", json={"name": "support", "questions": [CALM]}, headers=owner)
    assert replaced.status_code == 200 and replaced.get_json()["size"] == 1
    other = {"Authorization": "Bearer nope"}
    assert client.get(f"/api/sets/{made['id']}", headers=other).status_code == 401


def test_a_run_of_a_set_judges_each_answer_and_counts_what_passed(client, owner):
    assistant = _assistant(client, owner, "Refunds take 30 days.")
    qset = _set(client, owner, [REFUND, CALM, TERSE])
    replay = _finished(client, owner, _run(client, owner, qset["id"], assistant["id"], repeats=2))
    assert replay["total"] == 6 and replay["repeats"] == 2 and replay["set_id"] == qset["id"]
    assert replay["passed"] == 4  # terse fails twice: its instructions do not say it
    lines = [
        json.loads(line)
        for line in client.get(f"/api/replays/{replay['id']}/results", headers=owner).data.split(b"\n")
        if line
    ]
    assert [(line["key"], line["repeat"], line["passed"]) for line in lines] == [
        ("refund", 0, True), ("calm", 0, True), ("terse", 0, False),
        ("refund", 1, True), ("calm", 1, True), ("terse", 1, False),
    ]  # fmt: skip
    terse = lines[2]["checks"]
    assert terse[0] == {"check": "succeeded", "passed": True, "detail": ""}
    assert terse[1] == {"check": "contains", "passed": False, "detail": "missing: 'Be terse'"}
    assert all(line["tokens"] > 0 and line["latency_ms"] >= 0 for line in lines)
    runs = client.get(f"/api/sets/{qset['id']}/runs", headers=owner).get_json()["items"]
    assert [r["id"] for r in runs] == [replay["id"]]
    # Its sessions, one per question asked, are the run's, not in the chat list.
    sessions = {client.get(f"/api/turns/{line['turn_id']}", headers=owner).get_json()["session_id"] for line in lines}
    listed = client.get("/api/sessions", query_string={"origin": "replay", "replay_id": replay["id"]}, headers=owner)
    assert len(sessions) == 6 and {s["id"] for s in listed.get_json()["items"]} == sessions
    assert client.get("/api/sessions?origin=chat", headers=owner).get_json()["items"] == []


def _two_runs(client, owner) -> tuple[str, str, dict]:
    """A baseline whose instructions pass `refund`, a candidate's that
    fail it and pass `terse`: one regression, one improvement."""
    assistant = _assistant(client, owner, "Refunds take 30 days.")
    v2 = _new_version(client, owner, assistant, "Refunds take a while. Be terse.")
    qset = _set(client, owner, [REFUND, CALM, TERSE])
    baseline = _run(client, owner, qset["id"], assistant["id"], 1)
    candidate = _run(client, owner, qset["id"], assistant["id"], v2)
    _finished(client, owner, baseline), _finished(client, owner, candidate)
    return baseline, candidate, qset


def test_a_comparison_finds_the_regression_and_the_improvement(client, owner):
    baseline, candidate, _ = _two_runs(client, owner)
    response = client.get(f"/api/comparisons?baseline={baseline}&candidate={candidate}", headers=owner)
    assert response.status_code == 200, response.get_json()
    data = response.get_json()
    changes = {q["key"]: q["change"] for q in data["questions"]}
    assert changes == {"refund": "regressed", "calm": "same", "terse": "improved"}
    assert data["changes"]["regressed"] == 1 and data["changes"]["improved"] == 1
    refund = next(q for q in data["questions"] if q["key"] == "refund")
    diff = refund["diff"]  # each answer is the pieces it shares and its own
    assert "".join(t for op, t in diff if op != "+") == refund["baseline"]["answer"]
    assert "".join(t for op, t in diff if op != "-") == refund["candidate"]["answer"]
    assert ["-", "30"] in diff and ["+", 'while. Be terse."].'] in diff
    assert refund["baseline"]["pass_rate"] == 1 and refund["candidate"]["pass_rate"] == 0
    assert [c["check"] for c in refund["candidate"]["checks"] if not c["passed"]] == ["contains"]
    assert data["baseline"]["pass_rate"] == data["candidate"]["pass_rate"] == pytest.approx(2 / 3)
    assert data["difference"]["pass_rate"] == {"change": 0.0, "ci95": None, "within_noise": None}  # one run a side
    assert data["baseline"]["p50_latency_ms"] > 0 and data["candidate"]["mean_tokens"] > 0

    rows = list(csv.DictReader(io.StringIO(
        client.get(f"/api/comparisons?baseline={baseline}&candidate={candidate}&format=csv", headers=owner).text
    )))  # fmt: skip
    assert [(r["key"], r["change"], r["candidate_failed_checks"]) for r in rows] == [
        ("refund", "regressed", "contains: missing: '30 days'"),
        ("calm", "same", ""),
        ("terse", "improved", ""),
    ]
    html = client.get(f"/api/comparisons?baseline={baseline}&candidate={candidate}&format=html", headers=owner)
    assert html.status_code == 200 and html.mimetype == "text/html"
    assert "script-src 'nonce-" in html.headers["Content-Security-Policy"]
    assert html.text.count('<tr class="regressed">') == 1 and "Plotly.newPlot" in html.text
    assert "<del>30</del>" in html.text and "https://" not in html.text.split("<script", 1)[0]


def test_repeated_runs_give_spreads_and_intervals_and_keep_a_sure_regression(client, owner):
    """Two runs of the set a side (repeats): each metric's spread and the
    95% interval of its change; the regression, the same in every run, is
    beyond the noise."""
    assistant = _assistant(client, owner, "Refunds take 30 days.")
    v2 = _new_version(client, owner, assistant, "Refunds take a while.")
    qset = _set(client, owner, [REFUND, CALM], name="repeated")
    baseline = _run(client, owner, qset["id"], assistant["id"], 1, repeats=2)
    candidate = _run(client, owner, qset["id"], assistant["id"], v2, repeats=2)
    _finished(client, owner, baseline), _finished(client, owner, candidate)
    data = client.get(f"/api/comparisons?baseline={baseline}&candidate={candidate}", headers=owner).get_json()
    assert data["baseline"]["runs_of_set"] == data["candidate"]["runs_of_set"] == 2
    refund = next(q for q in data["questions"] if q["key"] == "refund")
    assert refund["change"] == "regressed" and refund["pass_change_ci"] == [-1.0, -1.0]
    assert refund["baseline"]["samples"] == 2
    latency = data["difference"]["p50_latency_ms"]
    assert latency["ci95"][0] <= latency["change"] <= latency["ci95"][1]
    assert data["baseline"]["spread"]["p50_latency_ms"]["sd"] >= 0
    rate = data["difference"]["pass_rate"]
    assert rate["change"] == pytest.approx(-0.5) and rate["ci95"] == [-0.5, -0.5] and rate["within_noise"] is False


def test_the_compare_command_writes_reports_and_exits_1_on_a_regression(app, client, owner, tmp_path):
    baseline, candidate, _ = _two_runs(client, owner)
    runner = app.test_cli_runner()
    report, out = tmp_path / "report.html", tmp_path / "c.json"
    result = runner.invoke(args=["replay", "compare", baseline, candidate, "--html", str(report), "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "1 regressed, 1 improved, 1 same" in result.output
    assert json.loads(out.read_text())["changes"]["regressed"] == 1
    text = report.read_text()
    assert 'id="regressions-only"' in text and text.count("Plotly.newPlot") == 2 and "<script src" not in text
    same = runner.invoke(args=["replay", "compare", baseline, baseline])
    assert same.exit_code == 0, same.output
    unfinished = runner.invoke(args=["replay", "compare", baseline, "not-a-replay"])
    assert unfinished.exit_code == 2


def test_a_comparison_of_unfinished_or_unrelated_runs_is_refused(client, owner):
    qset = _set(client, owner, [CALM], name="a")
    other = _set(client, owner, [CALM], name="b")
    slow = _run(client, owner, qset["id"], repeats=1)
    done = _finished(client, owner, _run(client, owner, other["id"]))["id"]
    _finished(client, owner, slow)
    unrelated = client.get(f"/api/comparisons?baseline={slow}&candidate={done}", headers=owner)
    assert unrelated.status_code == 422 and "different question sets" in unrelated.get_json()["error"]["message"]
    assert client.get(f"/api/comparisons?baseline={slow}", headers=owner).status_code == 422
    assert client.get(f"/api/comparisons?baseline={slow}&candidate={slow}", headers=new_owner()).status_code == 404


def test_sets_import_and_replay_of_a_set_through_the_commands(app, tmp_path):
    runner = app.test_cli_runner()
    lines = tmp_path / "qs.jsonl"
    lines.write_text(json.dumps(CALM) + "\n" + json.dumps({"message": "Bye", "expect": {"contains": "nope"}}) + "\n")
    owner = f"cli-{time.time_ns()}"
    made = runner.invoke(args=["sets", "import", "smoke", str(lines), "--owner", owner])
    assert made.exit_code == 0, made.output
    assert json.loads(made.output)["size"] == 2
    out = tmp_path / "r.jsonl"
    result = runner.invoke(args=["replay", "--set", "smoke", "--owner", owner, "--out", str(out)])
    assert result.exit_code == 1, result.output  # "Bye" does not pass
    assert [json.loads(line)["passed"] for line in out.read_text().splitlines()] == [True, False]
    broken = tmp_path / "bad.jsonl"
    broken.write_text('{"message": "q", "expect": {"regex": "("}}\n')
    refused = runner.invoke(args=["sets", "import", "bad", str(broken), "--owner", owner])
    assert refused.exit_code == 2 and "questions.0.expect.regex" in refused.output


def test_a_schedule_fires_through_a_real_beat_within_a_tick_and_runs_once_at_a_time(stack, client, owner):
    qset = _set(client, owner, [{"message": "tick [[tokens=5]]"}], name="nightly")
    beat = services.start_beat(stack["logdir"], stack["env"], f"beat-{time.time_ns()}")
    try:
        services.wait_until(lambda: "fire-schedules" in beat.log_path.read_text(), 30, "beat's first tick")
        body = {"set_id": qset["id"], "cron": "*/2 * * * * *", "timezone": "Asia/Kolkata"}
        schedule = client.post("/api/schedules", json=body, headers=owner).get_json()
        due = datetime.fromisoformat(schedule["next_run_at"])
        deadline = time.monotonic() + 10
        while not (runs := _runs(client, owner, schedule["id"])):
            assert time.monotonic() < deadline, "the schedule never fired"
            time.sleep(0.05)
        # Beat sends its tick each second: a run starts within one tick of
        # its time, and the moment a worker takes the tick from the queue.
        assert 0 <= (datetime.fromisoformat(runs[-1]["created_at"]) - due).total_seconds() < 1.5
        first = _finished(client, owner, runs[-1]["id"])
        assert first["schedule_id"] == schedule["id"] and first["set_id"] == qset["id"]
        # Due every second, a run of 3 s: occurrences are skipped, never two runs at once.
        slow = {"name": "nightly", "questions": [{"message": "tock [[delay=0.6]] [[tokens=5]]"}]}
        assert client.put(f"/api/sets/{qset['id']}", json=slow, headers=owner).status_code == 200
        client.patch(f"/api/schedules/{schedule['id']}", json={"cron": "* * * * * *"}, headers=owner)
        time.sleep(5)
        paused = client.patch(f"/api/schedules/{schedule['id']}", json={"enabled": False}, headers=owner).get_json()
        assert paused["next_run_at"] is None and paused["skipped"] > 0
        runs = _runs(client, owner, schedule["id"])
        spans = sorted(
            (
                datetime.fromisoformat(r["created_at"]),
                datetime.fromisoformat(_finished(client, owner, r["id"])["finished_at"]),
            )
            for r in runs
        )
        assert len(spans) >= 2 and all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False))
        time.sleep(2)  # disabled: nothing more
        assert len(_runs(client, owner, schedule["id"])) == len(runs)
    finally:
        beat.stop()
    now = client.post(f"/api/schedules/{schedule['id']}/run", headers=owner)
    assert now.status_code == 202 and now.get_json()["schedule_id"] == schedule["id"]
    again = client.post(f"/api/schedules/{schedule['id']}/run", headers=owner)
    assert again.status_code == 409 and "under way" in again.get_json()["error"]["message"]
    _finished(client, owner, now.get_json()["id"])


def _runs(client, owner, schedule_id: str) -> list[dict]:
    return client.get(f"/api/schedules/{schedule_id}/runs", headers=owner).get_json()["items"]


def test_a_schedule_is_refused_a_bad_cron_or_time_zone(client, owner):
    qset = _set(client, owner, [CALM], name="tz")
    for body, field in (
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * *  *  * *"}, "cron"),
        ({"cron": "0 9 * * 1-5", "timezone": "Mars/Olympus"}, "timezone"),
    ):
        response = client.post("/api/schedules", json={"set_id": qset["id"], **body}, headers=owner)
        assert response.status_code == 422 and response.get_json()["error"]["details"]["field"] == field, body
    made = client.post(
        "/api/schedules",
        json={"set_id": qset["id"], "cron": "0 9 * * 1-5", "timezone": "America/New_York"},
        headers=owner,
    ).get_json()
    at = datetime.fromisoformat(made["next_run_at"])
    from zoneinfo import ZoneInfo

    local = at.astimezone(ZoneInfo("America/New_York"))
    assert (local.hour, local.minute, local.weekday() < 5) == (9, 0, True)


def test_a_scheduled_runs_end_is_a_webhook_event_with_what_passed(client, owner):
    qset = _set(client, owner, [CALM, {"message": "Bye", "expect": {"contains": "nope"}}], name="hooked")
    hook = _endpoint(qset["id"], ["schedule.run_finished", "replay.finished"])
    body = {"set_id": qset["id"], "cron": "0 3 * * *", "enabled": False}
    schedule = client.post("/api/schedules", json=body, headers=owner).get_json()
    assert schedule["next_run_at"] is None  # disabled: "run now" still runs it
    run = client.post(f"/api/schedules/{schedule['id']}/run", headers=owner).get_json()
    _finished(client, owner, run["id"])
    plain = _finished(client, owner, _run(client, owner, qset["id"]))  # not a schedule's: replay.finished alone
    deliveries = client.get(f"/api/webhooks/{hook}/deliveries", headers=owner).get_json()["items"]
    events = sorted((d["event_type"], d["payload"]["data"]["replay_id"]) for d in deliveries)
    assert events == sorted(
        [("replay.finished", run["id"]), ("schedule.run_finished", run["id"]), ("replay.finished", plain["id"])]
    )
    data = next(d["payload"]["data"] for d in deliveries if d["event_type"] == "schedule.run_finished")
    assert data == {
        "replay_id": run["id"],
        "replay_url": f"/api/replays/{run['id']}",
        "schedule_id": schedule["id"],
        "schedule_url": f"/api/schedules/{schedule['id']}",
        "set_id": qset["id"],
        "total": 2,
        "passed": 1,
    }


def _endpoint(set_id: str, events: list[str]) -> str:
    """A webhook endpoint of the set's owner, written as the API would (the
    shared stack does not allow a receiver on this machine; no delivery is
    sent here, only the outbox is read)."""
    from shared.db import transaction
    from shared.models import QuestionSet, WebhookEndpoint

    with transaction() as db:
        owner_id = db.get(QuestionSet, set_id).owner_id
        endpoint = WebhookEndpoint(owner_id=owner_id, url="https://example.com/hook", event_types=events, secret="x")
        db.add(endpoint)
        db.flush()
        return endpoint.id
