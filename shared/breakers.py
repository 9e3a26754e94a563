"""Circuit breakers for what turns depend on outside Turnstream: one per
model endpoint and one per MCP server, shared by every worker process
through Redis, so that they fail fast together and recover by one probe.

- closed: calls go. Each is counted in a ring of ten buckets spanning
  BREAKER_WINDOW_SECONDS, and so is each failure (a timeout, a connection
  error, a 5xx, a 429 left after the client's retries; never an answer to a
  bad request). Once the window holds BREAKER_MIN_FAILURES failures and they
  are at least BREAKER_FAILURE_RATE of its calls, it opens.
- open: calls are refused until BREAKER_COOLDOWN_SECONDS have passed. Then
  the first caller of any process is let through as the probe (half_open)
  and the others are still refused while it runs, for at most a lease, so
  that a probe whose process died is replaced.
- half_open: the probe's success closes it (and hands back the turns that
  waited on it); its failure opens it again for another cool-down.

A call costs one script call before it (which decides and counts); a
failure or a probe one more after it. No lock is held while the call runs.
The clock is Redis's (`TIME`), so hosts whose clocks differ agree. Each
change is logged by the process that made it, naming the breaker and the
last error, and counted in the breaker's hash (opens, probes) for /metrics.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from shared.config import get_settings
from shared.redis import get_redis, key

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
MODEL, TOOLS = "model", "tools"  # the kinds: a model endpoint, an MCP server
BUCKETS = 10

_RING = """
local function slot(now, size)
    local b = math.floor(now / size)
    local i = b % 10
    if tonumber(redis.call('HGET', KEYS[1], 'b' .. i)) ~= b then
        redis.call('HSET', KEYS[1], 'b' .. i, b, 'c' .. i, 0, 'f' .. i, 0)
    end
    return i, b
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""
# KEYS: the breaker's hash. ARGV: window, lease, calls. Returns {decision,
# until, last error, seconds until then}.
_BEFORE = (
    _RING
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then
    local i = slot(now, tonumber(ARGV[1]) / 10)
    redis.call('HINCRBY', KEYS[1], 'c' .. i, tonumber(ARGV[3]))
    return {'go'}
end
local until_ = tonumber(redis.call('HGET', KEYS[1], 'until'))
if now < until_ then
    return {'wait', tostring(until_), redis.call('HGET', KEYS[1], 'error') or '', tostring(until_ - now)}
end
-- open past its cool-down, or half-open with its probe's lease run out
redis.call('HSET', KEYS[1], 'state', 'half_open', 'until', tostring(now + tonumber(ARGV[2])))
redis.call('HINCRBY', KEYS[1], 'probes', 1)
return {'probe', redis.call('HGET', KEYS[1], 'error') or ''}
"""
)
# KEYS: the breaker's hash. ARGV: window, min failures, rate, cool-down,
# error, probe (1/0). Returns {state now, changed (1/0), until, seconds
# until then}.
_FAILED = (
    _RING
    + """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
redis.call('HSET', KEYS[1], 'error', ARGV[5])
local function open()
    local until_ = now + tonumber(ARGV[4])
    redis.call('HSET', KEYS[1], 'state', 'open', 'until', tostring(until_))
    if state == 'closed' then
        redis.call('HSET', KEYS[1], 'since', tostring(now))
        redis.call('HINCRBY', KEYS[1], 'opens', 1)
    end
    return {'open', 1, tostring(until_), tostring(until_ - now)}
end
local function as_is()  -- and, closed, when a caller that waits would try again
    if state == 'closed' then return {state, 0, tostring(now + tonumber(ARGV[4])), ARGV[4]} end
    local until_ = tonumber(redis.call('HGET', KEYS[1], 'until'))
    return {state, 0, tostring(until_), tostring(math.max(until_ - now, 0))}
end
if ARGV[6] == '1' then
    if state == 'half_open' then return open() end
    return as_is()
end
if state ~= 'closed' then return as_is() end
local i, b = slot(now, tonumber(ARGV[1]) / 10)
redis.call('HINCRBY', KEYS[1], 'f' .. i, 1)
local calls, failures = 0, 0
for j = 0, 9 do
    if (tonumber(redis.call('HGET', KEYS[1], 'b' .. j)) or -1) > b - 10 then
        calls = calls + (tonumber(redis.call('HGET', KEYS[1], 'c' .. j)) or 0)
        failures = failures + (tonumber(redis.call('HGET', KEYS[1], 'f' .. j)) or 0)
    end
end
if failures >= tonumber(ARGV[2]) and failures >= tonumber(ARGV[3]) * calls then return open() end
return as_is()
"""
)
# KEYS: the breaker's hash, its waiting turns. Returns the turns that waited
# if this closed it, else false.
_SUCCEEDED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'half_open' then return false end
local ring = {}
for j = 0, 9 do
    table.insert(ring, 'b' .. j)
    table.insert(ring, 'c' .. j)
    table.insert(ring, 'f' .. j)
end
redis.call('HDEL', KEYS[1], 'until', 'since', unpack(ring))
redis.call('HSET', KEYS[1], 'state', 'closed')
local waiting = redis.call('ZRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return waiting
"""
# KEYS: the breaker's hash, its waiting turns. ARGV: turn id, until, lease,
# refused (1: by the breaker open, 0: after a failed call). Returns the
# seconds until the turn is due, or false to go now: refused by a breaker
# that has closed since (the probe that closed it sent the turns waiting
# then, and this one was not among them). Only the first turn to wait for
# a cool-down's end is due then, to probe; the others wait for the probe to
# close the breaker, or else a lease longer (so that a prober that went
# away is replaced), not all to be refused again at each cool-down's end.
_WAIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HGET', KEYS[1], 'state')
local at = tonumber(ARGV[2])
if not state or state == 'closed' then
    if ARGV[4] == '1' then return false end
elseif #redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, 1) > 0 then
    at = at + tonumber(ARGV[3])
end
redis.call('ZADD', KEYS[2], at, ARGV[1])
return tostring(math.max(at - now, 0))
"""
# KEYS: a breaker's waiting turns. ARGV: how many at most. Pops those due by
# Redis's clock; returns {seconds until the next is due or '', turn ids...}.
_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
local next_ = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
table.insert(due, 1, next_[2] and tostring(math.max(tonumber(next_[2]) - now, 0)) or '')
return due
"""


class Unavailable(Exception):
    """Not to be called until `until`: the breaker is open (`open`), or a
    call failed and its caller is to wait a cool-down before the next."""

    def __init__(self, breaker: Breaker, until: float, error: str, seconds: float, open: bool = True) -> None:
        super().__init__(f"{breaker.describe()} is unavailable (its last error: {error or 'none recorded'})")
        self.breaker, self.until, self.error, self.open = breaker, until, error, open
        self.seconds = seconds  # until `until`, by Redis's clock


@dataclass(frozen=True)
class Breaker:
    kind: str  # MODEL or TOOLS
    name: str  # the endpoint's (MODEL_ENDPOINTS) or the server's (MCP_SERVERS) name

    @property
    def key(self) -> str:
        return key("breaker", self.kind, self.name)

    @property
    def waiting_key(self) -> str:
        """The turns that wait on it, by when they are to try again."""
        return key("breaker", self.kind, self.name, "waiting")

    def describe(self) -> str:
        return f"model endpoint {self.name!r}" if self.kind == MODEL else f"tool server {self.name!r}"

    def before(self, calls: int = 1) -> bool:
        """Ask to make calls: False to go, True to go as the probe; raises
        Unavailable while open."""
        s = get_settings()
        reply = _script(_BEFORE)(keys=[self.key], args=[s.breaker_window, _lease(self.kind), calls])
        if reply[0] == b"wait":
            raise Unavailable(self, float(reply[1]), reply[2].decode(), float(reply[3]))
        if reply[0] == b"probe":
            log.warning("%s: cool-down over, one call probes it. Last error: %s", self.describe(), reply[1].decode())
            return True
        return False

    def failed(self, error: str, probe: bool) -> Unavailable:
        """Count a failure of a call (the probe's opens it again); returns
        what a caller that waits should wait for: the breaker's cool-down,
        whether it opened (`open`) or not."""
        s = get_settings()
        args = [s.breaker_window, s.breaker_min_failures, s.breaker_failure_rate, s.breaker_cooldown, error[:500]]
        reply = _script(_FAILED)(keys=[self.key], args=[*args, int(probe)])
        if reply[1]:
            again = "again: its probe failed" if probe else f"after {s.breaker_min_failures}+ failures"
            log.warning(
                "%s opened %s; calls refused for %g s. Last error: %s",
                self.describe(),
                again,
                s.breaker_cooldown,
                error,
            )
        return Unavailable(self, float(reply[2]), error, float(reply[3]), open=reply[0] != b"closed")

    def succeeded(self) -> list[str]:
        """The probe succeeded: close it; returns the turns that waited on it."""
        waiting = _script(_SUCCEEDED)(keys=[self.key, self.waiting_key])
        if waiting is None:
            return []
        log.warning("%s closed: its probe succeeded; %d waiting turns go on", self.describe(), len(waiting))
        return [t.decode() for t in waiting]

    def wait(self, turn_id: str, until: float, refused: bool) -> float | None:
        """Record a turn that waits on it, to try again at `until` (or
        later: see _WAIT); returns in how many seconds it is due, or None
        if it is to go now."""
        due = _script(_WAIT)(keys=[self.key, self.waiting_key], args=[turn_id, until, _lease(self.kind), int(refused)])
        return None if due is None else float(due)

    def due(self, most: int = 500) -> tuple[list[str], float | None]:
        """Take the waiting turns due now; also in how many seconds the next one is."""
        reply = _script(_DUE)(keys=[self.waiting_key], args=[most])
        return [t.decode() for t in reply[1:]], float(reply[0]) if reply[0] else None

    def state(self) -> dict[str, Any]:
        """What health, /metrics and the dashboard show."""
        return _parse(get_redis().hgetall(self.key))


def model_breaker(endpoint: str) -> Breaker:
    return Breaker(MODEL, endpoint)


def tool_breaker(server: str) -> Breaker:
    return Breaker(TOOLS, server)


def configured() -> list[Breaker]:
    """Every breaker the settings make: each model endpoint and MCP server."""
    s = get_settings()
    return [model_breaker(n) for n in s.model_endpoints] + [tool_breaker(n) for n in s.mcp_servers]


def states() -> dict[str, dict[str, Any]]:
    """Each configured breaker's state, by "kind:name", in one round trip."""
    breakers = configured()
    pipe = get_redis().pipeline(transaction=False)
    for b in breakers:
        pipe.hgetall(b.key)
    return {f"{b.kind}:{b.name}": _parse(raw) for b, raw in zip(breakers, pipe.execute(), strict=True)}


def _parse(raw: dict[bytes, bytes]) -> dict[str, Any]:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    state = fields.get("state", CLOSED)
    return {
        "state": state,
        "retry_at": float(fields["until"]) if "until" in fields and state != CLOSED else None,
        "open_since": float(fields["since"]) if "since" in fields else None,
        "last_error": fields.get("error"),
        "opens": int(fields.get("opens", 0)),
        "probes": int(fields.get("probes", 0)),
    }


def _lease(kind: str) -> float:
    """How long a probe may run before another process may probe instead:
    a model's probe is told when its answer starts, a tool's when it ends."""
    s = get_settings()
    return s.openai_timeout + 5 if kind == MODEL else s.tool_timeout + 5


def _script(source: str) -> Any:
    """The script on the process's Redis client (sent as EVALSHA, loaded on first use)."""
    return _registered(get_redis(), source)


@functools.cache
def _registered(client: Any, source: str) -> Any:
    return client.register_script(source)
