"""Quotas and fairness between owners: turns by owner and status; owner_may_run()

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 11:00:00

MAX_ACTIVE_TURNS_PER_OWNER counts the owner's queued and running turns on
every submission, and MAX_RUNNING_TURNS_PER_OWNER its running ones on every
claim (owner_may_run()); through the owner's index alone each count walks
every turn the owner ever had.
"""

from alembic import op

from shared.migrations.functions import function_sql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_turns_owner_status", "turns", ["owner_id", "status"])
    op.execute(function_sql("owner_may_run", 1))


def downgrade() -> None:
    op.execute("DROP FUNCTION owner_may_run(uuid, integer)")
    op.drop_index("ix_turns_owner_status", table_name="turns")
