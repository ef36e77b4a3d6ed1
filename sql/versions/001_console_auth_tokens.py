"""Adopt nova's console_auth_tokens, or create it as nova would.

A nova cell database already has the table: it is left as it is, except that
``tls_port`` (added by nova in 2024.2) is added when an older nova made the
table without it.  Anywhere else the table is created with nova's columns,
indexes and unique constraint.

Revision ID: 001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "001"
down_revision = None
branch_labels = None
depends_on = None

TABLE = "console_auth_tokens"


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if inspector.has_table(TABLE):
        columns = {column["name"] for column in inspector.get_columns(TABLE)}
        if "tls_port" not in columns:
            op.add_column(TABLE, sa.Column("tls_port", sa.Integer, nullable=True))
        return
    op.create_table(
        TABLE,
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
        sa.UniqueConstraint("token_hash", name="uniq_console_auth_tokens0token_hash"),
        mysql_engine="InnoDB",
        mysql_charset="utf8",
    )
    op.create_index("console_auth_tokens_instance_uuid_idx", TABLE, ["instance_uuid"])
    op.create_index("console_auth_tokens_host_expires_idx", TABLE, ["host", "expires"])
    op.create_index("console_auth_tokens_token_hash_idx", TABLE, ["token_hash"])
    op.create_index(
        "console_auth_tokens_token_hash_instance_uuid_idx", TABLE, ["token_hash", "instance_uuid"]
    )


def downgrade() -> None:
    # The table may be nova's: never drop it on the way down.
    pass
