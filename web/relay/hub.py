"""One Pub/Sub connection per web process, shared by every stream of that
process.

One reader (a greenlet under gunicorn's gevent worker; a thread elsewhere)
owns the connection. Each stream has a bounded queue on its channel;
SUBSCRIBE/UNSUBSCRIBE are reference-counted per channel. The reader never
blocks: a stream whose queue is full is ended, and its client resumes from
the event log with Last-Event-ID. `close()` ends every stream the same way
when the process shuts down, so clients reconnect to another process.

The hot path is cheap per client: the reader turns a message into its SSE
frame once (seq and type are read from the JSON's fixed prefix, not
parsed). A stream waiting for its next event may be written to by the reader
itself (shared/overrides/gunicorn_direct_write.py): one non-blocking send of
the frame, with no wake-up and no switch to the stream's greenlet. Any other
case (the socket's buffer is full, a gap in the seqs, the log's last event,
a stream busy writing, direct writes off) queues the frame and wakes the
channel's streams with one notification; a stream writes all the frames
queued since its last write in one chunk (one send). Idle streams wait with
no timer of their own: a ticker wakes each when its ping is due.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from tenacity import Retrying, retry_if_exception_type, wait_fixed

from shared import metrics, overrides
from shared.overrides.gunicorn_direct_write import send_now
from shared.overrides.redis_pubsub import RawSubscriber
from web.relay.frames import Frame, encode

log = logging.getLogger(__name__)

# One write in 16 (of a message's direct writes, of a stream's batch) is
# timed: a figure per delivery would cost the hot path a good part of what
# the delivery costs.
DELIVERY_SAMPLE = metrics.Sampler(16)

QUEUE_SIZE = 1000
# Idle streams the ticker wakes at once before it lets other work in.
WAKE_BATCH = 50


class LibrarySubscriber:
    """The relay's connection through redis-py's PubSub (the override
    `redis_pubsub` off), with the same three calls as `RawSubscriber`."""

    # get_message(timeout=None) fails when nothing is subscribed (redis-py 8.1
    # subtracts from None), so it waits in bounded slices.
    _WAIT = 60.0

    def __init__(self, client: redis.Redis) -> None:
        self._pubsub = client.pubsub()

    def send(self, command: str, *channels: bytes) -> None:
        getattr(self._pubsub, command.lower())(*channels)

    def read(self) -> list[Any]:
        while True:
            message = self._pubsub.get_message(timeout=self._WAIT)
            if message is not None:
                return [message["type"].encode(), message["channel"], message["data"]]

    def close(self) -> None:
        self._pubsub.close()


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
        # Direct writes: the OS socket (None: never), written while the
        # stream waits with nothing queued (`parked`) and `last` its last seq
        # written; `sent` is when the reader last wrote, `rest` what a partial
        # send left.
        self.sock: socket.socket | None = None
        self.parked = False
        self.last = 0
        self.sent = 0.0
        self.rest = b""

    def offer(self, item: Frame, now: float) -> bool:
        """Write the frame to the waiting stream's socket (True), or queue it
        (False: the channel must be notified). Only the next seq, never the
        log's last event, and only what the socket takes at once: the rest of
        a partial send is the stream's to write, before anything else."""
        if self.parked and item.seq == self.last + 1 and not item.ending and not self.pending and not self.rest:
            n = send_now(self.sock, item.chunk)
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
            if not self.ended:
                metrics.RELAY_DROPPED.labels("queue_full").inc()
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
        self._conn: RawSubscriber | LibrarySubscriber | None = None  # read by the reader
        self._threads: list[threading.Thread] = []  # the reader and the ticker, once started
        self._closing = threading.Event()
        self.direct_writes = overrides.enabled("gunicorn_direct_write")
        self.written_directly = 0  # frames the reader wrote to a stream's socket
        # Deliveries, counted here by the reader and added to the metric by
        # the ticker: a shared metric costs a lock and a write per update.
        self.relayed = 0
        self._relayed_reported = 0

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
                    self._conn.send("SUBSCRIBE", name)
                except redis.exceptions.RedisError:
                    del self._channels[name]  # else later streams would wait on a subscription never made
                    raise
                metrics.RELAY_CHANNELS.inc()
            sub = Subscription(chan)
            chan.subs.add(sub)
            metrics.RELAY_STREAMS.inc()
        if self._closing.is_set():
            sub.ended = True
        if not chan.confirmed.wait(timeout):
            self.unsubscribe(sub)
            raise redis.exceptions.ConnectionError("Redis did not confirm the subscription")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        chan = sub.channel
        with self._lock:
            if sub in chan.subs:
                chan.subs.discard(sub)
                metrics.RELAY_STREAMS.dec()
            if chan.subs or self._channels.get(chan.name) is not chan:
                return
            del self._channels[chan.name]
            metrics.RELAY_CHANNELS.dec()
            if self._closing.is_set():
                return
            try:
                self._conn.send("UNSUBSCRIBE", chan.name)
            except redis.exceptions.RedisError:
                log.warning("unsubscribe from %s failed; the reader resubscribes what is live", chan.name)

    def stats(self) -> dict[str, int]:
        """Channels subscribed, streams registered, frames written directly
        (for health and tests)."""
        with self._lock:
            return {
                "channels": len(self._channels),
                "streams": sum(len(c.subs) for c in self._channels.values()),
                "written_directly": self.written_directly,
            }

    def close(self) -> None:
        """End every stream, now and from now on, and the reader (the process
        is stopping)."""
        self._closing.set()
        self._each(Subscription.end)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def _each(self, action: Callable[[Subscription], None]) -> None:
        with self._lock:
            subs = [sub for chan in self._channels.values() for sub in chan.subs]
        for sub in subs:
            action(sub)

    def _ensure_reader(self) -> None:
        if self._threads:
            return
        self._conn = self._connect()
        self._threads = [
            threading.Thread(target=self._run, name="relay-reader", daemon=True),
            threading.Thread(target=self._ticker, name="relay-ticker", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _connect(self) -> RawSubscriber | LibrarySubscriber:
        """A connection of its own, read as shared/overrides/redis_pubsub.py says."""
        subscriber = RawSubscriber if overrides.enabled("redis_pubsub") else LibrarySubscriber
        return subscriber(self._client_factory())

    def wake_at(self, sub: Subscription, when: float) -> None:
        """Wake the stream's channel at the first tick after `when` (monotonic)."""
        tick = max(int(when / self._tick) + 1, self._ticked + 1)
        if sub.wake_tick != tick:
            sub.wake_tick = tick
            self._due.setdefault(tick, set()).add(sub.channel)

    def _ticker(self) -> None:
        while not self._closing.wait(self._tick):
            relayed = self.relayed
            if relayed != self._relayed_reported:
                metrics.RELAY_EVENTS.inc(relayed - self._relayed_reported)
                self._relayed_reported = relayed
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
            except Exception as exc:
                if self._closing.is_set():
                    return
                if not isinstance(exc, redis.exceptions.RedisError):
                    raise
                log.warning("relay lost Redis (%s); reconnecting", exc)
            retrying = Retrying(
                retry=retry_if_exception_type(redis.exceptions.RedisError),
                wait=wait_fixed(0.5),
                before_sleep=lambda state: log.warning(
                    "relay: Redis still unreachable (%s)", state.outcome.exception()
                ),
            )
            retrying(self._resubscribe)
            self._each(Subscription.poke)  # events published meanwhile are in the logs

    def _read(self) -> None:
        """Take messages as they come: a socket read brings many, which the
        parser then hands out one by one without another read."""
        channel_of = self._channels.get
        read = self._conn.read
        sampled = DELIVERY_SAMPLE
        while True:
            reply = read()
            kind = reply[0]
            if kind == b"message":
                chan = channel_of(reply[1])
                if chan is not None:
                    now = time.monotonic()
                    try:
                        item = encode(reply[2], now)
                    except (ValueError, KeyError):
                        log.warning("relay: not an event on %s: %.200r", reply[1], reply[2])
                        continue
                    queued, direct = False, 0
                    subs = tuple(chan.subs)
                    for sub in subs:
                        if sub.offer(item, now):
                            direct += 1
                        else:
                            queued = True
                    if direct:
                        self.written_directly += direct
                        if sampled():  # the last direct write's, once in 16 messages
                            metrics.RELAY_DELIVERY.observe(time.monotonic() - now)
                    self.relayed += len(subs)
                    if queued:
                        chan.notify()
            elif kind == b"subscribe":
                chan = channel_of(reply[1])
                if chan is not None:
                    chan.confirmed.set()

    def _resubscribe(self) -> None:
        """A new connection with every live channel (raises while Redis is away)."""
        with self._lock:
            self._conn.close()
            self._conn = self._connect()
            if self._channels:
                self._conn.send("SUBSCRIBE", *self._channels)
