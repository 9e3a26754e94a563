"""question_sets, set_questions, replay_schedules; replays of a set, repeated, judged

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 06:00:00

A question set is stored once, each question with a key (how two runs are
matched) and its expectations. A replay of a set copies them into its items
(so a run keeps what it was judged by, whatever the set becomes), runs each
question `repeats` times, and counts at its end the items that passed. A
schedule runs a set on a cron expression in a time zone; the replay it made
last is how "one run at a time" is kept. A scheduled run's end is a webhook
event of its own, `schedule.run_finished`, besides `replay.finished`.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from shared.migrations.functions import function_sql

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "question_sets",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("owner_id", sa.Uuid(), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("owner_id", "name", name="uq_question_sets_owner_name"),
    )
    op.create_table(
        "set_questions",
        sa.Column("set_id", sa.Uuid(), sa.ForeignKey("question_sets.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("index", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("expect", JSONB(), nullable=True),
        sa.UniqueConstraint("set_id", "key", name="uq_set_questions_key"),
    )
    op.create_table(
        "replay_schedules",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("owner_id", sa.Uuid(), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("set_id", sa.Uuid(), sa.ForeignKey("question_sets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("cron", sa.String(), nullable=False),
        sa.Column("timezone", sa.String(), nullable=False),
        sa.Column("assistant_id", sa.Uuid(), sa.ForeignKey("assistants.id", ondelete="SET NULL"), nullable=True),
        sa.Column("assistant_version", sa.Integer(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("repeats", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_replay_id", sa.Uuid(), nullable=True),
        sa.Column("skipped", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_replay_schedules_owner_id", "replay_schedules", ["owner_id"])
    op.create_index("ix_replay_schedules_set_id", "replay_schedules", ["set_id"])
    op.create_index("ix_replay_schedules_due", "replay_schedules", ["next_run_at"], postgresql_where=sa.text("enabled"))
    op.add_column(
        "replays",
        sa.Column("set_id", sa.Uuid(), sa.ForeignKey("question_sets.id", ondelete="SET NULL"), nullable=True),
    )
    op.add_column(
        "replays",
        sa.Column("schedule_id", sa.Uuid(), sa.ForeignKey("replay_schedules.id", ondelete="SET NULL"), nullable=True),
    )
    op.add_column("replays", sa.Column("repeats", sa.Integer(), server_default=sa.text("1"), nullable=False))
    op.add_column("replays", sa.Column("passed", sa.Integer(), nullable=True))
    op.create_index("ix_replays_set_created", "replays", ["set_id", "created_at"])
    op.create_index("ix_replays_schedule_created", "replays", ["schedule_id", "created_at"])
    op.create_foreign_key(
        "fk_replay_schedules_last_replay",
        "replay_schedules",
        "replays",
        ["last_replay_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.add_column("replay_items", sa.Column("key", sa.String(), nullable=True))
    op.add_column("replay_items", sa.Column("repeat", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column("replay_items", sa.Column("expect", JSONB(), nullable=True))
    op.execute(function_sql("webhook_replay_event", 2))


def downgrade() -> None:
    op.execute(function_sql("webhook_replay_event", 1))
    op.drop_column("replay_items", "expect")
    op.drop_column("replay_items", "repeat")
    op.drop_column("replay_items", "key")
    op.drop_constraint("fk_replay_schedules_last_replay", "replay_schedules", type_="foreignkey")
    op.drop_index("ix_replays_schedule_created", "replays")
    op.drop_index("ix_replays_set_created", "replays")
    op.drop_column("replays", "passed")
    op.drop_column("replays", "repeats")
    op.drop_column("replays", "schedule_id")
    op.drop_column("replays", "set_id")
    op.drop_table("replay_schedules")
    op.drop_table("set_questions")
    op.drop_table("question_sets")
