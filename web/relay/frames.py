"""Events as SSE frames, and the streaming response that carries them."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from flask import Response, g, request

from shared import metrics
from shared.events import ENDING_TYPES, peek
from shared.overrides.gunicorn_direct_write import chunk
from web.limits import open_streams

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING = b": ping\n\n"
RETRY = b"retry: 2000\n\n"

_ENDING = frozenset(t.encode() for t in ENDING_TYPES)


class Frame(NamedTuple):
    seq: int
    ending: bool  # the log's last event: turn.completed, replay.finished, …
    data: bytes  # the whole SSE message, encoded once
    chunk: bytes  # the same as an HTTP/1.1 chunk, as a direct write sends it
    received: float = 0.0  # when the relay's reader got it (monotonic); 0 for one read from the log


def encode(raw: bytes, received: float = 0.0) -> Frame:
    """The frame of one logged event (its JSON as published)."""
    seq, type_ = peek(raw)
    data = b"event: %s\nid: %d\ndata: %s\n\n" % (type_, seq, raw)
    return Frame(seq, type_ in _ENDING, data, chunk(data), received)


def synthetic(type_: str, data: str) -> bytes:
    """The frame of an event that is not in a log (turn.accepted, the
    snapshots): no id, so it never moves the client's Last-Event-ID."""
    return f"event: {type_}\ndata: {data}\n\n".encode()


def sse_response(frames: Iterable[bytes], ping_seconds: float) -> Response:
    """A streaming SSE response, counted against its owner's open streams
    until it closes. A client that stops reading (its socket blocks a
    write) or whose host vanished (sent data stays unacknowledged) is
    dropped after two pings, and one that closed its connection at its next
    ping, so its greenlet, socket and subscription are freed; it resumes
    from the log if it comes back."""
    release = open_streams().hold(g.owner_id)
    deadline = 2 * ping_seconds
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(deadline)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(deadline * 1000))
        frames = _until_closed(frames, sock, deadline)
    # No request context rides along (the frames need none), and bytes pass
    # through as they are.
    return Response(
        _Released(frames, release), mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True
    )


class _Released:
    """The frames, and `release` once the server closes them (a passed-through
    iterable is what the server closes, not the Response)."""

    __slots__ = ("_frames", "_release")

    def __init__(self, frames: Iterable[bytes], release: Callable[[], None]) -> None:
        self._frames = iter(frames)
        self._release = release

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._frames)

    def close(self) -> None:
        self._release()
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()


def _until_closed(frames: Iterable[bytes], sock: socket.socket, deadline: float) -> Iterator[bytes]:
    """The frames until the client closes its end, looked at before each
    ping: a write to a closed connection succeeds (the peer answers it with
    a reset), so without looking the stream would live to the ping after."""
    try:
        for data in frames:
            if data == PING and _closed(sock, deadline):
                metrics.RELAY_DROPPED.labels("gone").inc()
                return
            yield data
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()


def _closed(sock: socket.socket, deadline: float) -> bool:
    """Whether the peer closed, by a peek that does not wait (timeout 0:
    gevent's socket, like the standard one, then raises instead of waiting)."""
    try:
        sock.settimeout(0)
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False  # open, nothing sent: an SSE client sends nothing after its request
    except OSError:
        return True
    finally:
        try:
            sock.settimeout(deadline)
        except OSError:
            pass
