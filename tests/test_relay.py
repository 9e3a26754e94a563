"""The relay at its edges: shared subscriptions, the subscribe/backlog race,
lost terminal messages, clients that vanish, and a lost Pub/Sub connection.
Against real Redis and Postgres; through a real gunicorn -k gevent where the
serving matters (SSE_PING_SECONDS=1 there)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests import services
from tests.sse import read_events

PING = 1.0  # SSE_PING_SECONDS in the test environment


def running_turn(owner: dict) -> str:
    """A turn that is `running` with no worker behind it: the test writes its log."""
    from shared.db import transaction
    from shared.models import ChatSession, Turn
    from web.auth import lookup_key

    owner_id = lookup_key(owner["Authorization"].split()[1]).owner_id
    with transaction() as db:
        chat = ChatSession(owner_id=owner_id, title="relay", meta={}, turn_count=1)
        db.add(chat)
        db.flush()
        turn = Turn(session_id=chat.id, owner_id=owner_id, number=1)  # queued: every turn starts so
        db.add(turn)
        db.flush()
        turn.status = "running"  # claimed, by no worker
        db.flush()
        return turn.id


def finish(turn_id: str, answer: str) -> None:
    from sqlalchemy import func, update

    from shared.db import transaction
    from shared.models import Turn

    with transaction() as db:
        db.execute(
            update(Turn).where(Turn.id == turn_id).values(status="succeeded", answer=answer, finished_at=func.now())
        )


def subscribers(channel: str) -> int:
    from shared.redis import get_redis

    return dict(get_redis().pubsub_numsub(channel))[channel.encode()]


def relay_stats(http) -> dict:
    return http.get("/api/health?detail=1").json()["checks"]["relay"]


def web_pid(stack) -> int:
    gunicorn = next(p for p in stack["procs"] if p.name == "gunicorn")
    return services.children(gunicorn.popen.pid)[0]


def open_stream(base: str, turn_id: str, owner: dict, rcvbuf: int | None = None) -> socket.socket:
    """A raw SSE connection, returned once the server sent `retry:` (subscribed)."""
    url = urlsplit(base)
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((url.hostname, url.port))
    auth = owner["Authorization"]
    sock.sendall(f"GET /api/turns/{turn_id}/events HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\r\n".encode())
    got = b""
    while b"retry:" not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


def reset(sock: socket.socket) -> None:
    """Close with RST, as a crashed client or a dropped network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def sockets(pid: int) -> list[str]:
    """The process's TCP sockets as local->remote port and state (for failure messages)."""
    inodes = {p.readlink().as_posix()[8:-1] for p in Path(f"/proc/{pid}/fd").iterdir() if "socket" in str(p.readlink())}
    found = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[9] in inodes:
            found.append(f"{int(cols[1][-4:], 16)}->{int(cols[2][-4:], 16)}:{cols[3]}")
    return found


def wait_for(check, timeout: float, what: str):
    return services.wait_until(lambda: check() or None, timeout, what)


# 1. One subscription per web process, reference-counted.


def test_clients_of_one_turn_share_one_subscription_released_by_the_last(web_server, owner, stack):
    from shared.events import EventLog

    turn_id = running_turn(owner)
    log = EventLog("turn", turn_id)
    with httpx.Client(base_url=web_server, timeout=10) as http:
        before = relay_stats(http)
        socks = [open_stream(web_server, turn_id, owner) for _ in range(20)]
        assert subscribers(log.channel) == 1  # one SUBSCRIBE for 20 clients
        stats = relay_stats(http)
        assert stats["streams"] - before["streams"] == 20 and stats["channels"] - before["channels"] == 1
        for sock in socks[:-1]:
            reset(sock)
        time.sleep(2 * PING + 0.5)
        assert subscribers(log.channel) == 1  # still one client left
        reset(socks[-1])
        wait_for(lambda: subscribers(log.channel) == 0, 2 * PING + 1, "UNSUBSCRIBE after the last client")
        assert relay_stats(http)["streams"] == before["streams"]


