"""The worker: `celery -A tasks worker`. Tasks register through shared_task,
so importing this package builds a Celery object but reads no environment and
opens no connection (celeryconfig is read when Celery first needs it)."""

from shared.broker import get_celery
from tasks import replay, sweeper, turn  # noqa: F401  (registers the tasks)

app = get_celery()
