"""The SSE relay: one Pub/Sub connection per web process, shared by every
stream of that process.

One reader (a greenlet under gunicorn's gevent worker; a thread elsewhere)
owns the connection. Each stream has a bounded queue on its channel;
SUBSCRIBE/UNSUBSCRIBE are reference-counted per channel. The reader never
blocks: a stream whose queue is full is ended, and its client resumes from
the event log with Last-Event-ID. `close()` ends every stream the same way
when the process shuts down, so clients reconnect to another process.

The hot path is cheap per client: the reader turns a message into its SSE
frame once (seq and type are read from the JSON's fixed prefix, not parsed).
A stream waiting for its next event, under gunicorn's gevent worker, takes it
straight from the reader: one non-blocking send of the frame, already framed
as an HTTP chunk, on the stream's socket, with no wake-up and no switch to
the stream's greenlet. Any other case (the socket's buffer is full, a gap in
the seqs, the terminal event, a stream busy writing) queues the frame and
wakes the channel's streams with one notification; a stream writes all the
frames queued since its last write in one chunk (one send). Idle streams wait
with no timer of their own: a ticker wakes each when its ping is due.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import NamedTuple

import redis
from flask import Response, request
from sqlalchemy.exc import SQLAlchemyError

from shared.events import TERMINAL_TYPES, Event, EventLog, peek
from shared.models import TERMINAL
from web.errors import ApiError

# Snapshot statuses after which nothing more will come (turns; replays).
FINISHED = frozenset(TERMINAL) | {"finished"}
_TERMINAL = frozenset(t.encode() for t in TERMINAL_TYPES)

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
# A stream idle this many pings in a row re-reads its log and asks Postgres
# whether its turn ended: a terminal event that never reached the log (Redis
# failed just after the turn's end committed) or whose Pub/Sub message was
# lost must not leave the client waiting forever.
IDLE_PINGS_BEFORE_CHECK = 4

# Idle streams the ticker wakes at once before it lets other work in.
WAKE_BATCH = 50

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING = b": ping\n\n"
RETRY = b"retry: 2000\n\n"


class Frame(NamedTuple):
    seq: int
    terminal: bool
    data: bytes  # the whole SSE message, encoded once
    chunk: bytes  # the same as an HTTP/1.1 chunk, as a direct send writes it


def encode(raw: bytes) -> Frame:
    """The frame of one logged event (its JSON as published)."""
    seq, type_ = peek(raw)
    data = b"event: %s\nid: %d\ndata: %s\n\n" % (type_, seq, raw)
    return Frame(seq, type_ in _TERMINAL, data, b"%X\r\n%s\r\n" % (len(data), data))


def frame(event: Event) -> bytes:
    """The frame of an Event. Synthetic events (seq 0: accepted, snapshot)
    carry no id, so they never move the client's Last-Event-ID."""
    if event.seq == 0:
        return f"event: {event.type}\ndata: {event.raw}\n\n".encode()
    return encode(event.raw.encode()).data


class Channel:
    """A subscribed channel: its streams, and the wake-ups they wait on.
    A message is queued on each stream, then the channel's waiters are woken
    together (one notification per message, not one per stream).

    Streams wait in lanes of up to WAKE_BATCH (a channel with one stream has
    one lane), so the ticker can wake a crowded channel's idle streams a
    lane at a time: a thousand clients of one turn that left together would
    otherwise fail their pings in one pass, holding every other stream."""

    __slots__ = ("name", "subs", "lanes", "confirmed")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.subs: set[Subscription] = set()
        self.lanes = [threading.Event()]  # gevent Events under gunicorn
        self.confirmed = threading.Event()  # Redis confirmed the SUBSCRIBE

    def lane_for_new_stream(self) -> int:
        """Streams join one at a time, so a new lane is at most the next one."""
        lane = len(self.subs) // WAKE_BATCH
        if lane == len(self.lanes):
            self.lanes.append(threading.Event())
        return lane

    def notify(self, lane: int | None = None) -> None:
        """Wake the streams of one lane, or of all."""
        lanes = self.lanes
        for at in range(len(lanes)) if lane is None else (lane,):
            event, lanes[at] = lanes[at], threading.Event()
            event.set()