def test_a_stream_whose_queue_fills_is_ended_and_resumes_from_the_log(stack, monkeypatch, new_relay):
    import uuid

    from shared.events import EventLog
    from web.relay import hub
    from web.relay.frames import RETRY
    from web.relay.resume import Resume

    monkeypatch.setattr(hub, "QUEUE_SIZE", 5)
    log = EventLog("turn", f"full-{uuid.uuid4().hex[:8]}")
    log.append("turn.started", attempt=1)
    frames = Resume(new_relay(30), log, 0, lambda: None).frames()
    assert next(frames) == RETRY
    assert b"event: turn.started" in next(frames)
    for n in range(20):  # the client reads none of these: its queue takes 5
        log.append("message.delta", delta=str(n))
    time.sleep(0.3)
    assert list(frames) == []  # ended, without a frame more: the reader never waited for it
    resumed = Resume(new_relay(30), log, 1, lambda: None).frames()
    assert next(resumed) == RETRY
    chunk = next(resumed)
    assert [int(line[4:]) for line in chunk.split(b"\n") if line.startswith(b"id: ")] == list(range(2, 22))


def test_a_crowded_channel_wakes_its_streams_by_lane_and_each_gets_every_message(stack, new_relay):
    import uuid

    from shared.events import EventLog
    from web.relay.hub import WAKE_BATCH

    relay = new_relay(0.4)  # ticks of 0.1 s
    log = EventLog("turn", f"lanes-{uuid.uuid4().hex[:8]}")
    subs = [relay.subscribe(log.channel) for _ in range(2 * WAKE_BATCH + 10)]
    try:
        assert len(subs[0].channel.lanes) == 3 and sorted({s.lane for s in subs}) == [0, 1, 2]

        def wait_all(action) -> tuple[dict, float]:
            """What each stream's take() returned, and the seconds from the
            action until the last one returned."""
            got: dict[int, list] = {}
            woken: list[float] = []

            def take(i: int, sub) -> None:
                got[i] = sub.take()
                woken.append(time.monotonic())

            threads = [threading.Thread(target=take, args=(i, s)) for i, s in enumerate(subs)]
            for t in threads:
                t.start()
            time.sleep(0.05)
            acted = time.monotonic()
            action()
            for t in threads:
                t.join(5)
            return got, max(woken, default=acted) - acted

        got, _ = wait_all(lambda: log.append("turn.started", attempt=1))
        assert all([f.seq for f in got[i]] == [1] for i in range(len(subs))), got
        # idle: the ticker wakes every lane of a channel that asked for it, within
        # a tick or two (0.1 s each); unwoken, take() would block past the 5 s join
        got, took = wait_all(lambda: [relay.wake_at(s, time.monotonic()) for s in subs])
        assert len(got) == len(subs) and not any(got.values())
        assert took < 1.0, took
    finally:
        for sub in subs:
            relay.unsubscribe(sub)


def test_a_stream_leaves_nothing_for_the_garbage_collector(stack, new_relay):
    """Every stream's objects are freed as it ends, gap path included: cyclic
    garbage would wait for the collector's full passes, which stop every
    stream of the process for tens of milliseconds."""
    import gc
    import uuid

    from shared.events import EventLog
    from web.relay.resume import Resume

    log = EventLog("turn", f"gc-{uuid.uuid4().hex[:8]}")
    for n in range(5):
        log.append("message.delta", delta=str(n))
    log.append("turn.completed", answer="01234")
    log.redis.xtrim(log.stream_key, minid="0-4", approximate=False)  # seq 2 and 3 are gone: a gap after 1
    relay = new_relay(30)
    assert list(Resume(relay, log, 5, lambda: None).frames())[-1].startswith(b"event: turn.completed")  # warm-up
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            chunks = list(Resume(relay, log, 1, lambda: None).frames())
            assert [int(line[4:]) for line in b"".join(chunks).split(b"\n") if line.startswith(b"id: ")] == [4, 5, 6]
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        # Only the streams' own: another module's stack, left behind by a
        # thread that ends meanwhile, may come free at any moment.
        found = [repr(o)[:150] for o in gc.garbage if _of_the_relay(o)]
        gc.garbage.clear()
        gc.set_debug(0)
    finally:
        gc.enable()
    assert found == []


def _of_the_relay(obj) -> bool:
    """Whether garbage was made by the relay's code: its objects, or the
    frames, generators and functions of its modules."""
    if type(obj).__module__.startswith(("web.relay", "shared.events")):
        return True
    code = getattr(obj, "f_code", None) or getattr(obj, "gi_code", None) or getattr(obj, "__code__", None)
    return code is not None and ("/web/relay/" in code.co_filename or code.co_filename.endswith("/shared/events.py"))


# 2. Lossless: subscribe, backlog, then live, across an injected delay.


