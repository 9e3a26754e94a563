"""The OpenAPI document: valid OpenAPI 3.1, generated from the models that
validate requests, listing every endpoint, error and event type; answers
from a real session of use match it; and the reference page is served with
its own assets."""

from __future__ import annotations

import re

import jsonschema
import pytest
from openapi_spec_validator import validate

from shared.events import EVENT_TYPES
from web.errors import _CODES
from web.validation import TurnCreate


@pytest.fixture(scope="module")
def document(app):
    return app.test_client().get("/api/openapi.json").get_json()


def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_api_route_is_in_it(app, document):
    routes = {
        (re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routes == documented


def test_every_error_and_event_type_is_in_it(document):
    statuses = {int(s) for ops in document["paths"].values() for op in ops.values() for s in op["responses"]}
    assert set(_CODES) - {403, 405} <= statuses
    schemas = document["components"]["schemas"]
    assert {f"event.{name}" for name in EVENT_TYPES if name != "session.turn"} <= set(schemas)
    assert schemas["event.turn.completed"]["required"] == ["type", "turn_id", "seq", "answer", "usage", "tools"]


def test_request_schemas_are_the_validating_models(document):
    body = document["paths"]["/api/sessions/{session_id}/turns"]["post"]["requestBody"]
    name = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    schema = document["components"]["schemas"][name]
    assert name == TurnCreate.__name__ and schema["additionalProperties"] is False
    assert schema["properties"]["message"]["minLength"] == 1 and schema["required"] == ["message"]


def _check(document: dict, path: str, method: str, response) -> None:
    """The answer matches what the document says of this operation and status."""
    answer = document["paths"][path][method]["responses"][str(response.status_code)]
    content = answer.get("content", {})
    if response.status_code == 204:
        assert not content and not response.data
        return
    schema = content[response.mimetype]["schema"]
    resolver = {**schema, "components": document["components"]}
    jsonschema.validate(response.get_json(), resolver, cls=jsonschema.Draft202012Validator)


def test_answers_of_a_session_of_use_match_it(client, owner, document):
    from tests.conftest import wait_turn

    created = client.post("/api/sessions", json={"title": "doc", "metadata": {"a": [1]}}, headers=owner)
    _check(document, "/api/sessions", "post", created)
    sid = created.get_json()["id"]
    turn = client.post(f"/api/sessions/{sid}/turns", json={"message": "hello"}, headers=owner)
    _check(document, "/api/sessions/{session_id}/turns", "post", turn)
    tid = turn.get_json()["id"]
    wait_turn(client, owner, tid)
    for path, url in [
        ("/api/turns/{turn_id}", f"/api/turns/{tid}"),
        ("/api/sessions/{session_id}", f"/api/sessions/{sid}"),
        ("/api/sessions/{session_id}/messages", f"/api/sessions/{sid}/messages"),
        ("/api/sessions", "/api/sessions?limit=1"),
        ("/api/info", "/api/info"),
        ("/api/health", "/api/health"),
        ("/api/turns/{turn_id}", "/api/turns/not-an-id"),
        ("/api/sessions", "/api/sessions?limit=0"),
    ]:
        _check(document, path, "get", client.get(url, headers=owner))
    _check(document, "/api/turns/{turn_id}/cancel", "post", client.post(f"/api/turns/{tid}/cancel", headers=owner))
    _check(document, "/api/chat", "post", client.post("/api/chat", json={"message": "hi"}, headers=owner))
    replay = client.post("/api/replays", json={"questions": [{"message": "q"}]}, headers=owner)
    _check(document, "/api/replays", "post", replay)
    _check(document, "/api/sessions", "get", client.get("/api/sessions"))  # 401
    _check(document, "/api/sessions/{session_id}", "delete", client.delete(f"/api/sessions/{sid}", headers=owner))


def test_the_reference_page_is_served_with_its_own_assets(client):
    page = client.get("/api/docs")
    assert (
        page.status_code == 200
        and "unsafe-inline" not in page.headers["Content-Security-Policy"].split("script-src")[1].split(";")[0]
    )
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") for a in assets)  # nothing from another host
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert client.get("/static/vendor/swagger-ui-dist/LICENSE").status_code == 200
