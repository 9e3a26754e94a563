"""The API's OpenAPI 3.1 document, generated: paths from the app's routes,
each declared with `@operation`, and every schema from the pydantic models
that validate requests (web/validation.py) and describe answers
(web/schemas.py), plus the event types of shared.events.EVENT_TYPES. Served
at /api/openapi.json, and read at /api/docs (Swagger UI, shipped in
web/static/vendor/)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, render_template
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.events import EVENT_TYPES
from web import schemas

bp = Blueprint("openapi", __name__)

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"

# The errors each kind of operation can answer, beyond its own.
_ERRORS = {
    400: "the body is not valid JSON, not an object, or nested too deeply",
    401: "missing, unknown or revoked credentials",
    404: "no such resource, or another caller's",
    409: "conflicts with the current state (see the message)",
    413: "the body is larger than MAX_BODY_BYTES",
    415: "the body is not application/json",
    422: "a field is missing, of the wrong type or out of range (`details.field`)",
    429: "over a rate limit (`rate_limited`, with Retry-After) or a quota (`quota_exceeded`)",
    503: "Postgres or Redis is unavailable",
}


@dataclass(frozen=True)
class Operation:
    summary: str
    answers: dict[int, Any]  # status -> a model, SSE, NDJSON, or None (no body)
    body: type[BaseModel] | None = None
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> JSON schema
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    public: bool = False


def operation(summary: str, answers: dict[int, Any], **options: Any) -> Callable:
    """Declare a view's place in the document."""

    def mark(view: Callable) -> Callable:
        view.openapi = Operation(summary, answers, **options)
        return view

    return mark


@bp.get("/api/openapi.json")
@operation("This document", {200: None}, public=True)
def document():
    return jsonify(build(current_app))


@bp.get("/api/docs")
@operation("The API's reference, to read and try in a browser", {200: None}, public=True)
def docs():
    response = current_app.make_response(render_template("docs.html"))
    # Swagger UI sets styles inline; its script is shipped here, and nothing runs inline.
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return response


# What a created object's id is called in the paths that take it: links
# from the operation that made it to those, so a client (or a fuzzer) can
# follow one to the other.
_ID_OF = {
    schemas.Session: "session_id",
    schemas.Turn: "turn_id",
    schemas.Replay: "replay_id",
    schemas.Assistant: "assistant_id",
    schemas.WebhookEndpoint: "webhook_id",
    schemas.QuestionSet: "set_id",
    schemas.Schedule: "schedule_id",
    schemas.Share: "share_id",
}


def build(app: Flask) -> dict[str, Any]:
    models: dict[type[BaseModel], str] = {}
    paths: dict[str, dict[str, Any]] = {}
    made: list[tuple[dict[str, Any], Operation]] = []
    takes: dict[str, list[str]] = {}  # a path parameter -> the operations that take only it
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        op = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if op is None:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found = {"operationId": f"{rule.endpoint}.{method.lower()}", **_operation(op, rule.arguments, models)}
            paths.setdefault(path, {})[method.lower()] = found
            made.append((found, op))
            if len(rule.arguments) == 1:
                takes.setdefault(next(iter(rule.arguments)), []).append(found["operationId"])
    for found, op in made:
        for status, answer in op.answers.items():
            param = _ID_OF.get(answer) if isinstance(answer, type) else None
            if param and 200 <= status < 300:
                found["responses"][str(status)]["links"] = {
                    target: {"operationId": target, "parameters": {param: "$response.body#/id"}}
                    for target in takes.get(param, ())
                }
    _, top = models_json_schema(
        [(model, mode) for model, mode in models.items()], ref_template="#/components/schemas/{model}"
    )
    components = {**top.get("$defs", {}), **_event_schemas()}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Turnstream",
            "version": "1",
            "description": "LLM chat turns as distributed work. The contract in prose: docs/api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "login": {"type": "apiKey", "in": "cookie", "name": "session"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}, {"login": []}],
    }


