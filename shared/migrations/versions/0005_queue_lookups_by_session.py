"""next_queued_turn(): find the session's turns through its index

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 07:50:00

`t.status = 'queued'` let the planner serve next_queued_turn() from
ix_turns_status_created, walking every queued turn of every session, when
its statistics said few were queued (see shared.models.status_of). The
status is now compared as `status || ''`, which only the session's index
can serve.
"""

from alembic import op

from shared.migrations.functions import function_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(function_sql("next_queued_turn", 2))


def downgrade() -> None:
    op.execute(function_sql("next_queued_turn", 1))
