"""The consumer watch: a worker that takes no message while some wait and
its threads are free is stuck, and restarts; one that is busy, or paused on
purpose, is not. On either broker (marked: run against RabbitMQ too)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest

from shared.broker import get_celery
from shared.config import get_settings
from tasks.watchdog import ConsumerWatch, waiting_messages
from tests.services import wait_until

pytestmark = pytest.mark.broker


@contextlib.contextmanager
def _queue(messages: int) -> Iterator[str]:
    """A queue of the broker under test that no consumer takes from, holding
    `messages` by the time it is yielded.

    On RabbitMQ a publish returns once its frames are written, before the
    broker has put the message in the queue, and the count asks on another
    connection: without publisher confirms it can see fewer messages than
    were put. A confirmed put returns once the queue has the message. On
    Redis a put is an LPUSH that has already answered."""
    name = f"watch-{uuid.uuid4().hex[:8]}"
    options = {"confirm_publish": True} if get_settings().rabbitmq else {}
    with get_celery().connection_for_write(transport_options=options) as conn:
        queue = conn.SimpleQueue(name)
        for n in range(messages):
            queue.put({"n": n})
        try:
            yield name
        finally:
            queue.queue.delete()
            queue.close()


def _watch(queue: str, stalls: list, **kwargs) -> ConsumerWatch:
    waiting = waiting_messages(get_celery(), queue)
    return ConsumerWatch(
        waiting, threads=4, stall_seconds=2, on_stall=lambda: stalls.append("handed back"), exit=stalls.append, **kwargs
    )


def test_the_count_is_the_messages_waiting_in_the_queue(stack):
    with _queue(3) as name:
        assert waiting_messages(get_celery(), name)() == 3


def test_messages_waiting_and_nothing_received_means_stuck(stack):
    stalls: list = []
    with _queue(1) as name:
        watch = _watch(name, stalls)
        wait_until(lambda: stalls, 10, "the watch to see the stall")
        watch.stop()
    assert stalls == ["handed back", 1]  # turns handed back first, then exit(1)


def test_a_consumer_that_receives_or_was_paused_or_has_nothing_to_take_is_left_alone(stack):
    stalls: list = []
    with _queue(1) as busy, _queue(1) as paused, _queue(0) as idle:
        watches = [_watch(busy, stalls), _watch(paused, stalls, consuming=lambda: False), _watch(idle, stalls)]
        deadline = time.monotonic() + 4  # twice the stall time
        while time.monotonic() < deadline:
            watches[0].reset()
            time.sleep(0.2)
        for watch in watches:
            watch.stop()
    assert stalls == []


def test_a_count_that_fails_is_not_a_stall(stack):
    """The broker is away (or the count broke): the watch waits, and does
    not restart a worker that may be fine."""
    stalls: list = []

    def away() -> int:
        raise ConnectionRefusedError("the broker is away")

    watch = ConsumerWatch(away, threads=4, stall_seconds=2, on_stall=lambda: stalls.append("x"), exit=stalls.append)
    time.sleep(4)
    watch.stop()
    assert stalls == []


def test_the_worker_watches_its_consumer(stack):
    worker = stack["worker"]
    wait_until(
        lambda: "watching the consumer of queue 'turns' (consuming: True)" in worker.log_path.read_text(), 10, "watch"
    )
