"""devices: stations' telemetry link, current state, bounded history, alarms, discards.

Revision ID: devices_0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "devices_0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    schema = tree_schema()
    op.create_table(
        "devices_station",
        sa.Column("station_code", sa.String(64), primary_key=True),
        sa.Column("online", sa.Boolean),
        sa.Column("last_seen", UTCDateTime()),
        sa.Column("stale", sa.Boolean, nullable=False),
        sa.Column("discards", sa.BigInteger, nullable=False),
        sa.Column("last_discard_at", UTCDateTime()),
        schema=schema,
    )
    op.create_table(
        "devices_current",
        sa.Column("station_code", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("boot", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_table(
        "devices_history",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("station_code", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("boot", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_index(
        "ix_devices_history_key",
        "devices_history",
        ["station_code", "kind", "key", "id"],
        schema=schema,
    )
    op.create_table(
        "devices_alarm",
        sa.Column("station_code", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(8), primary_key=True),
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("raised_at", UTCDateTime()),
        sa.Column("cleared_at", UTCDateTime()),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_table(
        "devices_alarm_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("station_code", sa.String(64), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_index(
        "ix_devices_alarm_log_station", "devices_alarm_log", ["station_code", "id"], schema=schema
    )
    op.create_table(
        "devices_discard",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("station_code", sa.String(64), nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_index(
        "ix_devices_discard_station", "devices_discard", ["station_code", "id"], schema=schema
    )


def downgrade() -> None:
    schema = tree_schema()
    for table in (
        "devices_discard",
        "devices_alarm_log",
        "devices_alarm",
        "devices_history",
        "devices_current",
        "devices_station",
    ):
        op.drop_table(table, schema=schema)
