"""Parked deliveries, the event history, the retry base of replays, the next attempt time.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("retry_base", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "parked",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.String(255), nullable=False, unique=True),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("lane", sa.String(400), nullable=False, index=True),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("connection", sa.String(130), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("kafka_key", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("replay", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_parked_target_partition", "parked", ["target", "partition"])
    op.create_table(
        "events",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False, index=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("client_id", sa.String(64), nullable=True, index=True),
        sa.Column("phone_hash", sa.String(64), nullable=True, index=True),
        sa.Column("kafka_key", sa.Text(), nullable=True),
        sa.Column("inbox", sa.Text(), nullable=False),
        sa.Column("normalized", sa.Text(), nullable=True),
        sa.Column("quarantine_reason", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_index("ix_parked_target_partition", "parked")
    op.drop_table("parked")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("next_attempt_at")
        batch.drop_column("retry_base")
