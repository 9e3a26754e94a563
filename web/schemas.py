"""The shapes of what the API answers, as pydantic models: the OpenAPI
document is generated from them (web/openapi.py), and the fuzzing tests check
every answer against it. The JSON itself is built in web/resources.py."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.turn_states import STATUSES

TurnStatus = Literal[STATUSES]  # type: ignore[valid-type]


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Answer):
    code: str = Field(description="machine-readable: validation_error, not_found, rate_limited, …")
    message: str = Field(description="for a person: what was wrong and what to do")
    details: dict[str, Any] | None = Field(None, description="e.g. `field`, the field at fault")


class Error(Answer):
    error: ErrorBody


class Ok(Answer):
    ok: bool


class Session(Answer):
    id: str
    title: str | None
    metadata: dict[str, Any]
    assistant_id: str | None = Field(description="who answers its turns; null: the default assistant")
    assistant_version: int | None = Field(description="the version pinned; null: the assistant's latest")
    active_turn_id: str | None = Field(description="the leaf of the active path: a new message follows it")
    created_at: datetime
    updated_at: datetime
    message_count: int = Field(description="on every branch")


class SessionPage(Answer):
    items: list[Session]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class Message(Answer):
    id: str
    role: Literal["user", "assistant"]
    content: str
    turn_id: str
    created_at: datetime
    tool_calls: list[dict[str, Any]] | None = Field(None, description="the tools called for this answer, if any")


class MessageList(Answer):
    items: list[Message]


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int


class TurnError(Answer):
    code: str
    message: str


class Turn(Answer):
    id: str
    session_id: str
    number: int = Field(description="its place in its session's run order: 1, 2, 3 …")
    parent_id: str | None = Field(description="the turn whose answer it follows; null: a first question")
    status: TurnStatus
    model: str | None = Field(description="the model that answered (the newest attempt's)")
    assistant_id: str | None = Field(description="the assistant it runs with; null: the default assistant")
    assistant_version: int | None = Field(description="that assistant's version, fixed when it was accepted")
    answer: str | None
    error: TurnError | None
    usage: Usage
    tools: list[dict[str, Any]]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    events_url: str


class SessionTurn(Turn):
    message: str = Field(description="the question the turn answers")
    siblings: list[str] = Field(description="the turns that follow the same answer, itself included, oldest first")


class SessionTurnPage(Answer):
    items: list[SessionTurn]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class ChatAnswer(Answer):
    response: str | None
    session_id: str
    turn_id: str
    status: TurnStatus
    error: TurnError | None
    usage: Usage
    tools: list[dict[str, Any]]


class Replay(Answer):
    id: str
    status: Literal["running", "finished"]
    assistant_id: str | None = Field(description="who answers every question; null: each session's")
    assistant_version: int | None
    total: int
    succeeded: int
    failed: int
    passed: int | None = Field(description="items that passed their expectations; counted when it finishes")
    set_id: str | None = Field(description="the question set it runs, if it does")
    schedule_id: str | None = Field(description="the schedule that made it, if one did")
    repeats: int = Field(description="how many times each question is asked")
    created_at: datetime
    finished_at: datetime | None


class ReplayPage(Answer):
    items: list[Replay]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class Check(Answer):
    check: str = Field(description="succeeded, or an expectation's name")
    passed: bool
    detail: str = Field(description="why it failed; empty when it passed")


class ReplayResult(Answer):
    """One line of a replay's results (NDJSON)."""

    index: int
    key: str = Field(description="the question's key in its set; else its index")
    repeat: int
    message: str
    status: Literal[(*STATUSES, "pending")]  # type: ignore[valid-type]
    answer: str | None
    error: TurnError | None
    turn_id: str | None
    latency_ms: int | None
    tokens: int | None
    tools: list[str]
    passed: bool | None = Field(description="its turn succeeded and every check passed; null until it ends")
    checks: list[Check]


class SetQuestion(Answer):
    key: str
    message: str
    expect: dict[str, Any] | None


class QuestionSet(Answer):
    id: str
    name: str
    description: str
    size: int
    created_at: datetime
    updated_at: datetime
    questions: list[SetQuestion] | None = Field(None, description="one set's; not in lists")


class QuestionSetPage(Answer):
    items: list[QuestionSet]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class Schedule(Answer):
    id: str
    set_id: str
    cron: str
    timezone: str
    assistant_id: str | None
    assistant_version: int | None = Field(description="null: the assistant's latest at each run")
    concurrency: int
    repeats: int
    enabled: bool
    next_run_at: datetime | None = Field(description="when it runs next; null while disabled")
    last_replay_id: str | None
    skipped: int = Field(description="times it was due while its last run was still under way")
    created_at: datetime
    updated_at: datetime


class SchedulePage(Answer):
    items: list[Schedule]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class Approval(Answer):
    policy: Literal["never", "always", "tools"]
    tools: list[str]
    read_only_without_asking: bool


class Assistant(Answer):
    """An assistant at one of its versions (its latest unless asked)."""

    id: str
    name: str
    version: int = Field(description="the version shown")
    latest: int = Field(description="the version sessions that pin none run with")
    versions: int = Field(description="how many were made: 1 … versions")
    instructions: str
    endpoint: str
    model: str
    temperature: float | None
    max_tokens: int | None
    tools: dict[str, list[str]]
    approval: Approval
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    version_created_at: datetime