class Subscription:
    """One stream's queue of frames: filled by the reader, drained by the
    stream; or, while the stream waits (`parked`), written by the reader
    straight to the stream's socket."""

    __slots__ = (
        "channel",
        "lane",
        "pending",
        "ended",
        "recheck",
        "wake_tick",
        "sock",
        "parked",
        "last",
        "sent",
        "rest",
    )

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lane = channel.lane_for_new_stream()
        self.pending: deque[Frame] = deque()
        # Set when the stream must end (its queue overflowed, the process is
        # shutting down); its client resumes from the log.
        self.ended = False
        # Set when the reader reconnected: events published meanwhile are only
        # in the log, so the stream re-reads it.
        self.recheck = False
        self.wake_tick = 0  # the relay's tick at which it asked to be woken
        # Direct sends: the OS socket (None: never), set while the stream
        # waits with nothing queued and `last` its last seq written; `sent`
        # is when the reader last wrote, `rest` what a partial send left.
        self.sock: socket.socket | None = None
        self.parked = False
        self.last = 0
        self.sent = 0.0
        self.rest = b""

    def offer(self, item: Frame, now: float) -> bool:
        """Write the frame to the waiting stream's socket (True), or queue it
        (False: the channel must be notified). Only the next seq, never the
        terminal one, and only what the socket takes at once: the rest of a
        partial send is the stream's to write, before anything else."""
        if self.parked and item.seq == self.last + 1 and not item.terminal and not self.pending and not self.rest:
            try:
                n = self.sock.send(item.chunk, socket.MSG_DONTWAIT)
            except OSError:
                n = 0  # full, or broken: the stream's own write tells which
            if n:
                self.last, self.sent = item.seq, now
                if n == len(item.chunk):
                    return True
                self.rest = item.chunk[n:]
                return False
        self.push(item)
        return False

    def push(self, item: Frame) -> None:
        """Queue a frame (the reader; it then notifies the channel); never blocks."""
        if len(self.pending) >= QUEUE_SIZE:
            self.ended = True
        else:
            self.pending.append(item)

    def end(self) -> None:
        self.ended = True
        self.channel.notify()

    def poke(self) -> None:
        self.recheck = True
        self.channel.notify()

    def take(self) -> list[Frame]:
        """Every frame queued; with none, waits for the channel's next wake-up
        (a message, or the relay's tick) and returns what came ([] if none)."""
        event = self.channel.lanes[self.lane]  # before looking: a message queued after it sets this one
        if not self.pending and not self.ended and not self.recheck:
            event.wait()
        pending = self.pending
        return [pending.popleft() for _ in range(len(pending))]


