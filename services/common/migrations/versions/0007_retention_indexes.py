"""Indexes the retention purge reads its oldest rows by: attempts by start, the entity map by its last update.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_delivery_attempts_started_at", "delivery_attempts", ["started_at"])
    op.create_index("ix_entity_map_updated_at", "entity_map", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_entity_map_updated_at", "entity_map")
    op.drop_index("ix_delivery_attempts_started_at", "delivery_attempts")
