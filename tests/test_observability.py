"""Logs and traces of one turn, across the processes that serve it, started
as the Procfile starts them: JSON lines carrying the request's and the
turn's ids (a library's lines too), no message text; and one OpenTelemetry
trace from the POST to the answer's commit, seen by an OTLP receiver."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests import services
from tests.conftest import wait_turn


class Receiver:
    """An OTLP/HTTP trace receiver: every span it is sent, with its service."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = next(
                        a.value.string_value for a in resource.resource.attributes if a.key == "service.name"
                    )
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            receiver.spans.append(
                                {
                                    "service": service,
                                    "name": span.name,
                                    "trace": span.trace_id.hex(),
                                    "id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                }
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace_of(self, *names: str, exclude: str = "", timeout: float = 20) -> list[dict]:
        """Every span of the first trace to hold a span of each name, once
        they all came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            traces: dict[str, list[dict]] = {}
            for span in list(self.spans):
                traces.setdefault(span["trace"], []).append(span)
            for trace_id, spans in traces.items():
                if trace_id != exclude and set(names) <= {s["name"] for s in spans}:
                    return spans
            time.sleep(0.1)
        raise AssertionError(f"no trace with {names}: {self.spans}")


@contextlib.contextmanager
def served(stack: dict, settings: dict[str, str]) -> Iterator[tuple[str, services.Proc, services.Proc]]:
    """gunicorn and a worker of their own with these settings."""
    env = {**stack["env"], **settings}
    with services.sole_worker(stack, "worker-observed", settings, concurrency=4) as worker:
        web, port = services.start_gunicorn(stack["logdir"], env, name="web-observed")
        try:
            yield f"http://127.0.0.1:{port}", web, worker
        finally:
            web.stop()


def _json_lines(path) -> list[dict]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


def test_json_logs_carry_the_ids_of_the_request_and_the_turn_and_no_text(stack, owner, client):
    secret = f"zebra{uuid.uuid4().hex[:8]}"
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    with served(stack, {"LOG_FORMAT": "json"}) as (url, web, worker):
        with httpx.Client(base_url=url, timeout=30) as http:
            sid = http.post("/api/sessions", json={}, headers=owner).json()["id"]
            message = f"tell nobody {secret} [[faults=503]]"  # one retry: the client's own line
            turn = http.post(
                f"/api/sessions/{sid}/turns", json={"message": message}, headers={**owner, "X-Request-ID": request_id}
            )
            assert turn.headers["X-Request-ID"] == request_id
            done = wait_turn(client, owner, turn.json()["id"])
            assert done["status"] == "succeeded" and secret in done["answer"]
        time.sleep(0.5)  # the worker's last lines
        web_lines, worker_lines = _json_lines(web.log_path), _json_lines(worker.log_path)

    posted = [line for line in web_lines if line.get("request_id") == request_id]
    assert posted and all(line["owner_id"] and line["session_id"] == sid for line in posted)
    assert any("POST /api/sessions/<session_id>/turns 202" in line["event"] for line in posted)

    mine = [line for line in worker_lines if line.get("turn_id") == turn.json()["id"]]
    assert mine, worker_lines[-5:]
    for line in mine:
        assert line["request_id"] == request_id and line["session_id"] == sid and line["attempt"] == 1
        assert {"timestamp", "level", "logger", "event"} <= set(line)
    loggers = {line["logger"] for line in mine}
    assert "openai._base_client" in loggers  # a library's line (its retry) carries the turn's ids
    assert any(name.startswith("celery") for name in loggers)

    everything = web.log_path.read_text(errors="replace") + worker.log_path.read_text(errors="replace")
    assert secret not in everything  # neither the question nor the answer
    assert owner["Authorization"].split()[1] not in everything


def test_one_trace_follows_a_turn_from_the_post_to_its_commit(stack, owner, client):
    receiver = Receiver()
    settings = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with served(stack, settings) as (url, _web, _worker):
        with httpx.Client(base_url=url, timeout=30) as http:
            sid = http.post("/api/sessions", json={}, headers=owner).json()["id"]
            first = http.post(
                f"/api/sessions/{sid}/turns",
                json={"message": '[[call=kit__nap {"seconds": 0.5}]]'},
                headers=owner,
            ).json()
            # Sent while the first runs: queued behind it, so the worker that
            # ends the first sends it, and it is still its own request's trace.
            second = http.post(f"/api/sessions/{sid}/turns", json={"message": "then [[tokens=3]]"}, headers=owner)
            for turn in (first, second.json()):
                assert wait_turn(client, owner, turn["id"])["status"] == "succeeded"

            spans = receiver.trace_of("tool kit__nap", "turn", "finish_turn")
            by_id = {s["id"]: s for s in spans}
            post = next(s for s in spans if s["name"] == "POST /api/sessions/<session_id>/turns")
            assert post["service"] == "turnstream-web"
            turn = next(s for s in spans if s["name"] == "turn")
            assert turn["service"] == "turnstream-worker" and turn["parent"] == post["id"]
            children = sorted(s["name"] for s in spans if s["parent"] == turn["id"])
            assert children == ["chat turnstream-offline", "chat turnstream-offline", "finish_turn", "tool kit__nap"]
            assert all(s["parent"] in by_id or s is post for s in spans)

            # The second turn: a trace of its own, from its own POST.
            second_trace = receiver.trace_of(
                "POST /api/sessions/<session_id>/turns", "turn", "finish_turn", exclude=post["trace"]
            )
            second_post = next(s for s in second_trace if s["name"].startswith("POST"))
            assert next(s for s in second_trace if s["name"] == "turn")["parent"] == second_post["id"]
