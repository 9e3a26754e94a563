"""webhook_endpoints, webhook_deliveries, webhook_attempts: tell other systems when work ends

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 03:00:00

An owner's endpoints (URL, the event types wanted, the signing secret and,
while a rotation overlaps, the one before). Deliveries are an outbox:
triggers on turns (a status that ends a turn, or `waiting`) and on replays
(finished) insert them in the transaction that made the change, so no event
is lost between the change and its sending; the webhook worker sends them
and records each attempt.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from shared.migrations.functions import function_sql

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("owner_id", sa.Uuid(), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_types", ARRAY(sa.String()), nullable=False),
        sa.Column("secret", sa.String(), nullable=False),
        sa.Column("previous_secret", sa.String(), nullable=True),
        sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_webhook_endpoints_owner_id", "webhook_endpoints", ["owner_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(), primary_key=True),  # the webhook-id header, the same on every attempt
        sa.Column("endpoint_id", sa.Uuid(), sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event_type", sa.String(), nullable=False),
        sa.Column("payload", JSONB(), nullable=False),
        sa.Column("status", sa.String(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="webhook_deliveries_status"),
    )
    op.create_index("ix_webhook_deliveries_endpoint_created", "webhook_deliveries", ["endpoint_id", "created_at"])
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "webhook_attempts",
        sa.Column(
            "delivery_id", sa.String(), sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("number", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.execute(function_sql("webhook_turn_event", 1))
    op.execute(function_sql("webhook_replay_event", 1))
    op.execute(
        "CREATE TRIGGER turns_webhooks AFTER UPDATE OF status ON turns FOR EACH ROW"
        " WHEN (OLD.status IS DISTINCT FROM NEW.status"
        " AND NEW.status IN ('succeeded', 'failed', 'cancelled', 'interrupted', 'waiting'))"
        " EXECUTE FUNCTION webhook_turn_event()"
    )
    op.execute(
        "CREATE TRIGGER replays_webhooks AFTER UPDATE OF finished_at ON replays FOR EACH ROW"
        " WHEN (OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL) EXECUTE FUNCTION webhook_replay_event()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER replays_webhooks ON replays")
    op.execute("DROP TRIGGER turns_webhooks ON turns")
    op.execute("DROP FUNCTION webhook_replay_event()")
    op.execute("DROP FUNCTION webhook_turn_event()")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
