"""The beat-scheduled sweeper (every SWEEP_SECONDS): see shared/recovery.py."""

from __future__ import annotations

from celery import shared_task

from shared import metrics
from shared.approvals import expire_overdue
from shared.broker import SWEEP_TURNS
from shared.recovery import requeue_stale_running, resend_queued, resend_stalled_replays
from tasks.base import TurnstreamTask


# No task events: run every SWEEP_SECONDS, it would fill Flower's task list,
# which is there to show turns. What it does, shared/recovery.py logs. No
# retries either: beat sends the next sweep soon enough.
@shared_task(name=SWEEP_TURNS, base=TurnstreamTask, send_events=False, autoretry_for=())
def sweep_turns() -> dict[str, int]:
    """How many queued turns were re-sent, running ones re-queued,
    stalled replays advanced, and tool calls rejected past their deadline."""
    done = {
        "resent": resend_queued(),
        "requeued": requeue_stale_running(),
        "replays": resend_stalled_replays(),
        "expired": expire_overdue(),
    }
    for action, count in done.items():
        if count:
            metrics.SWEEPER_ACTIONS.labels(action).inc(count)
    return done
