"""Graceful deploys: SIGTERM to a worker finishes or hands back its turns;
SIGTERM to web ends its SSE streams, and clients resume elsewhere."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from shared.events import EventLog
from tests import services
from tests.conftest import wait_turn
from tests.sse import read_events

SHORT = "short [[tokens=10]] [[delay=0.1]]"  # 1 s: ends within the grace
LONG = "long [[tokens=50]] [[delay=0.1]]"  # 5 s: handed back

pytestmark = pytest.mark.broker  # run against RabbitMQ too (deploy/test.sh)


def _submit(client, owner, message: str) -> str:
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    response = client.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner)
    return response.get_json()["id"]


def _status(client, owner, turn_id: str) -> str:
    return client.get(f"/api/turns/{turn_id}", headers=owner).get_json()["status"]


def _streaming(turn_id: str) -> bool:
    return any(e.type == "message.delta" for e in EventLog("turn", turn_id).read_after(0))


def test_sigterm_to_a_worker_finishes_short_turns_and_hands_back_long_ones(stack, client, owner):
    # Only the worker under test takes turns until it has stopped.
    with services.sole_worker(stack, "leaving-worker", {"WORKER_SHUTDOWN_GRACE_SECONDS": "2"}, 8) as leaving:
        short = [_submit(client, owner, SHORT) for _ in range(2)]
        long = [_submit(client, owner, LONG) for _ in range(3)]
        services.wait_until(lambda: all(map(_streaming, short + long)), 20, "turns to stream")
        leaving.popen.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        leaving.popen.wait(20)
        took = time.monotonic() - sent
        # Within the grace plus the time a turn takes to stop between deltas.
        assert took < 2 + 3, (took, leaving.log_tail())
        assert "handed back 3 turns" in leaving.log_tail(), leaving.log_tail()
        for t in short:
            done = wait_turn(client, owner, t, timeout=1)
            assert done["status"] == "succeeded" and done["attempts"] == 1
        assert all(_status(client, owner, t) == "queued" for t in long)
    for t in long:  # another worker (the session's) takes them over
        done = wait_turn(client, owner, t, timeout=30)
        assert done["status"] == "succeeded" and done["attempts"] == 2
        events = EventLog("turn", t).read_after(0)
        restarted = max(i for i, e in enumerate(events) if e.type == "turn.restarted")
        after = "".join(e.data["delta"] for e in events[restarted:] if e.type == "message.delta")
        assert after == done["answer"]
        assert [e.type for e in events].count("turn.completed") == 1
        messages = client.get(f"/api/sessions/{done['session_id']}/messages", headers=owner).get_json()["items"]
        assert [m["role"] for m in messages] == ["user", "assistant"]


def test_sigterm_to_web_ends_streams_and_clients_resume_on_another_process(stack, web_server, owner):
    env = stack["env"]
    leaving, port = services.start_gunicorn(stack["logdir"], env)
    try:
        base = f"http://127.0.0.1:{port}"
        services.wait_until(lambda: httpx.get(f"{base}/api/health", timeout=2).status_code == 200, 30, "web")
        with httpx.Client(base_url=base, timeout=30) as http:
            sid = http.post("/api/sessions", json={}, headers=owner).json()["id"]
            turn = http.post(f"/api/sessions/{sid}/turns", json={"message": LONG}, headers=owner).json()
            sent: list[float] = []

            def deploy(n: int) -> None:
                if n == 5:
                    leaving.popen.send_signal(signal.SIGTERM)
                    sent.append(time.monotonic())

            _, head = read_events(http, turn["events_url"], headers=owner, on_event=deploy)
            ended_after = time.monotonic() - sent[0]
        # The stream ended cleanly, long before the turn (5 s) or the graceful timeout (20 s).
        assert ended_after < 3, ended_after
        assert head[-1].event == "message.delta"
        assert leaving.popen.wait(15) == 0
    finally:
        leaving.stop()
    with httpx.Client(base_url=web_server, timeout=30) as other:
        _, tail = read_events(other, turn["events_url"], headers={**owner, "Last-Event-ID": head[-1].id})
    seqs = [e.seq for e in head + tail]
    assert seqs == list(range(1, len(seqs) + 1))
    assert tail[-1].event == "turn.completed"
    assert "".join(e.data["delta"] for e in head + tail if e.event == "message.delta") == tail[-1].data["answer"]
