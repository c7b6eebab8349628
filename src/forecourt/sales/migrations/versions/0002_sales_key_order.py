"""sales: the sale key as (station, sale_id, business date); drop the index it makes redundant.

The key's columns are unchanged, so de-duplication and time partitioning by business date
are as before; with ``sale_id`` second, the key's own index answers "is this sale_id already
stored for this station, under any business date", which a separate index did until now
(one index fewer to maintain per ingested sale). PostgreSQL only: SQLite cannot re-order a
table's key in place, and there the separate index stays.

Revision ID: sales_0002
Revises: sales_0001
Create Date: 2026-11-25
"""

from alembic import op

from forecourt.infra.migrate import tree_schema

revision = "sales_0002"
down_revision = "sales_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    schema = tree_schema()
    op.execute(
        f'ALTER TABLE "{schema}".sale DROP CONSTRAINT sale_pkey,'
        " ADD CONSTRAINT sale_pkey PRIMARY KEY (station_code, sale_id, business_date)"
    )
    op.drop_index("ix_sale_station_sale_id", table_name="sale", schema=schema)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    schema = tree_schema()
    op.create_index("ix_sale_station_sale_id", "sale", ["station_code", "sale_id"], schema=schema)
    op.execute(
        f'ALTER TABLE "{schema}".sale DROP CONSTRAINT sale_pkey,'
        " ADD CONSTRAINT sale_pkey PRIMARY KEY (station_code, business_date, sale_id)"
    )
