"""Logs from every process: JSON lines (`LOG_FORMAT=json`) or text (the
default), written through the standard library's logging, so the lines of
Celery, gunicorn's app and every library come out the same way.

Each line carries the ids bound for the work at hand (`bind`): request_id,
owner_id, session_id, turn_id, attempt, replay_id. They are held in
contextvars, per greenlet under gevent and per thread in the worker's pool,
so a library's line logged while a turn runs carries them too.

What is logged at INFO names things by id: never a message's text, a key,
or a URL with its password (shared.config.redact).
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

bind = structlog.contextvars.bind_contextvars
clear = structlog.contextvars.clear_contextvars


def bound() -> dict[str, Any]:
    return structlog.contextvars.get_contextvars()


def _text(_logger: Any, _name: str, event: dict[str, Any]) -> str:
    """`time LEVEL logger message key=value …`, then a traceback, if any."""
    head = f"{event.pop('timestamp')} {event.pop('level').upper()} {event.pop('logger', '-')} {event.pop('event')}"
    trace = event.pop("exception", None)
    line = " ".join([head, *(f"{k}={v}" for k, v in event.items())])
    return f"{line}\n{trace}" if trace else line


def configure(fmt: str, level: int = logging.INFO) -> None:
    """Route the root logger through structlog's formatter (once per
    process; again replaces it)."""
    before = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=before,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer() if fmt == "json" else _text,
        ],
    )
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
