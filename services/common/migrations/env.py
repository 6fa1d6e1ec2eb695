"""Alembic environment: migrations run on a connection handed in by services.common.ledger.upgrade."""

from alembic import context

from services.common.ledger import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `relay db upgrade`, which passes a connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
