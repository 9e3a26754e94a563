"""One test per override of a library's internals (shared/overrides/): the
override does what it is for, and the upstream behaviour it works around is
still there. When upstream changes, these fail: drop or fix the override."""

from __future__ import annotations

import uuid

import redis
from kombu import Connection
from kombu.transport import redis as upstream_redis
from openai import OpenAI

from shared import overrides
from shared.config import Settings
from shared.overrides import kombu_redis, openai_stream


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
    assert Settings.from_env(dev).library_overrides == {"kombu_redis", "openai_drain", "openai_dict_chunks"}
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
