"""gunicorn settings for the web process: `gunicorn -c deploy/gunicorn.conf.py "web:create_app()"`."""

# gevent patches the standard library before anything else is imported, so
# every socket (Redis, Postgres via psycopg's gevent support) yields.
from gevent import monkey

monkey.patch_all()

import glob  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

# Metrics: every gunicorn process counts into files of one directory, and
# /metrics sums them (prometheus_client's multiprocess mode). Set before
# anything imports prometheus_client; emptied at start, since counts left by
# an earlier server would be added to this one's.
_metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"turnstream-metrics-{os.environ.get('PORT', '8000')}"),
)
os.makedirs(_metrics_dir, exist_ok=True)
for _stale in glob.glob(os.path.join(_metrics_dir, "*.db")):
    os.remove(_stale)

from shared.config import ConfigError, cookie_signing_key, get_settings, is_loopback  # noqa: E402

# Read and validated here, in the master: a bad setting stops the server with
# its sentence before any worker starts.
_settings = get_settings()
cookie_signing_key(_settings)
bind = f"0.0.0.0:{_settings.port}"
worker_class = "gevent"
workers = _settings.web_concurrency
# Each SSE stream is one greenlet; the relay holds one Redis connection per
# process whatever this number.
worker_connections = _settings.web_worker_connections
timeout = 30
# SIGTERM ends SSE streams at once (post_worker_init); plain requests get this long.
graceful_timeout = 20
keepalive = 5
# No access log: web logs each request itself (web/context.py), with its ids, as text or JSON.


def on_starting(server):
    """Before binding: with authentication off, only this machine may reach
    the server (`-b` on the command line can change the address)."""
    if _settings.auth_enabled:
        return
    for address in server.cfg.bind:
        host = address.rpartition(":")[0] if not address.startswith("unix:") else "localhost"
        if not is_loopback(host):
            raise ConfigError(
                f"AUTH=off is refused on {address}: anyone who reaches it could read every conversation and"
                " use the model and the tools. Bind to 127.0.0.1 (as deploy/dev.sh does) or turn AUTH on."
            )


def post_worker_init(worker):
    """Once the app is loaded in the worker process."""
    import gc

    import gevent

    # What the app holds from its start (modules, the ORM's mappers) is
    # never garbage: leave it out of the collector's full passes, which
    # otherwise scan all of it again each time while every stream waits.
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


def child_exit(server, worker):
    """A process that ended no longer counts in the gauges of the living
    (open streams, channels)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
