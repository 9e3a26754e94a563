"""Breakers per model endpoint and MCP server, shared through Redis by every
worker process (shared/breakers.py): through real worker processes, two of
them, with the model behind a proxy that can be cut as a dead server is."""

from __future__ import annotations

import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.breakers import CLOSED, HALF_OPEN, MODEL, OPEN, Breaker, model_breaker, tool_breaker
from shared.events import EventLog
from tests import services
from tests.conftest import TEST_ENV, new_owner, wait_turn
from tests.proxy import Proxy

COOLDOWN = 2.0
SETTINGS = {
    **TEST_ENV,
    "REDIS_PREFIX": "breakers:",
    "BREAKER_MIN_FAILURES": "3",
    "BREAKER_FAILURE_RATE": "0.5",
    "BREAKER_WINDOW_SECONDS": "30",
    "BREAKER_COOLDOWN_SECONDS": str(COOLDOWN),
    "MODEL_WAIT_SECONDS": "120",
    "OPENAI_MAX_RETRIES": "2",
    "OPENAI_TIMEOUT": "5",
    "TOOL_TIMEOUT_SECONDS": "1",
}


@pytest.fixture(scope="module")
def own_stack():
    with services.stack("turnstream-breakers-", SETTINGS, ("--first-token-delay", "0")) as info:
        proxy = Proxy([("127.0.0.1", info["model_port"])])
        info["proxy"] = proxy
        info["worker_env"] = {**info["env"], "OPENAI_BASE_URL": f"http://127.0.0.1:{proxy.port}/v1"}
        yield info
        proxy.close()


@pytest.fixture
def app_client(own_stack):
    from web import create_app

    return create_app().test_client(), new_owner("breakers")


def _workers(own_stack, count: int, **settings: str) -> list[services.Proc]:
    workers = [
        services.start_worker(
            own_stack["logdir"], {**own_stack["worker_env"], **settings}, f"b{n}-{uuid.uuid4().hex[:4]}", 4
        )
        for n in range(count)
    ]
    own_stack["procs"].extend(workers)
    for worker in workers:
        services.wait_for_worker(worker)
    return workers


def _stop(workers: list[services.Proc]) -> None:
    for worker in workers:
        worker.stop()


def _submit(client, owner, message: str, **session) -> str:
    sid = client.post("/api/sessions", json=session, headers=owner).get_json()["id"]
    made = client.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner)
    assert made.status_code == 202, made.get_json()
    return made.get_json()["id"]


def _delayed(turn_id: str) -> bool:
    return any(e.type == "turn.delayed" for e in EventLog("turn", turn_id).read_after(0))


def test_one_probe_of_all_processes_while_open_and_every_waiting_turn_answers_after(own_stack, app_client):
    client, owner = app_client
    proxy, breaker = own_stack["proxy"], model_breaker("default")
    workers = _workers(own_stack, 2)
    try:
        assert wait_turn(client, owner, _submit(client, owner, "before"))["status"] == "succeeded"
        proxy.cut(3600)  # the endpoint dies
        turns = [_submit(client, owner, f"question {n}") for n in range(8)]
        services.wait_until(lambda: all(_delayed(t) for t in turns), 60, "every turn to wait for the endpoint")
        state = breaker.state()
        assert state["state"] in (OPEN, HALF_OPEN) and state["opens"] == 1, state
        for turn_id in turns:  # waiting in the queue, not failed, and saying why
            turn = client.get(f"/api/turns/{turn_id}", headers=owner).get_json()
            assert turn["status"] in ("queued", "running"), turn
        delayed = next(e for e in EventLog("turn", turns[0]).read_after(0) if e.type == "turn.delayed")
        assert delayed.data["endpoint"] == "default" and "unavailable, retrying at" in delayed.data["reason"]

        # While it is dead: only probes reach it, one per cool-down across both workers.
        probes_before, refused_before, watched = breaker.state()["probes"], len(proxy.refused), time.monotonic()
        time.sleep(4 * COOLDOWN)
        probes = breaker.state()["probes"] - probes_before
        reached = len(proxy.refused) - refused_before
        elapsed = time.monotonic() - watched
        print(f"\n{elapsed:.1f} s dead: {probes} probes, {reached} connections to the endpoint")
        assert 1 <= probes <= elapsed / COOLDOWN + 1, probes
        assert reached <= probes + 1, (reached, probes)  # a probe admitted at the edge of the window

        # It comes back: the next probe closes the breaker and every waiting turn answers.
        proxy.down_until = 0
        back = time.monotonic()
        done = [wait_turn(client, owner, t, timeout=60) for t in turns]
        assert [d["status"] for d in done] == ["succeeded"] * len(turns), done
        assert breaker.state()["state"] == CLOSED
        print(f"all {len(turns)} answered {time.monotonic() - back:.1f} s after the endpoint came back")
        assert all(d["attempts"] >= 2 for d in done)  # each was handed back at least once
        logs = "".join(w.log_tail(400) for w in workers)
        assert re.search(r"model endpoint 'default' opened .*Last error: ", logs), logs[-3000:]
        assert "model endpoint 'default' closed" in logs
    finally:
        proxy.down_until = 0
        _stop(workers)


