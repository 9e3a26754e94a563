"""Celery settings, read by Celery when the app is first configured.

Delivery is at least once; tasks are idempotent (they re-read and claim their
row under an attempt number), so a redelivered task is harmless and a lost
one is re-sent by the sweeper. Results live in Postgres and the event log, not
in Celery. Values that come from the environment (broker URL, key prefix, the
sweeper's schedule) are added by shared.broker.get_celery(), so this module
reads nothing when imported (the worker's concurrency, WORKER_CONCURRENCY,
comes that way too; so do the queues, and the transport's options for
RabbitMQ when BROKER_URL names it). Redis itself must run with
`maxmemory-policy noeviction` (deploy/redis.sh; the worker warns otherwise).
"""

# Threads: a turn waits on the model and its tools, and the MCP client is
# asyncio, which gevent's pool clashes with.
worker_pool = "threads"
# A worker that starts before Redis keeps trying instead of exiting.
broker_connection_retry_on_startup = True
# The worker's start and stop, and the task modules: imported by the worker
# when it starts (beat's loader imports them too; never the web tier).
include = ["tasks.worker", "tasks.turn", "tasks.replay", "tasks.sweeper", "tasks.webhooks", "tasks.schedules"]
# With Redis as the broker, the one visibility timeout (there is no result
# backend to set it on too, and beat, Flower and the web tier build the same
# app, so all of them use it): how long an unacknowledged message waits
# before Redis hands it to another worker. Turns do not wait for it: the
# sweeper re-queues a dead worker's turns once their heartbeats stop
# (STALE_RUNNING_SECONDS + SWEEP_SECONDS) and re-sends lost messages. It need
# only exceed the longest turn, so a running turn's message is not handed out
# again (harmless if it is: the second claim finds the turn running and does
# nothing). RabbitMQ hands a message on when its consumer's connection
# closes instead, and closes a channel that holds one past its
# consumer_timeout (deploy/rabbitmq.sh sets an hour, as here).
broker_transport_options = {"visibility_timeout": 3600}
# JSON only: task arguments are ids, and pickle from a broker is code execution.
task_serializer = "json"
accept_content = ["json"]
# Outcomes go to Postgres and the event log; a result backend would only be a
# second, unread copy.
result_backend = None
task_ignore_result = True
# Acknowledge after the task ran, so a worker that dies mid-turn leaves the
# message to be delivered again rather than lost. reject_on_worker_lost hands
# the message back at once when a pool child dies; it matters with the prefork
# pool (with threads a crash takes the whole process, and the sweeper acts).
task_acks_late = True
task_reject_on_worker_lost = True
# One message at a time per worker thread: a long turn must not sit on
# prefetched messages that an idle worker could run.
worker_prefetch_multiplier = 1
# When the broker connection drops, running turns keep going: they stream
# through Redis (which reconnects) and finish in Postgres under their attempt
# number. Cancelling them would waste the model's work, and the redelivered
# message finds the turn running and does nothing.
worker_cancel_long_running_tasks_on_connection_loss = False
# Shutdown. SIGTERM is Celery's warm shutdown: stop taking messages, wait for
# the running turns; tasks/worker.py hands back those still running after
# WORKER_SHUTDOWN_GRACE_SECONDS. A cold shutdown (SIGQUIT, Ctrl+C twice) hands
# them back at once; this soft-shutdown window lets that land, and the turns
# stop, before Celery cancels what is left and exits.
worker_soft_shutdown_timeout = 3.0
# Every turn shows in Flower, from the worker's events. No "sent" event: it
# would cost the web tier a Redis round trip per turn to show a turn as
# pending, which Turnstream's own API already does.
worker_send_task_events = True
task_send_sent_event = False
# The queues (task_queues) are shared.broker.QUEUES, declared for the broker
# in use: quorum queues on RabbitMQ.
task_default_queue = "turns"
task_routes = {
    "tasks.sweep_turns": {"queue": "maintenance"},
    "tasks.dispatch_webhooks": {"queue": "maintenance"},
    "tasks.fire_schedules": {"queue": "maintenance"},
    "tasks.deliver_webhook": {"queue": "webhooks"},
}
timezone = "UTC"
# No task time limits: the threads pool cannot enforce them. A turn is bounded
# by OPENAI_TIMEOUT per model read, TOOL_TIMEOUT_SECONDS per tool call and
# MAX_TOOL_ROUNDS.
