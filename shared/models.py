"""Database models (SQLAlchemy 2). Postgres is the source of truth.

The schema itself is made by Alembic (shared/migrations); these classes must
match it, and tests run the migrations, never `create_all`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime, Uuid

from shared.turn_states import SUBMIT


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {
        str: String,
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
    }


def _id() -> Mapped[str]:
    return mapped_column(Uuid(as_uuid=False), primary_key=True, default=new_id)


def _fk(target: str, ondelete: str = "CASCADE", nullable: bool = False) -> Mapped[Any]:
    return mapped_column(Uuid(as_uuid=False), ForeignKey(target, ondelete=ondelete), nullable=nullable, index=True)


def _now() -> Mapped[datetime]:
    return mapped_column(server_default=func.now())


class Owner(Base):
    __tablename__ = "owners"
    id: Mapped[str] = _id()
    name: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[datetime] = _now()


class ApiKey(Base):
    """An API key. Only its SHA-256 is stored: keys are 256-bit random, so a
    fast hash is enough (no dictionary to guard against), and lookup is one
    indexed equality. `prefix` (its first characters) tells keys apart."""

    __tablename__ = "api_keys"
    id: Mapped[str] = _id()
    owner_id: Mapped[str] = _fk("owners.id")
    name: Mapped[str]
    key_hash: Mapped[str] = mapped_column(unique=True)
    prefix: Mapped[str | None]
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None]


class Login(Base):
    """The chat page's login, made from an API key; its signed cookie holds
    only this id. It ends at logout, at expires_at (an absolute lifetime,
    never extended), or when its key is revoked."""

    __tablename__ = "logins"
    id: Mapped[str] = _id()
    key_id: Mapped[str] = _fk("api_keys.id")
    owner_id: Mapped[str] = _fk("owners.id")
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class Assistant(Base):
    """Who answers: a named profile of its owner's, versioned. Each update
    makes a new version (AssistantVersion); `latest` is the one used unless
    a session pins another, and a rollback points it back."""

    __tablename__ = "assistants"
    id: Mapped[str] = _id()
    owner_id: Mapped[str] = _fk("owners.id")
    name: Mapped[str]
    latest: Mapped[int] = mapped_column(Integer)
    versions: Mapped[int] = mapped_column(Integer)  # made so far; the next is versions + 1
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (UniqueConstraint("owner_id", "name"),)


class AssistantVersion(Base):
    """One version of an assistant's profile; never changed once made."""

    __tablename__ = "assistant_versions"
    assistant_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("assistants.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    instructions: Mapped[str] = mapped_column(Text)  # the system prompt
    endpoint: Mapped[str]  # a name of Settings.model_endpoints
    model: Mapped[str]
    temperature: Mapped[float | None] = mapped_column(Float)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    tools: Mapped[dict[str, Any]]  # MCP server -> the tool names allowed ("*": all of them)
    approval: Mapped[dict[str, Any]]  # its approval policy
    meta: Mapped[dict[str, Any]] = mapped_column("metadata")
    created_at: Mapped[datetime] = _now()


class ChatSession(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = _id()
    owner_id: Mapped[str] = _fk("owners.id")
    # Tools a person allowed for the rest of the session ("always for this chat").
    approved_tools: Mapped[list[str]] = mapped_column(ARRAY(String), server_default=text("'{}'"))
    # Who answers its turns: an assistant (its latest version, or the one
    # pinned), or the default assistant (the operator's settings) if null.
    assistant_id: Mapped[str | None] = _fk("assistants.id", ondelete="SET NULL", nullable=True)
    assistant_version: Mapped[int | None] = mapped_column(Integer)
    title: Mapped[str | None]
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=text("'{}'::jsonb"))
    # Turns accepted so far; the next turn's number. Bumped under the row lock
    # that also serialises turn submission against turn completion.
    turn_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # The leaf of the active path (shared/branches.py): a new message follows
    # it. No foreign key (migration 0017 says why).
    active_turn_id: Mapped[str | None] = mapped_column(Uuid(as_uuid=False))
    # The replay that made it for one of its questions (shared/replays.py);
    # null: a chat. Not the metadata's replay_id, which the owner may rewrite.
    replay_id: Mapped[str | None] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("replays.id", ondelete="SET NULL", name="fk_sessions_replay")
    )
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        Index("ix_sessions_owner_created", "owner_id", "created_at", "id"),
        # The chat list (origin=chat): an owner's sessions of no replay, newest
        # first, however many replay sessions are newer (migration 0019).
        Index("ix_sessions_owner_chats", "owner_id", "created_at", "id", postgresql_where=text("replay_id IS NULL")),
        Index("ix_sessions_replay", "replay_id", "created_at", "id", postgresql_where=text("replay_id IS NOT NULL")),
    )


