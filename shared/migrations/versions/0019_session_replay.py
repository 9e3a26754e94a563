"""sessions.replay_id: the replay that made a session, so a chat list can leave them out

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 13:00:00

A replay (a set's run too) makes a session for each question that names
none; an owner's runs of 10,000 questions buried their chats in the list.
Which sessions a replay made was only in their metadata, which the owner
may rewrite (PATCH), and a list filtered on it could use no index. The
column says it, and the partial index ix_sessions_owner_chats serves the
chat page's list (`owner_id = ? AND replay_id IS NULL`, newest first)
however many replay sessions are newer than the chats. The metadata key
stays, for clients that read it.

ON DELETE SET NULL, not CASCADE: replays are deleted only with their owner
(no endpoint or command deletes one), and the owner's sessions go in that
same cascade, so in the app a session never outlives its replay. Deleted
by hand, a replay would with CASCADE take its sessions' turns and messages
with it, past what deleting a session does first (DELETE
/api/sessions/{id} cancels its running and queued turns), and a session a
person went on talking in after opening it by its address; with SET NULL they stay, as
sessions of no replay. RESTRICT would make such a deletion fail on the
first session. The partial index ix_sessions_replay serves the constraint's
lookup and the list of one replay's sessions.

Backfilled: a session whose metadata's replay_id names a replay of the
same owner that asked one of its questions in it (an item names the
session). Metadata is the owner's to write; the item is what the replay
itself recorded, so a session merely labelled so is left a chat.
Compared as text: a value that is not a uuid matches nothing rather than
failing the cast.
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("replay_id", sa.Uuid(), nullable=True))
    op.create_foreign_key("fk_sessions_replay", "sessions", "replays", ["replay_id"], ["id"], ondelete="SET NULL")
    op.execute(
        "UPDATE sessions s SET replay_id = r.id FROM replays r"
        " WHERE r.id::text = s.metadata ->> 'replay_id' AND r.owner_id = s.owner_id"
        " AND EXISTS (SELECT FROM replay_items i WHERE i.replay_id = r.id AND i.session_id = s.id)"
    )
    op.create_index(
        "ix_sessions_owner_chats",
        "sessions",
        ["owner_id", "created_at", "id"],
        postgresql_where=sa.text("replay_id IS NULL"),
    )
    op.create_index(
        "ix_sessions_replay",
        "sessions",
        ["replay_id", "created_at", "id"],
        postgresql_where=sa.text("replay_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_replay", "sessions")
    op.drop_index("ix_sessions_owner_chats", "sessions")
    op.drop_constraint("fk_sessions_replay", "sessions", type_="foreignkey")
    op.drop_column("sessions", "replay_id")
