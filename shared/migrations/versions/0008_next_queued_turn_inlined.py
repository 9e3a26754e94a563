"""next_queued_turn() as a set of at most one row, which queries inline

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 11:15:00

The claim and the sweeper call next_queued_turn() for a turn's session. As a
scalar SQL function whose body has a FROM, Postgres plans its body again on
every call; as a set-returning one called in FROM, it inlines the body into
the calling query, whose plan is kept.
"""

from alembic import op

from shared.migrations.functions import function_sql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP FUNCTION next_queued_turn(uuid)")  # its type changes: CREATE OR REPLACE cannot
    op.execute(function_sql("next_queued_turn", 3))


def downgrade() -> None:
    op.execute("DROP FUNCTION next_queued_turn(uuid)")
    op.execute(function_sql("next_queued_turn", 2))
