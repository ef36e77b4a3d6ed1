"""Migrations: each revision, adoption of nova's table, and upgraded == fresh."""

from __future__ import annotations

import os
import sys
import zipfile
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, utils
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.store import schema
from consoled.store.engine import make_engine
from tests.databases import fresh_database

# console_auth_tokens as nova's migration 8f2f1571d55b made it before 2024.2
# added tls_port; nova also keeps its own alembic_version table.
NOVA_TABLE = """
CREATE TABLE console_auth_tokens (
    created_at DATETIME, updated_at DATETIME,
    id INTEGER NOT NULL {autoincrement},
    token_hash VARCHAR(255) NOT NULL,
    console_type VARCHAR(255) NOT NULL,
    host VARCHAR(255) NOT NULL,
    port INTEGER NOT NULL,
    internal_access_path VARCHAR(255),
    instance_uuid VARCHAR(36) NOT NULL,
    expires INTEGER NOT NULL,
    access_url_base VARCHAR(255),
    PRIMARY KEY (id),
    CONSTRAINT uniq_console_auth_tokens0token_hash UNIQUE (token_hash)
)"""
NOVA_INDEXES = [
    "CREATE INDEX console_auth_tokens_instance_uuid_idx ON console_auth_tokens (instance_uuid)",
    "CREATE INDEX console_auth_tokens_host_expires_idx ON console_auth_tokens (host, expires)",
    "CREATE INDEX console_auth_tokens_token_hash_idx ON console_auth_tokens (token_hash)",
    "CREATE INDEX console_auth_tokens_token_hash_instance_uuid_idx"
    " ON console_auth_tokens (token_hash, instance_uuid)",
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
    "INSERT INTO alembic_version VALUES ('2903cd72dc14')",
]


class SchemaTestsMixin:
    backend: str

    def setUp(self: Any) -> None:
        self.engine = make_engine(fresh_database(self, self.backend))
        self.addCleanup(self.engine.dispose)

    def tables(self: Any) -> set[str]:
        return set(sa.inspect(self.engine).get_table_names())

    def test_upgraded_equals_metadata(self: Any) -> None:
        """After upgrade to head, alembic finds no difference from the tables' metadata."""
        schema.upgrade(self.engine)
        self.assertEqual(schema.differences(self.engine), [])
        self.assertEqual(schema.current_revision(self.engine), schema.head_revision())

    def test_revision_001(self: Any) -> None:
        """001 creates console_auth_tokens with nova's indexes and constraint, nothing else."""
        schema.upgrade(self.engine, "001")
        self.assertEqual(self.tables(), {"console_auth_tokens", schema.VERSION_TABLE})
        inspector = sa.inspect(self.engine)
        indexes = {i["name"] for i in inspector.get_indexes("console_auth_tokens")}
        self.assertTrue(
            {
                "console_auth_tokens_instance_uuid_idx",
                "console_auth_tokens_host_expires_idx",
                "console_auth_tokens_token_hash_instance_uuid_idx",
            }
            <= indexes
        )
        uniques = {u["name"] for u in inspector.get_unique_constraints("console_auth_tokens")}
        if self.backend == "mariadb":  # MySQL reports unique constraints as indexes
            uniques |= indexes
        self.assertIn("uniq_console_auth_tokens0token_hash", uniques)

    def test_revision_002_up_and_down(self: Any) -> None:
        """002 adds consoled's tables; downgrading to 001 removes them and keeps nova's."""
        schema.upgrade(self.engine)
        self.assertTrue({"consoled_sessions", "consoled_serial_leases"} <= self.tables())
        schema.downgrade(self.engine, "001")
        self.assertFalse({"consoled_sessions", "consoled_serial_leases"} & self.tables())
        self.assertIn("console_auth_tokens", self.tables())

    def test_revision_003_up_and_down(self: Any) -> None:
        """003 adds the serial port allocations, unique per (host, port); down to 002 drops them."""
        schema.upgrade(self.engine, "003")
        self.assertIn("consoled_serial_ports", self.tables())
        key = sa.inspect(self.engine).get_pk_constraint("consoled_serial_ports")
        self.assertEqual(key["constrained_columns"], ["host", "port"])
        schema.downgrade(self.engine, "002")
        self.assertNotIn("consoled_serial_ports", self.tables())
        self.assertIn("consoled_serial_leases", self.tables())

    def test_001_adopts_nova_table(self: Any) -> None:
        """A nova-made table keeps its rows and nova's alembic_version; tls_port is added."""
        autoincrement = "AUTO_INCREMENT" if self.backend == "mariadb" else ""
        if self.backend == "postgresql":
            ddl = NOVA_TABLE.replace("INTEGER NOT NULL {autoincrement}", "SERIAL NOT NULL")
            ddl = ddl.replace("DATETIME", "TIMESTAMP WITHOUT TIME ZONE")
        else:
            ddl = NOVA_TABLE.format(autoincrement=autoincrement)
        with self.engine.begin() as connection:
            connection.exec_driver_sql(ddl)
            for statement in NOVA_INDEXES:
                connection.exec_driver_sql(statement)
            connection.exec_driver_sql(
                "INSERT INTO console_auth_tokens (token_hash, console_type, host, port,"
                " instance_uuid, expires) VALUES ('abc', 'novnc', 'h', 5900,"
                " '9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f', 1)"
            )
        schema.upgrade(self.engine)
        with self.engine.connect() as connection:
            row = connection.exec_driver_sql(
                "SELECT token_hash, tls_port FROM console_auth_tokens"
            ).one()
            nova_version = connection.exec_driver_sql(
                "SELECT version_num FROM alembic_version"
            ).scalar()
        self.assertEqual(tuple(row), ("abc", None))
        self.assertEqual(nova_version, "2903cd72dc14")
        self.assertEqual(schema.current_revision(self.engine), schema.head_revision())
        self.assertEqual(schema.differences(self.engine), [])

    def test_check_names_the_upgrade_command(self: Any) -> None:
        """A database behind head is refused with the command that upgrades it."""
        schema.upgrade(self.engine, "001")
        error = self.assertRaises(schema.SchemaBehind, schema.check, self.engine)
        self.assertIn("consoled-manage db upgrade", str(error))
        self.assertIn("001", str(error))


