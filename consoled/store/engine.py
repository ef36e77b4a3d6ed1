"""Engines for every database consoled serves: SQLite (embedded), PostgreSQL, MariaDB."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

#: Where the embedded default keeps its file when ``[database] connection`` is unset.
DEFAULT_SQLITE_PATH = os.path.join("var", "consoled.sqlite")

# nova.conf usually names the driver (mysql+pymysql://).  A bare scheme would
# load a DBAPI consoled does not install, so pick the one it does.
_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


#: Seconds one connection attempt to PostgreSQL or MariaDB may take.  Without
#: it a blackholed address holds start-up (and every pool refill) for the
#: kernel's SYN retries, about two minutes.  A ``connect_timeout`` in the
#: URL's query (``...?connect_timeout=15``) wins.
CONNECT_TIMEOUT = 5

# Drivers whose connect() takes ``connect_timeout`` in seconds.  psycopg
# bounds the whole connection (TCP, TLS, start-up); PyMySQL bounds the TCP
# connect only (its ``read_timeout``, off by default, bounds the greeting).
_TIMEOUT_DRIVERS = {"psycopg", "pymysql"}


def default_url(state_path: str | None = None) -> str:
    path = os.path.join(state_path, "consoled.sqlite") if state_path else DEFAULT_SQLITE_PATH
    return f"sqlite:///{os.path.abspath(path)}"


def normalise_url(url: str) -> sa.URL:
    parsed = make_url(url)
    return parsed.set(drivername=_DRIVERS.get(parsed.drivername, parsed.drivername))


def make_engine(url: str, pool_size: int = 4, recycle: int = 3600) -> sa.Engine:
    """An engine with each dialect's settings for a long-running proxy.

    SQLite runs in WAL mode, so the proxies of one host can read while one
    writes, with a busy timeout instead of immediate "database is locked".
    """
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(database)) or ".", exist_ok=True)
        # hide_parameters: a failed statement's text must not carry token hashes.
        engine = sa.create_engine(parsed, connect_args={"timeout": 30}, hide_parameters=True)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if parsed.get_driver_name() in _TIMEOUT_DRIVERS and "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT
    if parsed.get_driver_name() == "psycopg" and "tcp_user_timeout" not in parsed.query:
        # A blackholed server never acknowledges a statement: without this the
        # database thread that sent it hangs for the kernel's retries (~15 min).
        connect_args["tcp_user_timeout"] = CONNECT_TIMEOUT * 1000
    return sa.create_engine(
        parsed,
        connect_args=connect_args,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        pool_recycle=recycle,
        hide_parameters=True,
    )


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def safe_url(url: str | sa.URL) -> str:
    """The URL as it may be shown: password hidden."""
    return normalise_url(str(url) if isinstance(url, sa.URL) else url).render_as_string(
        hide_password=True
    )


def describe_error(error: BaseException, url: str | sa.URL) -> str:
    """One line for an operator about a database failure, without secrets."""
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig else error
    lines = str(cause).strip().splitlines()
    return f"cannot use the database {safe_url(url)}: {type(cause).__name__}: {lines[0] if lines else ''}"


def ping(engine: sa.Engine) -> None:
    """One round trip to the database (the store's breaker probes with it)."""
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")
