"""The event log of a turn (or a replay): a capped Redis Stream plus Pub/Sub.

Every event gets the next `seq` of its log, is appended to the stream under
the entry id `0-<seq>` (so a reader resumes with XRANGE from `(0-<after>`),
and is published on the log's channel, all in one Lua call: one round trip,
and no reader can see a seq in the channel that the stream lacks. The same
call reports whether the turn was asked to cancel, so a worker learns it
without a second round trip per delta.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from shared.config import get_settings
from shared.redis import get_redis, key

TURN_TERMINAL_TYPES = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})
REPLAY_TERMINAL_TYPES = frozenset({"replay.finished"})
TERMINAL_TYPES = TURN_TERMINAL_TYPES | REPLAY_TERMINAL_TYPES

# KEYS: seq counter, stream, channel, cancel flag
# ARGV: event JSON without seq (an object, "{...}"), maxlen, terminal (0/1), ttl
_APPEND = """
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


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: dict[str, Any]
    raw: str  # the JSON line, encoded once and sent as-is

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @classmethod
    def parse(cls, raw: str | bytes) -> Event:
        text = raw.decode() if isinstance(raw, bytes) else raw
        data = json.loads(text)
        return cls(seq=int(data["seq"]), type=data["type"], data=data, raw=text)


class EventLog:
    """The log of one turn or replay: `EventLog("turn", turn_id)`."""

    def __init__(self, kind: str, ident: str, client: redis.Redis | None = None) -> None:
        self.kind = kind
        self.ident = ident
        self.redis = client or get_redis()
        self.stream_key = key(kind, ident, "events")
        self.seq_key = key(kind, ident, "seq")
        self.channel = key(kind, ident)
        self.cancel_key = key(kind, ident, "cancel")
        self._append = self.redis.register_script(_APPEND)  # EVALSHA, not the script's text, per event

    def append(self, type_: str, **fields: Any) -> tuple[int, bool]:
        """Append and publish one event; returns (seq, cancel_requested)."""
        settings = get_settings()
        body = json.dumps({f"{self.kind}_id": self.ident, "type": type_, **fields}, separators=(",", ":"))
        seq, cancelled = self._append(
            keys=(self.seq_key, self.stream_key, self.channel, self.cancel_key),
            args=(body, settings.event_log_maxlen, "1" if type_ in TERMINAL_TYPES else "0", settings.event_log_ttl),
        )
        return int(seq), bool(cancelled)

    def read_after(self, after: int) -> list[Event]:
        """Events with seq > after still held in the stream, oldest first."""
        entries = self.redis.xrange(self.stream_key, min=f"(0-{after}", max="+")
        return [Event.parse(fields[b"d"]) for _id, fields in entries]

    def last_seq(self) -> int:
        """The last seq handed out (0 if none, or if the log has expired)."""
        value = self.redis.get(self.seq_key)
        return int(value) if value else 0

    def cancel_requested(self) -> bool:
        return bool(self.redis.exists(self.cancel_key))

    def request_cancel(self) -> None:
        self.redis.set(self.cancel_key, "1", ex=get_settings().event_log_ttl)
