"""Prometheus metrics from every process type, scraped as Prometheus would:
web's /metrics (gunicorn, its processes summed), the worker's port, beat's."""

from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import services
from tests.conftest import wait_turn

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample: (name, sorted labels) -> value."""
    response = httpx.get(url, headers=headers or {}, timeout=10)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _labels_are_bounded(samples: dict) -> None:
    for name, labels in samples:
        assert name.startswith(("turnstream_", "python_", "process_")), name
        for label, value in labels:
            assert not UUID.search(value), (name, label, value)  # never a turn's or a session's id
            assert len(value) < 80, (name, label, value)


def test_a_turn_is_counted_by_the_web_tier_and_the_worker(stack, http, client, owner):
    worker = f"http://127.0.0.1:{stack['worker_metrics_port']}/metrics"
    web = f"{str(http.base_url).rstrip('/')}/metrics"
    before_worker, before_web = _scrape(worker), _scrape(web)

    sid = http.post("/api/sessions", json={}, headers=owner).json()["id"]
    asked = [
        "counted [[tokens=5]]",
        "[[fault=400]] fails",
        '[[call=kit__shout {"text": "hi"}]]',
        '[[call=kit__explode {"reason": "on purpose"}]]',
    ]
    for message in asked:
        turn = http.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner).json()
        wait_turn(client, owner, turn["id"])
    # A stream followed live: its events come through the relay.
    turn = http.post(f"/api/sessions/{sid}/turns", json={"message": "live [[tokens=30]] [[delay=0.02]]"}, headers=owner)
    with http.stream("GET", turn.json()["events_url"], headers=owner) as stream:
        lines = stream.iter_lines()
        next(lines)
        during = _scrape(web)
        assert any(line.startswith("event: turn.completed") for line in lines)
    after_worker, after_web = _scrape(worker), _scrape(web)
    deadline = time.monotonic() + 5
    while _value(after_web, "turnstream_relay_events_total") <= _value(before_web, "turnstream_relay_events_total"):
        assert time.monotonic() < deadline, "no relayed events counted"  # added by the relay's ticker
        time.sleep(0.2)
        after_web = _scrape(web)

    def grew(after, before, name, by=1, **labels):
        got = _value(after, name, **labels) - _value(before, name, **labels)
        assert got >= by, (name, labels, got)

    grew(after_worker, before_worker, "turnstream_turns_finished_total", 3, status="succeeded", error_code="")
    grew(after_worker, before_worker, "turnstream_turns_finished_total", status="failed", error_code="model_error")
    grew(after_worker, before_worker, "turnstream_turn_attempts_total", 4)
    grew(after_worker, before_worker, "turnstream_time_to_first_token_seconds_count", 3)
    grew(after_worker, before_worker, "turnstream_turn_duration_seconds_count", 3, status="succeeded")
    grew(after_worker, before_worker, "turnstream_model_request_duration_seconds_count", 5, outcome="ok")
    grew(after_worker, before_worker, "turnstream_model_errors_total", code="model_error")
    grew(after_worker, before_worker, "turnstream_tool_call_duration_seconds_count", server="kit", tool="shout")
    grew(after_worker, before_worker, "turnstream_tool_errors_total", server="kit", tool="explode")
    assert _value(after_worker, "turnstream_tool_errors_total", server="kit", tool="shout") == _value(
        before_worker, "turnstream_tool_errors_total", server="kit", tool="shout"
    )
    grew(after_worker, before_worker, "turnstream_events_published_total", 10)

    grew(after_web, before_web, "turnstream_turns_submitted_total", 5)
    grew(
        after_web,
        before_web,
        "turnstream_http_requests_total",
        4,
        method="POST",
        endpoint="turns.create_turn",
        status="202",
    )
    assert _value(during, "turnstream_relay_streams") >= 1  # the stream open then
    assert _value(after_web, "turnstream_relay_streams") == _value(during, "turnstream_relay_streams") - 1
    assert _value(after_web, "turnstream_workers_alive") >= 1
    assert ("turnstream_turns_queued", ()) in after_web
    assert ("turnstream_oldest_queued_turn_age_seconds", ()) in after_web
    _labels_are_bounded(after_web)
    _labels_are_bounded(after_worker)


def test_model_retries_are_counted_by_what_the_request_before_got(stack, http, client, owner):
    worker = f"http://127.0.0.1:{stack['worker_metrics_port']}/metrics"
    before = _scrape(worker)
    sid = http.post("/api/sessions", json={}, headers=owner).json()["id"]
    message = f"retried {uuid.uuid4().hex[:6]} [[faults=429,503]] [[tokens=3]]"
    turn = http.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner).json()
    assert wait_turn(client, owner, turn["id"])["status"] == "succeeded"
    after = _scrape(worker)
    for kind in ("http_429", "http_503"):
        got = _value(after, "turnstream_model_retries_total", kind=kind) - _value(
            before, "turnstream_model_retries_total", kind=kind
        )
        assert got >= 1, kind


def test_metrics_need_a_key_unless_asked_from_this_machine(client, owner):
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    refused = client.get("/metrics", environ_base=remote)
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "unauthorized"
    assert client.get("/metrics", environ_base=remote, headers=owner).status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 200


@pytest.mark.timeout(60)
def test_beat_exports_what_it_sent(stack):
    port = services.free_port()
    env = {**stack["env"], "BEAT_METRICS_PORT": str(port), "SWEEP_SECONDS": "0.5"}
    beat = services.start_beat(stack["logdir"], env, name="beat-metrics")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 30
        while True:
            try:
                sent = _value(_scrape(url), "turnstream_beat_sent_total", task="tasks.sweep_turns")
            except httpx.HTTPError:
                sent = 0
            if sent >= 2:
                break
            assert time.monotonic() < deadline, "beat exported no sends"
            time.sleep(0.3)
    finally:
        beat.stop()


def test_the_dashboard_reads_only_metrics_that_are_exported(client):
    """deploy/grafana/turnstream.json, against what /metrics declares: a
    renamed metric would otherwise leave a panel silently empty."""
    exposition = client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"}).get_data(as_text=True)
    families = re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE)
    exported = {f + suffix for f in families for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    dashboard = json.loads((services.ROOT / "deploy" / "grafana" / "turnstream.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"turnstream_[a-z_]+", target["expr"])
    }
    assert len(used) >= 15
    assert used <= exported, used - exported
