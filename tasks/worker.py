"""The worker's start and stop, as Celery's signals announce them: checks
and warm-up at start, the consumer watch, hand-back of running turns at
shutdown, then closing the tools and sending the last spans. The worker
imports it through celeryconfig's `include`; the tasks themselves know
nothing of it."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.signals import task_received, worker_init, worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy import text

from shared import metrics, tracing
from shared.assistants import default_profile
from shared.config import get_settings
from shared.db import autocommit_engine
from shared.events import get_publisher
from shared.redis import check_eviction_policy, get_redis
from shared.status import POSTGRES_ERRORS, REDIS_ERRORS, describe_outage
from tasks.heartbeat import get_heartbeat
from tasks.model import get_client, probe_model
from tasks.tools import get_toolbox
from tasks.watchdog import ConsumerWatch, waiting_messages

log = logging.getLogger(__name__)

_watch: ConsumerWatch | None = None


@worker_init.connect
def check_redis(**_: Any) -> None:
    """Before Celery connects to its broker (and, with Redis down, retries
    without end): say in one line where Redis was looked for."""
    try:
        get_redis().ping()
    except REDIS_ERRORS as exc:
        log.error("%s; the worker keeps trying", describe_outage(exc))


@worker_ready.connect
def warm_up(sender: Any, **_: Any) -> None:
    """The consumer is ready (`sender` is Celery's Consumer): start watching
    it for a stall, export traces and metrics, check Redis's eviction policy, and do first-use work
    before the first turn instead of during a burst of them: build the model
    client, and start every pool thread (the threads pool starts one per
    task until it is full, each start then waiting for the GIL that running
    turns hold). Then freeze what start-up made, as web does: a full
    collection, which holds the GIL and so stops every turn, no longer scans
    it."""
    watch_consumer(sender, on_stall=get_heartbeat().hand_back_all)
    tracing.configure("turnstream-worker")
    settings = get_settings()
    metrics.serve(settings.worker_metrics_port, settings.metrics_address, "worker")
    check_eviction_policy()
    get_client()
    threading.Thread(target=check_dependencies, name="start-checks", daemon=True).start()
    executor = getattr(sender.pool, "executor", None)
    if executor is not None:
        started = threading.Barrier(sender.pool.limit)
        for _ in range(sender.pool.limit):
            executor.submit(started.wait, 10)
    gc.collect()
    gc.freeze()


def check_dependencies() -> None:
    """What a person starting a worker needs to know, said at once rather
    than at the first turn: a Postgres it cannot reach, in one line; and,
    for web to show, whether the model answers (and is the offline one) and
    which tool servers open (which also opens them before the first turn)."""
    try:
        with autocommit_engine().connect() as db:
            db.execute(text("SELECT 1"))
    except POSTGRES_ERRORS as exc:
        log.error("%s; turns wait until it answers", describe_outage(exc))
    probe_model()
    get_toolbox().offer(default_profile(get_settings()))


def watch_consumer(consumer: Any, on_stall: Callable[[], Any]) -> None:
    """Start watching a worker's consumer (the sender of `worker_ready`)."""
    global _watch
    queue = consumer.app.conf.task_default_queue

    def consuming() -> bool:
        tasks = consumer.task_consumer  # replaced on every reconnect
        return tasks is None or any(q.name == queue for q in tasks.queues)

    stall = get_settings().worker_stall_seconds
    log.info(
        "watching the consumer of queue %r (consuming: %s): stuck after %.0f s without a message",
        queue,
        consuming(),  # here first, so a fault in it shows at start-up
        stall,
    )
    _watch = ConsumerWatch(waiting_messages(consumer.app, queue), consumer.pool.limit, stall, on_stall, consuming)


@task_received.connect
def _note_received(**_: Any) -> None:
    if _watch is not None:
        _watch.reset()


@worker_shutting_down.connect
def hand_back_on_shutdown(how: str = "Warm", **_: Any) -> None:
    """SIGTERM (a deploy, a scale-down): Celery stops taking messages and
    waits for the running turns. Those still running after
    WORKER_SHUTDOWN_GRACE_SECONDS are handed back to the queue at once, for
    another worker, instead of being killed by the platform (Heroku allows
    30 s) and waiting for the sweeper. A cold shutdown (SIGQUIT, a second
    SIGINT) hands them back without waiting."""
    grace = get_settings().worker_shutdown_grace if how == "Warm" else 0.0
    threading.Thread(target=_drain, args=(grace,), name="shutdown-hand-back", daemon=True).start()


def _drain(grace: float) -> None:
    heartbeat = get_heartbeat()
    deadline = time.monotonic() + grace
    while heartbeat.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    handed = heartbeat.hand_back_all()
    if handed:
        log.warning("shutting down: handed back %d turns still running after %.0f s", handed, grace)


@worker_shutdown.connect
def close_tools(**_: Any) -> None:
    """Send the spans still buffered, close the MCP servers this process
    opened (stdio servers exit), and log how the event publisher batched
    (tests/bench/pipeline.py reads it)."""
    tracing.flush()
    if get_toolbox.cache_info().currsize:
        get_toolbox().close()
    if get_publisher.cache_info().currsize:
        b = get_publisher().batcher
        log.info("event publisher: %d events submitted, %d sent, in %d round trips", b.submitted, b.handled, b.batches)
