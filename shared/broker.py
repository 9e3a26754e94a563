"""The Celery app both tiers use, and the thin functions that send work.

The web tier sends tasks by name through this module and never imports the
worker's code; the worker registers its tasks on the same app (tasks/).
The logging of every Celery process (the worker's and beat's) is set up
here too, and so are beat's metrics: beat only sends tasks by name, as web
does. The worker's own start and stop are tasks/worker.py's.
"""

from __future__ import annotations

import functools
import logging

import redis
from celery import Celery
from celery.signals import beat_init, before_task_publish, setup_logging
from kombu import Producer, Queue

from shared import logs, metrics, overrides
from shared.batching import Batcher
from shared.config import get_settings
from shared.overrides import kombu_redis
from shared.redis import TCP_OPTIONS, get_redis, key

log = logging.getLogger(__name__)

RUN_TURN = "tasks.run_turn"
ADVANCE_REPLAY = "tasks.advance_replay"
SWEEP_TURNS = "tasks.sweep_turns"
DISPATCH_WEBHOOKS = "tasks.dispatch_webhooks"
DELIVER_WEBHOOK = "tasks.deliver_webhook"
FIRE_SCHEDULES = "tasks.fire_schedules"
WEBHOOKS_QUEUE = "webhooks"
# Turns, and the sweeper's own queue, which every worker also consumes: it
# must not wait behind a long queue of turns (it is what re-sends lost ones);
# and webhooks, which only the webhook worker consumes (the Procfile).
QUEUES = ("turns", "maintenance", WEBHOOKS_QUEUE)


@functools.cache
def get_celery() -> Celery:
    """Built on first use from celeryconfig.py plus the environment's values."""
    settings = get_settings()
    if overrides.enabled("kombu_redis"):
        kombu_redis.install()  # before the app's first connection
    app = Celery("turnstream")
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.broker_url
    app.conf.worker_concurrency = settings.worker_concurrency
    if settings.rabbitmq:
        # Quorum queues (replicated, written to disk before a publish is
        # confirmed; the sender asks for confirms, _sender_producer): a
        # turn's message, once sent, survives the broker's restart. Late
        # acks (celeryconfig.py) keep it until its turn ran.
        app.conf.task_queues = [Queue(name, queue_arguments={"x-queue-type": "quorum"}) for name in QUEUES]
        app.conf.broker_transport_options = {}
    else:
        app.conf.task_queues = [Queue(name) for name in QUEUES]
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "global_keyprefix": settings.redis_prefix,
            "socket_keepalive": True,
            "socket_keepalive_options": TCP_OPTIONS,
        }
    app.conf.beat_schedule = {
        "sweep-turns": {"task": SWEEP_TURNS, "schedule": settings.sweep_seconds},
        # Each second, on the maintenance queue: the turn workers take the due
        # webhooks (a query on a partial index) and only their sending goes to
        # the webhooks process; nothing piles up where none runs.
        "dispatch-webhooks": {"task": DISPATCH_WEBHOOKS, "schedule": 1.0, "options": {"expires": 2}},
        # The same for replay schedules: they are kept in Postgres
        # (shared/schedules.py), so a change needs no restart of beat.
        "fire-schedules": {"task": FIRE_SCHEDULES, "schedule": 1.0, "options": {"expires": 2}},
    }
    return app


@setup_logging.connect
def _logs(**_: object) -> None:
    """The worker's and beat's logs, as web's (Celery then leaves logging alone)."""
    logs.configure(get_settings().log_format)


@beat_init.connect
def _beat_metrics(**_: object) -> None:
    """Beat exports its own metrics: what it sent, from its own process."""
    settings = get_settings()
    metrics.serve(settings.beat_metrics_port, settings.metrics_address, "beat")
    before_task_publish.connect(_count_beat_send, weak=False)


def _count_beat_send(sender: str | None = None, **_: object) -> None:
    metrics.BEAT_SENT.labels(sender or "").inc()


def send_turn(turn_id: str) -> None:
    """Send a turn to the workers. Call only after its row has committed."""
    _sender().submit((RUN_TURN, turn_id))


def send_turns(turn_ids: list[str]) -> None:
    """Send many turns without waiting for each: one that is lost is sent
    again by the sweeper."""
    for turn_id in turn_ids:
        _sender().submit((RUN_TURN, turn_id), wait=False)


def send_replay_advance(replay_id: str) -> None:
    _sender().submit((ADVANCE_REPLAY, replay_id))


def sent_key(turn_id: str) -> str:
    """Present for STALE_QUEUED_SECONDS after the turn was sent, so the
    sweeper does not send again a turn that waits in a long queue, and does
    send one whose send failed (shared/recovery.py). It lives in Redis: when
    Redis, as the broker, loses the queue, it loses these too."""
    return key("turn", turn_id, "sent")


def mark_sent(*turn_ids: str, later: float = 0.0) -> None:
    """Set the turns' sent marks, for STALE_QUEUED_SECONDS after `later` seconds."""
    ttl = int(get_settings().stale_queued_seconds + later)
    pipe = get_redis().pipeline(transaction=False)
    for turn_id in turn_ids:
        pipe.set(sent_key(turn_id), 1, ex=ttl)
    pipe.execute()


@functools.cache
def _sender() -> Batcher:
    """The process's task sender. Each caller waits until its message is in
    the broker; messages queued meanwhile go together, in one round trip.

    Celery's send_task runs on the sender's own thread: under gevent, a send
    from a request's new greenlet first builds per-greenlet state (a result
    backend, an id) and kombu's client, to use them for one message; the
    sender's one long-lived thread builds them once."""
    return Batcher(_send_tasks, "task-sender")


@functools.cache
def _sender_producer() -> Producer:
    """The sender's own producer and broker connection, used by its one
    thread only. On RabbitMQ it asks for publisher confirms, so a send
    returns once the broker has the messages on disk. Only here: with
    confirms on the connections a worker's threads share (task events),
    its consumer stopped taking messages under a burst."""
    app = get_celery()
    options = {"confirm_publish": True} if get_settings().rabbitmq else {}
    return app.amqp.Producer(app.connection_for_write(transport_options=options), auto_declare=False)


def _send_tasks(tasks: list[tuple[str, str]]) -> list[None]:
    """The messages in one round trip (kombu's publish batch), then the
    turns' sent marks in one more: a lost mark only lets the sweeper send
    a turn again early, which is harmless."""
    app = get_celery()
    producer = _sender_producer()
    with producer.batch():
        for name, ident in tasks:
            app.send_task(name, args=[ident], producer=producer)
    turns = [ident for name, ident in tasks if name == RUN_TURN]
    if turns:
        try:
            mark_sent(*turns)
        except redis.RedisError as exc:
            log.warning("could not mark %d turns sent: %s", len(turns), exc)
    return [None] * len(tasks)
