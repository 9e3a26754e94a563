"""kombu's Redis transport, with one redis-py client per channel for the
commands it sends outside its consumer's BRPOP (publishes, acks, task
events).

Targets kombu 5.7 (`kombu.transport.redis.Channel.conn_or_acquire`) with
redis-py 8.1. kombu builds a new client for each such command
(`self._create_client()`), and redis-py fills a table of about 150 reply
callbacks for each client it builds: about 60 µs of CPU, several times per
task (every task event, every ack). A client holds no connection (each
command takes one from the channel's pool and gives it back), so one serves
every command and every thread. No upstream issue is filed.
"""

from __future__ import annotations

from contextlib import contextmanager

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.utils.objects import cached_property


class Channel(kombu_redis.Channel):
    @cached_property
    def _commands_client(self) -> redis.Redis:
        return self._create_client()

    @contextmanager
    def conn_or_acquire(self, client=None):
        """kombu's hook for a command outside BRPOP: the channel's one client."""
        yield client or self._commands_client


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make redis:// and rediss:// name this transport in this process.
    Registered under the schemes' own names, not as a class path in
    broker_transport, so URLs keep their form where they are shown (Flower's
    broker page reads the scheme)."""
    TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
