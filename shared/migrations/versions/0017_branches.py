"""a session's turns form a tree: each turn's parent, the session's active leaf

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 08:00:00

A turn follows its parent's answer (null: a first question); regenerating
an answer or editing a question makes a sibling. The session's active
path runs from its leaf (`active_turn_id`) up to a first question; a new
message continues it. Existing sessions become straight lines: each turn's
parent is the turn before it, the leaf their last. submit_turn() v5 takes
the parent.
"""

import sqlalchemy as sa
from alembic import op

from shared.migrations.functions import function_sql

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_V4 = "submit_turn(uuid, uuid, uuid, uuid, text, text, text, boolean, text[], jsonb, uuid, integer)"
_V5 = "submit_turn(uuid, uuid, uuid, uuid, text, text, text, boolean, text[], jsonb, uuid, integer, boolean, uuid)"


def upgrade() -> None:
    op.add_column("turns", sa.Column("parent_id", sa.Uuid(), nullable=True))
    op.create_foreign_key("fk_turns_parent", "turns", "turns", ["parent_id"], ["id"], ondelete="SET NULL")
    op.create_index("ix_turns_parent_id", "turns", ["parent_id"])
    # No foreign key: its check would cost every submission a lookup and a
    # lock at commit, and a leaf that is gone (a rollback moves it to the
    # parent first) reads as the session's newest turn (shared/branches.py).
    op.add_column("sessions", sa.Column("active_turn_id", sa.Uuid(), nullable=True))
    op.execute(
        "UPDATE turns t SET parent_id = p.before FROM ("
        " SELECT id, lag(id) OVER (PARTITION BY session_id ORDER BY number) AS before FROM turns) p"
        " WHERE t.id = p.id AND p.before IS NOT NULL"
    )
    op.execute(
        "UPDATE sessions s SET active_turn_id = ("
        " SELECT t.id FROM turns t WHERE t.session_id = s.id ORDER BY t.number DESC LIMIT 1)"
    )
    op.execute(f"DROP FUNCTION {_V4}")  # new parameters: CREATE OR REPLACE would add a second function
    op.execute(function_sql("submit_turn", 5))


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_V5}")
    op.execute(function_sql("submit_turn", 4))
    op.drop_column("sessions", "active_turn_id")
    op.drop_index("ix_turns_parent_id", "turns")
    op.drop_constraint("fk_turns_parent", "turns", type_="foreignkey")
    op.drop_column("turns", "parent_id")
