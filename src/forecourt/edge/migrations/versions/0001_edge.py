"""edge: snapshots, sales journal, upload outbox, device transactions, audit outbox.

Revision ID: edge_0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime

revision = "edge_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshot",
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("fetched_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "journal",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sale_id", sa.String(36), nullable=False, unique=True),
        sa.Column("fuelling_point", sa.Integer, nullable=False),
        sa.Column("device_txn", sa.Integer),
        sa.Column("grade", sa.String(40), nullable=False),
        sa.Column("volume_ml", sa.Integer, nullable=False),
        sa.Column("amount_minor", sa.Integer, nullable=False),
        sa.Column("dispense_type", sa.String(20), nullable=False),
        sa.Column("business_date", sa.String(10), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("journaled_at", UTCDateTime(), nullable=False),
        sa.Column("settled_at", UTCDateTime()),
        sa.Column("hq_status", sa.String(20)),
        sa.Column("hq_flags", sa.String(400)),
        sa.Column("hq_acked_at", UTCDateTime()),
    )
    # (fuelling point, device transaction) → sale: de-duplicates re-read device transactions
    # before a sale_id is ever assigned.
    op.create_table(
        "device_txn",
        sa.Column("fuelling_point", sa.Integer, primary_key=True),
        sa.Column("device_txn", sa.Integer, primary_key=True),
        sa.Column("sale_id", sa.String(36), nullable=False),
        sa.Column("closed_at", UTCDateTime()),
    )
    op.create_table(
        "upload_outbox",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sale_id", sa.String(36), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rejected", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "audit_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(200), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("details", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("audit_outbox", "upload_outbox", "device_txn", "journal", "snapshot"):
        op.drop_table(table)
