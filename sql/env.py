"""alembic environment for consoled.

Always run through :mod:`consoled.store.schema`, which hands over an open
connection in ``config.attributes["connection"]``.  consoled keeps its own
version table, because a nova cell database already has ``alembic_version``.
"""

from alembic import context

from consoled.store.schema import VERSION_TABLE, include_object
from consoled.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    include_object=include_object,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
