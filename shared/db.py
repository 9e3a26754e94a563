"""The database engine, built once per process on first use, and transactions."""

from __future__ import annotations

import functools
import logging
import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError, InternalError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.config import DEAD_SERVER_SECONDS, KEEPALIVE_COUNT, KEEPALIVE_INTERVAL_SECONDS, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


# A statement on a connection to a server gone without a word fails after
# DEAD_SERVER_SECONDS, so the pool and run_again_while_away() move on to a
# new connection (shared/config.py says why).
_DEAD_SERVER = {
    "tcp_user_timeout": DEAD_SERVER_SECONDS * 1000,  # ms
    "keepalives": 1,
    "keepalives_idle": DEAD_SERVER_SECONDS,
    "keepalives_interval": KEEPALIVE_INTERVAL_SECONDS,
    "keepalives_count": KEEPALIVE_COUNT,
}


@functools.cache
def get_engine() -> Engine:
    settings = get_settings()
    engine = create_engine(
        settings.database_url,
        # No ping before each use (a round trip per checkout, the largest
        # single cost in tests/bench/pipeline.py); a look at the socket
        # instead (_closed_by_server, below).
        pool_pre_ping=False,
        # A failing statement's error (and so the log) leaves out its
        # parameters: they hold users' messages.
        hide_parameters=True,
        # Up to twice DB_POOL_SIZE, opened as load needs them and kept: an
        # overflow connection closed on its return is opened again at the
        # next burst (a process start, a login and, managed, a TLS handshake
        # each time). A worker thread holds one only between model calls.
        pool_size=2 * settings.db_pool_size,
        max_overflow=0,
        # Wait this long for a free connection: a reconnect storm of thousands
        # of SSE clients queues here for a while, and should not fail.
        pool_timeout=30,
        # No prepared statements: psycopg prepares one on a connection after
        # its fifth run there, and behind a transaction pooler (PgBouncer
        # before 1.21, in front of most managed Postgres) the next run may
        # land on another server connection, which lacks it. The hot
        # statements are calls of short functions; the pipeline benchmark
        # shows no gain from preparing them.
        connect_args={"connect_timeout": 5, "prepare_threshold": None, **_DEAD_SERVER},
    )
    event.listen(engine, "checkout", _closed_by_server)
    event.listen(engine, "connect", lambda *_: _reached.add(engine.url))
    event.listen(engine, "commit", _committing)
    event.listen(engine, "before_cursor_execute", _executing)
    return engine


# The servers (DATABASE_URLs) this process connected to: one that refuses now
# is restarting; one never reached may be a wrong URL, which should say so at
# once.
_reached: set[object] = set()
# Whether this context (a request's greenlet, a task's thread) sent a COMMIT,
# or a statement in autocommit, since run_again_while_away() began: a lost
# connection then leaves unknown whether what it wrote landed, and the work
# must not run again.
_sent_writes: ContextVar[bool] = ContextVar("turnstream_db_sent_writes", default=False)


def _committing(_conn: Connection) -> None:
    _sent_writes.set(True)


def _executing(conn: Connection, *_: object) -> None:
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        _sent_writes.set(True)


def server_went_away(exc: BaseException) -> bool:
    """Whether exc says Postgres, or the pooler in front of it, went away:
    a connection lost or refused (SQLSTATE class 08, or none: the client's
    own), the server shutting down or starting up (57P01-57P03); or psycopg
    lost track of the protocol on a connection the pooler cut mid-reply."""
    state = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if isinstance(exc, InternalError):
        return state is None and str(exc.orig).startswith("received ")
    if not isinstance(exc, OperationalError):
        return False
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def run_again_while_away(work: Callable[[], T], writes: bool = True) -> T:
    """work(), run again while Postgres is away (a restart, a failover, a
    pooler that cannot reach it), for up to DB_RESTART_WAIT_SECONDS, as long
    as it sent no write: what it read it reads again, and a transaction cut
    before its COMMIT left nothing behind. Work that `writes` nothing (a
    safe request) runs again whatever it sent. A server never reached
    fails at once."""
    deadline = time.monotonic() + get_settings().db_restart_wait
    while True:
        token = _sent_writes.set(False)
        try:
            return work()
        except (OperationalError, InternalError) as exc:
            if (
                not server_went_away(exc)
                or get_engine().url not in _reached
                or (writes and _sent_writes.get())
                or time.monotonic() >= deadline
            ):
                raise
            log.warning("Postgres went away (%s); running it again", exc.orig)
            time.sleep(0.25)
        finally:
            _sent_writes.reset(token)


def _closed_by_server(dbapi_connection: object, _record: object, _proxy: object) -> None:
    """A pooled connection that the server closed (a restart, a failover, a
    pooler's restart: Postgres says so and closes its end) has something to
    read while it sits idle in the pool; a live idle one has nothing. Found
    so at checkout, it is swapped for a new one (DisconnectionError makes
    the pool do that), so the request that drew it does not fail. One
    `poll` with no wait, not a round trip (poll, not select: a web process
    holding thousands of streams has descriptors past select's 1,024). A
    server that vanished without a word is found by the first statement,
    after _DEAD_SERVER's timeout, or by the keepalives while it sits idle."""
    fd = dbapi_connection.pgconn.socket if not dbapi_connection.closed else -1
    if fd < 0 or _readable(fd):
        raise DisconnectionError("the server closed the connection while it was in the pool")


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@functools.cache
def autocommit_engine() -> Engine:
    """The same pool in autocommit, for a lone statement on a hot path (a
    statement is atomic on its own): no BEGIN before it and no COMMIT or
    ROLLBACK after it (two round trips less), and no ORM session around it."""
    return get_engine().execution_options(isolation_level="AUTOCOMMIT")


@functools.cache
def _sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def transaction() -> Iterator[Session]:
    """An ORM session (`db`) around one transaction: commits on success,
    rolls back on error, and always returns its connection to the pool."""
    session = _sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def after_commit(db: Session | Connection, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Run fn(*args) once the session's transaction has committed, and never if
    it rolls back; on a connection in autocommit, now (its statement has
    committed). This is how tasks are sent: a worker must find the row.

    A failure of fn is logged, not raised: what the transaction wrote stands,
    and recovery works from it (the sweeper re-sends a queued turn whose
    message never left)."""
    if isinstance(db, Connection):
        if db.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            raise TypeError("after_commit takes a Session, or a Connection in autocommit")
        committed(fn, *args, **kwargs)
        return
    db.info.setdefault("after_commit", []).append((fn, args, kwargs))


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for fn, args, kwargs in session.info.pop("after_commit", []):
        committed(fn, *args, **kwargs)


def committed(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """fn(*args), run after a transaction committed: a failure is logged, not
    raised (see after_commit)."""
    try:
        fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the commit stands; recovery works from it
        log.exception("after commit: %s failed", getattr(fn, "__qualname__", fn))


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop("after_commit", None)
