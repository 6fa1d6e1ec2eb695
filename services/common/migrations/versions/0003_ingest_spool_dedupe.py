"""The ingest spool, the normalizer's dedupe window, duplicates in the event history.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_spool",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("record_id", sa.String(64), nullable=False, unique=True),
        sa.Column("kafka_key", sa.Text(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("spooled_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "ingest_dedupe",
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(400), nullable=False, index=True),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("duplicate_of", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("duplicate_of")
    op.drop_table("ingest_dedupe")
    op.drop_table("ingest_spool")
