"""The worker: `celery -A tasks worker`. Tasks register through shared_task;
the app itself is built on first access of `tasks.app` (what `-A tasks`
looks up), so importing this package reads no environment."""

from tasks import replay, sweeper, turn  # noqa: F401  (registers the tasks)


def __getattr__(name: str):
    if name in ("app", "celery"):
        from shared.broker import get_celery

        return get_celery()
    raise AttributeError(name)
