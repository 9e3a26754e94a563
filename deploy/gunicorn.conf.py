"""gunicorn settings for the web process: `gunicorn -c deploy/gunicorn.conf.py "web:create_app()"`."""

# gevent patches the standard library before anything else is imported, so
# every socket (Redis, Postgres via psycopg's gevent support) yields.
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Each SSE stream is one greenlet; the relay holds one Redis connection per
# process whatever this number.
worker_connections = int(os.environ.get("WEB_WORKER_CONNECTIONS", "10000"))
timeout = 30
# SIGTERM ends SSE streams at once (post_worker_init); plain requests get this long.
graceful_timeout = 20
keepalive = 5
accesslog = "-"


def post_worker_init(worker):
    """Once the app is loaded in the worker process."""
    import gc

    import gevent

    # What the app holds from its start (modules, the ORM's mappers; about
    # 100,000 objects) is never garbage: leave it out of the collector's
    # full passes, which otherwise scan it while every stream waits (a full
    # pass with 1,000 streams took 102 ms, and 43 ms without it).
    gc.collect()
    gc.freeze()

    # On SIGTERM (a deploy) gunicorn stops accepting and waits up to
    # graceful_timeout for open requests; an SSE stream never ends by itself,
    # so end them all at once: each client reconnects (to another process)
    # with Last-Event-ID and loses nothing.
    def end_streams_at_exit():
        while worker.alive:
            gevent.sleep(0.5)
        worker.wsgi.extensions["turnstream.relay"].close()

    gevent.spawn(end_streams_at_exit)
