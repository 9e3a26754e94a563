"""The SSE relay: one Pub/Sub connection per web process, shared by every
stream of that process.

One reader (a greenlet under gunicorn's gevent worker; a thread elsewhere)
owns the connection. Streams register a bounded queue per channel;
SUBSCRIBE/UNSUBSCRIBE are reference-counted. The reader never blocks: a
stream whose queue is full is ended, and its client resumes from the event
log with Last-Event-ID. `close()` ends every stream the same way when the
process shuts down, so clients reconnect to another process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator

import redis

from shared.events import Event, EventLog
from shared.models import TERMINAL

# Snapshot statuses after which nothing more will come (turns; replays).
FINISHED = frozenset(TERMINAL) | {"finished"}

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
# A stream idle this many pings in a row asks Postgres whether its turn ended:
# a terminal event that never reached the log (Redis failed just after the
# turn's end committed) must not leave the client waiting forever.
IDLE_PINGS_BEFORE_CHECK = 4


class Subscription:
    __slots__ = ("channel", "queue", "ended")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=QUEUE_SIZE)
        # Set when the stream must end (its queue overflowed, the process is
        # shutting down); its client resumes from the log.
        self.ended = False

    def end(self) -> None:
        self.ended = True
        try:
            self.queue.put_nowait(b"")  # wake the stream
        except queue.Full:
            pass  # it has events to take, and sees `ended` after the next


class Relay:
    def __init__(self, client_factory: Callable[[], redis.Redis]) -> None:
        self._client_factory = client_factory
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = {}
        self._confirmed: dict[str, threading.Event] = {}
        self._pubsub: redis.client.PubSub | None = None
        self._reader: threading.Thread | None = None
        self._closed = False

    def subscribe(self, channel: str, timeout: float = 5.0) -> Subscription:
        """Register a stream; returns once Redis confirmed the subscription,
        so every event published from now on reaches the queue."""
        sub = Subscription(channel)
        if self._closed:
            sub.end()
        with self._lock:
            self._ensure_reader()
            subs = self._subs.setdefault(channel, set())
            subs.add(sub)
            if len(subs) == 1:
                self._confirmed[channel] = threading.Event()
                try:
                    self._pubsub.subscribe(channel)
                except redis.exceptions.RedisError:
                    self._drop(sub)  # else later streams would wait on a subscription never made
                    raise
            confirmed = self._confirmed[channel]
        if not confirmed.wait(timeout):
            self.unsubscribe(sub)
            raise redis.exceptions.ConnectionError("Redis did not confirm the subscription")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if not self._drop(sub):
                return
            try:
                self._pubsub.unsubscribe(sub.channel)
            except redis.exceptions.RedisError:
                log.warning("unsubscribe from %s failed; the reader resubscribes what is live", sub.channel)

    def _drop(self, sub: Subscription) -> bool:
        """Forget a stream (lock held); True if it was its channel's last."""
        subs = self._subs.get(sub.channel)
        if subs is None:
            return False
        subs.discard(sub)
        if subs:
            return False
        del self._subs[sub.channel]
        self._confirmed.pop(sub.channel, None)
        return True

    def close(self) -> None:
        """End every stream, now and from now on (the process is stopping)."""
        with self._lock:
            self._closed = True
            subs = [sub for subs in self._subs.values() for sub in subs]
        for sub in subs:
            sub.end()

    def _ensure_reader(self) -> None:
        if self._reader is not None:
            return
        self._pubsub = self._client_factory().pubsub()
        self._reader = threading.Thread(target=self._run, name="relay-reader", daemon=True)
        self._reader.start()

    def _run(self) -> None:
        while True:
            try:
                self._read()
            except redis.exceptions.RedisError as exc:
                log.warning("relay lost Redis (%s); reconnecting", exc)
                while not self._resubscribe():
                    time.sleep(0.5)

    def _read(self) -> None:
        while True:
            message = self._pubsub.get_message(timeout=1.0)
            if message is None or message["type"] not in ("message", "subscribe"):
                continue
            kind, channel = message["type"], message["channel"].decode()
            if kind == "message":
                for sub in tuple(self._subs.get(channel, ())):
                    try:
                        sub.queue.put_nowait(message["data"])
                    except queue.Full:
                        sub.ended = True
            elif kind == "subscribe":
                confirmed = self._confirmed.get(channel)
                if confirmed is not None:
                    confirmed.set()

    def _resubscribe(self) -> bool:
        """A new connection with every live channel; False while Redis is away.
        Streams notice events missed meanwhile on their next idle check (they
        re-read the log after their last seq), so nothing is lost."""
        with self._lock:
            try:
                self._pubsub.reset()
            except redis.exceptions.RedisError:
                pass
            client = self._client_factory()
            self._pubsub = client.pubsub()
            try:
                client.ping()  # with no channel to subscribe, this says Redis is back
                if self._subs:
                    self._pubsub.subscribe(*self._subs)
            except redis.exceptions.RedisError as exc:
                log.warning("relay: Redis still unreachable (%s)", exc)
                return False
            return True


