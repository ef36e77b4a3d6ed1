"""The database tables, as SQLAlchemy Core, in one MetaData.

``console_auth_tokens`` is nova's table, column for column (types,
nullability, indexes and the unique constraint), so a nova cell database is
served as it is.  consoled's own tables carry the ``consoled_`` prefix and
live beside it.  Migrations in ``sql/versions`` must produce exactly this
metadata; ``tests/test_schema.py`` compares the two.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

#: nova.db.main.models.ConsoleAuthToken (NovaBase adds created_at/updated_at).
console_auth_tokens = sa.Table(
    "console_auth_tokens",
    metadata,
    sa.Column("created_at", sa.DateTime),
    sa.Column("updated_at", sa.DateTime),
    sa.Column("id", sa.Integer, primary_key=True, nullable=False),
    sa.Column("token_hash", sa.String(255), nullable=False),
    sa.Column("console_type", sa.String(255), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("internal_access_path", sa.String(255)),
    sa.Column("instance_uuid", sa.String(36), nullable=False),
    sa.Column("expires", sa.Integer, nullable=False),
    sa.Column("access_url_base", sa.String(255)),
    sa.Column("tls_port", sa.Integer),
    sa.Index("console_auth_tokens_instance_uuid_idx", "instance_uuid"),
    sa.Index("console_auth_tokens_host_expires_idx", "host", "expires"),
    sa.Index("console_auth_tokens_token_hash_idx", "token_hash"),
    sa.Index("console_auth_tokens_token_hash_instance_uuid_idx", "token_hash", "instance_uuid"),
    sa.UniqueConstraint("token_hash", name="uniq_console_auth_tokens0token_hash"),
)

#: One row per console session, open or ended.  Times are Unix seconds.
sessions = sa.Table(
    "consoled_sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instance_uuid", sa.String(36), nullable=False),
    sa.Column("console_type", sa.String(32), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("token_hash_prefix", sa.String(8), nullable=False),
    sa.Column("door", sa.String(32), nullable=False),
    sa.Column("client_address", sa.String(255), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False, server_default="writer"),
    sa.Column("proxy", sa.String(255), nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("touched_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double),
    sa.Column("end_reason", sa.String(255)),
    sa.Column("bytes_to_client", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("bytes_to_server", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("kick_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("kick_reason", sa.String(255)),
    sa.Column("kick_takeover", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("consoled_sessions_ended_at_idx", "ended_at"),
    sa.Index("consoled_sessions_proxy_ended_at_idx", "proxy", "ended_at"),
    sa.Index("consoled_sessions_instance_uuid_idx", "instance_uuid"),
)

#: The single-writer lock of a serial port: one row per host:port, held by a
#: session until released or until its lease lapses (a proxy that died).
serial_leases = sa.Table(
    "consoled_serial_leases",
    metadata,
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("port", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("session_id", sa.Integer, nullable=False),
    sa.Column("proxy", sa.String(255), nullable=False),
    sa.Column("acquired_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Index("consoled_serial_leases_expires_at_idx", "expires_at"),
)

#: Serial ports handed out to instances, per compute host, from
#: ``[serial_console] port_range``: a port in this table is never tested or
#: handed out again until the instance releases it.  The primary key on
#: (host, port) is what lets exactly one of two racing allocators have a port.
serial_ports = sa.Table(
    "consoled_serial_ports",
    metadata,
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("port", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("instance_uuid", sa.String(36), nullable=False),
    sa.Column("allocated_at", sa.Double, nullable=False),
    sa.Index("consoled_serial_ports_instance_uuid_idx", "instance_uuid"),
)

#: The tables consoled owns or adopts; anything else in a cell database is nova's.
OWN_TABLES = frozenset(metadata.tables)
