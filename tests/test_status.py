"""What people are told about the model and the tool servers: the workers
report what they saw, web shows it (/api/info, health, the chat page), and a
turn offered fewer tools than configured says so."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from shared.config import get_settings, use_settings
from shared.events import EventLog
from tests.services import wait_until


def _info(client, owner) -> dict:
    return client.get("/api/info", headers=owner).get_json()


def test_the_offline_banner_shows_only_while_the_offline_model_really_answers(client, owner, stack, monkeypatch):
    from tasks import model

    wait_until(lambda: _info(client, owner)["offline_model"], 30, "the session worker's probe to find it")

    def worker_sees(base_url: str) -> None:  # a worker started with this OPENAI_BASE_URL
        monkeypatch.setenv("OPENAI_BASE_URL", base_url)
        monkeypatch.setenv("OPENAI_MAX_RETRIES", "0")
        monkeypatch.setattr(model, "_health", model._ModelHealth())  # a new process has told nothing yet
        get_settings.cache_clear()
        model.get_client.cache_clear()
        model.probe_model()
        try:
            model.stream_completion([{"role": "user", "content": "hi"}], lambda _: None)
        except model.ModelError:
            pass

    root = f"http://127.0.0.1:{stack['model_port']}"
    try:
        worker_sees(root)  # the usual mistake: no /v1
        info = _info(client, owner)
        assert info["offline_model"] is False and info["model_status"]["ok"] is False
        assert f"the model server at {root}" in info["model_status"]["error"]
        assert "OPENAI_BASE_URL" in info["model_status"]["error"]
        assert client.get("/api/health").get_json()["checks"]["model"] == "error"
    finally:
        worker_sees(root + "/v1")
        get_settings.cache_clear()
        model.get_client.cache_clear()
    info = _info(client, owner)
    assert info["offline_model"] is True and info["model_status"] == {**info["model_status"], "ok": True, "error": None}


def test_a_tool_server_that_cannot_start_shows_in_info_health_and_the_turn(stack, owner):
    from tasks.agent import run_agent
    from tasks.tools import Toolbox
    from web import create_app

    ghost = f"/nonexistent/ghost-mcp-{uuid.uuid4().hex[:6]}"
    settings = get_settings()
    settings = replace(settings, mcp_servers={**settings.mcp_servers, "ghost": {"command": ghost}})
    toolbox = Toolbox(settings.mcp_servers, settings.tool_timeout)  # as a worker with this configuration
    events = EventLog("turn", str(uuid.uuid4()))
    try:
        outcome = run_agent([{"role": "user", "content": "list tables"}], events, toolbox, settings, 1)
    finally:
        toolbox.close()
    assert outcome.status == "succeeded" and outcome.tools[0]["name"] == "sql__list_tables"  # the rest still works
    notes = [e for e in events.read_after(0) if e.type == "tools.unavailable"]
    assert len(notes) == 1 and [s["name"] for s in notes[0].data["servers"]] == ["ghost"]
    assert ghost in notes[0].data["servers"][0]["error"]

    client = create_app(settings).test_client()
    try:
        assert get_settings() is settings  # the app's settings are the process's
        listed = {t["name"]: t for t in _info(client, owner)["tools"]}
        assert listed["ghost"]["ok"] is False and ghost in listed["ghost"]["error"]
        assert listed["sql"]["ok"] is True and listed["sql"]["tools"] == 3
        assert client.get("/api/health").get_json()["checks"]["tools_unavailable"] == ["ghost"]
    finally:
        use_settings(None)


def test_a_turn_with_every_tool_server_up_says_nothing_about_tools(client, owner):
    from tests.conftest import wait_turn

    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    turn = client.post(f"/api/sessions/{sid}/turns", json={"message": "hello"}, headers=owner).get_json()
    wait_turn(client, owner, turn["id"])
    assert "tools.unavailable" not in [e.type for e in EventLog("turn", turn["id"]).read_after(0)]


@pytest.mark.parametrize("path", ["/favicon.ico", "/static/favicon.svg"])
def test_the_page_has_an_icon(client, path):
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "image/svg+xml" and b"<svg" in response.data


def test_health_names_the_database_it_could_not_reach(client, monkeypatch):
    from shared import db
    from tests.services import free_port

    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgres://turnstream:hunter2@127.0.0.1:{port}/turnstream")
    get_settings.cache_clear()
    db.get_engine.cache_clear()
    try:
        response = client.get("/api/health")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        db.get_engine.cache_clear()
    body = response.get_json()
    assert response.status_code == 503 and body["status"] == "unavailable" and body["checks"]["redis"] == "ok"
    assert body["checks"]["database"].startswith(f"error: could not reach Postgres at 127.0.0.1:{port} (DATABASE_URL)")
    assert "hunter2" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("module", "says"),
    [
        ("offline_model", ["--token-delay", "seconds between tokens", "--fault-rate", "[[fault=500]]"]),
        ("tasks.mcp.sql", ["--max-rows", "rows a query returns at most", "demo URL"]),
    ],
)
def test_the_bundled_servers_help_describes_every_option(module, says):
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
    for words in says:
        assert words in shown, shown


@pytest.mark.parametrize(
    ("variable", "url", "says"),
    [
        ("DATABASE_URL", "postgres://turnstream@127.0.0.1:{port}/turnstream", "could not reach Postgres at"),
        ("REDIS_URL", "redis://127.0.0.1:{port}/0", "could not reach Redis at"),
    ],
)
def test_a_worker_started_without_its_database_or_redis_says_so_in_one_line(stack, variable, url, says):
    from tests import services

    port = services.free_port()
    env = {**stack["env"], variable: url.format(port=port)}
    name = f"blind-{variable.lower()}"  # on a queue of its own: it must take none of the other tests' turns
    worker = services.start_worker(stack["logdir"], env, name, concurrency=2, extra=("-Q", name))
    try:
        line = f"{says} 127.0.0.1:{port} ({variable})"
        wait_until(lambda: line in worker.log_path.read_text(), 30, "the worker's word on it")
    finally:
        worker.stop()
    assert "Traceback" not in worker.log_path.read_text()
