"""consoled's own tables: sessions and serial port leases.

Revision ID: 002
Revises: 001
"""

import sqlalchemy as sa
from alembic import op

revision = "002"
down_revision = "001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consoled_sessions",
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
        mysql_engine="InnoDB",
    )
    op.create_index("consoled_sessions_ended_at_idx", "consoled_sessions", ["ended_at"])
    op.create_index(
        "consoled_sessions_proxy_ended_at_idx", "consoled_sessions", ["proxy", "ended_at"]
    )
    op.create_index("consoled_sessions_instance_uuid_idx", "consoled_sessions", ["instance_uuid"])
    op.create_table(
        "consoled_serial_leases",
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column("port", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("session_id", sa.Integer, nullable=False),
        sa.Column("proxy", sa.String(255), nullable=False),
        sa.Column("acquired_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        mysql_engine="InnoDB",
    )
    op.create_index(
        "consoled_serial_leases_expires_at_idx", "consoled_serial_leases", ["expires_at"]
    )


def downgrade() -> None:
    op.drop_table("consoled_serial_leases")
    op.drop_table("consoled_sessions")
