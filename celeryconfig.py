"""Celery settings, read by Celery when the app is first configured.

Delivery is at least once; tasks are idempotent (they re-read and claim their
row), so a redelivered task is harmless and a lost one is re-sent by the
sweeper. Results live in Postgres and the event log, not in Celery. Values that come
from the environment (broker URL, key prefix) are added by
shared.broker.get_celery(), so this module reads nothing when imported.
"""

broker_connection_retry_on_startup = True
# The task modules, imported by the worker when it starts (never by the web tier).
include = ["tasks.turn", "tasks.replay", "tasks.sweeper"]
# One visibility timeout for the broker and the result transport: how long an
# unacknowledged task waits before Redis hands it to another worker. The
# sweeper re-sends lost queued turns much sooner than this; running turns of a
# dead worker wait for it (heartbeats to shorten that are still to come).
broker_transport_options = {"visibility_timeout": 3600}
task_serializer = "json"
accept_content = ["json"]
result_backend = None
task_ignore_result = True
# Acknowledge after the task ran, and hand the task back if its worker dies,
# so a crash mid-turn leads to a redelivery rather than a lost turn.
task_acks_late = True
task_reject_on_worker_lost = True
# One message at a time per worker thread: a long turn must not sit on
# prefetched messages that an idle worker could run.
worker_prefetch_multiplier = 1
# Every turn shows in Flower.
worker_send_task_events = True
task_send_sent_event = True
task_default_queue = "turns"
timezone = "UTC"
beat_schedule = {
    "sweep-turns": {"task": "tasks.sweep_turns", "schedule": 15.0},
}
