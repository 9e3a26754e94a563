"""shared.batching.Batcher: an idle batcher lets an inline caller handle its
own item; anything that comes while a batch is in flight waits for it and
goes after it, in order."""

from __future__ import annotations

import threading

import pytest

from shared.batching import Batcher

pytestmark = pytest.mark.fast  # no service: bash deploy/test.sh --fast


def test_an_inline_item_is_handled_by_its_caller_when_the_batcher_is_idle():
    handled_by: list[str] = []

    def handle(items: list) -> list:
        handled_by.append(threading.current_thread().name)
        return [item * 2 for item in items]

    batcher = Batcher(handle, "test-batcher")
    assert batcher.submit(21, inline=True) == 42
    assert batcher.submit(1) == 2  # not inline: the batcher's own thread
    assert handled_by == [threading.current_thread().name, "test-batcher"]


def test_items_that_come_during_a_batch_go_after_it_in_order():
    order: list[int] = []
    first_started, release = threading.Event(), threading.Event()

    def handle(items: list) -> list:
        if items == [0]:
            first_started.set()
            release.wait(5)
        order.extend(items)
        return [None] * len(items)

    batcher = Batcher(handle, "test-batcher")
    first = threading.Thread(target=batcher.submit, args=(0,), kwargs={"inline": True})
    first.start()
    assert first_started.wait(5)
    later = []
    for i in range(1, 6):  # inline, but the batcher is busy: they queue
        later.append(threading.Thread(target=batcher.submit, args=(i,), kwargs={"inline": True}))
        later[-1].start()
    while batcher.submitted < 6:
        threading.Event().wait(0.01)
    threading.Event().wait(0.1)
    assert order == []  # nothing overtook the batch in flight
    release.set()
    for t in [first, *later]:
        t.join(5)
    assert order[0] == 0 and sorted(order[1:]) == [1, 2, 3, 4, 5]
    assert batcher.batches < 6  # the queued ones shared batches


def test_an_error_reaches_its_caller_and_the_batcher_lives_on():
    def handle(items: list) -> list:
        if "bad" in items:
            raise ValueError("bad item")
        return items

    batcher = Batcher(handle, "test-batcher")
    for inline in (True, False):
        try:
            batcher.submit("bad", inline=inline)
        except ValueError:
            pass
        else:
            raise AssertionError("expected the error")
        assert batcher.submit("good", inline=inline) == "good"
