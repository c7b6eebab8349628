"""edge: device transactions keyed by device, epoch and content; device epochs; sale columns.

A controller that restarts with its counters reset (or swaps, or wraps its counter) reuses
transaction numbers, so (fuelling point, number) no longer names one dispensing. Device
transactions are now keyed by (device, fuelling point, number, epoch) and carry a fingerprint
of their contents; the journal gets the columns the controller reads back (device, epoch,
nozzle, end totalizer, end time, flags). Rows of edge_0001 are carried over under the device
"" and epoch 0, their fingerprints computed from the journaled payload.

Revision ID: edge_0002
Revises: edge_0001
Create Date: 2026-12-01
"""

import json
from datetime import datetime

import sqlalchemy as sa
from alembic import op

from forecourt.edge.domain import transaction_fingerprint
from forecourt.infra.db import UTCDateTime

revision = "edge_0002"
down_revision = "edge_0001"
branch_labels = None
depends_on = None

LEGACY_DEVICE = ""


def upgrade() -> None:
    for column in (
        sa.Column("device_id", sa.String(64), nullable=False, server_default=LEGACY_DEVICE),
        sa.Column("device_epoch", sa.Integer, nullable=False, server_default="0"),
        sa.Column("nozzle", sa.Integer),
        sa.Column("totalizer_end_ml", sa.BigInteger),
        sa.Column("ended_at", UTCDateTime()),
        sa.Column("flags", sa.String(400), nullable=False, server_default=""),
    ):
        op.add_column("journal", column)
    op.create_table(
        "device_sale",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("fuelling_point", sa.Integer, primary_key=True),
        sa.Column("device_txn", sa.Integer, primary_key=True),
        sa.Column("epoch", sa.Integer, primary_key=True),
        sa.Column("fingerprint", sa.String(200), nullable=False),
        sa.Column("sale_id", sa.String(36), nullable=False),
        sa.Column("closed_at", UTCDateTime()),
    )
    op.create_table(
        "device_epoch",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("boot_marker", sa.String(200)),
        sa.Column("changed_at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
    )
    op.create_index("journal_fp_end", "journal", ["fuelling_point", "ended_at"])
    conn = op.get_bind()
    journal = sa.table(
        "journal",
        sa.column("sale_id", sa.String),
        sa.column("nozzle", sa.Integer),
        sa.column("totalizer_end_ml", sa.BigInteger),
        sa.column("ended_at", UTCDateTime()),
    )
    device_sale = sa.table(
        "device_sale",
        sa.column("device_id", sa.String),
        sa.column("fuelling_point", sa.Integer),
        sa.column("device_txn", sa.Integer),
        sa.column("epoch", sa.Integer),
        sa.column("fingerprint", sa.String),
        sa.column("sale_id", sa.String),
        sa.column("closed_at", UTCDateTime()),
    )
    old = sa.table(
        "device_txn",
        sa.column("fuelling_point", sa.Integer),
        sa.column("device_txn", sa.Integer),
        sa.column("sale_id", sa.String),
        sa.column("closed_at", UTCDateTime()),
    )
    payloads = sa.table("journal", sa.column("sale_id", sa.String), sa.column("payload", sa.Text))
    rows = conn.execute(
        sa.select(old.c.fuelling_point, old.c.device_txn, old.c.sale_id, old.c.closed_at)
    ).fetchall()
    for fp, txn, sale_id, closed_at in rows:
        payload = conn.scalar(sa.select(payloads.c.payload).where(payloads.c.sale_id == sale_id))
        if payload is None:
            continue
        body = json.loads(payload)
        ended = datetime.fromisoformat(body["ended_at"])
        fingerprint = transaction_fingerprint(
            nozzle=body["nozzle"],
            volume_ml=body["volume_ml"],
            amount_minor=body["amount_minor"],
            unit_price_mmu=body["unit_price_mmu"],
            ended_at=ended,
            totalizer_end_ml=body.get("totalizer_end_ml"),
        )
        conn.execute(
            device_sale.insert().values(
                device_id=LEGACY_DEVICE,
                fuelling_point=fp,
                device_txn=txn,
                epoch=0,
                fingerprint=fingerprint,
                sale_id=sale_id,
                closed_at=closed_at,
            )
        )
        conn.execute(
            journal.update()
            .where(journal.c.sale_id == sale_id)
            .values(
                nozzle=body["nozzle"],
                totalizer_end_ml=body.get("totalizer_end_ml"),
                ended_at=ended,
            )
        )
    op.drop_table("device_txn")


def downgrade() -> None:
    op.create_table(
        "device_txn",
        sa.Column("fuelling_point", sa.Integer, primary_key=True),
        sa.Column("device_txn", sa.Integer, primary_key=True),
        sa.Column("sale_id", sa.String(36), nullable=False),
        sa.Column("closed_at", UTCDateTime()),
    )
    conn = op.get_bind()
    # The newest epoch wins where numbers repeat: the old table could hold only one.
    conn.execute(
        sa.text(
            "INSERT OR REPLACE INTO device_txn (fuelling_point, device_txn, sale_id, closed_at) "
            "SELECT fuelling_point, device_txn, sale_id, closed_at FROM device_sale "
            "ORDER BY epoch"
        )
    )
    op.drop_index("journal_fp_end", "journal")
    op.drop_table("device_epoch")
    op.drop_table("device_sale")
    with op.batch_alter_table("journal") as batch:
        for name in (
            "flags",
            "ended_at",
            "totalizer_end_ml",
            "nozzle",
            "device_epoch",
            "device_id",
        ):
            batch.drop_column(name)
