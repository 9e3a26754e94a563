"""replays.succeeded, failed, running: a replay's counts, kept by each advance

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 21:30:00

Each end of a replay's turn advances the replay. It loaded every item of the
replay with its turn, twice, to count them and find the next to start: on a
10,000-question replay, 20,000 rows at every turn's end. The replay's row now
keeps how many of its turns ended succeeded or failed, and the turns it
started and has not yet seen end (at most its concurrency), so an advance
reads those and the items it starts.

Existing replays are counted here, as the advance counts: an item left
without a turn behind the last one started lost it with its deleted session,
and counts as failed (its turn ended cancelled).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

from shared.turn_states import ENDED, SUCCEEDED

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_ENDED = ", ".join(f"'{status}'" for status in ENDED)
# As an advance counts: a turn not ended is under way.
_COUNT = f"""
UPDATE replays r SET succeeded = c.succeeded, failed = c.failed, running = c.running
FROM (
    SELECT i.replay_id,
        count(*) FILTER (WHERE t.status = '{SUCCEEDED}') AS succeeded,
        count(*) FILTER (
            WHERE (t.status IN ({_ENDED}) AND t.status <> '{SUCCEEDED}') OR (t.id IS NULL AND i.index < s.started)
        ) AS failed,
        coalesce(array_agg(t.id ORDER BY i.index) FILTER (WHERE t.status NOT IN ({_ENDED})), '{{}}') AS running
    FROM replay_items i
    JOIN (
        SELECT replay_id, coalesce(max(index) FILTER (WHERE turn_id IS NOT NULL), -1) + 1 AS started
        FROM replay_items GROUP BY replay_id
    ) s ON s.replay_id = i.replay_id
    LEFT JOIN turns t ON t.id = i.turn_id
    GROUP BY i.replay_id
) c
WHERE r.id = c.replay_id
"""


def upgrade() -> None:
    op.add_column("replays", sa.Column("succeeded", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column("replays", sa.Column("failed", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column(
        "replays",
        sa.Column("running", ARRAY(sa.Uuid(as_uuid=False)), server_default=sa.text("'{}'"), nullable=False),
    )
    op.execute(_COUNT)


def downgrade() -> None:
    op.drop_column("replays", "running")
    op.drop_column("replays", "failed")
    op.drop_column("replays", "succeeded")