class Relay:
    def __init__(self, client_factory: Callable[[], redis.Redis], ping_seconds: float) -> None:
        self._client_factory = client_factory
        self.ping_seconds = ping_seconds
        # Idle streams ask to be woken when their ping is due; the ticker wakes
        # them at the next tick after that (ping_seconds / 4 later at most), and
        # only them: waking every stream at every tick makes each pass of the
        # scheduler as long as the number of streams.
        self._tick = ping_seconds / 4
        self._due: dict[int, set[Channel]] = {}  # tick number -> channels to wake
        self._ticked = int(time.monotonic() / self._tick)  # the last tick woken
        self._lock = threading.Lock()
        self._channels: dict[bytes, Channel] = {}
        self._conn: redis.connection.AbstractConnection | None = None  # subscribed mode, read by the reader
        self._reader: threading.Thread | None = None
        self._closed = False

    def subscribe(self, channel: str, timeout: float = 5.0) -> Subscription:
        """Register a stream; returns once Redis confirmed the subscription,
        so every event published from now on reaches the queue."""
        name = channel.encode()
        with self._lock:
            self._ensure_reader()
            chan = self._channels.get(name)
            if chan is None:
                chan = self._channels[name] = Channel(name)
                try:
                    self._send("SUBSCRIBE", name)
                except redis.exceptions.RedisError:
                    del self._channels[name]  # else later streams would wait on a subscription never made
                    raise
            sub = Subscription(chan)
            chan.subs.add(sub)
        if self._closed:
            sub.ended = True
        if not chan.confirmed.wait(timeout):
            self.unsubscribe(sub)
            raise redis.exceptions.ConnectionError("Redis did not confirm the subscription")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        chan = sub.channel
        with self._lock:
            chan.subs.discard(sub)
            if chan.subs or self._channels.get(chan.name) is not chan:
                return
            del self._channels[chan.name]
            try:
                self._send("UNSUBSCRIBE", chan.name)
            except redis.exceptions.RedisError:
                log.warning("unsubscribe from %s failed; the reader resubscribes what is live", chan.name)

    def stats(self) -> dict[str, int]:
        """Channels subscribed and streams registered (for health and tests)."""
        with self._lock:
            return {"channels": len(self._channels), "streams": sum(len(c.subs) for c in self._channels.values())}

    def close(self) -> None:
        """End every stream, now and from now on (the process is stopping)."""
        self._closed = True
        self._each(Subscription.end)

    def _each(self, action: Callable[[Subscription], None]) -> None:
        with self._lock:
            subs = [sub for chan in self._channels.values() for sub in chan.subs]
        for sub in subs:
            action(sub)

    def _ensure_reader(self) -> None:
        if self._reader is not None:
            return
        self._conn = self._connect()
        self._reader = threading.Thread(target=self._run, name="relay-reader", daemon=True)
        self._reader.start()
        threading.Thread(target=self._ticker, name="relay-ticker", daemon=True).start()

    def _connect(self) -> redis.connection.AbstractConnection:
        """A connection of its own (redis-py's: TLS, auth and the hiredis
        parser), used in subscribed mode without redis-py's PubSub layer,
        which costs more per message than everything else the relay does."""
        conn = self._client_factory().connection_pool.make_connection()
        conn.connect()
        return conn

    def _send(self, *command: str | bytes) -> None:
        """Send a (UN)SUBSCRIBE; the reader takes the reply. Lock held, so
        commands of two greenlets never interleave on the socket."""
        self._conn.send_command(*command, check_health=False)

    def wake_at(self, sub: Subscription, when: float) -> None:
        """Wake the stream's channel at the first tick after `when` (monotonic)."""
        tick = max(int(when / self._tick) + 1, self._ticked + 1)
        if sub.wake_tick != tick:
            sub.wake_tick = tick
            self._due.setdefault(tick, set()).add(sub.channel)

    def _ticker(self) -> None:
        while True:
            time.sleep(self._tick)
            now = int(time.monotonic() / self._tick)
            for tick in range(self._ticked + 1, now + 1):
                self._ticked = tick
                woken = 0
                for chan in self._due.pop(tick, ()):
                    for lane in range(len(chan.lanes)):
                        chan.notify(lane)
                        woken += min(len(chan.subs), WAKE_BATCH)  # about a lane's streams
                        if woken >= WAKE_BATCH:
                            # Streams that went quiet together are due together:
                            # a burst of clients that left all fail their ping
                            # at once. Wake them a batch at a time, with the
                            # hub's I/O in between, so live streams are not
                            # held behind them.
                            woken = 0
                            time.sleep(0.001)

    def _run(self) -> None:
        while True:
            try:
                self._read()
            except redis.exceptions.RedisError as exc:
                log.warning("relay lost Redis (%s); reconnecting", exc)
                while not self._resubscribe():
                    time.sleep(0.5)
                self._each(Subscription.poke)  # events published meanwhile are in the logs

    def _read(self) -> None:
        """Take messages as they come: a socket read brings many, which the
        parser then hands out one by one without another read."""
        channel_of = self._channels.get
        read = self._conn.read_response
        while True:
            reply = read()
            kind = reply[0]
            if kind == b"message":
                chan = channel_of(reply[1])
                if chan is not None:
                    try:
                        item = encode(reply[2])
                    except (ValueError, KeyError):
                        log.warning("relay: not an event on %s: %.200r", reply[1], reply[2])
                        continue
                    now, queued = time.monotonic(), False
                    for sub in tuple(chan.subs):
                        if not sub.offer(item, now):
                            queued = True
                    if queued:
                        chan.notify()
            elif kind == b"subscribe":
                chan = channel_of(reply[1])
                if chan is not None:
                    chan.confirmed.set()

    def _resubscribe(self) -> bool:
        """A new connection with every live channel; False while Redis is away."""
        with self._lock:
            self._conn.disconnect()
            try:
                self._conn = self._connect()
                if self._channels:
                    self._send("SUBSCRIBE", *self._channels)
            except redis.exceptions.RedisError as exc:
                log.warning("relay: Redis still unreachable (%s)", exc)
                return False
            return True


