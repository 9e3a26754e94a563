"""The base of every task: what each run of a task shares, whatever it does."""

from __future__ import annotations

import redis
from celery import Task
from celery.signals import task_prerun
from sqlalchemy.exc import InterfaceError, OperationalError

from shared import logs

# Failures that pass: Postgres or Redis restarting, a dropped connection.
TRANSIENT = (OperationalError, InterfaceError, redis.ConnectionError, redis.TimeoutError)


class TurnstreamTask(Task):
    """Base for every task: late acks (a crash means redelivery, and the task
    is idempotent), results kept in Postgres rather than Celery, and a
    failure that passes (Postgres or Redis restarting) retried by Celery
    with exponential backoff: 1, 2, 4, 8, 8 … seconds at most, jittered,
    about a minute in all."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    autoretry_for = TRANSIENT
    retry_backoff = True
    retry_backoff_max = 8
    retry_jitter = True
    max_retries = 10


@task_prerun.connect
def _forget_the_last_task(**_: object) -> None:
    """A pool thread's ids are the task's it runs now (they stay bound
    after it, for Celery's own line saying how it ended)."""
    logs.clear()
