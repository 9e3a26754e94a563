"""Reads of a model's answer that end when the turn is asked to stop.
Targets httpx2 2.16 and httpcore2 2.16 (`Client._transport._pool` and the
pool's `_network_backend`, which httpx2's transport does not let a caller
pass).

A worker thread waiting for a model's first token, or its next one, sits in
a socket read that only the read timeout (OPENAI_TIMEOUT) ends, so a
cancel, an interrupt or a rollback was seen at the next delta: against a
model that thinks for a minute, a minute late. Under `watching(stop)` this
backend's reads wait in slices of SLICE seconds and between slices ask
`stop()`; a yes raises Stopped, which is no httpx error (the client does not
retry it) and drops the connection, so the model server stops generating
too. The client's own read timeout still holds. A read that finds data
returns at once: an answer that streams costs nothing more; one that keeps
the thread waiting costs a `stop()` (one Redis command) per SLICE.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpcore2
import httpx2

SLICE = 0.25  # seconds a waiting read goes without asking: a stop is seen within it

_watch = threading.local()


class Stopped(Exception):
    """`stop()` said yes while a read waited for the model."""


@contextlib.contextmanager
def watching(stop: Callable[[], bool]) -> Iterator[None]:
    """This thread's reads of the model ask `stop()` while they wait."""
    _watch.stop = stop
    try:
        yield
    finally:
        _watch.stop = None


def install(client: httpx2.Client) -> httpx2.Client:
    pool = client._transport._pool
    pool._network_backend = _Backend(pool._network_backend)
    return client


class _Stream(httpcore2.NetworkStream):
    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        stop = getattr(_watch, "stop", None)
        if stop is None:
            return self._inner.read(max_bytes, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
            if wait <= 0:
                raise httpcore2.ReadTimeout("timed out")
            try:
                return self._inner.read(max_bytes, wait)
            except httpcore2.ReadTimeout:
                if wait < SLICE:  # the client's own timeout has passed
                    raise
                if stop():
                    raise Stopped from None

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(self._inner.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore2.NetworkBackend):
    def __init__(self, inner: httpcore2.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(self._inner.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)