def relay_events(
    relay: Relay,
    events: EventLog,
    after: int,
    snapshot: Callable[[], Event | None],
    finished: bool | None = None,
    sock: socket.socket | None = None,
) -> Generator[bytes, None, int | None]:
    """Yield SSE frames after `after` until the terminal event; returns the
    last seq sent once the terminal event went out, None if the stream had
    to end before (the client resumes from the log).

    Subscribe first, then read the backlog from the stream, then drain live
    events skipping any seq already sent: no gap and no duplicate. Events
    missing before a batch (trimmed, lost with Redis, or published while the
    reader reconnected) are read from the log, and what the log lacks is
    reported with `snapshot()` (the state from Postgres). Every
    IDLE_PINGS_BEFORE_CHECK idle pings the stream re-reads its log and asks
    Postgres, so a stream whose terminal event was lost still ends.
    `finished`, when the caller knows: a new stream (after 0) of a turn not
    yet ended waits for its events without asking Postgres; one of a turn
    that ended, with nothing after `after` held, gets its end from Postgres.
    `sock`, from `direct_socket()`: the reader may write to it while the
    stream waits (the frames yielded must then go out as they are, unprefixed).
    """
    sub = relay.subscribe(events.channel)
    sub.sock = None if sock is None else getattr(sock, "_sock", sock)  # the OS socket, under gevent's
    last = after

    def logged() -> list[Frame]:
        return [encode(raw) for raw in events.read_raw_after(last)]

    def check() -> tuple[Event | None, list[Frame]]:
        """With nothing new in the live queue: the log after `last`, or (when
        it holds nothing) Postgres's state. A turn can run from start to end
        between a read of the log and the snapshot; its events then beat a
        snapshot without usage or tools, so the log is read again."""
        held = logged()
        if held:
            return None, held
        snap = snapshot()
        if snap is None or snap.data["status"] not in FINISHED:
            return snap, []
        held = logged()
        return (None, held) if held else (snap, [])

    def take(batch: list[Frame], out: list[bytes]) -> bool:
        """Add the frames after `last` to `out`; True once the stream is over.
        Where events are missing after `last`, they are taken from the log
        (which holds every event before it is published); what it lacks too
        is reported with a snapshot first. (One function, not two calling
        each other: closures that refer to each other are a reference cycle,
        which only the garbage collector's full passes would free.)"""
        nonlocal last
        at = 0
        while at < len(batch):
            item = batch[at]
            at += 1
            if item.seq <= last:
                continue
            if item.seq != last + 1:
                batch, at = logged() or batch[at - 1 :], 0
                if batch[0].seq > last + 1:
                    snap = snapshot()
                    if snap is not None:
                        out.append(frame(snap))
                        if snap.data["status"] in FINISHED:
                            return True
                    last = batch[0].seq - 1
                continue
            out.append(item.data)
            last = item.seq
            if item.terminal:
                return True
        return False

    try:
        yield RETRY
        out: list[bytes] = []
        backlog = logged()
        if finished is False and last == 0:
            gone = False  # a turn not yet ended: its events come through the subscription
        elif finished:
            gone = True  # it ended, and its end is not in the log after `last`
        else:
            gone = events.last_seq() < max(last, 1)  # the log does not reach `last`
        if not backlog and gone:
            # Not written yet, expired, lost, or missing its end: say which with
            # Postgres's state.
            snap, backlog = check()
            if snap is not None and (snap.data["status"] in FINISHED or last > 0):
                yield frame(snap)
                if snap.data["status"] in FINISHED:
                    return last
        done = take(backlog, out)
        # Pings in a row with nothing to send, and the last write. Streams that
        # opened together (a reconnect storm) start at random points of the
        # cycle, so their pings and idle checks do not all fall at once.
        idle = random.randrange(IDLE_PINGS_BEFORE_CHECK)
        written = time.monotonic() - random.random() * relay.ping_seconds
        while True:
            if out:
                yield b"".join(out)
                out.clear()
                written = time.monotonic()
            if done:
                return last
            relay.wake_at(sub, written + relay.ping_seconds)
            if sock is not None:
                sub.last, sub.parked = last, True
            batch = sub.take()
            if sub.parked:
                sub.parked = False
                if sub.last != last:  # the reader wrote to the socket meanwhile
                    last, written, idle = sub.last, sub.sent, 0
                if sub.rest:
                    rest, sub.rest = sub.rest, b""
                    try:
                        sock.sendall(rest)  # gevent's: waits for the client, up to the socket's timeout
                    except OSError:
                        return None
            if sub.ended:
                return None  # the client reconnects and resumes from the log
            if batch:
                idle = 0
                done = take(batch, out)
                continue
            if not sub.recheck:
                if time.monotonic() - written < relay.ping_seconds:
                    continue
                yield PING
                written = time.monotonic()
                idle += 1
                if idle % IDLE_PINGS_BEFORE_CHECK:
                    continue
            sub.recheck = False
            try:
                snap, held = check()
            except (redis.RedisError, SQLAlchemyError) as exc:
                log.warning("idle check of %s failed (%s); the next one retries", sub.channel.name, exc)
                continue
            if snap is not None and snap.data["status"] in FINISHED:
                yield frame(snap)
                return last
            done = take(held, out)
    finally:
        relay.unsubscribe(sub)


