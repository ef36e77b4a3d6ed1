"""Schema versions: find the alembic environment, read and upgrade the version.

Blocking functions: call them from a thread (the Store's pool), from the CLI,
or before the reactor runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from consoled.store.tables import OWN_TABLES, metadata

#: consoled's own version table; nova's cell database has ``alembic_version``.
VERSION_TABLE = "consoled_schema_version"


class SchemaBehind(Exception):
    """The database is not at the revision this consoled needs."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"database schema is at revision {current or 'none'}, this consoled needs {head}: "
            "run `consoled-manage db upgrade` (with the same --config-file)"
        )


def migrations_directory() -> Path:
    """The alembic environment: ``sql/`` beside a checkout, ``consoled/sql`` in a wheel."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "sql", package / "sql"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"no alembic environment beside {package}")


def _config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_directory()))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    with engine.begin() as connection:
        command.upgrade(_config(connection), revision)


def downgrade(engine: sa.Engine, revision: str) -> None:
    with engine.begin() as connection:
        command.downgrade(_config(connection), revision)


def check(engine: sa.Engine) -> None:
    """Raise :class:`SchemaBehind` unless the database is at head."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaBehind(current, head)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Let alembic see only consoled's tables in a database nova shares."""
    if type_ == "table":
        return name in OWN_TABLES
    table = getattr(obj, "table", None)
    return table is None or table.name in OWN_TABLES


def differences(engine: sa.Engine) -> list[Any]:
    """What alembic finds between the live database and :data:`metadata`."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"include_object": include_object, "compare_type": True},
        )
        return compare_metadata(context, metadata)
