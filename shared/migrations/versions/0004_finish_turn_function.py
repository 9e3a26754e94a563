"""finish_turn(): a turn's end in one statement; next_queued_turn()

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 06:20:00

What tasks.turn.finish_turn did in six round trips (BEGIN, the session lock,
the guarded update, the answer, the next queued turn, COMMIT) as one
function call, in autocommit one round trip. next_queued_turn() is the one
definition of the session's next turn.
"""

from alembic import op

from shared.migrations.functions import function_sql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(function_sql("next_queued_turn", 1))
    op.execute(function_sql("finish_turn", 1))


def downgrade() -> None:
    op.execute("DROP FUNCTION finish_turn(uuid, uuid, integer, text, text, jsonb, jsonb, jsonb, uuid)")
    op.execute("DROP FUNCTION next_queued_turn(uuid)")