def delivered(events: EventLog, ended: bool, after: int) -> bool:
    """Whether a client holding `after` has every event of a turn that ended."""
    if not ended:
        return False
    end = events.last_event()
    return end is not None and end.terminal and after >= end.seq


def prefixed(frames: Generator[bytes, None, int | None], prefix: bytes) -> Generator[bytes, None, int | None]:
    """A turn's frames inside a session's stream: each id becomes `<turn id>:<seq>`."""
    try:
        while True:
            try:
                chunk = next(frames)
            except StopIteration as stop:
                return stop.value
            yield chunk.replace(b"\nid: ", b"\nid: " + prefix)
    finally:
        frames.close()


def wait_for_message(relay: Relay, sub: Subscription) -> Generator[bytes, None, bool]:
    """Ping until the subscription's channel carries a message (True), an
    idle check is due (True), or the stream must end (False)."""
    written, idle = time.monotonic(), 0
    while True:
        relay.wake_at(sub, written + relay.ping_seconds)
        batch = sub.take()
        if sub.ended:
            return False
        if batch or sub.recheck:
            sub.recheck = False
            return True
        if time.monotonic() - written >= relay.ping_seconds:
            yield PING
            written, idle = time.monotonic(), idle + 1
            if idle % IDLE_PINGS_BEFORE_CHECK == 0:
                return True


def last_event_id() -> str:
    """The client's Last-Event-ID header (or ?after=), "0" if none."""
    return request.headers.get("Last-Event-ID") or request.args.get("after") or "0"


def parse_seq(raw: str) -> int:
    try:
        after = int(raw)
    except ValueError:
        raise ApiError(422, "Last-Event-ID (or after) must be a whole number", {"field": "after"}) from None
    if after < 0:
        raise ApiError(422, "Last-Event-ID (or after) must not be negative", {"field": "after"})
    return after


def direct_socket() -> socket.socket | None:
    """The request's socket, if the relay's reader may write a stream's
    frames to it itself: under gunicorn's gevent worker (reader and stream
    are greenlets of one thread, so they never write at once), without TLS
    in the process, and in a chunked response (HTTP/1.1, not HEAD), whose
    framing each direct send carries."""
    env = request.environ
    sock = env.get("gunicorn.socket")
    if sock is None or not type(sock).__module__.startswith("gevent") or hasattr(sock, "cipher"):
        return None
    if env.get("SERVER_PROTOCOL") != "HTTP/1.1" or env.get("REQUEST_METHOD") == "HEAD":
        return None
    return sock


def sse_response(frames: Iterable[bytes], ping_seconds: float) -> Response:
    """A streaming SSE response. A client that stops reading (its socket
    blocks a write) or whose host vanished (sent data stays unacknowledged)
    is dropped after two pings, and one that closed its connection at its
    next ping, so its greenlet, socket and subscription are freed; it
    resumes from the log if it comes back."""
    deadline = 2 * ping_seconds
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(deadline)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(deadline * 1000))
        frames = _until_closed(frames, getattr(sock, "_sock", sock))
    # No request context rides along (the frames need none), and bytes pass
    # through as they are.
    return Response(frames, mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True)


def _until_closed(frames: Iterable[bytes], sock: socket.socket) -> Iterator[bytes]:
    """The frames until the client closes its end, looked at before each
    ping: a write to a closed connection succeeds (the peer answers it with
    a reset), so without looking the stream would live to the ping after.
    `sock` is the OS socket itself (gevent's wrapper would wait for data)."""
    try:
        for chunk in frames:
            if chunk == PING and _closed(sock):
                return
            yield chunk
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing sent: an SSE client sends nothing after its request
    except OSError:
        return True