class SQLiteSchemaTests(SchemaTestsMixin, SynchronousTestCase):
    backend = "sqlite"


class PostgreSQLSchemaTests(SchemaTestsMixin, SynchronousTestCase):
    backend = "postgresql"


class MariaDBSchemaTests(SchemaTestsMixin, SynchronousTestCase):
    backend = "mariadb"


class WheelTests(TestCase):
    """The migrations travel inside the wheel and are found from an installed copy."""

    timeout = 120

    @defer.inlineCallbacks
    def test_wheel_carries_migrations(self) -> Any:
        """A built wheel holds every module, the web page and consoled/sql; unpacked
        elsewhere the daemon's modules import and it finds its head revision."""
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(schema.__file__)))
        checkout = os.path.dirname(checkout)
        out = os.path.abspath(self.mktemp())
        _, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, checkout],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        (wheel,) = [name for name in os.listdir(out) if name.endswith(".whl")]
        site = os.path.join(out, "site")
        with zipfile.ZipFile(os.path.join(out, wheel)) as archive:
            names = set(archive.namelist())
            archive.extractall(site)
        self.assertIn("consoled/sql/env.py", names)
        self.assertIn("consoled/sql/versions/001_console_auth_tokens.py", names)
        self.assertIn("twisted/plugins/consoled_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        probe = (
            "import pkgutil, consoled, os; "
            "[__import__(m.name) for m in pkgutil.walk_packages(consoled.__path__, 'consoled.')"
            " if not m.name.startswith('consoled.sql')]; "
            "import consoled.service, consoled.listeners; "
            "assert os.path.exists(os.path.join(consoled.__path__[0], 'web', 'serial.html')); "
            "from consoled.store import schema; "
            "print(schema.migrations_directory()); print(schema.head_revision())"
        )
        output, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-c", probe], env={**os.environ, "PYTHONPATH": site}, path=out
        )
        self.assertEqual(code, 0, err)
        where, head = output.decode().split()
        self.assertEqual(where, os.path.join(site, "consoled", "sql"))
        self.assertEqual(head, schema.head_revision())
