"""Fresh databases for tests: a SQLite file, and real PostgreSQL and MariaDB servers.

Each test that asks gets a database of its own, created empty and dropped
afterwards.  The servers' admin URLs can be changed with
``CONSOLED_TEST_POSTGRESQL`` and ``CONSOLED_TEST_MARIADB``; when a server
cannot be reached the test is skipped, or fails under ``CI=true``.
"""

from __future__ import annotations

import os
import uuid

import sqlalchemy as sa
from twisted.trial.unittest import SynchronousTestCase

from tests.peers import require_peer

ADMIN_URLS = {
    "postgresql": os.environ.get(
        "CONSOLED_TEST_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get("CONSOLED_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test"),
}

BACKENDS = ("sqlite", "postgresql", "mariadb")

_HINTS = {
    "postgresql": "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "mariadb": "start it with: start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd",
}


def fresh_database(testcase: SynchronousTestCase, backend: str) -> str:
    """The URL of an empty database for this test alone."""
    if backend == "sqlite":
        return f"sqlite:///{os.path.abspath(testcase.mktemp())}.sqlite"
    admin = sa.create_engine(ADMIN_URLS[backend], isolation_level="AUTOCOMMIT")
    name = f"consoled_t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as error:
        admin.dispose()
        require_peer(testcase, backend, False, f"{_HINTS[backend]} ({error.orig})")

    def drop() -> None:
        with admin.connect() as connection:
            if backend == "postgresql":
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            else:
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()

    testcase.addCleanup(drop)
    return admin.url.set(database=name).render_as_string(hide_password=False)


def upgraded_engine(testcase: SynchronousTestCase, url: str) -> sa.Engine:
    """consoled's engine on ``url`` with the schema at head, disposed after the test."""
    from consoled.store import schema
    from consoled.store.engine import make_engine

    engine = make_engine(url)
    testcase.addCleanup(engine.dispose)
    schema.upgrade(engine)
    return engine
