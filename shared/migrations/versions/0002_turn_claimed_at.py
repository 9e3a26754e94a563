"""turns.claimed_at: when the running attempt claimed its turn

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 05:40:00

The sweeper leaves a turn claimed less than STALE_RUNNING_SECONDS ago alone,
so a worker no longer writes a heartbeat before every claim. Rows claimed
before this revision keep NULL, and their workers wrote that heartbeat.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("turns", "claimed_at")
