"""Request bodies: JSON checks and pydantic validation in one place."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from shared.expectations import MAX_PATTERN_CHARS, pattern_error
from web.errors import ApiError

M = TypeVar("M", bound=BaseModel)

# Deeper than any body of this API needs; checked while walking the body, so
# a hostile nesting costs no more than its bytes.
MAX_DEPTH = 32
# What Postgres cannot store (NUL in text or jsonb) or UTF-8 cannot encode
# (a lone surrogate, which JSON's \u escapes can spell).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Title = Annotated[str, StringConstraints(max_length=200)]


Version = Annotated[int, Field(ge=1, le=2_000_000_000)]


class SessionCreate(Body):
    title: Title | None = None
    metadata: dict = Field(default_factory=dict)
    assistant_id: str | None = Field(None, description="who answers (null: the default assistant)")
    assistant_version: Version | None = Field(None, description="pinned; null: the assistant's latest, as it moves")


class SessionUpdate(Body):
    """What a PATCH changes: the fields it names, nothing else (naming
    `assistant_id` sets `assistant_version` too: null unless given)."""

    title: Title | None = None
    metadata: dict | None = None
    assistant_id: str | None = None
    assistant_version: Version | None = None


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
# An MCP server's name as MCP_SERVERS allows it, and a tool's as MCP does.
ServerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,30}$")]
ToolName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class Approval(Body):
    """When a person approves a tool call before it runs (issue: humans in
    the loop): never, always, or for the tools named (`<server>__<tool>`);
    `read_only_without_asking` lets tools that declare themselves
    read-only (MCP's readOnlyHint) run without asking."""

    policy: Literal["never", "always", "tools"] = "never"
    tools: Annotated[list[ToolName], Field(max_length=500)] = Field(default_factory=list)
    read_only_without_asking: bool = False


class AssistantBody(Body):
    """A whole profile: creating one, or replacing it (a new version)."""

    name: Name
    instructions: str = Field("", description="the system prompt; at most MAX_PROMPT_CHARS characters")
    endpoint: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        "default", description="a name the operator configured (MODEL_ENDPOINTS; `default`: OPENAI_BASE_URL)"
    )
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        None, description="required unless the endpoint is `default` (then OPENAI_MODEL)"
    )
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    tools: Annotated[dict[ServerName, Annotated[list[ToolName], Field(max_length=500)]], Field(max_length=100)] = Field(
        default_factory=dict, description='MCP server -> the tools it may offer (["*"]: all); absent: none'
    )
    approval: Approval = Field(default_factory=Approval)
    metadata: dict = Field(default_factory=dict)


class Decision(Body):
    """A person's decision on a tool call that waits for one."""

    decision: Literal["approve", "reject"]
    arguments: dict | None = Field(None, description="approve with these instead (checked against the tool's schema)")
    message: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        None, description="a rejection's reason: the model receives it as the call's result"
    )
    always: bool = Field(False, description="approve this tool for the rest of the session")


class LatestVersion(Body):
    version: Version


EventTypeName = Literal[
    "turn.completed",
    "turn.failed",
    "turn.cancelled",
    "turn.interrupted",
    "turn.waiting",
    "replay.finished",
    "schedule.run_finished",
]
WebhookUrl = Annotated[str, StringConstraints(min_length=1, max_length=2000)]


class WebhookCreate(Body):
    url: WebhookUrl = Field(description="https (in production), to a host with a public address")
    event_types: Annotated[list[EventTypeName], Field(min_length=1, max_length=7)]
    enabled: bool = True


class WebhookUpdate(Body):
    """What a PATCH changes: the fields it names, nothing else."""

    url: WebhookUrl | None = None
    event_types: Annotated[list[EventTypeName], Field(min_length=1, max_length=7)] | None = None
    enabled: bool | None = None


class SecretRotation(Body):
    overlap_seconds: Annotated[int, Field(ge=0, le=7 * 86400)] = Field(
        86400, description="how long the secret before still signs, beside the new one"
    )


Multitask = Literal["enqueue", "reject", "interrupt", "rollback"]


class TurnCreate(Body):
    message: Text
    multitask: Multitask = Field(
        "enqueue",
        description="while another turn of the session is active: wait behind it (enqueue), refuse (reject, 409),"
        " end the running one keeping its answer so far (interrupt), or remove it and its question (rollback)",
    )


class ActiveBranch(Body):
    turn_id: str = Field(description="a turn of the session: its branch becomes the active path")


class ShareCreate(Body):
    turn_id: str | None = Field(None, description="the leaf of the path to share; default: the active path's")
    include_tools: bool = Field(False, description="show each answer's tool calls, their arguments and outputs")


class Regenerate(Body):
    """The body of a regeneration, if it has one."""

    multitask: Multitask = "enqueue"


class ChatRequest(Body):
    message: Text
    session_id: str | None = None
    assistant_id: str | None = Field(None, description="a new session's assistant (with no `session_id`)")
    stream: bool = False


MAX_QUESTIONS = 10_000  # in one replay, however they are given (a set's times its repeats)
MAX_REPEATS = 10

Phrase = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
Phrases = Phrase | Annotated[list[Phrase], Field(min_length=1, max_length=50)]
ToolNames = ToolName | Annotated[list[ToolName], Field(min_length=1, max_length=50)]


