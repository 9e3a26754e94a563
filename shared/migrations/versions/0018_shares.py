"""shares: read-only links to a snapshot of a session's path

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 09:00:00

A share's id is its link's secret (256 random bits); its snapshot is the
path shown when it was made, tool outputs only if the sharer chose so.
Deleting the row revokes the link.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shares",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("session_id", sa.Uuid(), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("owner_id", sa.Uuid(), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("turn_id", sa.Uuid(), nullable=True),
        sa.Column("include_tools", sa.Boolean(), nullable=False),
        sa.Column("snapshot", JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_shares_session_id", "shares", ["session_id"])
    op.create_index("ix_shares_owner_id", "shares", ["owner_id"])


def downgrade() -> None:
    op.drop_table("shares")
