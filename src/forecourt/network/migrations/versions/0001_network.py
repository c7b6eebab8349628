"""network: chain, regions, grades, models, stations, equipment, prices, credentials.

Revision ID: network_0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "network_0001"
down_revision = None
branch_labels = None
depends_on = None

CODE = sa.String(40)


def upgrade() -> None:
    schema = tree_schema()
    op.create_table(
        "network_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_table(
        "chain",
        sa.Column("code", CODE, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        schema=schema,
    )
    op.create_table(
        "region",
        sa.Column("code", CODE, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        schema=schema,
    )
    op.create_table(
        "grade",
        sa.Column("code", CODE, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        schema=schema,
    )
    op.create_table(
        "dispenser_model",
        sa.Column("code", sa.String(80), primary_key=True),
        sa.Column("amount_resolution_minor", sa.Integer, nullable=False),
        sa.Column("rounding", sa.String(20), nullable=False),
        sa.Column("volume_decimals", sa.Integer, nullable=False),
        schema=schema,
    )
    op.create_table(
        "station",
        sa.Column("code", CODE, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("region_code", CODE, nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("business_day_cutoff", sa.String(8), nullable=False),
        sa.Column("shift_starts", sa.Text, nullable=False),
        schema=schema,
    )
    op.create_table(
        "tank",
        sa.Column("station_code", CODE, primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True),
        sa.Column("grade", CODE, nullable=False),
        sa.Column("capacity_ml", sa.BigInteger, nullable=False),
        schema=schema,
    )
    op.create_table(
        "dispenser",
        sa.Column("station_code", CODE, primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True),
        sa.Column("model", sa.String(80), nullable=False),
        schema=schema,
    )
    op.create_table(
        "fuelling_point",
        sa.Column("station_code", CODE, primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True),
        sa.Column("dispenser", sa.Integer, nullable=False),
        schema=schema,
    )
    op.create_table(
        "nozzle",
        sa.Column("station_code", CODE, primary_key=True),
        sa.Column("fuelling_point", sa.Integer, primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True),
        sa.Column("grade", CODE, nullable=False),
        sa.Column("tank", sa.Integer, nullable=False),
        schema=schema,
    )
    op.create_table(
        "price",
        sa.Column("price_id", sa.String(64), primary_key=True),
        sa.Column("grade", CODE, nullable=False),
        sa.Column("scope", sa.String(20), nullable=False),
        sa.Column("scope_code", CODE, nullable=False),
        sa.Column("milli_minor_per_litre", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("effective_from", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("grade", "scope", "scope_code", "effective_from"),
        schema=schema,
    )
    op.create_table(
        "station_credential",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("station_code", CODE, nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime()),
        schema=schema,
    )


def downgrade() -> None:
    schema = tree_schema()
    for table in (
        "station_credential",
        "price",
        "nozzle",
        "fuelling_point",
        "dispenser",
        "tank",
        "station",
        "dispenser_model",
        "grade",
        "region",
        "chain",
        "network_revision",
    ):
        op.drop_table(table, schema=schema)
