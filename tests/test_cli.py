"""Operator commands as people run them: one clear line when Postgres or
Redis cannot be reached, lists that say what they show."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests import services
from tests.conftest import wait_turn


def _flask(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["flask", "--app", "web", *args], cwd=services.ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", [("keys", "create", "x"), ("keys", "list"), ("turns", "list"), ("db", "upgrade")])
def test_an_unreachable_postgres_is_one_line_naming_host_and_setting(stack, command):
    port = services.free_port()
    env = {**stack["env"], "DATABASE_URL": f"postgres://turnstream:hunter2@127.0.0.1:{port}/turnstream"}
    result = _flask(env, *command)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"Error: could not reach Postgres at 127.0.0.1:{port} (DATABASE_URL): ")
    assert "hunter2" not in result.stderr
    verbose = _flask(env, *command, "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_an_unreachable_redis_is_one_line_naming_host_and_setting(stack):
    port = services.free_port()
    result = _flask({**stack["env"], "REDIS_URL": f"redis://127.0.0.1:{port}/0"}, "turns", "requeue", "--stale")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"Error: could not reach Redis at 127.0.0.1:{port} (REDIS_URL): ")


def test_a_new_database_is_migrated_and_its_empty_lists_say_so(fresh_database):
    _url, env = fresh_database
    assert _flask(env, "db", "upgrade").stdout.strip() == "database at head"
    assert _flask(env, "turns", "list").stdout.strip() == "no queued, running or waiting turns"
    assert _flask(env, "turns", "list", "--status", "failed").stdout.strip() == "no failed turns"
    assert _flask(env, "keys", "list").stdout.startswith("no keys")


def test_turns_list_shows_the_newest_first_with_error_codes(app, client, owner):
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    ids = []
    for i in range(3):
        turn = client.post(f"/api/sessions/{sid}/turns", json={"message": f"{i} [[fault=401]]"}, headers=owner)
        ids.append(turn.get_json()["id"])
        wait_turn(client, owner, ids[-1])
    out = app.test_cli_runner().invoke(args=["turns", "list", "--status", "failed", "--limit", "2"]).output
    header, *rows = out.splitlines()
    assert header.split() == ["id", "status", "attempts", "age", "s", "heartbeat", "error"]
    assert [row.split()[0] for row in rows] == [ids[2], ids[1]]
    assert all(row.split()[-1] == "model_error" for row in rows)


def test_replay_that_runs_out_of_time_exits_3_and_reports_progress_in_plain_lines(app, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"message": "slow [[tokens=40]] [[delay=0.05]]"}) + "\n")
    result = app.test_cli_runner().invoke(
        args=["replay", str(questions), "--out", str(tmp_path / "o.jsonl"), "--timeout", "0.5"]
    )
    assert result.exit_code == 3, result.output
    assert "0/1 done, 0 failed" in result.output and "\r" not in result.output  # no bar frames in a log
    assert "1 unfinished" in result.output


def test_assistants_are_made_listed_and_shown_from_the_command_line(stack, tmp_path):
    owner = f"cli-{uuid.uuid4().hex[:8]}"
    profile = tmp_path / "support.json"
    profile.write_text(json.dumps({"instructions": "From a file.", "temperature": 0.5, "metadata": {"team": "ops"}}))
    made = _flask(
        stack["env"],
        "assistants",
        "create",
        "support",
        "--owner",
        owner,
        "--from",
        str(profile),
        "--tools",
        "kit=shout,nap",
        "--max-tokens",
        "300",
    )
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    assert (data["name"], data["version"], data["instructions"], data["temperature"]) == (
        "support",
        1,
        "From a file.",
        0.5,
    )
    assert (
        data["tools"] == {"kit": ["nap", "shout"]} and data["max_tokens"] == 300 and data["metadata"] == {"team": "ops"}
    )

    listed = _flask(stack["env"], "assistants", "list", "--owner", owner).stdout.splitlines()
    assert (
        len(listed) == 2 and listed[1].split()[:3] == [data["id"], "support", "1/1"] and "kit: nap shout" in listed[1]
    )
    for which in ("support", data["id"]):
        shown = _flask(stack["env"], "assistants", "show", which, "--owner", owner)
        assert json.loads(shown.stdout)["id"] == data["id"]

    refused = _flask(stack["env"], "assistants", "create", "other", "--owner", owner, "--endpoint", "elsewhere")
    assert refused.returncode == 1 and "endpoint 'elsewhere' is not configured" in refused.stderr
    assert "Traceback" not in refused.stderr
    twice = _flask(stack["env"], "assistants", "create", "support", "--owner", owner)
    assert twice.returncode == 1 and "already" in twice.stderr
    missing = _flask(stack["env"], "assistants", "show", "nobody", "--owner", owner)
    assert missing.returncode == 2 and "has no assistant 'nobody'" in missing.stderr
    assert _flask(stack["env"], "assistants", "list", "--owner", owner).stdout.count("\n") == 2

    replayed = tmp_path / "q.jsonl"
    replayed.write_text(json.dumps({"message": "[[echo=setup]]"}) + "\n")
    out = tmp_path / "o.jsonl"
    ran = _flask(stack["env"], "replay", str(replayed), "--out", str(out), "--owner", owner, "--assistant", "support@1")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(out.read_text())["answer"].startswith('System: ["From a file."]. Model: turnstream-offline.')
    wrong = _flask(
        stack["env"], "replay", str(replayed), "--out", str(out), "--owner", owner, "--assistant", "support@2"
    )
    assert wrong.returncode == 2 and "support has versions 1 to 1" in wrong.stderr