def test_an_answer_to_a_bad_request_does_not_open_it(own_stack, app_client):
    client, owner = app_client
    workers = _workers(own_stack, 1)
    try:
        opens = model_breaker("default").state()["opens"]
        turns = [_submit(client, owner, f"bad {n} [[fault=400]]") for n in range(6)]
        done = [wait_turn(client, owner, t) for t in turns]
        assert {d["status"] for d in done} == {"failed"} and {d["error"]["code"] for d in done} == {"model_error"}
        state = model_breaker("default").state()
        assert state["state"] == CLOSED and state["opens"] == opens, state
    finally:
        _stop(workers)


def test_a_turn_that_waits_longer_than_model_wait_seconds_fails_naming_the_endpoint(own_stack, app_client):
    client, owner = app_client
    proxy = own_stack["proxy"]
    workers = _workers(own_stack, 1, MODEL_WAIT_SECONDS="3")
    try:
        proxy.cut(3600)
        turns = [_submit(client, owner, f"in vain {n}") for n in range(4)]
        done = [wait_turn(client, owner, t, timeout=60) for t in turns]
        assert {d["status"] for d in done} == {"failed"}, done
        errors = {d["error"]["code"] for d in done}
        assert errors == {"model_unavailable"}, done
        waited = [d for d in done if "MODEL_WAIT_SECONDS" in d["error"]["message"]]
        assert waited and "model endpoint 'default'" in waited[0]["error"]["message"], done
    finally:
        proxy.down_until = 0
        _stop(workers)
        _close(model_breaker("default"))


def test_a_tool_server_whose_breaker_is_open_is_reported_unavailable_to_the_model(own_stack, app_client):
    client, owner = app_client
    workers = _workers(own_stack, 1)
    try:
        naps = [_submit(client, owner, f'nap {n} [[call=kit__nap {{"seconds": 3}}]]') for n in range(3)]
        for turn_id in naps:  # each call times out (TOOL_TIMEOUT_SECONDS=1): the server failed
            done = wait_turn(client, owner, turn_id)
            assert not done["tools"][0]["ok"] and "did not answer within" in done["tools"][0]["output"]
        assert tool_breaker("kit").state()["state"] == OPEN
        turn_id = _submit(client, owner, '[[call=kit__shout {"text": "hi"}]]')
        done = wait_turn(client, owner, turn_id)
        (call,) = done["tools"]
        assert not call["ok"] and call["duration_ms"] == 0, call  # not made
        assert "the tool server 'kit' is unavailable" in call["output"]
        assert "is unavailable" in done["answer"]  # the model was told
        finished = [e for e in EventLog("turn", turn_id).read_after(0) if e.type == "tool.finished"]
        assert "unavailable" in finished[0].data["output"]  # and so is the page
    finally:
        _stop(workers)
        _close(tool_breaker("kit"))


def test_one_caller_of_many_probes_an_open_breaker_past_its_cooldown(own_stack):
    breaker = Breaker(MODEL, f"probe-{uuid.uuid4().hex[:6]}")
    for _ in range(3):
        breaker.before()
        breaker.failed("connection refused", probe=False)
    assert breaker.state()["state"] == OPEN
    time.sleep(COOLDOWN + 0.2)
    start = threading.Barrier(20)

    def ask() -> str:
        start.wait()
        try:
            return "probe" if breaker.before() else "go"
        except Exception as exc:  # noqa: BLE001 - Unavailable: refused
            return type(exc).__name__

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: ask(), range(20)))
    assert sorted(answers) == ["Unavailable"] * 19 + ["probe"], answers
    assert breaker.state()["state"] == HALF_OPEN
    breaker.failed("still refused", probe=True)  # the probe failed: open for another cool-down
    assert breaker.state()["state"] == OPEN and breaker.state()["opens"] == 1
    time.sleep(COOLDOWN + 0.2)
    assert breaker.before() is True
    assert breaker.succeeded() == []
    assert breaker.state()["state"] == CLOSED and breaker.before() is False


def test_health_and_metrics_show_each_breaker(own_stack, app_client):
    client, owner = app_client
    breaker = tool_breaker("kit")
    for _ in range(3):
        breaker.before()
        breaker.failed("the tool server 'kit' closed the connection", probe=False)
    try:
        health = client.get("/api/health?detail=1", headers=owner).get_json()["checks"]
        assert "tools:kit" in health["breakers_open"]
        shown = health["breakers"]["tools:kit"]
        assert shown["state"] == OPEN and "closed the connection" in shown["last_error"] and shown["retry_at"]
        assert health["breakers"]["model:default"]["state"] == CLOSED
        scraped = client.get("/metrics", headers=owner).get_data(as_text=True)
        assert 'turnstream_breaker_state{kind="tools",name="kit"} 2.0' in scraped
        assert re.search(r'turnstream_breaker_opens_total\{kind="tools",name="kit"\} [1-9]', scraped)
    finally:
        _close(breaker)


def _close(breaker: Breaker) -> None:
    """Leave a breaker closed for the next test."""
    from shared.redis import get_redis

    get_redis().delete(breaker.key, breaker.waiting_key)
