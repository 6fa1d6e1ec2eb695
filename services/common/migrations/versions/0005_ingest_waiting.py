"""Thin webhooks waiting for the Klientiks API, and the records of their keys behind them.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_waiting",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("source", sa.String(130), nullable=False, index=True),
        sa.Column("inbox_key", sa.String(400), nullable=False, index=True),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("thin", sa.Integer(), nullable=False),
        sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ingest_waiting")
