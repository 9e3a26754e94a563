"""The event log of a turn (or a replay): a capped Redis Stream plus Pub/Sub.

Every event gets the next `seq` of its log, is appended to the stream under
the entry id `0-<seq>` (so a reader resumes with XRANGE from `(0-<after>`),
and is published on the log's channel, all in one Lua call: one round trip,
and no reader can see a seq in the channel that the stream lacks. The same
call reports whether the turn was asked to cancel, so a worker learns it
without a second round trip per delta.

A worker hands its events to one `Publisher` per process, which sends them
in pipelined batches: a Redis round trip costs about as much CPU as the
openai client spends reading a chunk, so one per delta would more than
double the worker's cost under load. Nothing waits for a batch to fill: a
delta (or an event its sender waits for) that finds the publisher idle is
sent at once by its own thread; other events, and those that queue up while
a batch is in flight, are sent together by the publisher's thread
(consecutive deltas of one turn are merged there).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared import metrics
from shared.batching import Batcher
from shared.config import get_settings
from shared.redis import get_redis, key


@dataclass(frozen=True)
class EventType:
    """One type of event: the fields its data carries beyond its log's id
    (`turn_id` or `replay_id`), `seq` and `type`."""

    name: str
    fields: tuple[str, ...]
    doc: str
    ending: bool = False  # the log's last event: the stream ends after it
    logged: bool = True  # False: made for one client (no seq, no id), never in a log


# Why a running turn is asked to stop (its cancel flag's value).
STOP_CANCEL, STOP_INTERRUPT, STOP_ROLLBACK = "cancel", "interrupt", "rollback"
# An attempt number above any a turn reaches: the last word on a turn that is
# gone (rolled back), after which its log drops what its running attempt
# still sends, and tells that attempt to stop.
LAST_WORD = 1 << 20

_REPLAY_FIELDS = (
    "id",
    "status",
    "assistant_id",
    "assistant_version",
    "total",
    "succeeded",
    "failed",
    "passed",
    "set_id",
    "schedule_id",
    "repeats",
    "created_at",
    "finished_at",
)

# The event contract: what the worker and web emit, what the relay streams,
# and the table in docs/api.md (tests/test_event_types.py holds the three
# together).
EVENT_TYPES = {
    t.name: t
    for t in (
        EventType(
            "turn.accepted",
            ("session_id",),
            "first event of `POST /api/chat` with `stream: true`",
            logged=False,
        ),
        EventType("turn.started", ("attempt",), "a worker started the turn (again, after `turn.restarted`)"),
        EventType(
            "tools.unavailable",
            ("servers",),
            '`[{"name", "error"}]`: configured tool servers this turn is answered without',
        ),
        EventType("message.delta", ("delta",), "text to append"),
        EventType("tool.started", ("call_id", "name", "arguments"), "the model called a tool"),
        EventType(
            "tool.finished",
            ("call_id", "name", "ok", "output"),
            "the tool's result; `output` holds at most 2,000 characters",
        ),
        EventType(
            "tool.approval_required",
            ("request_id", "call_id", "name", "server", "tool", "arguments", "deadline"),
            "a call a person must decide before it runs (`POST /api/turns/{id}/approvals/{request_id}`)",
        ),
        EventType(
            "turn.waiting",
            ("requests", "deadline"),
            "the turn waits for a person to decide these calls (the `request_id`s); no worker holds it",
        ),
        EventType(
            "tool.approval_decided",
            ("request_id", "call_id", "status", "decided_by", "arguments", "message"),
            "a decision: `approved` (with `arguments` if edited), `rejected` (`message`), `expired`",
        ),
        EventType(
            "turn.delayed",
            ("endpoint", "reason", "retry_at"),
            "its model endpoint failed or its breaker is open: the turn waits in the queue, no worker holding it,"
            " and tries again at `retry_at` or as soon as the endpoint answers a probe (`turn.resumed` then)",
        ),
        EventType(
            "turn.resumed",
            ("text",),
            "the turn goes on after a pause: `text` is its answer so far (replace what is shown)",
        ),
        EventType(
            "turn.restarted",
            ("attempt", "reason"),
            "`reason` is `redelivered` or `model_stream_broke`; drop the text of the earlier attempt",
        ),
        EventType(
            "turn.snapshot",
            ("status", "text", "error"),
            "the state so far from Postgres (`error` only if failed), sent when the log after"
            " `Last-Event-ID` is no longer held",
            logged=False,
        ),
        EventType("turn.completed", ("answer", "usage", "tools"), "the answer", ending=True),
        EventType("turn.failed", ("error",), "`{code, message}`", ending=True),
        EventType("turn.cancelled", (), "cancelled by request, or its session was deleted", ending=True),
        EventType(
            "turn.interrupted",
            ("answer",),
            "it gave way to a newer message (multitask `interrupt`): `answer` is what it had said, kept in history",
            ending=True,
        ),
        EventType(
            "turn.rolled_back",
            (),
            "it and its question were removed for a newer message (multitask `rollback`), as if never sent",
            ending=True,
        ),
        EventType("replay.progress", _REPLAY_FIELDS, "the Replay, after each of its turns ends"),
        EventType("replay.finished", _REPLAY_FIELDS, "the Replay, once every item ended", ending=True),
        EventType("replay.snapshot", _REPLAY_FIELDS, "the Replay from Postgres, when the log is gone", logged=False),
        EventType(
            "session.turn",
            ("session_id", "turn_id"),
            "on a session's channel, never sent to a client: a turn was accepted",
            logged=False,
        ),
    )
}
ENDING_TYPES = frozenset(name for name, t in EVENT_TYPES.items() if t.ending)
_FIELDS = {name: frozenset(t.fields) for name, t in EVENT_TYPES.items()}


# KEYS: seq counter, stream, channel, cancel flag, newest attempt
# ARGV: event JSON without seq (an object, "{...}"), maxlen, ending (0/1), ttl,
#       attempt (0: not sent by an attempt), the sender's last seq (0: none yet)
# - An event of an older attempt than one already seen is dropped, and its
#   sender told to stop (seq 0, cancel 1): a re-queued turn's old attempt, if
#   it still runs, cannot mix its text into the new attempt's.
# - A sender that appended before but finds no counter lost its log (Redis
#   restarted without its data): refused (seq -1), so the attempt ends and the
#   turn runs again as a new attempt.
# - A fresh log of attempt N starts its seq at (N-1) * 2^20 + 1, above every seq
#   an earlier attempt can have handed out in a log that was lost: seqs are
#   never reused, so a client's Last-Event-ID never points into the wrong log.
_APPEND = """
local attempt = tonumber(ARGV[5])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if tonumber(ARGV[6]) > 0 then
    return {-1, 0}
  end
  if attempt > 1 then
    redis.call('SET', KEYS[1], (attempt - 1) * 1048576)
  end