def test_events_published_while_the_backlog_is_read_arrive_once_and_in_order(stack, new_relay):
    import uuid

    from shared.events import EventLog
    from web.relay.resume import Resume

    class SlowLog(EventLog):
        """The worker writes while the relay is between SUBSCRIBE and XRANGE,
        and again between XRANGE and draining the live queue."""

        first = True

        def read_raw_after(self, after):
            if not self.first:
                return super().read_raw_after(after)
            self.first = False
            self.append("message.delta", delta="c")  # live and in the backlog
            self.append("message.delta", delta="d")
            time.sleep(0.2)
            held = super().read_raw_after(after)
            self.append("message.delta", delta="e")  # live only
            return held

    log = SlowLog("turn", f"race-{uuid.uuid4().hex[:8]}")
    log.append("turn.started", attempt=1)  # before the stream subscribed
    log.append("message.delta", delta="b")
    frames = Resume(new_relay(30), log, 0, lambda: None).frames()
    got = b""
    for chunk in frames:
        got += chunk
        if b"\nid: 5\n" in chunk:  # the worker ends the turn
            log.append("turn.completed", answer="bcde")
    ids = [int(line[4:]) for line in got.split(b"\n") if line.startswith(b"id: ")]
    assert ids == [1, 2, 3, 4, 5, 6]
    assert got.count(b'"delta":"c"') == 1 and got.count(b'"delta":"e"') == 1


def test_a_resume_from_before_what_the_log_holds_starts_with_a_snapshot(http, owner):
    from shared.events import EventLog
    from shared.redis import get_redis

    turn_id = running_turn(owner)
    log = EventLog("turn", turn_id)
    log.append("turn.started", attempt=1)
    for n in range(9):
        log.append("message.delta", delta=str(n))
    get_redis().xtrim(log.stream_key, minid="0-6", approximate=False)  # the log now holds seqs 6 to 10
    log.append("turn.completed", answer="012345678")
    finish(turn_id, "012345678")
    _, events = read_events(http, f"/api/turns/{turn_id}/events", headers={**owner, "Last-Event-ID": "2"})
    assert events[0].event == "turn.snapshot" and events[0].data["text"] == "012345678"
    assert events[0].id is None  # a snapshot never moves Last-Event-ID


# 3. Never stuck: a lost terminal message.


def test_a_stream_ends_when_the_terminal_message_never_comes_through_pub_sub(http, owner):
    from shared.events import EventLog
    from shared.redis import get_redis

    turn_id = running_turn(owner)
    log = EventLog("turn", turn_id)
    log.append("turn.started", attempt=1)
    log.append("message.delta", delta="all")
    lost = {}

    def drop_the_end(n):
        if n == 2:  # the client has both events: the end goes into the log, not the channel
            data = f'{{"seq":3,"turn_id":"{turn_id}","type":"turn.completed","answer":"all"}}'
            get_redis().xadd(log.stream_key, {"d": data}, id="0-3")
            get_redis().set(log.seq_key, 3)
            finish(turn_id, "all")
            lost["at"] = time.monotonic()

    _, events = read_events(http, f"/api/turns/{turn_id}/events", headers=owner, on_event=drop_the_end)
    assert [e.event for e in events] == ["turn.started", "message.delta", "turn.completed"]
    # the stream re-reads its log after IDLE_PINGS_BEFORE_CHECK quiet pings
    assert time.monotonic() - lost["at"] < 4 * PING * 1.25 + 2


# 4. Vanished clients are freed within two pings; churn leaves nothing behind.


def test_a_client_that_stops_reading_is_dropped_and_does_not_hold_up_another(web_server, owner, stack, http):
    from shared.events import EventLog

    turn_id = running_turn(owner)
    log = EventLog("turn", turn_id)
    before = relay_stats(http)
    frozen = open_stream(web_server, turn_id, owner, rcvbuf=4096)  # then never reads again
    reader_got = {}

    def read_all():
        with httpx.Client(base_url=web_server, timeout=30) as c:
            reader_got["events"] = read_events(c, f"/api/turns/{turn_id}/events", headers=owner)[1]

    reader = threading.Thread(target=read_all)
    reader.start()
    wait_for(lambda: relay_stats(http)["streams"] == before["streams"] + 2, 5, "both streams")
    log.append("turn.started", attempt=1)
    blob = "x" * 50_000
    for _ in range(200):  # 10 MB: more than the frozen client's socket buffers hold
        log.append("message.delta", delta=blob)
    log.append("turn.completed", answer="...")
    reader.join(timeout=20)
    assert len(reader_got["events"]) == 202  # the frozen client held nobody up
    blocked_at = time.monotonic()
    wait_for(lambda: relay_stats(http)["streams"] == before["streams"], 2 * PING + 2, "the frozen stream freed")
    assert subscribers(log.channel) == 0
    assert time.monotonic() - blocked_at < 2 * PING + 2
    frozen.close()


