"""What a request is, for logs and traces: its id (the caller's
`X-Request-ID`, if it is a plausible one, else a new one; echoed back), the
ids it concerns, bound for every line logged while it is served, and its
span. One line per request at INFO (method, route, status, duration), and
its counts for /metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request
from opentelemetry import context, propagate, trace

from shared import logs, metrics, tracing

log = logging.getLogger("web.request")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_IDS = ("session_id", "turn_id", "replay_id")


def init_app(app: Flask) -> None:
    """Register before anything else that runs per request (authentication
    binds the owner's id once it knows it)."""
    app.before_request(_begin)
    app.after_request(_answered)
    app.teardown_request(_end)


def _begin() -> None:
    logs.clear()
    presented = request.headers.get("X-Request-ID", "")
    g.request_id = presented if _REQUEST_ID.fullmatch(presented) else uuid.uuid4().hex
    g.started = time.monotonic()
    logs.bind(request_id=g.request_id, **{k: v for k, v in (request.view_args or {}).items() if k in _IDS})
    route = _route()
    span = tracing.tracer.start_span(
        f"{request.method} {route}",
        context=propagate.extract(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route, "turnstream.request_id": g.request_id},
    )
    g.span, g.span_token = span, context.attach(trace.set_span_in_context(span))


def _route() -> str:
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def _answered(response: Response) -> Response:
    """The request's line, its counts and its span's status, once its answer
    starts (an SSE stream's life is not a request's latency)."""
    response.headers["X-Request-ID"] = g.get("request_id", "")
    started = g.get("started")
    elapsed = time.monotonic() - started if started is not None else 0.0
    log.info("%s %s %d %.1f ms", request.method, _route(), response.status_code, elapsed * 1000)
    endpoint = request.endpoint or "none"
    metrics.HTTP_REQUESTS.labels(request.method, endpoint, str(response.status_code)).inc()
    metrics.HTTP_DURATION.labels(request.method, endpoint).observe(elapsed)
    span = g.get("span")
    if span is not None:
        span.set_attribute("http.response.status_code", response.status_code)
    return response


def _end(_exc: BaseException | None) -> None:
    span = g.pop("span", None)
    if span is not None:
        span.end()
        context.detach(g.pop("span_token"))
    logs.clear()
