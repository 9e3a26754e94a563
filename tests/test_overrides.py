"""One test per override of a library's internals (shared/overrides/): the
override does what it is for, and the upstream behaviour it works around is
still there. When upstream changes, these fail: drop or fix the override."""

from __future__ import annotations

import uuid

import redis
from kombu import Connection
from kombu.transport import redis as upstream_redis

from shared import overrides
from shared.config import Settings
from shared.overrides import kombu_redis


def _clients_built(stack, transport, monkeypatch) -> tuple[int, list[int]]:
    """redis-py clients a kombu channel builds for 10 publishes, gets and acks."""
    built = []
    init = redis.Redis.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    with Connection(f"redis://127.0.0.1:{stack['redis_port']}/0", transport=transport) as conn:
        queue = conn.SimpleQueue(f"test-override-{uuid.uuid4().hex[:8]}")
        try:
            queue.put({"n": 0})
            queue.get(timeout=5).ack()  # whatever a channel builds once, it has from here on
            monkeypatch.setattr(redis.Redis, "__init__", counted)
            for n in range(1, 11):
                queue.put({"n": n})
            got = []
            for _ in range(10):
                message = queue.get(timeout=5)
                got.append(message.payload["n"])
                message.ack()
        finally:
            monkeypatch.undo()
            queue.clear()
            queue.close()
    return len(built), got


def test_kombu_redis_one_client_per_channel_where_kombu_builds_one_per_command(stack, monkeypatch):
    upstream, got = _clients_built(stack, upstream_redis.Transport, monkeypatch)
    assert got == list(range(1, 11))
    assert upstream >= 20, "kombu no longer builds a client per command: shared/overrides/kombu_redis.py can go"
    ours, got = _clients_built(stack, kombu_redis.Transport, monkeypatch)
    assert got == list(range(1, 11)) and ours == 0


def test_the_app_uses_it_unless_switched_off_under_the_redis_scheme(stack):
    from shared.broker import get_celery

    expected = kombu_redis.Transport if overrides.enabled("kombu_redis") else upstream_redis.Transport
    with get_celery().connection_for_write() as conn:
        assert type(conn.transport) is expected
        # its URL keeps its scheme, which Flower's broker page dispatches on
        assert conn.as_uri().startswith("redis://")


def test_each_override_can_be_switched_off():
    dev = {"TURNSTREAM_ENV": "development"}
    assert Settings.from_env(dev).library_overrides == {"kombu_redis"}
    assert Settings.from_env({**dev, "LIBRARY_OVERRIDES": "none"}).library_overrides == frozenset()
    assert Settings.from_env({**dev, "LIBRARY_OVERRIDES": "kombu_redis"}).library_overrides == {"kombu_redis"}
