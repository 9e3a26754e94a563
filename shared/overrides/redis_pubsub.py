"""The relay's Pub/Sub connection, read without redis-py's PubSub layer.

Targets redis-py 8.1 (`Connection.send_command(..., check_health=False)`
and `Connection.read_response()`, which on a subscribed RESP2 connection
returns each push as `[kind, channel, data]`). `PubSub.get_message` turns
every message into a dict through `handle_message`, with a health check and
a readiness poll around each read: per message, that cost more than
everything else the relay does with it (parsing its seq and type, framing
it, handing it to each stream). One connection of the client's own pool
(TLS, auth and the hiredis parser as configured) is used as it is. No
upstream issue is filed: PubSub's per-message work is by design.

With the override off (LIBRARY_OVERRIDES), the relay reads through
`redis.client.PubSub` (`web.relay.hub.LibrarySubscriber`).
"""

from __future__ import annotations

from typing import Any

import redis


class RawSubscriber:
    """SUBSCRIBE/UNSUBSCRIBE sent and pushes read on one plain connection."""

    def __init__(self, client: redis.Redis) -> None:
        self._conn = client.connection_pool.make_connection()
        self._conn.connect()

    def send(self, command: str, *channels: bytes) -> None:
        self._conn.send_command(command, *channels, check_health=False)

    def read(self) -> list[Any]:
        """The next push: [b"message", channel, data], [b"subscribe", channel, n], …"""
        return self._conn.read_response()

    def close(self) -> None:
        self._conn.disconnect()
