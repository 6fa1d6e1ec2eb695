"""The phone index becomes an HMAC under `phone_hash_key`: drop the unsalted SHA-256 values written before.

They cannot be re-keyed here (the key is in the config, not the database), and left in place they are the
weakness this revision removes: a 10-digit phone's plain SHA-256 is brute-forced in minutes. Events
recorded before it are still found by client id and shown by `relay events show`.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(sa.text("UPDATE events SET phone_hash = NULL WHERE phone_hash IS NOT NULL"))


def downgrade() -> None:
    pass  # the old digests are gone for good, as intended
