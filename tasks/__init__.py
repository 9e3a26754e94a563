"""The worker: `celery -A tasks worker`. The app is built on first access of
`tasks.app` (what `-A tasks` looks up), so importing this package reads no
environment and stays light (the bundled MCP server lives in tasks.mcp); the
worker imports its start and stop (tasks.worker) and the task modules through
celeryconfig's `include`."""


def __getattr__(name: str):
    if name in ("app", "celery"):
        from shared.broker import get_celery

        return get_celery()
    raise AttributeError(name)
