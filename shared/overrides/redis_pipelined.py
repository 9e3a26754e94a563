"""The web process's Redis client: commands from any number of greenlets
share round trips.

Targets redis-py 8.1: every command method of `redis.Redis` (scripts'
EVALSHA included) goes through `Redis.execute_command`, and a non-
transactional pipeline returns each command's reply, or its error, in
order (`Pipeline.execute(raise_on_error=False)`), with the same reply
callbacks the client applies. This client replaces `execute_command`: a
command that finds the client idle goes at once, and a `Batcher` sends
whatever queued meanwhile as one pipeline and hands each caller its reply.

Why: a gevent process runs thousands of streams over a few connections. A
command holding a pooled connection holds it until its greenlet runs again,
after every other runnable greenlet: in a connect storm of 10,000 streams
that made each connection serve one command per scheduler pass, and most
streams gave up waiting for one. Batched, a pass serves every command
queued. No upstream issue: redis-py has no auto-pipelining for sync clients.

Off (LIBRARY_OVERRIDES), web uses a plain `redis.Redis` over the same pool.
"""

from __future__ import annotations

from typing import Any

import redis

from shared.batching import Batcher


class Pipelined(redis.Redis):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batcher = Batcher(self._send, "redis-pipelined")

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return self.batcher.submit((args, options), inline=True)

    def _send(self, commands: list[tuple[tuple, dict]]) -> list:
        pipe = self.pipeline(transaction=False)
        for args, options in commands:
            pipe.execute_command(*args, **options)
        return pipe.execute(raise_on_error=False)
