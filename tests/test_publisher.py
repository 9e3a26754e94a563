"""The worker's event publisher: batches from many threads, in order, merged
deltas, contiguous seqs, and the cancel flag coming back."""

from __future__ import annotations

import threading
import uuid

from shared.events import EventLog, Publisher


def test_many_threads_keep_each_logs_order_and_text(stack):
    publisher = Publisher()
    logs = [EventLog("turn", f"pub-{uuid.uuid4().hex}", publisher=publisher) for _ in range(8)]

    def produce(log: EventLog) -> None:
        log.emit("turn.started", attempt=1)
        for i in range(300):
            log.emit("message.delta", delta=f"{i} ")
        log.append("turn.completed", answer="done")

    threads = [threading.Thread(target=produce, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        events = log.read_after(0)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[0].type == "turn.started" and events[-1].type == "turn.completed"
        text = "".join(e.data["delta"] for e in events if e.type == "message.delta")
        assert text == "".join(f"{i} " for i in range(300))
    # deltas queued while a batch was in flight were merged and sent together
    assert publisher.batcher.batches < publisher.batcher.handled <= 8 * 302


def test_cancel_request_reaches_the_emitter(stack):
    log = EventLog("turn", f"pub-{uuid.uuid4().hex}", publisher=Publisher())
    log.emit("message.delta", delta="a")
    assert log.append("tool.started", call_id="c", name="n", arguments={})[1] is False
    log.request_cancel()
    log.emit("message.delta", delta="b")
    _seq, cancelled = log.append("tool.finished", call_id="c", name="n", ok=True, output="")
    assert cancelled and log.cancelled


def test_a_bad_event_fails_its_sender_and_the_publisher_lives_on(stack):
    publisher = Publisher()
    log = EventLog("turn", f"pub-{uuid.uuid4().hex}", publisher=publisher)
    try:
        log.append("tool.finished", output=object())  # not JSON
    except TypeError:
        pass
    else:
        raise AssertionError("expected the append to fail")
    other = EventLog("turn", f"pub-{uuid.uuid4().hex}", publisher=publisher)
    assert other.append("turn.started", attempt=1) == (1, False)