end
if attempt > 0 then
  local newest = tonumber(redis.call('GET', KEYS[5]) or '0')
  if attempt < newest then
    return {0, 1}
  end
  if attempt > newest then
    redis.call('SET', KEYS[5], attempt, 'EX', ARGV[4])
  end
end
local seq = redis.call('INCR', KEYS[1])
local data = '{"seq":' .. seq .. ',' .. string.sub(ARGV[1], 2)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '0-' .. seq, 'd', data)
redis.call('PUBLISH', KEYS[3], data)
if ARGV[3] == '1' then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {seq, redis.call('EXISTS', KEYS[4])}
"""


class EventLogLost(redis.RedisError):
    """The log this sender appended to is gone (Redis lost its data)."""


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: dict[str, Any]
    raw: str  # the JSON line, encoded once and sent as-is

    @property
    def ending(self) -> bool:
        return self.type in ENDING_TYPES

    @classmethod
    def parse(cls, raw: str | bytes) -> Event:
        text = raw.decode() if isinstance(raw, bytes) else raw
        data = json.loads(text)
        return cls(seq=int(data["seq"]), type=data["type"], data=data, raw=text)


def peek(raw: bytes) -> tuple[int, bytes]:
    """The seq and type of a logged event's JSON, without parsing it: the
    append script writes `{"seq":N,` first, and `EventLog.body` puts the type
    right after the turn's (or replay's) id, which holds no quote."""
    if raw.startswith(b'{"seq":'):
        comma = raw.find(b",", 7)
        start = raw.find(b'"type":"', comma) + 8
        end = raw.find(b'"', start)
        if comma > 0 and start > 7 and end > 0:
            return int(raw[7:comma]), raw[start:end]
    event = Event.parse(raw)
    return event.seq, event.type.encode()


@functools.cache
def _append_script(client: redis.Redis) -> Any:
    """The append script of a client: sent as EVALSHA, loaded on first use."""
    return client.register_script(_APPEND)


class EventLog:
    """The log of one turn or replay: `EventLog("turn", turn_id)`."""

    def __init__(
        self,
        kind: str,
        ident: str,
        client: redis.Redis | None = None,
        publisher: Publisher | None = None,
        attempt: int = 0,
    ) -> None:
        self.kind = kind
        self.ident = ident
        self.attempt = attempt
        self.redis = client or get_redis()
        self.publisher = publisher
        self.stream_key = key(kind, ident, "events")
        self.seq_key = key(kind, ident, "seq")
        self.channel = key(kind, ident)
        self.cancel_key = key(kind, ident, "cancel")
        self.attempt_key = key(kind, ident, "attempt")
        self.cancelled = False  # set once an append reports a cancel request
        self.last = 0  # the last seq this sender was handed
        self.failure: Exception | None = None  # a batch that could not be sent

    def append(self, type_: str, **fields: Any) -> tuple[int, bool]:
        """Append and publish one event, after any this log queued before;
        returns (seq, cancel_requested)."""
        if self.publisher is not None:
            return self.publisher.submit(self, type_, fields, wait=True)
        try:
            reply = self.send(self.redis, type_, fields)
        except redis.RedisError as exc:
            reply = exc
        return self.took(reply)

    def emit(self, type_: str, **fields: Any) -> None:
        """Append without waiting (through the publisher, if there is one).
        `cancelled` turns true some events after a cancel request; a Redis
        failure is raised by a later emit or append."""
        if self.failure is not None:
            raise self.failure
        if self.publisher is not None:
            self.publisher.submit(self, type_, fields, wait=False)
        else:
            self.append(type_, **fields)

    def body(self, type_: str, fields: dict[str, Any]) -> str:
        allowed = _FIELDS.get(type_)
        if allowed is None or not fields.keys() <= allowed:
            raise ValueError(f"{type_} with {sorted(fields)}: not an event of shared.events.EVENT_TYPES")
        return json.dumps({f"{self.kind}_id": self.ident, "type": type_, **fields}, separators=(",", ":"))

    def send(self, client: redis.Redis | redis.client.Pipeline, type_: str, fields: dict[str, Any]) -> Any:
        """Run the append script on a client (its reply) or queue it on a pipeline.

        A client gets EVALSHA (reloading the script if Redis lost it); a
        pipeline gets EVAL with the script's text, which Redis caches too:
        a pipeline that holds a registered script first asks Redis, in a
        round trip of its own, whether the script exists."""
        settings = get_settings()
        ending = "1" if type_ in ENDING_TYPES else "0"
        keys = (self.seq_key, self.stream_key, self.channel, self.cancel_key, self.attempt_key)
        args = (
            self.body(type_, fields),
            settings.event_log_maxlen,
            ending,
            settings.event_log_ttl,
            self.attempt,
            self.last,
        )
        if isinstance(client, redis.client.Pipeline):
            return client.eval(_APPEND, len(keys), *keys, *args)
        return _append_script(self.redis)(keys=keys, args=args, client=client)

    def took(self, reply: Any) -> tuple[int, bool]:
        if isinstance(reply, Exception) or reply[0] == -1:
            if not isinstance(reply, Exception):
                reply = EventLogLost(f"the event log of {self.kind} {self.ident} was lost")
            self.failure = reply
            raise reply
        seq, cancelled = int(reply[0]), bool(reply[1])
        self.last = max(self.last, seq)
        self.cancelled = self.cancelled or cancelled
        return seq, cancelled

    def read_after(self, after: int) -> list[Event]:
        """Events with seq > after still held in the stream, oldest first."""
        return [Event.parse(raw) for raw in self.read_raw_after(after)]

    def read_raw_after(self, after: int) -> list[bytes]:
        """The same events as published (JSON bytes), unparsed."""
        entries = self.redis.xrange(self.stream_key, min=f"(0-{after}", max="+")
        return [fields[b"d"] for _id, fields in entries]

    def last_event(self) -> Event | None:
        """The newest event still held, if any."""
        entries = self.redis.xrevrange(self.stream_key, count=1)
        return Event.parse(entries[0][1][b"d"]) if entries else None

    def last_seq(self) -> int:
        """The last seq handed out (0 if none, or if the log has expired)."""
        value = self.redis.get(self.seq_key)
        return int(value) if value else 0

    def cancel_requested(self) -> bool:
        return bool(self.redis.exists(self.cancel_key))

    def stop_requested(self) -> bool:
        """`cancelled`, asking Redis when no append has said so yet: for a
        turn that waits on something that emits nothing (a silent model, a
        tool)."""
        self.cancelled = self.cancelled or self.cancel_requested()
        return self.cancelled

    def request_cancel(self, reason: str = STOP_CANCEL) -> None:
        """Ask the turn's running attempt to stop, and say why: STOP_CANCEL,
        STOP_INTERRUPT (end it, keeping its answer so far) or STOP_ROLLBACK
        (it is gone)."""
        self.redis.set(self.cancel_key, reason, ex=get_settings().event_log_ttl)

    def stop_reason(self) -> str:
        """Why the running attempt was asked to stop (STOP_CANCEL if it was not)."""
        reason = self.redis.get(self.cancel_key)
        return reason.decode() if reason else STOP_CANCEL


class Publisher:
    """Sends the events of many logs, from many threads, in pipelined batches
    from one thread, in the order they were submitted."""

    def __init__(self, client: redis.Redis | None = None, max_batch: int = 500) -> None:
        self.redis = client or get_redis()
        self.batcher = Batcher(self._send, "event-publisher", max_batch, prepare=_merge_deltas)

    def submit(self, log: EventLog, type_: str, fields: dict[str, Any], wait: bool) -> Any:
        # Sent by the caller if the publisher is idle: an event it waits for,
        # and a delta (the turn's thread then reads the next chunk, often
        # already here). Any other event is handed off, since the thread's
        # next step is slow (the model's request, the tools).
        return self.batcher.submit((log, type_, fields), wait, inline=wait or type_ == "message.delta")

    def _send(self, batch: list[tuple[EventLog, str, dict[str, Any]]]) -> list:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for log, type_, fields in batch:
                log.send(pipe, type_, fields)
            started = time.monotonic()
            replies = pipe.execute(raise_on_error=False)
            metrics.EVENT_PUBLISH.observe(time.monotonic() - started)
            metrics.EVENTS_PUBLISHED.inc(len(batch))
        except Exception as exc:  # noqa: BLE001 - every log of the batch fails (below), not only its waiters
            replies = [exc] * len(batch)
        results = []
        for (log, _type, _fields), reply in zip(batch, replies, strict=True):
            try:
                results.append(log.took(reply))
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits, or kept on the log
                results.append(exc)
        return results


def _merge_deltas(batch: list) -> list:
    """Merge consecutive message.delta events of one log that nobody waits for."""
    merged: list = []
    last_delta: dict[int, int] = {}  # id(log) -> index in merged of its trailing delta
    for item in batch:
        (log, type_, fields), future = item
        at = last_delta.pop(id(log), None)
        if type_ == "message.delta" and future is None and fields.keys() == {"delta"}:
            if at is not None:
                prev = merged[at][0][2]["delta"]
                merged[at] = ((log, type_, {"delta": prev + fields["delta"]}), None)
                last_delta[id(log)] = at
                continue
            last_delta[id(log)] = len(merged)
        merged.append(item)
    return merged


def announce_turn(session_id: str, turn_id: str) -> None:
    """Tell the session's followers (GET /api/sessions/{id}/events) that a
    turn was accepted. A lost announcement is found by their idle check."""
    data = {"seq": 0, "session_id": session_id, "type": "session.turn", "turn_id": turn_id}
    get_redis().publish(key("session", session_id), json.dumps(data, separators=(",", ":")))


@functools.cache
def get_publisher() -> Publisher:
    """The process's publisher (workers)."""
    return Publisher()
