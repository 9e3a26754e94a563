"""The event stream, served by a real gunicorn -k gevent and read by an SSE client."""

from __future__ import annotations

import time

import httpx

from tests.sse import iter_sse, read_events


def _session(http, owner) -> str:
    return http.post("/api/sessions", json={}, headers=owner).json()["id"]


def _turn(http, owner, sid, message) -> dict:
    response = http.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner)
    assert response.status_code == 202, response.text
    return response.json()


def test_stream_delivers_every_event_in_order_and_ends_after_the_terminal_one(http, owner):
    sid = _session(http, owner)
    turn = _turn(http, owner, sid, "stream me [[tokens=30]] [[delay=0.01]]")
    with http.stream("GET", turn["events_url"], headers=owner) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        events = [e for e in iter_sse(response) if not isinstance(e, tuple)]  # the server ends the stream
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    assert [e.seq for e in events] == [int(e.id) for e in events]
    assert events[0].event == "turn.started" and events[-1].event == "turn.completed"
    text = "".join(e.data["delta"] for e in events if e.event == "message.delta")
    assert len([e for e in events if e.event == "message.delta"]) == 30
    assert text == events[-1].data["answer"] == http.get(f"/api/turns/{turn['id']}", headers=owner).json()["answer"]


def test_reconnect_with_last_event_id_resumes_with_no_gap_and_no_duplicate(http, owner):
    sid = _session(http, owner)
    turn = _turn(http, owner, sid, "resume me [[tokens=60]] [[delay=0.02]]")
    _, head = read_events(http, turn["events_url"], headers=owner, stop_after=8)  # then drop mid-stream
    assert len(head) == 8 and head[-1].event == "message.delta"
    _, tail = read_events(http, turn["events_url"], headers={**owner, "Last-Event-ID": head[-1].id})
    seqs = [e.seq for e in head + tail]
    assert seqs == list(range(1, len(seqs) + 1))
    assert tail[-1].event == "turn.completed"
    text = "".join(e.data["delta"] for e in head + tail if e.event == "message.delta")
    assert text == tail[-1].data["answer"]
    # ?after= works like the header
    _, again = read_events(http, f"{turn['events_url']}?after={seqs[-3]}", headers=owner)
    assert [e.seq for e in again] == seqs[-2:]


def test_finished_turn_answers_204_once_everything_was_delivered(http, owner):
    sid = _session(http, owner)
    turn = _turn(http, owner, sid, "quick")
    _, events = read_events(http, turn["events_url"], headers=owner)
    assert events[-1].event == "turn.completed"
    done = http.get(turn["events_url"], headers={**owner, "Last-Event-ID": events[-1].id})
    assert done.status_code == 204
    # a client that missed the end still gets it
    _, rest = read_events(http, turn["events_url"], headers={**owner, "Last-Event-ID": events[-2].id})
    assert [e.event for e in rest] == ["turn.completed"]


def test_idle_stream_sends_ping_comments(http, owner):
    sid = _session(http, owner)
    # SSE_PING_SECONDS=1 in the test environment; the first token comes after
    # 3.5 s. Pings go out at the relay's tick (a quarter ping) after they are
    # due, the first at a random point of the cycle: 2 come within 2.5 s.
    turn = _turn(http, owner, sid, "wait [[first=3.5]]")
    comments = []
    with http.stream("GET", turn["events_url"], headers=owner) as response:
        for item in iter_sse(response):
            if isinstance(item, tuple):
                comments.append(item[1])
            elif item.event == "turn.completed":
                break
    assert comments.count("ping") >= 2


def test_chat_stream_true_starts_with_turn_accepted_and_makes_the_session(http, owner):
    _, events = read_events(
        http, "/api/chat", headers=owner, method="POST", json_body={"message": "hi", "stream": True}
    )
    assert events[0].event == "turn.accepted"
    session_id, turn_id = events[0].data["session_id"], events[0].data["turn_id"]
    assert events[-1].event == "turn.completed" and events[-1].data["turn_id"] == turn_id
    messages = http.get(f"/api/sessions/{session_id}/messages", headers=owner).json()["items"]
    assert [m["content"] for m in messages] == ["hi", events[-1].data["answer"]]


