"""One client's stream of a log's events, resumed from its Last-Event-ID.

Subscribe first, then read the backlog from the log, then drain live
events skipping any seq already sent: no gap and no duplicate. Events
missing before a batch (trimmed, lost with Redis, or published while the
reader reconnected) are read from the log, and what the log lacks is
reported with a snapshot (the state from Postgres). Every
IDLE_PINGS_BEFORE_CHECK idle pings the stream re-reads its log and asks
Postgres, so a stream whose last event was lost still ends.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable, Generator

import redis
from flask import request
from sqlalchemy.exc import SQLAlchemyError

from shared import metrics
from shared.events import EventLog
from shared.overrides.gunicorn_direct_write import os_socket
from web.errors import ApiError
from web.relay.frames import PING, RETRY, Frame, encode
from web.relay.hub import DELIVERY_SAMPLE, Relay, Subscription
from web.relay.snapshots import Snapshot

log = logging.getLogger(__name__)

# A stream idle this many pings in a row re-reads its log and asks Postgres
# whether its turn ended: a last event that never reached the log (Redis
# failed just after the turn's end committed) or whose Pub/Sub message was
# lost must not leave the client waiting forever.
IDLE_PINGS_BEFORE_CHECK = 4

Frames = Generator[bytes, None, "int | None"]


class Resume:
    """The frames of `events` after seq `after` until the log's last event.

    `snapshot()` is the state from Postgres (None: nothing there).
    `ended`, when the caller knows it: a new stream (after 0) of a turn not
    yet ended waits for its events without asking Postgres; one of a turn
    that ended, with nothing after `after` held, gets its end from Postgres.
    `sock`, from `writable_socket()`: the hub may write to it while the
    stream waits (the frames yielded must then go out as they are, unprefixed).
    """

    def __init__(
        self,
        relay: Relay,
        events: EventLog,
        after: int,
        snapshot: Callable[[], Snapshot | None],
        ended: bool | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.relay = relay
        self.events = events
        self.snapshot = snapshot
        self.ended = ended
        self.sock = sock if relay.direct_writes else None
        self.last = after  # the last seq the client has

    def frames(self) -> Frames:
        """Yield SSE frames; returns the last seq sent once the log's last
        event went out, None if the stream had to end before (the client
        resumes from the log)."""
        relay = self.relay
        sub = relay.subscribe(self.events.channel)
        sub.sock = None if self.sock is None else os_socket(self.sock)
        try:
            yield RETRY
            out: list[bytes] = []
            snap, backlog = self._start()
            if snap is not None:
                yield snap.frame
                if snap.ended:
                    return self.last
            done = self._take(backlog, out)
            # Pings in a row with nothing to send, and the last write. Streams
            # that opened together (a reconnect storm) start at random points
            # of the cycle, so their pings and idle checks do not all fall at once.
            idle = random.randrange(IDLE_PINGS_BEFORE_CHECK)
            written = time.monotonic() - random.random() * relay.ping_seconds
            while True:
                if out:
                    yield b"".join(out)
                    out.clear()
                    written = time.monotonic()
                if done:
                    return self.last
                relay.wake_at(sub, written + relay.ping_seconds)
                batch = self._wait(sub)
                if batch is None:
                    return None  # the client reconnects and resumes from the log
                if sub.sent > written:  # the hub wrote to the socket meanwhile
                    written, idle = sub.sent, 0
                if batch:
                    idle = 0
                    done = self._take(batch, out)
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
                    snap, held = self._check()
                except (redis.RedisError, SQLAlchemyError) as exc:
                    log.warning("idle check of %s failed (%s); the next one retries", sub.channel.name, exc)
                    continue
                if snap is not None and snap.ended:
                    yield snap.frame
                    return self.last
                done = self._take(held, out)
        finally:
            relay.unsubscribe(sub)

    def _start(self) -> tuple[Snapshot | None, list[Frame]]:
        """The backlog, and the snapshot to send first, if the log cannot
        say where the stream stands: not written yet, expired, lost, or
        missing its end."""
        backlog = self._logged()
        if backlog:
            return None, backlog
        if self.ended is False and self.last == 0:
            return None, []  # a turn not yet ended: its events come through the subscription
        if not self.ended and self.events.last_seq() >= max(self.last, 1):
            return None, []  # the log reaches `last`: the rest is to come
        snap, backlog = self._check()
        if snap is not None and (snap.ended or self.last > 0):
            return snap, backlog
        return None, backlog

    def _wait(self, sub: Subscription) -> list[Frame] | None:
        """The frames queued next (after any the hub wrote directly while the
        stream waited); None if the stream must end."""
        sub.last, sub.parked = self.last, self.sock is not None
        batch = sub.take()
        if sub.parked:
            sub.parked = False
            self.last = sub.last
            if sub.rest:
                rest, sub.rest = sub.rest, b""
                try:
                    self.sock.sendall(rest)  # gevent's: waits for the client, up to the socket's timeout
                except OSError:
                    metrics.RELAY_DROPPED.labels("not_reading").inc()
                    return None
        return None if sub.ended else batch

    def _logged(self) -> list[Frame]:
        return [encode(raw) for raw in self.events.read_raw_after(self.last)]

    def _check(self) -> tuple[Snapshot | None, list[Frame]]:
        """With nothing new in the live queue: the log after `last`, or (when
        it holds nothing) Postgres's state. A turn can run from start to end
        between a read of the log and the snapshot; its events then beat a
        snapshot without usage or tools, so the log is read again."""
        held = self._logged()
        if held:
            return None, held
        snap = self.snapshot()
        if snap is None or not snap.ended:
            return snap, []
        held = self._logged()
        return (None, held) if held else (snap, [])

    def _take(self, batch: list[Frame], out: list[bytes]) -> bool:
        """Add the frames after `last` to `out`; True once the stream is over.
        Where events are missing after `last`, they are taken from the log
        (which holds every event before it is published); what it lacks too
        is reported with a snapshot first."""
        if batch and batch[0].received and DELIVERY_SAMPLE():  # the batch's oldest, once in 16 batches
            metrics.RELAY_DELIVERY.observe(time.monotonic() - batch[0].received)
        at = 0
        while at < len(batch):
            item = batch[at]
            at += 1
            if item.seq <= self.last:
                continue
            if item.seq != self.last + 1:
                batch, at = self._logged() or batch[at - 1 :], 0
                if batch[0].seq > self.last + 1:
                    snap = self.snapshot()
                    if snap is not None:
                        out.append(snap.frame)
                        if snap.ended:
                            return True
                    self.last = batch[0].seq - 1
                continue
            out.append(item.data)
            self.last = item.seq
            if item.ending:
                return True
        return False


def delivered(events: EventLog, ended: bool, after: int) -> bool:
    """Whether a client holding `after` has every event of a turn that ended."""
    if not ended:
        return False
    end = events.last_event()
    return end is not None and end.ending and after >= end.seq


def prefixed(frames: Frames, prefix: bytes) -> Frames:
    """A turn's frames inside a session's stream: each id becomes `<turn id>:<seq>`."""
    try:
        while True:
            try:
                data = next(frames)
            except StopIteration as stop:
                return stop.value
            yield data.replace(b"\nid: ", b"\nid: " + prefix)
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


# Redis stream entry ids are 64-bit; a log's seqs stay far below this.
MAX_SEQ = 2**63 - 1


def parse_seq(raw: str) -> int:
    try:
        after = int(raw)
    except ValueError:
        raise ApiError(422, "Last-Event-ID (or after) must be a whole number", {"field": "after"}) from None
    if not 0 <= after <= MAX_SEQ:
        raise ApiError(422, f"Last-Event-ID (or after) must be between 0 and {MAX_SEQ}", {"field": "after"})
    return after
