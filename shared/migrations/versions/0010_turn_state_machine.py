"""The turn state machine in Postgres: a change of status the table lacks fails

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 20:30:00

shared/turn_states.py declares every status and every allowed change; its
rendering as a trigger function makes Postgres refuse any other, whoever
writes the row. finish_turn() and submit_turn() compare `status || ''`, as
every statement finding a turn by its id or session does.
"""

from alembic import op

from shared.migrations.functions import function_sql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TRIGGERS = """
CREATE TRIGGER turns_status_made BEFORE INSERT ON turns
    FOR EACH ROW EXECUTE FUNCTION turn_status_change();
CREATE TRIGGER turns_status_changed BEFORE UPDATE OF status ON turns
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION turn_status_change();
"""


def upgrade() -> None:
    op.execute(function_sql("turn_status_change", 1))
    op.execute(_TRIGGERS)
    op.execute(function_sql("finish_turn", 2))
    op.execute(function_sql("submit_turn", 3))


def downgrade() -> None:
    op.execute(function_sql("submit_turn", 2))
    op.execute(function_sql("finish_turn", 1))
    op.execute("DROP TRIGGER turns_status_changed ON turns")
    op.execute("DROP TRIGGER turns_status_made ON turns")
    op.execute("DROP FUNCTION turn_status_change()")
