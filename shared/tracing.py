"""Traces with OpenTelemetry: one trace per turn, from the request that sent
it, through the queue, to the worker's claim, each model request, each tool
call and the commit of its end.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set;
the SDK's own variables configure the rest (`OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_SERVICE_NAME`, `OTEL_BSP_SCHEDULE_DELAY`, sampling …). Off, spans are
the API's no-op spans, which cost next to nothing.

The trace context travels on the turn's row (`turns.origin`, with the
request's id for the logs), not only in the task: a turn queued behind
another is sent by the worker that ends the one before, and is still traced
as part of the request that made it.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from shared import logs

tracer = trace.get_tracer("turnstream")


def enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(service: str) -> None:
    """Export this process's spans over OTLP/HTTP, if an endpoint is set.
    Call in the process that makes them (after a fork: the exporter's
    thread does not survive one)."""
    if not enabled() or isinstance(trace.get_tracer_provider(), _sdk_provider()):
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def _sdk_provider() -> type:
    from opentelemetry.sdk.trace import TracerProvider

    return TracerProvider


def flush() -> None:
    """Send what is buffered (a process about to exit)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush(5000)


def origin() -> dict[str, str] | None:
    """What a turn keeps of the request that makes it: the request's id and
    its trace context (`traceparent`), if any."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    request_id = logs.bound().get("request_id")
    if request_id:
        carrier["request_id"] = request_id
    return carrier or None


def parent(origin: dict[str, Any] | None) -> Context:
    """The trace context a turn's work continues."""
    return propagate.extract(origin or {})
