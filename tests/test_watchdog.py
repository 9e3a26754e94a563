"""The consumer watch: a worker that takes no message while some wait and
its threads are free is stuck, and restarts; one that is busy, or paused on
purpose, is not."""

from __future__ import annotations

import time
import uuid

from shared.redis import get_redis, key
from tasks.watchdog import ConsumerWatch
from tests.services import wait_until


def _watch(queue: str, stalls: list, **kwargs) -> ConsumerWatch:
    return ConsumerWatch(
        queue, threads=4, stall_seconds=2, on_stall=lambda: stalls.append("handed back"), exit=stalls.append, **kwargs
    )


def test_messages_waiting_and_nothing_received_means_stuck(stack):
    queue = f"watch-{uuid.uuid4().hex[:8]}"
    get_redis().rpush(key(queue), "a message no consumer takes")
    stalls: list = []
    watch = _watch(queue, stalls)
    wait_until(lambda: stalls, 10, "the watch to see the stall")
    watch.stop()
    assert stalls == ["handed back", 1]  # turns handed back first, then exit(1)


def test_a_consumer_that_receives_or_was_paused_or_has_nothing_to_take_is_left_alone(stack):
    busy, paused, idle = (f"watch-{uuid.uuid4().hex[:8]}" for _ in range(3))
    for queue in (busy, paused):
        get_redis().rpush(key(queue), "waiting")
    stalls: list = []
    watches = [_watch(busy, stalls), _watch(paused, stalls, consuming=lambda: False), _watch(idle, stalls)]
    deadline = time.monotonic() + 4  # twice the stall time
    while time.monotonic() < deadline:
        watches[0].reset()
        time.sleep(0.2)
    for watch in watches:
        watch.stop()
    assert stalls == []


def test_the_worker_watches_its_consumer(stack):
    worker = stack["worker"]
    wait_until(
        lambda: "watching the consumer of queue 'turns' (consuming: True)" in worker.log_path.read_text(), 10, "watch"
    )
