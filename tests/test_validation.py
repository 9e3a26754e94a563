"""Request bodies (web/validation.py), with no server: each bad body is the
documented 4xx naming its field, and a good one comes back typed. The same
rules through the live API are tests/test_hostile_input.py's."""

from __future__ import annotations

import json

import pytest
from flask import Flask

from web.errors import ApiError
from web.validation import MAX_DEPTH, ReplayCreate, SessionUpdate, TurnCreate, parse_body

pytestmark = pytest.mark.fast  # no service: bash deploy/test.sh --fast


def _parse(model, body, content_type="application/json", **kwargs):
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    with Flask(__name__).test_request_context(method="POST", data=raw, content_type=content_type):
        return parse_body(model, **kwargs)


def _refused(model, body, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as refused:
        _parse(model, body, **kwargs)
    return refused.value


def test_a_good_body_comes_back_typed_and_trimmed():
    turn = _parse(TurnCreate, {"message": "  hello  "})
    assert (turn.message, turn.multitask) == ("hello", "enqueue")
    assert _parse(SessionUpdate, {"title": "t"}).model_fields_set == {"title"}  # a PATCH changes what it names


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"message": "   "}, 422, "validation_error", "message"),
        ({"message": "hi", "extra": 1}, 422, "validation_error", "extra"),
        ({"message": 5}, 422, "validation_error", "message"),  # strict: no coercion
        ({"message": "hi", "multitask": "later"}, 422, "validation_error", "multitask"),
        ({"message": "a\x00b"}, 422, "validation_error", "message"),  # Postgres cannot store NUL
        ('{"message": "\\ud800"}', 422, "validation_error", "message"),  # nor a lone surrogate
        ("[1, 2]", 400, "bad_request", None),
        ('{"message": NaN}', 400, "bad_request", None),
        ("{not json", 400, "bad_request", None),
        ("[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2), 400, "bad_request", None),
    ],
)
def test_a_bad_body_is_the_documented_error_naming_its_field(body, status, code, field):
    error = _refused(TurnCreate, body)
    assert (error.status, error.code) == (status, code), error.message
    assert (error.details or {}).get("field") == field


def test_a_body_that_is_not_json_is_415():
    assert _refused(TurnCreate, "message=hi", content_type="application/x-www-form-urlencoded").status == 415


def test_a_message_over_the_limit_is_refused():
    assert _parse(TurnCreate, {"message": "x" * 10}, max_message_chars=10).message == "x" * 10
    error = _refused(TurnCreate, {"message": "x" * 11}, max_message_chars=10)
    assert (error.status, error.details) == (422, {"field": "message"})


def test_a_replay_takes_exactly_one_list_of_questions():
    assert len(_parse(ReplayCreate, {"questions": [{"message": "q"}]}).questions) == 1
    assert _refused(ReplayCreate, {"questions": None}).status == 422
    assert _refused(ReplayCreate, {"questions": []}).status == 422
    assert _refused(ReplayCreate, {"questions": [{"message": "q"}], "concurrency": 0}).details == {
        "field": "concurrency"
    }


def test_an_assistant_profile_takes_defaults_and_refuses_what_is_out_of_range():
    from web.validation import AssistantBody

    body = _parse(AssistantBody, {"name": " support ", "temperature": 1})
    assert (body.name, body.endpoint, body.model, body.temperature, body.tools) == ("support", "default", None, 1.0, {})
    assert body.approval.policy == "never" and body.approval.tools == [] and body.metadata == {}
    for bad, field in [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "a", "temperature": -0.1}, "temperature"),
        ({"name": "a", "max_tokens": 0}, "max_tokens"),
        ({"name": "a", "tools": {"bad server!": ["x"]}}, "tools.bad server!.[key]"),
        ({"name": "a", "tools": {"sql": "query"}}, "tools.sql"),
        ({"name": "a", "approval": {"policy": "sometimes"}}, "approval.policy"),
        ({"name": "a", "endpoint": ""}, "endpoint"),
    ]:
        error = _refused(AssistantBody, bad)
        assert (error.status, error.details["field"]) == (422, field), (bad, error)


def test_a_profile_allows_only_its_listed_tools():
    from shared.assistants import Profile

    default = Profile(None, None, "default", "", "default", "m")
    assert default.allows("sql", "query") and default.messages([{"role": "user", "content": "q"}])[0]["role"] == "user"
    picky = Profile("a", 2, "picky", "Be brief.", "default", "m", tools={"sql": ["query"], "kit": ["*"]})
    assert picky.allows("sql", "query") and picky.allows("kit", "anything")
    assert not picky.allows("sql", "list_tables") and not picky.allows("web", "query")
    assert picky.messages([{"role": "user", "content": "q"}])[0] == {"role": "system", "content": "Be brief."}
    assert picky.label == "picky v2" and default.label == "default"