def frame(event: Event) -> str:
    """One SSE message. Synthetic events (seq 0: accepted, snapshot) carry no
    id, so they never move the client's Last-Event-ID."""
    if event.seq == 0:
        return f"event: {event.type}\ndata: {event.raw}\n\n"
    return f"event: {event.type}\nid: {event.seq}\ndata: {event.raw}\n\n"


def relay_events(
    relay: Relay,
    events: EventLog,
    after: int,
    ping_seconds: float,
    snapshot: Callable[[], Event | None],
    finished: bool | None = None,
) -> Iterator[str]:
    """Yield SSE frames after `after` until the terminal event.

    Subscribe first, then read the backlog from the stream, then drain live
    events skipping any seq already sent: no gap and no duplicate. When idle
    (every ping), re-read the stream after the last seq sent, so an event lost
    in Pub/Sub is still delivered; if the log is gone, `snapshot()` supplies
    the state from Postgres, as it does every IDLE_PINGS_BEFORE_CHECK idle
    pings, so a stream whose terminal event was lost still ends.
    `finished`, when the caller knows: a new stream (after 0) of a turn not
    yet ended waits for its events without asking Postgres; one of a turn
    that ended, with nothing after `after` held, gets its end from Postgres.
    """
    sub = relay.subscribe(events.channel)
    last = after
    idle = 0  # pings in a row with nothing to send

    def snapshot_or_log() -> tuple[Event | None, list[Event]]:
        """With nothing held after `last`: Postgres's state, or (when the turn
        ended but its log now holds events after `last`) those events. A turn
        can run from start to end between the first read of the log and the
        snapshot; its events then beat a snapshot without usage or tools."""
        snap = snapshot()
        if snap is None or snap.data["status"] not in FINISHED:
            return snap, []
        written = events.read_after(last)
        return (None, written) if written else (snap, [])

    def deliver(batch: list[Event]) -> Generator[str, None, bool]:
        """Frames for events after `last`; returns True once the stream is
        over. Events missing before the batch (trimmed, or lost with Redis)
        are reported with a snapshot first."""
        nonlocal last
        if batch and batch[0].seq > last + 1:
            snap = snapshot()
            if snap is not None:
                yield frame(snap)
                if snap.data["status"] in FINISHED:
                    return True
        for event in batch:
            yield frame(event)
            last = event.seq
            if event.terminal:
                return True
        return False

    try:
        yield "retry: 2000\n\n"
        backlog = events.read_after(last)
        if finished is False and last == 0:
            gone = False  # a turn not yet ended: its events come through the subscription
        elif finished:
            gone = True  # it ended, and its end is not in the log after `last`
        else:
            gone = events.last_seq() < max(last, 1)  # the log does not reach `last`
        if not backlog and gone:
            # Not written yet, expired, lost, or missing its end: say which with
            # Postgres's state.
            snap, backlog = snapshot_or_log()
            if snap is not None and (snap.data["status"] in FINISHED or last > 0):
                yield frame(snap)
                if snap.data["status"] in FINISHED:
                    return
        if (yield from deliver(backlog)):
            return
        while True:
            try:
                raw = sub.queue.get(timeout=ping_seconds)
            except queue.Empty:
                yield ": ping\n\n"
                idle += 1
                missed = events.read_after(last)
                if not missed and (events.last_seq() == 0 or idle % IDLE_PINGS_BEFORE_CHECK == 0):
                    snap, missed = snapshot_or_log()
                    if snap is not None and snap.data["status"] in FINISHED:
                        yield frame(snap)
                        return
                if (yield from deliver(missed)):
                    return
                continue
            if sub.ended:
                return  # the client reconnects and resumes from the log
            event = Event.parse(raw)
            idle = 0
            if event.seq <= last:
                continue
            if (yield from deliver([event] if event.seq == last + 1 else events.read_after(last))):
                return
    finally:
        relay.unsubscribe(sub)