def _ref(model: type[BaseModel], mode: str, models: dict[type[BaseModel], str]) -> dict[str, str]:
    models.setdefault(model, mode)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(op: Operation, path_args: set[str], models: dict[type[BaseModel], str]) -> dict[str, Any]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in sorted(path_args)
    ]
    parameters += [{"name": name, "in": "query", "schema": schema} for name, schema in op.query.items()]
    parameters += [{"name": name, "in": "header", "schema": schema} for name, schema in op.headers.items()]
    responses: dict[str, Any] = {}
    for status, answer in op.answers.items():
        responses[str(status)] = _answer(status, answer, models)
    errors = set(op.errors) | {429, 503}
    if not op.public:
        errors.add(401)
    if path_args:
        errors.add(404)
    if op.body is not None:
        errors |= {400, 413, 415, 422}
    if op.query or op.headers:
        errors.add(422)
    for status in sorted(errors - set(op.answers)):
        responses[str(status)] = {
            "description": _ERRORS[status],
            "content": {"application/json": {"schema": _ref(schemas.Error, "serialization", models)}},
        }
    result: dict[str, Any] = {"summary": op.summary, "responses": responses}
    if parameters:
        result["parameters"] = parameters
    if op.body is not None:
        result["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(op.body, "validation", models)}},
        }
    if op.public:
        result["security"] = []
    return result


def _answer(status: int, answer: Any, models: dict[type[BaseModel], str]) -> dict[str, Any]:
    if isinstance(answer, tuple):  # one of several kinds, by what was asked
        each = [_answer(status, one, models) for one in answer]
        return {
            "description": " or ".join(a["description"] for a in each),
            "content": {k: v for a in each for k, v in a["content"].items()},
        }
    if answer is None:
        return {"description": "no body" if status == 204 else "see the summary"}
    if answer == SSE:
        events = [{"$ref": f"#/components/schemas/event.{name}"} for name in EVENT_TYPES if name != "session.turn"]
        message = {
            "type": "object",
            "description": "one SSE message: `data` is the JSON of one of `x-events`",
            "properties": {
                "event": {"enum": [name for name in EVENT_TYPES if name != "session.turn"]},
                "id": {"type": "string"},
                "data": {"type": "string", "contentMediaType": "application/json"},
            },
            "required": ["event", "data"],
        }
        return {
            "description": "Server-Sent Events: each message's `event` is its type, `id` its seq (none on"
            " events made for one client), `data` one line of JSON",
            "content": {SSE: {"schema": message, "x-events": {"oneOf": events}}},
        }
    if answer == NDJSON:
        return {
            "description": "one JSON object per line",
            "content": {
                NDJSON: {"schema": {"type": "string"}, "x-line": _ref(schemas.ReplayResult, "serialization", models)}
            },
        }
    if isinstance(answer, str):  # a document of another kind: text/csv, text/html, text/markdown
        return {"description": f"a {answer} document", "content": {answer: {"schema": {"type": "string"}}}}
    return {
        "description": answer.__doc__ or answer.__name__,
        "content": {"application/json": {"schema": _ref(answer, "serialization", models)}},
    }


def _event_schemas() -> dict[str, Any]:
    """Each event type of shared.events.EVENT_TYPES, as the JSON of its `data`."""
    found = {}
    for name, event in EVENT_TYPES.items():
        if name == "session.turn":
            continue  # never sent to a client
        log_id = "replay_id" if name.startswith("replay.") else "turn_id"
        required = ["type", log_id] + (["seq"] if event.logged else [])
        optional = {"error"} if name == "turn.snapshot" else set()
        properties = {"type": {"const": name}, "seq": {"type": "integer", "minimum": 0}, log_id: {"type": "string"}}
        properties.update({f: {} for f in event.fields})
        found[f"event.{name}"] = {
            "type": "object",
            "description": event.doc + ("; the stream ends after it" if event.ending else ""),
            "properties": properties,
            "required": required + [f for f in event.fields if f not in optional],
        }
    return found
