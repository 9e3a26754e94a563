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
# The one visibility timeout (there is no result backend to set it on too): how
# long an unacknowledged message waits before Redis hands it to another worker.
# Turns do not wait for it: the sweeper re-queues a dead worker's turns once
# their heartbeats stop (STALE_RUNNING_SECONDS + SWEEP_SECONDS) and re-sends
# lost messages (STALE_QUEUED_SECONDS). It need only exceed the longest turn,
# so a running turn's message is not handed out again (harmless if it is: the
# second claim finds the turn running and does nothing).
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
# beat_schedule (the sweeper, every SWEEP_SECONDS) is set by get_celery().
