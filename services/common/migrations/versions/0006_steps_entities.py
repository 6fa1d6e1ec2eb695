"""Resumable delivery steps and the entity map (Klientiks id -> the target's id, per connection).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delivery_steps",
        sa.Column("idempotency_key", sa.String(255), primary_key=True),
        sa.Column("step", sa.String(64), primary_key=True),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "entity_map",
        sa.Column("connection", sa.String(130), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("klientiks_id", sa.String(64), primary_key=True),
        sa.Column("target_id", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("entity_map")
    op.drop_table("delivery_steps")
