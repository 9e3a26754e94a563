"""The baseline task of tests/bench/pipeline.py, loaded into the same worker
with `--include tests.bench.bare`: a bare Celery task (the project's settings:
threads pool, late acks, prefetch 1) that only PUBLISHes to a channel."""

from __future__ import annotations

from celery import shared_task

from shared.redis import get_redis

PUBLISH = "bench.publish"


@shared_task(name=PUBLISH, ignore_result=True)
def publish(channel: str, payload: str) -> None:
    get_redis().publish(channel, payload)
