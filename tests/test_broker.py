"""The broker transport: kombu's Redis transport, with one redis-py client per
channel for its commands, under the redis:// scheme. Against real Redis."""

from __future__ import annotations

import uuid

import redis


def test_broker_commands_build_no_redis_client_each(stack, monkeypatch):
    """kombu's own channel builds a redis-py client for every publish, get
    and ack (60 µs of CPU each, several per task); this one builds none once
    it has its own, and the messages still go through."""
    from shared.broker import Transport, get_celery

    built = []
    init = redis.Redis.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    with get_celery().connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        # its URL keeps its scheme, which Flower's broker page dispatches on
        assert conn.as_uri().startswith("redis://")
        queue = conn.SimpleQueue(f"test-broker-{uuid.uuid4().hex[:8]}")
        try:
            queue.put({"n": 0})
            queue.get(timeout=5).ack()  # the channel's client exists from here on
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
    assert got == list(range(1, 11))
    assert built == []
