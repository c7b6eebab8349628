"""sales: sales, conflicts, station sequence books, alerts.

Revision ID: sales_0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "sales_0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    schema = tree_schema()
    op.create_table(
        "sale",
        sa.Column("station_code", sa.String(40), primary_key=True),
        sa.Column("business_date", sa.Date, primary_key=True),
        sa.Column("sale_id", sa.Uuid, primary_key=True),
        sa.Column("station_seq", sa.BigInteger, nullable=False),
        sa.Column("fuelling_point", sa.Integer, nullable=False),
        sa.Column("nozzle", sa.Integer, nullable=False),
        sa.Column("grade", sa.String(40), nullable=False),
        sa.Column("volume_ml", sa.BigInteger, nullable=False),
        sa.Column("unit_price_mmu", sa.BigInteger, nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("price_version", sa.String(64)),
        sa.Column("snapshot_version", sa.BigInteger, nullable=False),
        sa.Column("totalizer_start_ml", sa.BigInteger, nullable=False),
        sa.Column("totalizer_end_ml", sa.BigInteger, nullable=False),
        sa.Column("device_txn", sa.BigInteger),
        sa.Column("dispense_type", sa.String(20), nullable=False),
        sa.Column("started_at", UTCDateTime()),
        sa.Column("ended_at", UTCDateTime(), nullable=False),
        sa.Column("shift_id", sa.String(40), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("quarantined", sa.Boolean, nullable=False),
        sa.Column("flags", sa.String(400), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_index("ix_sale_station_sale_id", "sale", ["station_code", "sale_id"], schema=schema)
    op.create_index(
        "ix_sale_natural_key",
        "sale",
        ["station_code", "fuelling_point", "nozzle", "device_txn", "totalizer_end_ml"],
        schema=schema,
    )
    op.create_index(
        "ix_sale_date_grade", "sale", ["business_date", "station_code", "grade"], schema=schema
    )
    op.create_table(
        "sale_conflict",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("station_code", sa.String(40), nullable=False),
        sa.Column("sale_id", sa.Uuid, nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_table(
        "station_sequence",
        sa.Column("station_code", sa.String(40), primary_key=True),
        sa.Column("high_water", sa.BigInteger, nullable=False),
        sa.Column("gaps", sa.Text, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_table(
        "sales_alert",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("station_code", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(60), nullable=False),
        sa.Column("sale_id", sa.Uuid),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("raised_at", UTCDateTime(), nullable=False),
        schema=schema,
    )


def downgrade() -> None:
    schema = tree_schema()
    for table in ("sales_alert", "station_sequence", "sale_conflict", "sale"):
        op.drop_table(table, schema=schema)
