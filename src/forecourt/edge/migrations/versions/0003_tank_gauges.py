"""edge: tank gauge readings, deliveries and device alarms journaled at the station.

Revision ID: edge_0003
Revises: edge_0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime

revision = "edge_0003"
down_revision = "edge_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tank_reading",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("tank", sa.Integer, nullable=False),
        sa.Column("measured_at", UTCDateTime(), nullable=False),
        sa.Column("volume_ml", sa.BigInteger),
        sa.Column("tc_volume_ml", sa.BigInteger),
        sa.Column("ullage_ml", sa.BigInteger),
        sa.Column("product_height_um", sa.BigInteger),
        sa.Column("water_height_um", sa.BigInteger),
        sa.Column("water_volume_ml", sa.BigInteger),
        sa.Column("temperature_mdegc", sa.Integer),
        sa.Column("product_code", sa.String(40)),
        sa.Column("status", sa.String(400), nullable=False),
        sa.Column("flags", sa.String(400), nullable=False),
        sa.Column("journaled_at", UTCDateTime(), nullable=False),
    )
    op.create_index("tank_reading_tank_at", "tank_reading", ["device_id", "tank", "measured_at"])
    op.create_index("tank_reading_journaled", "tank_reading", ["journaled_at"])
    op.create_table(
        "tank_delivery",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("tank", sa.Integer, primary_key=True),
        sa.Column("started_at", UTCDateTime(), primary_key=True),
        sa.Column("ended_at", UTCDateTime(), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("journaled_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "device_alarm",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("code", sa.String(60), nullable=False),
        sa.Column("device_code", sa.String(60), nullable=False),
        sa.Column("raised_at", UTCDateTime()),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
        sa.Column("cleared_at", UTCDateTime()),
    )
    op.create_index("device_alarm_open", "device_alarm", ["device_id", "cleared_at"])


def downgrade() -> None:
    op.drop_index("device_alarm_open", "device_alarm")
    op.drop_table("device_alarm")
    op.drop_table("tank_delivery")
    op.drop_index("tank_reading_journaled", "tank_reading")
    op.drop_index("tank_reading_tank_at", "tank_reading")
    op.drop_table("tank_reading")