class Turn(Base):
    __tablename__ = "turns"
    id: Mapped[str] = _id()
    session_id: Mapped[str] = _fk("sessions.id")
    owner_id: Mapped[str] = _fk("owners.id")
    number: Mapped[int] = mapped_column(Integer)
    # The turn whose answer this one follows (null: a first question); its
    # siblings are the regenerations and edits of one place in the session.
    parent_id: Mapped[str | None] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("turns.id", ondelete="SET NULL"), nullable=True, index=True
    )
    status: Mapped[str] = mapped_column(server_default=SUBMIT.target)  # shared/turn_states.py: every change
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    idempotency_key: Mapped[str | None]
    request_hash: Mapped[str | None]
    model: Mapped[str | None]
    answer: Mapped[str | None] = mapped_column(Text)
    usage: Mapped[dict[str, Any] | None]
    tools: Mapped[list[Any] | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None]
    origin: Mapped[dict[str, Any] | None]  # the request that sent it: request_id, traceparent (shared/logs.py)
    # The assistant version it runs with, fixed when it is accepted; no
    # foreign key: the record outlives a deleted assistant.
    assistant_id: Mapped[str | None] = mapped_column(Uuid(as_uuid=False))
    assistant_version: Mapped[int | None] = mapped_column(Integer)
    # Where a step waiting for a person stopped (shared/approvals.py): the
    # attempt's messages after the history, its text, usage and tools so far.
    paused: Mapped[dict[str, Any] | None]
    resumes: Mapped[int] = mapped_column(Integer, server_default=text("0"))  # attempts that began from a pause
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None]  # the first attempt's claim
    claimed_at: Mapped[datetime | None]  # the running attempt's claim (shared/recovery.py)
    finished_at: Mapped[datetime | None]

    # Server defaults come back with the INSERT (RETURNING), not a second query.
    __mapper_args__ = {"eager_defaults": True}
    __table_args__ = (
        UniqueConstraint("session_id", "number"),
        UniqueConstraint("owner_id", "idempotency_key"),
        Index("ix_turns_status_created", "status", "created_at"),
        Index("ix_turns_owner_status", "owner_id", "status"),
    )


class ToolApproval(Base):
    """One tool call of a paused step, waiting for (or given) a person's
    decision. Its id is the request id clients decide by."""

    __tablename__ = "tool_approvals"
    id: Mapped[str] = _id()
    turn_id: Mapped[str] = _fk("turns.id")
    owner_id: Mapped[str] = _fk("owners.id")
    attempt: Mapped[int] = mapped_column(Integer)  # the attempt that paused: one step's calls share it
    call_id: Mapped[str]  # the model's id of the call
    name: Mapped[str]  # as the model saw it: <server>__<tool>
    server: Mapped[str]
    tool: Mapped[str]
    arguments: Mapped[dict[str, Any]]  # as the model asked
    input_schema: Mapped[dict[str, Any]]  # the tool's, to check edited arguments
    status: Mapped[str] = mapped_column(server_default=text("'pending'"))  # pending, approved, rejected, expired
    decided_by: Mapped[str | None]
    decided_at: Mapped[datetime | None]
    decided_arguments: Mapped[dict[str, Any] | None]  # approved with these instead
    message: Mapped[str | None] = mapped_column(Text)  # a rejection's, which the model receives
    always: Mapped[bool] = mapped_column(server_default=text("false"))
    deadline: Mapped[datetime]
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        Index("ix_tool_approvals_pending_deadline", "deadline", postgresql_where=text("status = 'pending'")),
    )


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[str] = _id()
    session_id: Mapped[str] = _fk("sessions.id")
    turn_id: Mapped[str] = _fk("turns.id")
    role: Mapped[str]
    content: Mapped[str] = mapped_column(Text)
    tool_calls: Mapped[list[Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        # One question and at most one answer per turn, whatever retries do.
        Index("uq_messages_turn_role", "turn_id", "role", unique=True),
    )


class Replay(Base):
    __tablename__ = "replays"
    id: Mapped[str] = _id()
    owner_id: Mapped[str] = _fk("owners.id")
    # Who answers every question (null: the default assistant); the version
    # is fixed when the replay is made.
    assistant_id: Mapped[str | None] = _fk("assistants.id", ondelete="SET NULL", nullable=True)
    assistant_version: Mapped[int | None] = mapped_column(Integer)
    concurrency: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None]
    # Kept by each advance (shared/replays.py): its turns that ended, by
    # outcome, and those it started and has not yet seen end.
    succeeded: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    running: Mapped[list[str]] = mapped_column(ARRAY(Uuid(as_uuid=False)), server_default=text("'{}'"))
    # A run of a question set (shared/question_sets.py), maybe made by a
    # schedule; each question asked `repeats` times; how many items passed
    # their expectations, counted when the replay finishes.
    set_id: Mapped[str | None] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("question_sets.id", ondelete="SET NULL"), nullable=True
    )
    schedule_id: Mapped[str | None] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("replay_schedules.id", ondelete="SET NULL"), nullable=True
    )
    repeats: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    passed: Mapped[int | None] = mapped_column(Integer)


