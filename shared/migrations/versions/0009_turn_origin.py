"""turns.origin: the request that sent a turn, for the worker's logs and traces

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 13:45:00

A turn behind another in its session is sent to the workers by the worker
that ends the one before, not by the request that made it: the request's id
and trace context are kept on the turn, so the worker that runs it logs and
traces it as part of that request, whoever sent the task.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from shared.migrations.functions import function_sql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_V1 = "submit_turn(uuid, uuid, uuid, uuid, text, text, text, boolean, text[])"
_V2 = "submit_turn(uuid, uuid, uuid, uuid, text, text, text, boolean, text[], jsonb)"


def upgrade() -> None:
    op.add_column("turns", sa.Column("origin", JSONB, nullable=True))
    op.execute(f"DROP FUNCTION {_V1}")  # a new parameter: CREATE OR REPLACE would add a second function
    op.execute(function_sql("submit_turn", 2))


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_V2}")
    op.execute(function_sql("submit_turn", 1))
    op.drop_column("turns", "origin")
