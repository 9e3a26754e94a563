"""turns can be interrupted: a newer message of the session ends them, their answer so far kept

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 00:30:00

A message sent with multitask `interrupt` ends the session's running turn
(its attempt stops and finishes it) or waiting one (at once) as
`interrupted`, a new final state: the trigger's new version.
"""

from alembic import op

from shared.migrations.functions import function_sql

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(function_sql("turn_status_change", 3))


def downgrade() -> None:
    op.execute(function_sql("turn_status_change", 2))
