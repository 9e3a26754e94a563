"""The relay writes a waiting stream's next event to its client's socket
itself, framed as the HTTP/1.1 chunk gunicorn would have written.

Targets gunicorn 27 with gevent 26: under the gevent worker the request's
socket is `environ["gunicorn.socket"]`, a gevent socket over the OS socket
(`_sock`), and gunicorn writes each piece of a chunked response body straight
to it as `%X\\r\\n<data>\\r\\n` (`gunicorn.util.write_chunk`), buffering
nothing, so bytes written to the OS socket between two of its writes arrive
in order and well framed. The relay's reader and every stream are greenlets
of one thread, so they never write at once; the reader writes only while
the stream waits with nothing queued.

Why: otherwise each event wakes every stream's greenlet to write its own
copy (a switch, a wake-up, a send per stream), which under a few thousand
streams of one turn was most of the web process's CPU. No upstream issue:
WSGI offers no way to write outside the response iterator.

Off (LIBRARY_OVERRIDES), or without gevent, TLS in the process, or a
chunked HTTP/1.1 response, every frame goes through the response iterator.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any


def writable_socket(environ: Mapping[str, Any]) -> socket.socket | None:
    """The request's (gevent) socket, if a stream's frames may be written to
    it directly."""
    sock = environ.get("gunicorn.socket")
    if sock is None or not type(sock).__module__.startswith("gevent") or hasattr(sock, "cipher"):
        return None
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1" or environ.get("REQUEST_METHOD") == "HEAD":
        return None
    return sock


def os_socket(sock: socket.socket) -> socket.socket:
    """The OS socket under gevent's: its `send` returns at once when full,
    where gevent's waits for room."""
    return sock._sock


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked response body."""
    return b"%X\r\n%s\r\n" % (len(data), data)


def send_now(sock: socket.socket, data: bytes) -> int:
    """Bytes of `data` the socket took without waiting (0: full, or broken:
    the stream's own next write tells which)."""
    try:
        return sock.send(data, socket.MSG_DONTWAIT)
    except OSError:
        return 0
