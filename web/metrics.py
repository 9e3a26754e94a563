"""`GET /metrics` for Prometheus: what every gunicorn process of this web
tier measured (shared/metrics.py), and figures read from Postgres and Redis
when scraped: the queue, its oldest turn, replays, live workers, and each
breaker's state. For an
operator: an API key, or a request from this machine."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from flask import Blueprint, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import text

from shared import breakers, metrics
from shared.breakers import CLOSED, HALF_OPEN, OPEN
from shared.db import autocommit_engine
from shared.status import workers_alive
from shared.turn_states import QUEUED, RUNNING
from web.auth import require_operator

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

# One round trip; the status index serves the turns, and only unfinished
# replays' items are counted.
_QUEUE = text(
    f"""
    SELECT
      (SELECT count(*) FROM turns WHERE status = '{QUEUED}') AS queued,
      (SELECT count(*) FROM turns WHERE status = '{RUNNING}') AS running,
      (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)
         FROM turns WHERE status = '{QUEUED}') AS oldest,
      (SELECT count(*) FROM replays WHERE finished_at IS NULL) AS replays,
      (SELECT count(*) FROM replay_items i JOIN replays r ON r.id = i.replay_id
         LEFT JOIN turns t ON t.id = i.turn_id
         WHERE r.finished_at IS NULL AND (t.id IS NULL OR t.status IN ('{QUEUED}', '{RUNNING}'))) AS items
    """
)


def _figures() -> dict[str, tuple[str, float]]:
    with autocommit_engine().connect() as db:
        row = db.execute(_QUEUE).one()
    return {
        "turnstream_turns_queued": ("Turns waiting for a worker", row.queued),
        "turnstream_turns_running": ("Turns a worker is running", row.running),
        "turnstream_oldest_queued_turn_age_seconds": ("How long the oldest queued turn has waited", float(row.oldest)),
        "turnstream_replays_running": ("Replays not yet finished", row.replays),
        "turnstream_replay_items_pending": ("Questions of unfinished replays not yet answered", row.items),
        "turnstream_workers_alive": ("Worker processes whose heartbeat is recent", workers_alive()),
    }


_FIGURES = metrics.Figures(_figures)
_STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class _Breakers:
    """Each configured breaker as the workers left it in Redis (shared/breakers.py)."""

    def collect(self) -> Iterator[Metric]:
        try:
            found = breakers.states()
        except redis.RedisError as exc:
            log.warning("metrics: could not read the breakers: %s", exc)
            return
        state = GaugeMetricFamily(
            "turnstream_breaker_state",
            "A breaker's state: 0 closed, 1 half-open (probing), 2 open",
            labels=["kind", "name"],
        )
        opens = CounterMetricFamily("turnstream_breaker_opens", "Times a breaker opened", labels=["kind", "name"])
        probes = CounterMetricFamily(
            "turnstream_breaker_probes", "Calls let through an open breaker to probe it", labels=["kind", "name"]
        )
        for ident, found_state in found.items():
            labels = ident.split(":", 1)
            state.add_metric(labels, _STATE_VALUES[found_state["state"]])
            opens.add_metric(labels, found_state["opens"])
            probes.add_metric(labels, found_state["probes"])
        yield from (state, opens, probes)


_BREAKERS = _Breakers()


@bp.get("/metrics")  # Prometheus's exposition, not part of the JSON API (nor its document)
def scrape():
    require_operator("/metrics")
    return Response(metrics.exposition(_FIGURES, _BREAKERS), mimetype="text/plain; version=0.0.4")