class ReplayItem(Base):
    __tablename__ = "replay_items"
    id: Mapped[str] = _id()
    replay_id: Mapped[str] = _fk("replays.id")
    index: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)
    session_id: Mapped[str | None] = _fk("sessions.id", ondelete="SET NULL", nullable=True)
    turn_id: Mapped[str | None] = _fk("turns.id", ondelete="SET NULL", nullable=True)
    # Of a set's run: the question's key (how runs are matched), which of
    # its repeats, and the expectations it is judged by, copied from the set.
    key: Mapped[str | None]
    repeat: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    expect: Mapped[dict[str, Any] | None]

    __table_args__ = (UniqueConstraint("replay_id", "index"),)


class QuestionSet(Base):
    """Questions stored once, to be replayed on an assistant and the runs
    compared (shared/question_sets.py)."""

    __tablename__ = "question_sets"
    id: Mapped[str] = _id()
    owner_id: Mapped[str] = mapped_column(Uuid(as_uuid=False), ForeignKey("owners.id", ondelete="CASCADE"))
    name: Mapped[str]
    description: Mapped[str] = mapped_column(Text, server_default="")
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_question_sets_owner_name"),)


class SetQuestion(Base):
    __tablename__ = "set_questions"
    set_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("question_sets.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str]
    message: Mapped[str] = mapped_column(Text)
    expect: Mapped[dict[str, Any] | None]

    __table_args__ = (UniqueConstraint("set_id", "key", name="uq_set_questions_key"),)


class ReplaySchedule(Base):
    """A set run on a cron expression in a time zone (shared/schedules.py)."""

    __tablename__ = "replay_schedules"
    id: Mapped[str] = _id()
    owner_id: Mapped[str] = _fk("owners.id")
    set_id: Mapped[str] = _fk("question_sets.id")
    cron: Mapped[str]
    timezone: Mapped[str]
    # Who answers (null: the default); with no version, the latest at each run.
    assistant_id: Mapped[str | None] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("assistants.id", ondelete="SET NULL"), nullable=True
    )
    assistant_version: Mapped[int | None] = mapped_column(Integer)
    concurrency: Mapped[int] = mapped_column(Integer)
    repeats: Mapped[int] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(server_default=text("true"))
    next_run_at: Mapped[datetime | None]
    last_replay_id: Mapped[str | None] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("replays.id", ondelete="SET NULL", use_alter=True), nullable=True
    )
    skipped: Mapped[int] = mapped_column(Integer, server_default=text("0"))  # occurrences a run under way skipped
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class WebhookEndpoint(Base):
    """Where an owner wants to be told of events (shared/webhooks.py). The
    secret signs each delivery; during a rotation the one before signs too,
    until `previous_secret_until`."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = _id()
    owner_id: Mapped[str] = _fk("owners.id")
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(ARRAY(String))
    secret: Mapped[str]
    previous_secret: Mapped[str | None]
    previous_secret_until: Mapped[datetime | None]
    enabled: Mapped[bool] = mapped_column(server_default=text("true"))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class WebhookDelivery(Base):
    """One event for one endpoint, written with the change that caused it
    (the outbox: Postgres triggers, migration 0015) and sent until it is
    delivered or its retries run out."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(primary_key=True)  # the webhook-id header, the same on every attempt
    endpoint_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    event_type: Mapped[str]
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = _now()
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = _now()
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class Share(Base):
    """A read-only link to a snapshot of a session's path (web/shares.py):
    its id is the link's secret; deleting the row revokes it."""

    __tablename__ = "shares"
    id: Mapped[str] = mapped_column(primary_key=True)
    session_id: Mapped[str] = _fk("sessions.id")
    owner_id: Mapped[str] = _fk("owners.id")
    turn_id: Mapped[str | None] = mapped_column(Uuid(as_uuid=False))  # the path's leaf when it was made
    include_tools: Mapped[bool]
    snapshot: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _now()
