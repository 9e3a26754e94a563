"""Request bodies: JSON checks and pydantic validation in one place."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from web.errors import ApiError

M = TypeVar("M", bound=BaseModel)

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SessionCreate(Body):
    title: Annotated[str, StringConstraints(max_length=200)] | None = None
    metadata: dict = Field(default_factory=dict)


class TurnCreate(Body):
    message: Text
    multitask: Literal["enqueue", "reject"] = "enqueue"


class ChatRequest(Body):
    message: Text
    session_id: str | None = None
    stream: bool = False


class ReplayQuestion(Body):
    message: Text
    session_id: str | None = None


class ReplayCreate(Body):
    questions: Annotated[list[ReplayQuestion], Field(min_length=1, max_length=10_000)] | None = None
    from_sessions: Annotated[list[str], Field(min_length=1, max_length=1000)] | None = None
    concurrency: Annotated[int, Field(ge=1, le=100)] = 4


class Login(Body):
    key: Text


def parse_body(model: type[M], max_message_chars: int | None = None) -> M:
    """The request's JSON body validated as `model`, or the documented 4xx."""
    if not request.is_json:
        raise ApiError(415, "send the body as application/json")
    data = request.get_json(silent=True)
    if data is None:
        raise ApiError(400, "the body is not valid JSON")
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"{field}: {first['msg']}" if field else first["msg"], {"field": field}) from None
    message = getattr(body, "message", None)
    if max_message_chars is not None and message is not None and len(message) > max_message_chars:
        raise ApiError(422, f"message must be at most {max_message_chars} characters", {"field": "message"})
    return body
