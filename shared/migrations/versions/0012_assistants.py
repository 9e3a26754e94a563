"""assistants: who answers, versioned, chosen per session

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 23:30:00

An assistant is an owner's named profile (instructions, model endpoint and
model, sampling, allowed tools, approval policy); each update makes a new
version. A session names one (its latest, or a pinned version), a replay
too; a turn records the version it ran with. submit_turn() fixes it.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from shared.migrations.functions import function_sql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_V3 = "submit_turn(uuid, uuid, uuid, uuid, text, text, text, boolean, text[], jsonb)"
_V4 = "submit_turn(uuid, uuid, uuid, uuid, text, text, text, boolean, text[], jsonb, uuid, integer)"


def _chosen(table: str) -> None:
    op.add_column(
        table,
        sa.Column("assistant_id", sa.Uuid(), sa.ForeignKey("assistants.id", ondelete="SET NULL"), nullable=True),
    )
    op.add_column(table, sa.Column("assistant_version", sa.Integer(), nullable=True))
    op.create_index(f"ix_{table}_assistant_id", table, ["assistant_id"])


def upgrade() -> None:
    op.create_table(
        "assistants",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("owner_id", sa.Uuid(), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("latest", sa.Integer(), nullable=False),
        sa.Column("versions", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("owner_id", "name"),
    )
    op.create_index("ix_assistants_owner_id", "assistants", ["owner_id"])
    op.create_table(
        "assistant_versions",
        sa.Column("assistant_id", sa.Uuid(), sa.ForeignKey("assistants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("instructions", sa.Text(), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=True),
        sa.Column("max_tokens", sa.Integer(), nullable=True),
        sa.Column("tools", JSONB(), nullable=False),
        sa.Column("approval", JSONB(), nullable=False),
        sa.Column("metadata", JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    _chosen("sessions")
    _chosen("replays")
    # No foreign key: a turn's record outlives a deleted assistant.
    op.add_column("turns", sa.Column("assistant_id", sa.Uuid(), nullable=True))
    op.add_column("turns", sa.Column("assistant_version", sa.Integer(), nullable=True))
    op.execute(f"DROP FUNCTION {_V3}")  # new parameters: CREATE OR REPLACE would add a second function
    op.execute(function_sql("submit_turn", 4))


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_V4}")
    op.drop_column("turns", "assistant_version")
    op.drop_column("turns", "assistant_id")
    op.execute(function_sql("submit_turn", 3))
    for table in ("replays", "sessions"):
        op.drop_index(f"ix_{table}_assistant_id", table)
        op.drop_column(table, "assistant_version")
        op.drop_column(table, "assistant_id")
    op.drop_table("assistant_versions")
    op.drop_table("assistants")
