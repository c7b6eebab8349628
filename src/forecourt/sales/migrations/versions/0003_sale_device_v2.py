"""sales: upload schema v2 — totalizers may be missing; the device, its epoch and its notes.

Totalizers become nullable (a v2 device may not report them); new columns ``device_id``,
``device_epoch`` (NULL for v1 sales), ``device_flags`` (comma-separated, "" for v1) and
``device_raw`` (JSON text or NULL). Existing rows are v1 sales and stay as they are. And an
index to find a sale's recorded conflicts (a re-sent conflicting payload is answered from it). On
SQLite the table is rebuilt (it cannot relax NOT NULL in place); PostgreSQL alters in place
without rewriting the table (nullable columns, a constant default).

Going back refuses while a stored sale has no totalizer: v1 has no way to hold it, and
dropping sales is never an option.

Revision ID: sales_0003
Revises: sales_0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.migrate import tree_schema

revision = "sales_0003"
down_revision = "sales_0002"
branch_labels = None
depends_on = None

TOTALIZERS = ("totalizer_start_ml", "totalizer_end_ml")
DEVICE_COLUMNS = ("device_raw", "device_flags", "device_epoch", "device_id")


def upgrade() -> None:
    schema = tree_schema()
    with op.batch_alter_table("sale", schema=schema) as batch:
        for name in TOTALIZERS:
            batch.alter_column(name, existing_type=sa.BigInteger(), nullable=True)
        batch.add_column(sa.Column("device_id", sa.String(64)))
        batch.add_column(sa.Column("device_epoch", sa.BigInteger))
        batch.add_column(sa.Column("device_flags", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("device_raw", sa.Text))
    op.create_index(
        "ix_sale_conflict_station_sale_id",
        "sale_conflict",
        ["station_code", "sale_id"],
        schema=schema,
    )


def downgrade() -> None:
    schema = tree_schema()
    table = sa.table("sale", *(sa.column(n) for n in TOTALIZERS), schema=schema)
    missing = op.get_bind().scalar(
        sa.select(sa.func.count())
        .select_from(table)
        .where(sa.or_(*(table.c[n].is_(None) for n in TOTALIZERS)))
    )
    if missing:
        raise RuntimeError(
            f"{missing} stored sales have no totalizer (upload schema v2); sales_0002 cannot"
            " hold them. Keep sales_0003, or move those sales out first."
        )
    op.drop_index("ix_sale_conflict_station_sale_id", table_name="sale_conflict", schema=schema)
    with op.batch_alter_table("sale", schema=schema) as batch:
        for name in DEVICE_COLUMNS:
            batch.drop_column(name)
        for name in TOTALIZERS:
            batch.alter_column(name, existing_type=sa.BigInteger(), nullable=False)
