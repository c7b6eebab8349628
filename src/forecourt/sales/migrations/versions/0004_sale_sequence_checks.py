"""sales: who holds a station_seq, and the sequence jumps a station's book keeps aside.

An index (station, ``station_seq``) so ingest finds, in one probe per sale, another sale
already holding a sale's ``station_seq`` (``duplicate_station_seq``); and ``jumps`` on the
sequence book: the sequence numbers far beyond the high-water mark, stored but kept out of
the gap list until the high-water mark reaches them (JSON list, ``[]`` for existing books).
Both are additions: existing rows stay as they are. On PostgreSQL the index is built inside
the migration's transaction (it blocks writes to ``sale`` while it is built).

Revision ID: sales_0004
Revises: sales_0003
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.migrate import tree_schema

revision = "sales_0004"
down_revision = "sales_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = tree_schema()
    op.create_index("ix_sale_station_seq", "sale", ["station_code", "station_seq"], schema=schema)
    with op.batch_alter_table("station_sequence", schema=schema) as batch:
        batch.add_column(sa.Column("jumps", sa.Text, nullable=False, server_default="[]"))


def downgrade() -> None:
    schema = tree_schema()
    with op.batch_alter_table("station_sequence", schema=schema) as batch:
        batch.drop_column("jumps")
    op.drop_index("ix_sale_station_seq", table_name="sale", schema=schema)