class AssistantPage(Answer):
    items: list[Assistant]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class ToolApproval(Answer):
    """A tool call a person was asked to decide, and what they decided."""

    id: str = Field(description="the request id decisions name")
    turn_id: str
    call_id: str
    name: str = Field(description="<server>__<tool>, as the model called it")
    server: str
    tool: str
    arguments: dict[str, Any] = Field(description="as the model asked")
    status: Literal["pending", "approved", "rejected", "expired"]
    decided_by: str | None
    decided_at: datetime | None
    decided_arguments: dict[str, Any] | None = Field(description="approved with these instead")
    message: str | None
    always: bool
    deadline: datetime
    created_at: datetime


class ToolApprovalList(Answer):
    items: list[ToolApproval]


class Health(Answer):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Any] = Field(
        description="database, redis, workers, model, tools_unavailable, breakers_open, relay;"
        " with detail, breakers (each one's state, retry_at, last_error, opens, probes)"
    )


class CheckedStatus(Answer):
    ok: bool | None
    error: str | None
    checked_at: datetime | None


class ToolServer(CheckedStatus):
    name: str
    tools: int


class Info(Answer):
    model: str
    offline_model: bool
    model_status: CheckedStatus
    tools: list[ToolServer]
    auth: bool


class WebhookEndpoint(Answer):
    """Where the caller is told of events; `secret` only when made or rotated."""

    id: str
    url: str
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None = Field(description="why it was disabled, if it was (a 410 from the receiver)")
    secret: str | None = Field(None, description="whsec_…: shown once, when made or rotated")
    previous_secret_until: datetime | None = Field(description="while set, the secret before signs too")
    created_at: datetime
    updated_at: datetime


class WebhookEndpointPage(Answer):
    items: list[WebhookEndpoint]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class WebhookAttempt(Answer):
    number: int
    at: datetime
    status_code: int | None = Field(description="the receiver's; null when it gave no answer")
    duration_ms: int
    error: str | None


class WebhookDelivery(Answer):
    id: str = Field(description="the webhook-id header: the same on every attempt")
    event_type: str
    payload: dict[str, Any]
    status: Literal["pending", "delivered", "failed"]
    attempts: list[WebhookAttempt]
    next_attempt_at: datetime | None = Field(description="while pending")
    created_at: datetime
    finished_at: datetime | None


class WebhookDeliveryPage(Answer):
    items: list[WebhookDelivery]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class Spread(Answer):
    sd: float
    min: float
    max: float


class ComparedSide(Answer):
    replays: list[str]
    assistant: dict[str, Any] = Field(description="`id` and `version` of its first replay's assistant")
    set_id: str | None
    runs_of_set: int = Field(description="samples of the whole set: each replay's repeats")
    questions: int = Field(description="answers judged, every repeat counted")
    pass_rate: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    mean_tokens: float | None
    total_tokens: int
    spread: dict[str, Spread | None] = Field(description="each metric over the runs of the set; null with one")


class MetricChange(Answer):
    change: float | None = Field(description="candidate minus baseline")
    ci95: list[float] | None = Field(description="95% confidence interval of the change; null with one run a side")
    within_noise: bool | None


class ComparedOutcome(Answer):
    answer: str | None = Field(description="its first sample's")
    status: str
    checks: list[Check]
    tools: list[str]
    samples: int
    pass_rate: float
    latency_ms: float | None = Field(description="the median over its samples")
    tokens: float | None = Field(description="the mean over its samples")


class ComparedQuestion(Answer):
    key: str
    message: str
    change: Literal["regressed", "improved", "noise", "same", "added", "removed"]
    baseline: ComparedOutcome | None
    candidate: ComparedOutcome | None
    diff: list[list[str]] | None = Field(description='word diff of the answers: ["=" | "-" | "+", text] pieces')
    pass_change: float | None
    pass_change_ci: list[float] | None


class Comparison(Answer):
    baseline: ComparedSide
    candidate: ComparedSide
    difference: dict[str, MetricChange]
    changes: dict[str, int]
    questions: list[ComparedQuestion]


class Share(Answer):
    id: str = Field(description="the link's secret: whoever has it reads the snapshot")
    session_id: str
    turn_id: str | None = Field(description="the leaf of the path shared")
    include_tools: bool
    url: str = Field(description="the page to read it (no key needed)")
    api_url: str = Field(description="the snapshot as JSON (no key needed)")
    created_at: datetime


class ShareList(Answer):
    items: list[Share]


class SharedMessage(Answer):
    role: Literal["user", "assistant"]
    content: str
    tools: list[dict[str, Any]] | None = Field(None, description="its tool calls, when the sharer included them")


class SharedChat(Answer):
    title: str | None
    messages: list[SharedMessage]


class ExportedTurn(Answer):
    id: str
    parent_id: str | None
    status: TurnStatus
    question: str
    answer: str | None
    error: TurnError | None
    tools: list[dict[str, Any]]
    usage: dict[str, Any] | None
    model: str | None
    assistant_id: str | None
    assistant_version: int | None
    created_at: datetime
    finished_at: datetime | None


class SessionExport(Answer):
    format: Literal["turnstream.session/1"]
    session: dict[str, Any]
    active_path: list[str] = Field(description="the ids of the active path's turns, first question first")
    turns: list[ExportedTurn] = Field(description="every turn of every branch, in the order they were accepted")
