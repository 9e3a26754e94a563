"""Prometheus metrics: every metric Turnstream exports, defined here once.

Names follow Prometheus's conventions: the `turnstream_` prefix, base units
in the name (`_seconds`), `_total` on counters. Label values are bounded:
statuses, error codes, kinds, configured tool servers and their tools,
Flask endpoint names; never an id, a message or a URL.

Each process exports what it measures (docs/operations.md):
- web: gunicorn's processes share a directory (`PROMETHEUS_MULTIPROC_DIR`,
  set by deploy/gunicorn.conf.py before anything imports prometheus_client),
  and `GET /metrics` sums them, adding the queue's figures from Postgres;
- the worker and beat: each on a port of its own (`WORKER_METRICS_PORT`,
  `BEAT_METRICS_PORT`), from its own process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

# Seconds, from a fast answer to a long turn.
_TURN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# Seconds, for hops inside the system (a Redis round trip, a relayed event).
_HOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# ---- turns (the worker; web for turns cancelled before they ran) ----
TURNS_SUBMITTED = Counter("turnstream_turns_submitted_total", "Turns accepted by the API")
TURNS_FINISHED = Counter(
    "turnstream_turns_finished_total",
    "Turns that ended, by final status and error code (empty when none)",
    ["status", "error_code"],
)
TURN_ATTEMPTS = Counter("turnstream_turn_attempts_total", "Attempts started: a turn's first, and each one after")
TURNS_PAUSED = Counter(
    "turnstream_turns_paused_total", "Steps of turns that waited for a person to decide their tool calls"
)
TURNS_DELAYED = Counter(
    "turnstream_turns_delayed_total",
    "Times a turn went back to the queue to wait for its model endpoint",
    ["endpoint"],
)
TOOL_DECISIONS = Counter(
    "turnstream_tool_decisions_total", "Decisions on tool calls a person was asked about", ["status"]
)
TURN_RESTARTS = Counter(
    "turnstream_turn_restarts_total",
    "Turns started again: redelivered (a worker lost it), model_stream_broke",
    ["reason"],
)
QUEUE_WAIT = Histogram(
    "turnstream_turn_queue_wait_seconds", "From a turn's acceptance to the start of an attempt", buckets=_TURN_BUCKETS
)
TIME_TO_FIRST_TOKEN = Histogram(
    "turnstream_time_to_first_token_seconds",
    "From a turn's acceptance to the first text of its answer",
    buckets=_TURN_BUCKETS,
)
TURN_DURATION = Histogram(
    "turnstream_turn_duration_seconds",
    "From a turn's acceptance to its end, by status",
    ["status"],
    buckets=_TURN_BUCKETS,
)

# ---- the model and the tools (the worker) ----
MODEL_REQUEST = Histogram(
    "turnstream_model_request_duration_seconds",
    "One streamed completion, from the request to its last chunk, by outcome (ok, stopped, or an error code)",
    ["outcome"],
    buckets=_TURN_BUCKETS,
)
MODEL_ERRORS = Counter(
    "turnstream_model_errors_total",
    "Completions that failed after the client's retries, by code (stream_broke: broke off midway)",
    ["code"],
)
MODEL_RETRIES = Counter(
    "turnstream_model_retries_total",
    "Requests the openai client sent again, by what the one before got (http_429, http_503, connection)",
    ["kind"],
)
TOOL_CALL = Histogram(
    "turnstream_tool_call_duration_seconds",
    "One tool call, by server and tool",
    ["server", "tool"],
    buckets=_TURN_BUCKETS,
)
TOOL_ERRORS = Counter("turnstream_tool_errors_total", "Tool calls that failed, by server and tool", ["server", "tool"])

# ---- events (the worker's publisher) ----
EVENTS_PUBLISHED = Counter("turnstream_events_published_total", "Events appended to turn and replay logs")
EVENT_PUBLISH = Histogram(
    "turnstream_event_publish_seconds",
    "One pipelined batch of events to Redis, its round trip",
    buckets=_HOP_BUCKETS,
)

SWEEPER_ACTIONS = Counter(
    "turnstream_sweeper_actions_total",
    "What the sweeper repaired: resent (queued turns whose message was lost), requeued (running turns"
    " whose worker stopped), replays (stalled replays advanced)",
    ["action"],
)

# ---- web ----
HTTP_REQUESTS = Counter(
    "turnstream_http_requests_total", "Requests answered, by endpoint and status", ["method", "endpoint", "status"]
)
HTTP_DURATION = Histogram(
    "turnstream_http_request_duration_seconds",
    "Time to the start of the answer (a stream's whole life is not counted), by endpoint",
    ["method", "endpoint"],
    buckets=_HOP_BUCKETS,
)
RELAY_STREAMS = Gauge("turnstream_relay_streams", "SSE streams open", multiprocess_mode="livesum")
RELAY_CHANNELS = Gauge("turnstream_relay_channels", "Redis channels subscribed", multiprocess_mode="livesum")
RELAY_EVENTS = Counter("turnstream_relay_events_total", "Events relayed to clients (one per client)")
RELAY_DROPPED = Counter(
    "turnstream_relay_clients_dropped_total",
    "Streams ended by the relay: queue_full (a client too slow for its events), not_reading, gone",
    ["reason"],
)
RELAY_DELIVERY = Histogram(
    "turnstream_relay_delivery_seconds",
    "From the relay's receipt of an event to its write to a client (sampled: one write in 16)",
    buckets=_HOP_BUCKETS,
)

# ---- beat ----
BEAT_SENT = Counter("turnstream_beat_sent_total", "Scheduled tasks beat sent", ["task"])


def turn_ended(status: str, error: dict | None, accepted_at: float | None) -> None:
    TURNS_FINISHED.labels(status, (error or {}).get("code", "")).inc()
    if accepted_at is not None:
        TURN_DURATION.labels(status).observe(max(time.time() - accepted_at, 0.0))


class Sampler:
    """True once in `every` calls: a figure taken per event would cost the
    hot path as much as the work it measures. Racy by a count across
    threads, which sampling does not mind."""

    __slots__ = ("every", "n")

    def __init__(self, every: int) -> None:
        self.every, self.n = every, 0

    def __call__(self) -> bool:
        self.n += 1
        return self.n % self.every == 0


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition(*extra: object) -> bytes:
    """What a scrape of this process reports (of every gunicorn process,
    under gunicorn), with `extra` collectors: figures read at scrape time."""
    reg = CollectorRegistry()
    for collector in extra:
        reg.register(collector)
    if not multiprocess():
        return generate_latest(REGISTRY) + generate_latest(reg)
    MultiProcessCollector(reg)
    return generate_latest(reg)


class Figures:
    """A collector of gauges read when scraped (the queue from Postgres,
    workers from their heartbeats): `read()` returns {name: (help, value)}."""

    def __init__(self, read) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self._read()
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.warning("metrics: could not read the queue's figures: %s", exc)
            return
        for name, (doc, value) in figures.items():
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


_served: set[int] = set()
_serving = threading.Lock()


def serve(port: int, address: str, what: str) -> None:
    """Export this process's metrics on a port of its own (0: not at all)."""
    if not port:
        return
    with _serving:
        if port in _served:
            return
        try:
            start_http_server(port, addr=address)
        except OSError as exc:  # another process of the host has the port: set its own
            log.warning("%s metrics: could not listen on %s:%d (%s); not exported", what, address, port, exc)
            return
        _served.add(port)
    log.info("%s metrics on http://%s:%d/metrics", what, address, port)
