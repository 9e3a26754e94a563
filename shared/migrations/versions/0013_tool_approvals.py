"""tool_approvals, turns.paused: a turn waits for a person to approve its tool calls

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 00:00:00

A step whose tool calls the assistant's policy has a person approve pauses
its turn: the turn becomes `waiting` (a state of the state machine: the
trigger's new version), its transcript so far is kept on the row, and each
call is a row of tool_approvals until decided. A waiting turn holds its
session as a running one does (next_queued_turn()).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from shared.migrations.functions import function_sql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("paused", JSONB(), nullable=True))
    op.add_column("turns", sa.Column("resumes", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column(
        "sessions", sa.Column("approved_tools", ARRAY(sa.String()), server_default=sa.text("'{}'"), nullable=False)
    )
    op.create_table(
        "tool_approvals",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("turn_id", sa.Uuid(), sa.ForeignKey("turns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("owner_id", sa.Uuid(), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("call_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("server", sa.String(), nullable=False),
        sa.Column("tool", sa.String(), nullable=False),
        sa.Column("arguments", JSONB(), nullable=False),
        sa.Column("input_schema", JSONB(), nullable=False),
        sa.Column("status", sa.String(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("decided_by", sa.String(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_arguments", JSONB(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("always", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'approved', 'rejected', 'expired')", name="tool_approvals_status"),
    )
    op.create_index("ix_tool_approvals_turn_id", "tool_approvals", ["turn_id"])
    op.create_index("ix_tool_approvals_owner_id", "tool_approvals", ["owner_id"])
    op.create_index(
        "ix_tool_approvals_pending_deadline",
        "tool_approvals",
        ["deadline"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.execute(function_sql("turn_status_change", 2))
    op.execute(function_sql("next_queued_turn", 4))


def downgrade() -> None:
    op.execute(function_sql("next_queued_turn", 3))
    op.execute(function_sql("turn_status_change", 1))
    op.drop_table("tool_approvals")
    op.drop_column("sessions", "approved_tools")
    op.drop_column("turns", "resumes")
    op.drop_column("turns", "paused")
