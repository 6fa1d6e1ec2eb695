"""The entity map's in-doubt marker loses its NUL byte, which PostgreSQL's text cannot hold.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Only SQLite can hold the old marker: on PostgreSQL every claim with it failed, so none was kept.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE entity_map SET target_id = '(pending)' WHERE target_id = char(0) || 'pending'")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE entity_map SET target_id = char(0) || 'pending' WHERE target_id = '(pending)'")
