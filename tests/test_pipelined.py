"""The web's Redis client under gevent: commands of many callers share
round trips, and each caller gets its own reply or error."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from shared.config import get_settings
from shared.overrides.redis_pipelined import Pipelined


def test_concurrent_commands_share_round_trips_and_keep_their_replies(stack):
    client = Pipelined(connection_pool=redis.ConnectionPool.from_url(get_settings().redis_url))
    prefix = f"pipelined:{uuid.uuid4().hex}:"
    client.set(prefix + "list", "not a list")
    n = 200
    start = threading.Barrier(n)
    got: dict[int, object] = {}

    def call(i: int) -> None:
        start.wait()
        try:
            if i % 10 == 0:  # an error goes to its caller only
                got[i] = client.lpush(prefix + "list", "x")
            else:
                got[i] = client.incrby(prefix + str(i), i)
        except redis.ResponseError as exc:
            got[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(n):
        if i % 10 == 0:
            assert isinstance(got[i], redis.ResponseError) and "WRONGTYPE" in str(got[i])
        else:
            assert got[i] == i
    assert client.batcher.handled == n + 1
    assert client.batcher.batches < n / 4, (client.batcher.batches, client.batcher.handled)


def test_errors_reach_the_waiting_callers_and_the_sender_lives_on(stack):
    dead = Pipelined(connection_pool=redis.ConnectionPool(port=1, socket_connect_timeout=1))
    with pytest.raises(redis.ConnectionError):
        dead.get("anything")
    with pytest.raises(redis.ConnectionError):  # the same sender serves the next batch
        dead.get("anything")
    client = Pipelined(connection_pool=redis.ConnectionPool.from_url(get_settings().redis_url))
    key = f"pipelined:{uuid.uuid4().hex}"
    client.set(key, "1")
    redis.Redis.from_url(get_settings().redis_url).client_kill_filter(_id=client.client_id())
    try:
        client.get(key)  # redis-py may retry on a fresh connection, or raise
    except redis.ConnectionError:
        pass
    assert client.get(key) == b"1"
    assert client.batcher.batches == 4