class Expect(Body):
    """What a question expects of its answer (shared/expectations.py):
    every check named must pass."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)
    contains: Phrases | None = Field(None, description="text the answer must hold (each of a list), case-sensitive")
    not_contains: Phrases | None = Field(None, description="text the answer must not hold")
    regex: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATTERN_CHARS)] | None = Field(
        None, description="a pattern the answer must match somewhere"
    )
    is_json: Literal[True] | None = Field(None, alias="json", description="the answer is a JSON document")
    tools_called: ToolNames | None = Field(None, description="tools that must be called: `server__tool` or `tool`")
    tools_not_called: ToolNames | None = Field(None, description="tools that must not be called")
    max_latency_ms: Annotated[int, Field(ge=1, le=86_400_000)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=100_000_000)] | None = Field(
        None, description="prompt and completion tokens of the whole turn"
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        error = None if pattern is None else pattern_error(pattern)
        if error:
            raise ValueError(f"not a valid pattern: {error}")
        return pattern

    def stored(self) -> dict[str, Any] | None:
        return self.model_dump(by_alias=True, exclude_none=True) or None


Key = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class SetQuestion(Body):
    message: Text
    key: Key | None = Field(None, description="how runs are matched (default: the question's place, from 1)")
    expect: Expect | None = None


class QuestionSetBody(Body):
    """A whole set: creating one, or replacing it."""

    name: Name
    description: Annotated[str, StringConstraints(max_length=2000)] = ""
    questions: Annotated[list[SetQuestion], Field(min_length=1, max_length=MAX_QUESTIONS)]

    @model_validator(mode="after")
    def _keys_differ(self) -> QuestionSetBody:
        keys = [q.key or str(i + 1) for i, q in enumerate(self.questions)]
        if len(set(keys)) < len(keys):
            raise ValueError("two questions have the same key")
        return self


class ReplayQuestion(Body):
    message: Text
    session_id: str | None = None


def _exactly_one_source(schema: dict) -> None:
    """ReplayCreate's schema: one of its sources, none null."""
    for name in ("questions", "from_sessions", "set_id"):
        schema["properties"][name].pop("default", None)
    schema["oneOf"] = [{"required": ["questions"]}, {"required": ["from_sessions"]}, {"required": ["set_id"]}]


Concurrency = Annotated[int, Field(ge=1, le=100)]
Repeats = Annotated[int, Field(ge=1, le=MAX_REPEATS)]


class ReplayCreate(Body):
    """Exactly one of `questions`, `from_sessions` and `set_id`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one_source)
    # Absent, or a list: None stands for absent, and null is refused.
    questions: Annotated[list[ReplayQuestion], Field(min_length=1, max_length=MAX_QUESTIONS)] = None
    from_sessions: Annotated[list[str], Field(min_length=1, max_length=1000)] = None
    set_id: str = Field(None, description="run a question set: each question judged by its expectations")
    repeats: Repeats = Field(1, description="with `set_id`: ask each question this many times")
    concurrency: Concurrency = 4
    assistant_id: str | None = Field(None, description="who answers every question (null: each session's)")
    assistant_version: Version | None = Field(None, description="null: the assistant's latest when it starts")


Cron = Annotated[str, StringConstraints(strip_whitespace=True, min_length=9, max_length=200)]
TimeZone = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ScheduleCreate(Body):
    set_id: str
    cron: Cron = Field(description="minute hour day month weekday; or six fields, seconds first")
    timezone: TimeZone = Field("UTC", description="an IANA name: the cron's hours are this zone's")
    assistant_id: str | None = None
    assistant_version: Version | None = Field(None, description="null: the assistant's latest at each run")
    concurrency: Concurrency = 4
    repeats: Repeats = 1
    enabled: bool = True


class ScheduleUpdate(Body):
    """What a PATCH changes: the fields it names, nothing else (naming
    `assistant_id` sets `assistant_version` too: null unless given)."""

    cron: Cron | None = None
    timezone: TimeZone | None = None
    assistant_id: str | None = None
    assistant_version: Version | None = None
    concurrency: Concurrency | None = None
    repeats: Repeats | None = None
    enabled: bool | None = None


class Login(Body):
    key: Text


def parse_body(model: type[M], max_message_chars: int | None = None) -> M:
    """The request's JSON body validated as `model`, or the documented 4xx."""
    if not request.is_json:
        raise ApiError(415, "send the body as application/json")
    data = parse_json(request.get_data())  # kept: a request run again reads it again
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    body = validate(model, data)
    message = getattr(body, "message", None)
    if max_message_chars is not None and message is not None and len(message) > max_message_chars:
        raise ApiError(422, f"message must be at most {max_message_chars} characters", {"field": "message"})
    return body


def validate(model: type[M], data: dict[str, Any]) -> M:
    """`data` as `model`, or a 422 naming the first field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"{field}: {first['msg']}" if field else first["msg"], {"field": field}) from None


def parse_json(raw: bytes | str) -> Any:
    """Strict JSON that Postgres can store: no NaN or Infinity, no NUL, no
    lone surrogate, at most MAX_DEPTH levels; else the documented 4xx."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:  # a syntax error, bad UTF-8, NaN or Infinity
        raise ApiError(400, "the body is not valid JSON") from None
    _check(data, "", 0)
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check(value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ApiError(400, f"the body is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if UNSTORABLE.search(value):
            raise ApiError(
                422, f"{path or 'body'}: NUL characters and lone surrogates are not allowed", {"field": path}
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if UNSTORABLE.search(key):
                raise ApiError(
                    422, f"{path or 'body'}: a key holds a NUL character or a lone surrogate", {"field": path}
                )
            _check(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, f"{path}.{index}" if path else str(index), depth + 1)
