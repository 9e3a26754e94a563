"""One test per override of a library's internals (shared/overrides/): the
override does what it is for, and the upstream behaviour it works around is
still there. When upstream changes, these fail: drop or fix the override."""

from __future__ import annotations

import time
import uuid

import httpcore2
import pytest
import redis
from kombu import Connection
from kombu.transport import redis as upstream_redis
from openai import APITimeoutError, DefaultHttpx2Client, OpenAI

from shared import overrides
from shared.config import OVERRIDES, Settings
from shared.overrides import httpcore_stoppable, kombu_redis, openai_stream


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


@pytest.mark.fast
def test_each_override_can_be_switched_off():
    dev = {"TURNSTREAM_ENV": "development"}
    assert Settings.from_env(dev).library_overrides == set(OVERRIDES)
    assert Settings.from_env({**dev, "LIBRARY_OVERRIDES": "none"}).library_overrides == frozenset()
    assert Settings.from_env({**dev, "LIBRARY_OVERRIDES": "kombu_redis"}).library_overrides == {"kombu_redis"}


def _connections_for_two_streams(stack, client_class) -> int:
    """Connections the offline model accepted for two streamed completions in a row."""
    import httpx

    control = f"http://127.0.0.1:{stack['model_port']}/control"
    client = client_class(base_url=f"http://127.0.0.1:{stack['model_port']}/v1", api_key="x", max_retries=0)
    before = httpx.post(control, json={}).json()["connections"]
    for _ in range(2):
        with openai_stream.dict_chunks(client, _BODY) as stream:
            assert [c for c in stream][-1]["choices"] is not None
    return httpx.post(control, json={}).json()["connections"] - before - 1  # less the control request's


_BODY = {"model": "turnstream-offline", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_openai_drain_keeps_the_connection_the_client_drops_after_done(stack):
    assert _connections_for_two_streams(stack, OpenAI) == 2, (
        "the openai client now keeps its connection after a stream (openai-python #3440 fixed?):"
        " shared/overrides/openai_stream.py's openai_drain can go"
    )
    assert _connections_for_two_streams(stack, openai_stream.DrainingClient) == 1


def test_openai_dict_chunks_are_the_dicts_the_client_decoded(stack):
    client = OpenAI(base_url=f"http://127.0.0.1:{stack['model_port']}/v1", api_key="x", max_retries=0)
    with openai_stream.dict_chunks(client, _BODY) as stream:
        chunks = list(stream)
    assert all(type(c) is dict for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith('You said: "hi"')
    with client.chat.completions.create(**_BODY) as stream:  # what the override spares: a typed object per chunk
        typed = [c.model_dump() for c in stream]
    assert text == "".join(c["choices"][0]["delta"]["content"] or "" for c in typed if c["choices"])


def _stoppable_client(stack, timeout: float) -> OpenAI:
    http_client = httpcore_stoppable.install(DefaultHttpx2Client())
    return OpenAI(
        base_url=f"http://127.0.0.1:{stack['model_port']}/v1",
        api_key="x",
        max_retries=0,
        timeout=timeout,
        http_client=http_client,
    )


def test_httpcore_stoppable_ends_a_silent_read_when_told_and_leaves_others_alone(stack):
    client = _stoppable_client(stack, timeout=30)
    asked = []

    def not_yet() -> bool:
        asked.append(1)
        return False

    with httpcore_stoppable.watching(not_yet):
        assert list(openai_stream.dict_chunks(client, _BODY))  # it streams: nothing to ask
    assert not asked
    stalled = {**_BODY, "messages": [{"role": "user", "content": "hi [[fault=stall]]"}]}
    started = time.monotonic()
    with pytest.raises(httpcore_stoppable.Stopped):
        with httpcore_stoppable.watching(lambda: time.monotonic() - started > 0.5):
            list(openai_stream.dict_chunks(client, stalled))
    assert 0.5 < time.monotonic() - started < 5  # told, long before the client's 30 s
    started = time.monotonic()  # unwatched, a silent read waits for the client's timeout
    with pytest.raises(APITimeoutError):
        list(openai_stream.dict_chunks(_stoppable_client(stack, timeout=1), stalled))
    assert time.monotonic() - started >= 1


def test_httpcore_stoppable_reaches_the_pool_of_the_clients_transport():
    client = DefaultHttpx2Client()
    assert type(client._transport._pool._network_backend) is httpcore2.SyncBackend, (
        "httpx2's transport builds its pool differently: shared/overrides/httpcore_stoppable.py must follow"
    )
    httpcore_stoppable.install(client)
    assert isinstance(client._transport._pool._network_backend, httpcore_stoppable._Backend)


def test_redis_pipelined_relies_on_every_command_passing_through_execute_command(stack):
    """What Pipelined replaces is the one door every command goes through:
    plain commands, stream reads and scripts alike."""
    from shared.config import get_settings

    seen = []

    class Counting(redis.Redis):
        def execute_command(self, *args, **options):
            seen.append(args[0])
            return super().execute_command(*args, **options)

    client = Counting.from_url(get_settings().redis_url)
    name = f"override:{uuid.uuid4().hex[:8]}"
    client.set(name, "1")
    client.xrange(name + ":s")
    client.register_script("return 1")()
    assert seen[:2] == ["SET", "XRANGE"] and seen[-1] == "EVALSHA", (
        "redis-py no longer sends every command through execute_command:"
        " shared/overrides/redis_pipelined.py would miss some"
    )
    pipe = client.pipeline(transaction=False)
    pipe.lpush(name, "x")  # a wrong type: its error stays in its place
    pipe.get(name)
    wrong, value = pipe.execute(raise_on_error=False)
    assert isinstance(wrong, redis.ResponseError) and value == b"1"


def test_redis_pubsub_reads_pushes_as_plain_replies_where_the_library_builds_a_dict_each(stack):
    from shared.overrides.redis_pubsub import RawSubscriber
    from shared.redis import new_redis
    from web.relay.hub import LibrarySubscriber

    channel = f"override:{uuid.uuid4().hex[:8]}".encode()
    for subscriber in (RawSubscriber(new_redis()), LibrarySubscriber(new_redis())):
        try:
            subscriber.send("SUBSCRIBE", channel)
            assert subscriber.read()[:2] == [b"subscribe", channel]
            new_redis().publish(channel, b"hello")
            assert subscriber.read() == [b"message", channel, b"hello"], (
                "a RESP2 push is no longer [kind, channel, data]: shared/overrides/redis_pubsub.py reads it wrong"
            )
        finally:
            subscriber.close()
    pubsub = new_redis().pubsub()
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # the per-message dict the override spares


@pytest.mark.fast
def test_gunicorn_writes_each_chunk_whole_and_at_once():
    """Direct writes go between gunicorn's own: it must frame a chunk as the
    relay does and keep nothing back in a buffer of its own."""
    import socket

    from gunicorn import util

    from shared.overrides.gunicorn_direct_write import chunk

    ours, peer = socket.socketpair()
    try:
        util.write(ours, b"event: x\n\n", chunked=True)
        peer.settimeout(1)
        assert peer.recv(100) == chunk(b"event: x\n\n") == b"A\r\nevent: x\n\n\r\n", (
            "gunicorn frames or buffers chunks differently: shared/overrides/gunicorn_direct_write.py must follow"
        )
    finally:
        ours.close()
        peer.close()
