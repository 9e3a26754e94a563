"""Rate limits and quotas.

Rate limits (the `limits` library, counted in Redis so that every web
process shares them) apply per API key (per key prefix for logins, which carry no
key yet) and per client address: turn and chat submissions, replays,
stream opens, logins. Quotas bound what one owner holds at once: turns
queued or running, open streams (per web process), unfinished replay items.
Over either: 429 in the documented error shape; a rate limit says when to
retry (Retry-After). Each is a setting (docs/configuration.md).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable

import redis
from flask import Flask, current_app, g, request
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from shared.config import Settings
from shared.redis import get_redis
from web.errors import ApiError

log = logging.getLogger(__name__)


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["turnstream.rate_limits"] = RateLimits(settings)
    app.extensions["turnstream.streams"] = OpenStreams()


class RateLimits:
    """The app's rate limits (the `limits` library's moving window, in Redis,
    through the process's Redis client)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._strategy: MovingWindowRateLimiter | None = None  # connects on first use
        self._lock = threading.Lock()

    @functools.cache  # noqa: B019 - one per app, and few settings
    def _items(self, setting: str) -> tuple[RateLimitItem, ...]:
        value = getattr(self.settings, setting)
        return tuple(parse_many(value)) if value else ()

    def _limiter(self) -> MovingWindowRateLimiter:
        with self._lock:
            if self._strategy is None:
                storage = SharedClientStorage(get_redis(), key_prefix=f"{self.settings.redis_prefix}limits")
                self._strategy = MovingWindowRateLimiter(storage)
            return self._strategy

    def check(self, setting: str, who: str) -> None:
        """Count one request of `who` against the limits a setting names;
        429 with Retry-After once they are spent. A request counts once,
        though its view runs again while Postgres is away (web.App). With
        Redis away the limits are lifted rather than every request failed."""
        counted = g.setdefault("rate_limits_counted", set())
        if (setting, who) in counted:
            return
        counted.add((setting, who))
        items = self._items(setting) if self.settings.rate_limits_enabled else ()
        for item in items:
            try:
                limiter = self._limiter()
                if limiter.hit(item, setting, who):
                    continue
                reset, _remaining = limiter.get_window_stats(item, setting, who)
            except Exception as exc:  # noqa: BLE001 - whatever the storage raises
                log.warning("rate limit %s not checked: %s", setting, exc)
                return
            wait = max(1, math.ceil(reset - time.time()))
            raise ApiError(
                429,
                f"too many requests: at most {item} ({setting.upper()}); retry in {wait} s",
                code="rate_limited",
                headers={"Retry-After": str(wait)},
            )


class SharedClientStorage(RedisStorage):
    """The `limits` library's Redis storage over the process's client
    (shared.redis.get_redis) rather than one of its own: its checks share
    that client's REDIS_POOL_SIZE connections and, in web, go out pipelined
    with every greenlet's other commands. A client of its own (what
    `storage_from_string` builds) has an unbounded pool: one more
    connection for each check in flight at once, to the Redis the broker
    shares, up to its `maxclients`.

    Written for limits 5.8, whose RedisStorage takes a `connection_pool`
    and reaches its client only through get_connection();
    tests/test_redis_connections.py counts the connections and the checks
    of a burst."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client  # set first: the library registers its scripts on get_connection()
        # The library keeps a client of its own beside it; on the same pool,
        # anything that reaches Redis past get_connection() is bounded too.
        super().__init__("redis://", connection_pool=client.connection_pool, key_prefix=key_prefix)

    def get_connection(self, readonly: bool = False) -> redis.Redis:
        """The library's way to its client, for every command and script
        (its own Sentinel storage overrides it the same way)."""
        return self.client


def rate_limits() -> RateLimits:
    return current_app.extensions["turnstream.rate_limits"]


def by_owner() -> str:
    return f"owner:{g.owner_id}"


def by_address() -> str:
    return f"address:{request.remote_addr}"


def limited(setting: str) -> Callable:
    """A view under the limits `<setting>` per API key and `<setting>_address`
    per client address (checked after authentication, before the view)."""

    def wrap(view: Callable) -> Callable:
        @functools.wraps(view)
        def checked(*args, **kwargs):
            rate_limits().check(f"{setting}_address", by_address())
            rate_limits().check(setting, by_owner())
            return view(*args, **kwargs)

        return checked

    return wrap


def quota_exceeded(message: str) -> ApiError:
    return ApiError(429, message, code="quota_exceeded")


class OpenStreams:
    """The SSE streams each owner holds open in this web process."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def check(self, owner_id: str) -> None:
        """429 if the owner holds MAX_STREAMS_PER_OWNER streams already."""
        most = current_app.extensions["turnstream.settings"].max_streams
        if self._open[owner_id] >= most:
            raise quota_exceeded(
                f"this key holds {most} open streams on this server (MAX_STREAMS_PER_OWNER); close one first"
            )

    def hold(self, owner_id: str) -> Callable[[], None]:
        """Count one more stream against the owner's quota (429 if it is
        full); returns what releases it, called once the server closes the
        stream, however it ended."""
        with self._lock:
            self.check(owner_id)
            self._open[owner_id] += 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self._open[owner_id] -= 1
                if not self._open[owner_id]:
                    del self._open[owner_id]

        return release


def open_streams() -> OpenStreams:
    return current_app.extensions["turnstream.streams"]
