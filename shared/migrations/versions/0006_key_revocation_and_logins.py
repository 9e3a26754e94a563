"""API keys can be revoked; the chat page's logins live on the server

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 08:30:00

api_keys.prefix: the key's first characters, to tell keys apart in a list
(keys made before this revision have none). api_keys.revoked_at: a revoked
key authenticates nothing. logins: one row per `POST /api/login`, which the
cookie names; it ends at logout, at its absolute expiry, or with its key.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("prefix", sa.String(), nullable=True))
    op.add_column("api_keys", sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "logins",
        sa.Column("id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("key_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("owner_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["owner_id"], ["owners.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_logins_key_id"), "logins", ["key_id"], unique=False)
    op.create_index(op.f("ix_logins_owner_id"), "logins", ["owner_id"], unique=False)


def downgrade() -> None:
    op.drop_table("logins")
    op.drop_column("api_keys", "revoked_at")
    op.drop_column("api_keys", "prefix")