def test_a_client_that_lags_gets_every_byte_of_every_event(any_web_server, owner):
    """With direct writes, the reader writes events straight to a waiting
    stream's socket, each as an HTTP chunk; once a lagging client's buffers
    are full it leaves part of one, which the stream writes before anything
    else. Without, every frame goes through the response. Either way a
    strict HTTP parser reads the body back: every event whole, once and in
    order."""
    import h11

    from shared import overrides
    from shared.events import EventLog

    path, web_server = any_web_server
    direct_before = relay_stats(httpx.Client(base_url=web_server))["written_directly"]
    turn_id = running_turn(owner)
    log = EventLog("turn", turn_id)
    url = urlsplit(web_server)
    sock = socket.create_connection((url.hostname, url.port))
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "t"), ("Authorization", owner["Authorization"])]
    sock.sendall(conn.send(h11.Request(method="GET", target=f"/api/turns/{turn_id}/events", headers=headers)))
    sock.sendall(conn.send(h11.EndOfMessage()))
    # 8 MB, published at once: more than the server's socket buffer takes
    # (4 MB at most here) while the client does not read.
    deltas = [f"{n:04d}" * 16_000 for n in range(128)]
    parts: list[bytes] = []
    published = False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(1 << 16))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
        elif isinstance(event, h11.Data):
            parts.append(event.data)
            if not published and b"retry:" in b"".join(parts):
                published = True
                log.append("turn.started", attempt=1)
                for delta in deltas:
                    log.append("message.delta", delta=delta)
                log.append("turn.completed", answer="done")
                time.sleep(0.5)  # well within the 2 pings a blocked write may wait
        elif isinstance(event, h11.EndOfMessage):
            break
    sock.close()
    body = b"".join(parts)
    events = [block for block in body.split(b"\n\n") if block.startswith(b"event: ")]
    ids = [int(block.split(b"\nid: ")[1].split(b"\n")[0]) for block in events]
    assert ids == list(range(1, len(deltas) + 3))
    got = [json.loads(block.split(b"\ndata: ", 1)[1])["delta"] for block in events[1:-1]]
    assert got == deltas
    direct = relay_stats(httpx.Client(base_url=web_server))["written_directly"] - direct_before
    assert direct > 0 if path == "overrides" and overrides.enabled("gunicorn_direct_write") else direct == 0


def test_a_client_that_closes_its_connection_is_freed_at_the_next_ping(web_server, owner):
    from shared.events import EventLog

    turn_id = running_turn(owner)
    channel = EventLog("turn", turn_id).channel
    sock = open_stream(web_server, turn_id, owner)
    assert subscribers(channel) == 1
    closed_at = time.monotonic()
    sock.close()  # a FIN: writing a ping to it still succeeds
    wait_for(lambda: subscribers(channel) == 0, 3 * PING, "the closed stream freed")
    # the next ping is due within a ping of the last write, woken at the tick after (a quarter ping)
    assert time.monotonic() - closed_at < 1.25 * PING + 0.4


def test_a_thousand_connects_and_disconnects_leave_no_descriptors_greenlets_or_subscriptions(
    web_server, owner, stack, http
):
    from shared.events import EventLog

    turns = [running_turn(owner) for _ in range(2)]
    pid = web_pid(stack)

    def fds() -> int:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))

    def cycles(n: int) -> None:
        for k in range(n):
            sock = open_stream(web_server, turns[k % 2], owner)
            if k % 2:
                reset(sock)
            else:
                sock.close()  # a FIN: the server learns at its next write
        wait_for(lambda: relay_stats(http)["streams"] == base_streams, 2 * PING + 2, "every stream freed")

    base_streams = relay_stats(http)["streams"]
    cycles(300)  # warm-up: the database and Redis pools grow to what this load needs
    before, fds_before = relay_stats(http), fds()
    cycles(1000)
    after = relay_stats(http)
    assert after["channels"] == before["channels"]
    assert after["greenlets"] <= before["greenlets"] + 2, (before, after)
    assert fds() <= fds_before + 2, (fds_before, fds(), sockets(pid))
    assert all(subscribers(EventLog("turn", t).channel) == 0 for t in turns)


# 5. A lost Pub/Sub connection.