def test_another_owner_cannot_follow_a_turn(http, owner, stack):
    from web.auth import create_key

    sid = _session(http, owner)
    turn = _turn(http, owner, sid, "mine")
    other = {"X-API-Key": create_key("someone-else-" + str(time.time()))}
    response = http.get(turn["events_url"], headers=other)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_many_clients_on_one_turn_all_get_the_full_stream(any_web_server, owner):
    from concurrent.futures import ThreadPoolExecutor

    _path, web_server = any_web_server
    with httpx.Client(base_url=web_server, timeout=30) as http:
        sid = _session(http, owner)
        turn = _turn(http, owner, sid, "fan out [[tokens=40]] [[delay=0.01]] [[first=0.5]]")

        def follow(_):
            with httpx.Client(base_url=web_server, timeout=30) as c:
                return read_events(c, turn["events_url"], headers=owner)[1]

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(follow, range(20)))
    for events in results:
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].event == "turn.completed"


def test_a_turn_that_runs_start_to_end_between_the_first_read_and_the_snapshot_streams_its_events(stack, new_relay):
    """The relay read an empty log, then the whole turn ran before it asked
    Postgres: it must send the events (with usage), not a bare snapshot."""
    import json
    import uuid

    from shared.events import EventLog
    from web.relay.frames import synthetic
    from web.relay.resume import Resume
    from web.relay.snapshots import Snapshot

    log = EventLog("turn", f"race-{uuid.uuid4().hex[:8]}")

    def snapshot():
        log.append("turn.started", attempt=1)  # the worker, meanwhile
        log.append("message.delta", delta="hi")
        data = {"turn_id": log.ident, "seq": 0, "type": "turn.snapshot", "status": "succeeded", "text": "hi"}
        return Snapshot(synthetic("turn.snapshot", json.dumps(data)), ended=True)

    frames = Resume(new_relay(0.2), log, 0, snapshot).frames()
    assert next(frames) == b"retry: 2000\n\n"
    head = next(frames)  # the log's events, in one write
    assert [line for line in head.split(b"\n") if line.startswith(b"event:")] == [
        b"event: turn.started",
        b"event: message.delta",
    ]
    log.append("turn.completed", answer="hi", usage={"completion_tokens": 1}, tools=[])  # after the commit
    rest = [f for f in frames if not f.startswith(b":")]
    assert rest[0].startswith(b"event: turn.completed") and b'"usage"' in rest[0]


def test_a_stream_whose_terminal_event_never_reached_the_log_still_ends(http, owner):
    """Redis failed just after the turn's end committed: the log stops short
    of turn.completed. The idle stream asks Postgres and ends with a snapshot."""
    from shared.events import EventLog
    from shared.redis import get_redis

    sid = _session(http, owner)
    turn = _turn(http, owner, sid, "ends unseen")
    _, events = read_events(http, turn["events_url"], headers=owner)
    log = EventLog("turn", turn["id"])
    get_redis().delete(log.seq_key, log.stream_key)  # rebuild the log without its end
    log.append("turn.started", attempt=1)
    log.append("message.delta", delta="partial")
    start = time.monotonic()
    _, tail = read_events(http, turn["events_url"], headers={**owner, "Last-Event-ID": "2"})
    # SSE_PING_SECONDS=1 in the test environment: the check comes at the 4th idle ping
    assert time.monotonic() - start < 8
    assert [e.event for e in tail] == ["turn.snapshot"]
    assert tail[0].data["status"] == "succeeded" and tail[0].data["text"] == events[-1].data["answer"]


def test_an_open_stream_whose_turn_ended_without_its_terminal_event_ends_after_idle_pings(stack, new_relay):
    import json
    import uuid

    from shared.events import EventLog
    from web.relay.frames import synthetic
    from web.relay.resume import IDLE_PINGS_BEFORE_CHECK, Resume
    from web.relay.snapshots import Snapshot

    log = EventLog("turn", f"lost-end-{uuid.uuid4().hex[:8]}")
    log.append("turn.started", attempt=1)
    log.append("message.delta", delta="all of it")
    ended = {"now": False}

    def snapshot():
        status = "succeeded" if ended["now"] else "running"
        data = {"turn_id": log.ident, "seq": 0, "type": "turn.snapshot", "status": status, "text": "all of it"}
        return Snapshot(synthetic("turn.snapshot", json.dumps(data)), ended=ended["now"])

    frames = Resume(new_relay(0.05), log, 2, snapshot).frames()
    assert next(frames) == b"retry: 2000\n\n"
    assert [next(frames) for _ in range(IDLE_PINGS_BEFORE_CHECK + 1)] == [b": ping\n\n"] * (IDLE_PINGS_BEFORE_CHECK + 1)
    ended["now"] = True  # the turn's end committed; its terminal event never reached Redis
    rest = list(frames)
    assert rest[-1].startswith(b"event: turn.snapshot") and b'"succeeded"' in rest[-1]
    assert len(rest) <= IDLE_PINGS_BEFORE_CHECK * 2  # within a few pings, not never
