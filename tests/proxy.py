"""A TCP proxy for tests: round-robin over one or more servers, as a plain
load balancer spreads connections (a server that refuses is skipped), and
cuttable, as a network drop would be. Also a port forward (one target, and
the address and port to listen on)."""

from __future__ import annotations

import itertools
import socket
import threading
import time


class Proxy:
    def __init__(self, targets: list[tuple[str, int]], listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.targets = targets
        self._next = itertools.cycle(range(len(self.targets)))
        self.listener = socket.create_server(listen)
        self.port = self.listener.getsockname()[1]
        self.down_until = 0.0
        self.refused: list[float] = []  # when each connection was refused (time.monotonic())
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = None if time.monotonic() < self.down_until else self._connect()
            if upstream is None:
                self.refused.append(time.monotonic())
                client.close()
                continue
            with self.lock:
                self.live |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        """The next server in turn that accepts."""
        with self.lock:
            start = next(self._next)
        for i in range(len(self.targets)):
            try:
                return socket.create_connection(self.targets[(start + i) % len(self.targets)], timeout=2)
            except OSError:
                continue
        return None

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, seconds: float) -> None:
        """Close every open connection and refuse new ones for `seconds`."""
        self.down_until = time.monotonic() + seconds
        with self.lock:
            live, self.live = self.live, set()
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut(0)
