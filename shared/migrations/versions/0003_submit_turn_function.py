"""submit_turn(): a turn's submission in one statement

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 06:05:00

What shared.turns.submit_turn did in four round trips (BEGIN, the session's
row lock, the insert, COMMIT) as one function call: in autocommit, one
round trip.
"""

from alembic import op

from shared.migrations.functions import function_sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(function_sql("submit_turn", 1))


def downgrade() -> None:
    op.execute("DROP FUNCTION submit_turn(uuid, uuid, uuid, uuid, text, text, text, boolean, text[])")
