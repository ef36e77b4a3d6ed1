"""consoled_serial_ports: the persistent serial port allocations.

Revision ID: 003
Revises: 002
"""

import sqlalchemy as sa
from alembic import op

revision = "003"
down_revision = "002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consoled_serial_ports",
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column("port", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("instance_uuid", sa.String(36), nullable=False),
        sa.Column("allocated_at", sa.Double, nullable=False),
        mysql_engine="InnoDB",
    )
    op.create_index(
        "consoled_serial_ports_instance_uuid_idx", "consoled_serial_ports", ["instance_uuid"]
    )


def downgrade() -> None:
    op.drop_table("consoled_serial_ports")