def test_events_published_while_the_relay_reconnects_arrive_with_no_gap(http, owner):
    from shared.events import EventLog
    from shared.redis import get_redis

    turn_id = running_turn(owner)
    log = EventLog("turn", turn_id)
    log.append("turn.started", attempt=1)

    def cut(n):
        if n == 1:
            get_redis().client_kill_filter(_type="pubsub")  # every relay's connection
            for k in range(5):  # published while no relay listens
                log.append("message.delta", delta=str(k))
            log.append("turn.completed", answer="01234")

    start = time.monotonic()
    _, events = read_events(http, f"/api/turns/{turn_id}/events", headers=owner, on_event=cut)
    assert [e.seq for e in events] == list(range(1, 8))
    assert "".join(e.data["delta"] for e in events if e.event == "message.delta") == "01234"
    assert time.monotonic() - start < 3  # re-read at the reconnect, not at the idle check


# 6. Join from anywhere: a session's stream.


def follow_session(http, owner, sid, terminals: int, headers: dict | None = None, on_event=None) -> list:
    """Read a session's stream until `terminals` turns ended."""
    from tests.sse import ENDING_TYPES, iter_sse

    events = []
    with http.stream("GET", f"/api/sessions/{sid}/events", headers={**owner, **(headers or {})}) as response:
        assert response.status_code == 200, response.read()
        for item in iter_sse(response):
            if isinstance(item, tuple):
                continue
            events.append(item)
            if on_event is not None:
                on_event(len(events), item)
            if sum(e.event in ENDING_TYPES for e in events) == terminals:
                return events
    raise AssertionError(f"the session stream ended early: {[e.event for e in events]}")


def check_turn(events: list, turn_id: str, answer: str) -> None:
    mine = [e for e in events if e.data.get("turn_id") == turn_id]
    assert [e.id for e in mine] == [f"{turn_id}:{e.seq}" for e in mine]
    assert [e.seq for e in mine] == list(range(mine[0].seq, mine[0].seq + len(mine)))
    assert mine[-1].event == "turn.completed" and mine[-1].data["answer"] == answer
    assert "".join(e.data["delta"] for e in mine if e.event == "message.delta") == answer


def test_a_second_tab_joins_the_running_turn_and_follows_the_next(http, owner):
    sid = http.post("/api/sessions", json={}, headers=owner).json()["id"]
    first = http.post(f"/api/sessions/{sid}/turns", json={"message": "one [[tokens=30]] [[delay=0.03]]"}, headers=owner)
    first = first.json()
    read_events(http, first["events_url"], headers=owner, stop_after=3)  # the turn is running
    later = {}

    def submit_second(n, event):
        if n == 5:  # the second tab is in the middle of the first turn
            reply = http.post(f"/api/sessions/{sid}/turns", json={"message": "two [[tokens=5]]"}, headers=owner)
            later["turn"] = reply.json()

    events = follow_session(http, owner, sid, terminals=2, on_event=submit_second)
    assert events[0].data["turn_id"] == first["id"] and events[0].seq == 1  # joined from its start
    done = {t: http.get(f"/api/turns/{t}", headers=owner).json() for t in (first["id"], later["turn"]["id"])}
    for turn_id, turn in done.items():
        check_turn(events, turn_id, turn["answer"])
    assert [e.data["turn_id"] for e in events].index(later["turn"]["id"]) > len(
        [e for e in events if e.data["turn_id"] == first["id"]]
    ) - 1  # turns follow in order


def test_a_session_stream_resumes_from_its_last_event_id(http, owner):
    sid = http.post("/api/sessions", json={}, headers=owner).json()["id"]
    turn = http.post(
        f"/api/sessions/{sid}/turns", json={"message": "again [[tokens=20]] [[delay=0.03]]"}, headers=owner
    )
    turn = turn.json()
    head = []
    with http.stream("GET", f"/api/sessions/{sid}/events", headers=owner) as response:
        from tests.sse import iter_sse

        for item in iter_sse(response):
            if not isinstance(item, tuple):
                head.append(item)
                if len(head) == 6:
                    break
    tail = follow_session(http, owner, sid, terminals=1, headers={"Last-Event-ID": head[-1].id})
    check_turn(head + tail, turn["id"], http.get(f"/api/turns/{turn['id']}", headers=owner).json()["answer"])
    # a session stream names its position by turn; a bare seq is refused
    bad = http.get(f"/api/sessions/{sid}/events", headers={**owner, "Last-Event-ID": "7"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
