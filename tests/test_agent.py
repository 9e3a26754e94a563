"""Agent turns: tools from real MCP servers (the bundled SQL server and the
test kit over stdio and over HTTP), called by the offline model through the
real openai client, run by the real worker."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from shared.events import EventLog
from tests.conftest import wait_turn


def _turn(client, owner, message: str, sid: str | None = None) -> tuple[str, str]:
    if sid is None:
        sid = client.post("/api/sessions", json={"title": "agent"}, headers=owner).get_json()["id"]
    response = client.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner)
    assert response.status_code == 202, response.get_json()
    return sid, response.get_json()["id"]


def _run(client, owner, message: str, sid: str | None = None, timeout: float = 30):
    sid, turn_id = _turn(client, owner, message, sid)
    done = wait_turn(client, owner, turn_id, timeout)
    return sid, done, EventLog("turn", turn_id).read_after(0)


def _of(events, type_: str) -> list:
    return [e for e in events if e.type == type_]


def _wait_for_event(log: EventLog, type_: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _of(log.read_after(0), type_)
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no {type_} in {timeout}s")


def test_sql_question_runs_the_bundled_server_and_the_answer_uses_its_output(client, owner):
    sid, done, events = _run(client, owner, "How many? SELECT count(*) AS n FROM customers")
    assert done["status"] == "succeeded", done
    [started] = _of(events, "tool.started")
    [finished] = _of(events, "tool.finished")
    assert started.data["name"] == "sql__query"
    assert started.data["arguments"] == {"sql": "SELECT count(*) AS n FROM customers"}
    assert finished.data["call_id"] == started.data["call_id"] and finished.data["ok"] is True
    assert json.loads(finished.data["output"])["rows"] == [[60]]
    assert done["answer"].startswith('sql__query returned: {"columns": ["n"], "rows": [[60]]')
    deltas = "".join(e.data["delta"] for e in _of(events, "message.delta"))
    assert deltas == done["answer"]
    # order: started before finished before the answer's text
    types = [e.type for e in events]
    assert types.index("tool.started") < types.index("tool.finished") < types.index("message.delta")

    # accounting: usage of both model rounds, tools on the turn and on the stored message
    assert done["usage"]["prompt_tokens"] > 0 and done["usage"]["completion_tokens"] > len(deltas.split())
    [tool] = done["tools"]
    assert tool["name"] == "sql__query" and tool["ok"] and tool["duration_ms"] >= 0
    assert _of(events, "turn.completed")[0].data["tools"] == done["tools"]
    messages = client.get(f"/api/sessions/{sid}/messages", headers=owner).get_json()["items"]
    assert messages[1]["role"] == "assistant" and messages[1]["tool_calls"] == done["tools"]
    assert "tool_calls" not in messages[0]


def test_describe_and_list_tables_by_plain_words(client, owner):
    _sid, done, events = _run(client, owner, "please describe table orders")
    [started] = _of(events, "tool.started")
    assert started.data["name"] == "sql__describe_table" and started.data["arguments"] == {"table": "orders"}
    assert '["ordered_at", "date", false]' in _of(events, "tool.finished")[0].data["output"]
    _sid, done, events = _run(client, owner, "what can I ask? list tables")
    assert "public.customers" in _of(events, "tool.finished")[0].data["output"]
    assert done["status"] == "succeeded"


def test_parallel_tool_calls_over_stdio_and_http_run_at_once(client, owner):
    message = '[[call=kit__nap {"seconds": 1.5}]] [[call=web__nap {"seconds": 1.5}]] [[call=web__shout {"text": "hi"}]]'
    _sid, done, events = _run(client, owner, message)
    assert done["status"] == "succeeded", done
    assert [t["name"] for t in done["tools"]] == ["kit__nap", "web__nap", "web__shout"]
    assert [t["output"] for t in done["tools"]] == ["napped 1.5s", "napped 1.5s", "HI"]
    assert all(t["ok"] for t in done["tools"])
    # all three started before any finished, and the round took about one nap, not two
    types = [e.type for e in events if e.type.startswith("tool.")]
    assert types == ["tool.started"] * 3 + ["tool.finished"] * 3
    naps = sum(t["duration_ms"] for t in done["tools"] if t["name"].endswith("nap"))
    assert naps >= 3000
    started = [e for e in events if e.type == "tool.started"][0]
    finished = [e for e in events if e.type == "tool.finished"][-1]
    assert started.seq < finished.seq
    assert done["tools"][0]["duration_ms"] < 2900 and done["tools"][1]["duration_ms"] < 2900


def test_a_tool_error_goes_back_to_the_model_and_the_turn_succeeds(client, owner):
    _sid, done, events = _run(client, owner, '[[call=kit__explode {"reason": "on purpose"}]]')
    assert done["status"] == "succeeded"
    [finished] = _of(events, "tool.finished")
    assert finished.data["ok"] is False and "exploded on purpose" in finished.data["output"]
    assert "kit__explode returned: " in done["answer"] and "exploded on purpose" in done["answer"]

    _sid, done, events = _run(
        client, owner, '[[call=kit__no_such_tool]] [[call=sql__query {"sql": "DELETE FROM orders"}]]'
    )
    outputs = [e.data for e in _of(events, "tool.finished")]
    assert [o["ok"] for o in outputs] == [False, False]
    assert "no tool named 'kit__no_such_tool'" in outputs[0]["output"]
    assert "read-only transaction" in outputs[1]["output"]
    assert done["status"] == "succeeded"


def test_a_slow_tool_times_out_as_a_tool_error_and_the_server_stays_usable(client, owner):
    start = time.monotonic()
    sid, done, events = _run(client, owner, '[[call=kit__nap {"seconds": 30}]]')
    assert time.monotonic() - start < 20
    [finished] = _of(events, "tool.finished")
    assert finished.data["ok"] is False and "did not answer within" in finished.data["output"]
    assert done["status"] == "succeeded"
    _sid, done, events = _run(client, owner, '[[call=kit__shout {"text": "still here"}]]', sid)
    assert done["tools"][0]["output"] == "STILL HERE"


def test_a_crashed_stdio_server_is_restarted_on_next_use(client, owner):
    _sid, before, _ = _run(client, owner, "[[call=kit__pid]]")
    _sid, crashed, events = _run(client, owner, "[[call=kit__die]]")
    assert crashed["status"] == "succeeded"
    assert _of(events, "tool.finished")[0].data["ok"] is False
    _sid, after, _ = _run(client, owner, "[[call=kit__pid]]")
    assert after["tools"][0]["ok"], after
    assert after["tools"][0]["output"] != before["tools"][0]["output"]


def test_tool_rounds_are_capped(client, owner):
    # the model asks for tools 10 rounds in a row; MAX_TOOL_ROUNDS is 3 here
    _sid, done, events = _run(client, owner, '[[call=kit__shout {"text": "again"}]] [[rounds=10]]')
    assert done["status"] == "failed"
    assert done["error"]["code"] == "tool_rounds_exceeded"
    assert len(_of(events, "tool.finished")) == 3
    assert events[-1].type == "turn.failed"


def test_model_errors_are_retried_with_backoff_then_succeed(client, owner):
    start = time.monotonic()
    _sid, done, events = _run(client, owner, "retry me [[faults=500,429]]")
    elapsed = time.monotonic() - start
    assert done["status"] == "succeeded", done
    assert done["answer"].startswith('You said: "retry me".')
    assert elapsed >= 0.375 + 0.75  # two backoffs: 0.5 s then 1 s, each less at most 25 % jitter
    assert not _of(events, "turn.restarted")


def test_turns_reuse_the_connection_to_the_model(client, owner, stack):
    """The openai client closes the connection after each stream unless the
    body was read to its end (shared/overrides/openai_stream.py): without
    that, each turn opens one (4 here, plus 1 for the control request)."""
    from shared import overrides

    control = f"http://127.0.0.1:{stack['model_port']}/control"
    before = httpx.post(control, json={}).json()["connections"]
    sid = None
    for i in range(4):
        sid, done, _ = _run(client, owner, f"again {i} [[tokens=5]]", sid)
        assert done["status"] == "succeeded", done
    opened = httpx.post(control, json={}).json()["connections"] - before
    if overrides.enabled("openai_drain"):
        assert opened <= 2  # this request's, and one at most
    else:
        assert opened == 5


def test_a_model_that_holds_its_response_open_after_done_costs_time_not_the_answer(stack, monkeypatch):
    """The worker reads a stream to its end after [DONE] (to keep the
    connection); a server that never ends it is waited for OPENAI_TIMEOUT,
    and the answer stands."""
    from shared import overrides
    from shared.config import get_settings
    from tasks.model import get_client, stream_completion

    monkeypatch.setenv("OPENAI_TIMEOUT", "0.5")
    get_settings.cache_clear()
    get_client.cache_clear()
    try:
        deltas: list[str] = []
        start = time.monotonic()
        messages = [{"role": "user", "content": "hold on [[tokens=3]] [[fault=linger]]"}]
        result = stream_completion(messages, deltas.append)
        took = time.monotonic() - start
    finally:
        get_settings.cache_clear()  # the next use reads the environment as the fixture restores it
        get_client.cache_clear()
    assert len(result.text.split()) == 3 and "".join(deltas) == result.text
    if overrides.enabled("openai_drain"):
        assert 0.4 < took < 5  # read to the end: OPENAI_TIMEOUT runs out
    else:
        assert took < 0.4  # the stock client stops reading at [DONE]


def test_model_errors_past_the_bound_fail_with_a_clear_code(client, owner):
    _sid, done, _ = _run(client, owner, "no luck [[faults=503,503,503,503]]")
    assert done["status"] == "failed" and done["error"]["code"] == "model_unavailable"
    _sid, done, _ = _run(client, owner, "no luck [[faults=429,429,429,429]]")
    assert done["status"] == "failed" and done["error"]["code"] == "model_rate_limited"


def test_a_stream_broken_midway_restarts_with_turn_restarted(client, owner):
    _sid, done, events = _run(client, owner, "flaky [[faults=disconnect@3]] [[tokens=12]]")
    assert done["status"] == "succeeded", done
    types = [e.type for e in events]
    assert types.count("turn.restarted") == 1
    cut = types.index("turn.restarted")
    assert set(types[1:cut]) == {"message.delta"}  # the broken attempt's text (deltas may merge)…
    before = "".join(e.data["delta"] for e in events[1:cut])
    assert len(before.split()) == 3 and done["answer"].startswith(before)
    after = "".join(e.data["delta"] for e in events[cut:] if e.type == "message.delta")
    assert after == done["answer"] and len(done["answer"].split()) == 12  # …is replaced
    assert events[cut].data["reason"] == "model_stream_broke"


def test_a_stream_that_keeps_breaking_fails_as_model_unavailable(client, owner):
    _sid, done, events = _run(client, owner, "broken [[fault=disconnect@2]]")
    assert done["status"] == "failed" and done["error"]["code"] == "model_unavailable"
    assert len(_of(events, "turn.restarted")) == 2  # OPENAI_MAX_RETRIES in the tests


@pytest.mark.parametrize(
    ("message", "wait_for"),
    [
        ("stream [[tokens=500]] [[delay=0.05]]", "message.delta"),
        ('[[call=kit__nap {"seconds": 3.5}]]', "tool.started"),
    ],
    ids=["while-streaming", "while-a-tool-runs"],
)
def test_cancel_stops_a_running_turn_within_a_second(client, owner, message, wait_for):
    _sid, turn_id = _turn(client, owner, message)
    log = EventLog("turn", turn_id)
    _wait_for_event(log, wait_for)
    time.sleep(0.2)
    asked = time.monotonic()
    assert client.post(f"/api/turns/{turn_id}/cancel", headers=owner).status_code == 202
    _wait_for_event(log, "turn.cancelled", timeout=5)
    assert time.monotonic() - asked < 1.0
    done = wait_turn(client, owner, turn_id)
    assert done["status"] == "cancelled"
    deltas = "".join(e.data["delta"] for e in _of(log.read_after(0), "message.delta"))
    assert done["answer"] == deltas  # what was produced is kept
    assert not _of(log.read_after(0), "tool.finished")


@pytest.mark.parametrize(
    ("base_url", "message", "code", "says"),
    [
        (
            "{model}",
            "hi",
            "model_error",
            ["HTTP 404", "check OPENAI_BASE_URL (it usually ends in /v1)", "OPENAI_MODEL"],
        ),
        ("http://127.0.0.1:{closed}/v1", "hi", "model_unavailable", ["could not reach", "check OPENAI_BASE_URL"]),
        ("{model}/v1", "hi [[fault=401]]", "model_error", ["refused the key (HTTP 401)", "check OPENAI_API_KEY"]),
        ("{model}/v1", "hi [[fault=503]]", "model_unavailable", ["HTTP 503 after OPENAI_MAX_RETRIES (0) retries"]),
    ],
    ids=["no-v1", "closed-port", "wrong-key", "server-error"],
)
def test_model_errors_name_the_url_tried_and_the_setting_to_fix(stack, monkeypatch, base_url, message, code, says):
    from shared.config import get_settings
    from tasks import model
    from tasks.model import ModelError, get_client, stream_completion
    from tests.services import free_port

    url = base_url.format(model=f"http://127.0.0.1:{stack['model_port']}", closed=free_port())
    monkeypatch.setattr(model, "_health", model._ModelHealth())  # as a worker of its own
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_MAX_RETRIES", "0")
    get_settings.cache_clear()
    get_client.cache_clear()
    try:
        with pytest.raises(ModelError) as exc:
            stream_completion([{"role": "user", "content": message}], lambda _: None)
    finally:
        get_settings.cache_clear()  # the next use reads the environment as the fixture restores it
        get_client.cache_clear()
    assert exc.value.code == code
    assert f"the model server at {url}" in exc.value.message
    for words in says:
        assert words in exc.value.message, exc.value.message
