"""payments: payment orders, refunds, each sale's paid amount, notifications seen.

Revision ID: payments_0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "payments_0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = (
    "'created', 'pending', 'unknown', 'paid', 'failed', 'reversing', 'cancelled', "
    "'refunding', 'partially_refunded', 'refunded'"
)


def upgrade() -> None:
    schema = tree_schema()
    orders = f"{schema}.payment_order" if schema else "payment_order"
    op.create_table(
        "payment_order",
        sa.Column("order_id", sa.Uuid, primary_key=True),
        sa.Column("station_code", sa.String(40), nullable=False),
        sa.Column("sale_id", sa.Uuid, nullable=False),
        sa.Column("tender", sa.String(16), nullable=False),
        sa.Column("amount_fen", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("out_trade_no", sa.String(32)),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("provider_trade_no", sa.String(64)),
        sa.Column("paid_at", UTCDateTime()),
        sa.Column("refunded_fen", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refund_pending_fen", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("awaiting_payer", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("failure_code", sa.String(80)),
        sa.Column("failure_message", sa.String(400)),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("next_check_at", UTCDateTime()),  # NULL: settled (nothing owed)
        sa.Column("checks", sa.Integer, nullable=False, server_default="0"),
        sa.Column("traceparent", sa.String(80)),
        sa.CheckConstraint(f"state IN ({STATES})", name="payment_order_state"),
        sa.CheckConstraint("amount_fen > 0", name="payment_order_amount"),
        sa.CheckConstraint(
            "refunded_fen >= 0 AND refund_pending_fen >= 0 "
            "AND refunded_fen + refund_pending_fen <= amount_fen",
            name="payment_order_refunds",
        ),
        sa.UniqueConstraint("out_trade_no", name="payment_order_out_trade_no"),
        sa.UniqueConstraint("station_code", "idempotency_key", name="payment_order_key"),
        schema=schema,
    )
    op.create_index(
        "payment_order_sale", "payment_order", ["station_code", "sale_id"], schema=schema
    )
    op.create_index("payment_order_due", "payment_order", ["next_check_at"], schema=schema)
    op.create_table(
        "payment_refund",
        sa.Column("refund_id", sa.Uuid, primary_key=True),
        sa.Column("order_id", sa.Uuid, nullable=False),
        sa.Column("refund_key", sa.String(200), nullable=False),
        sa.Column("out_refund_no", sa.String(32), nullable=False, unique=True),
        sa.Column("amount_fen", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("provider_refund_no", sa.String(64)),
        sa.Column("failure_code", sa.String(80)),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("amount_fen > 0", name="payment_refund_amount"),
        sa.UniqueConstraint("order_id", "refund_key", name="payment_refund_key"),
        sa.ForeignKeyConstraint(["order_id"], [f"{orders}.order_id"]),
        schema=schema,
    )
    op.create_table(
        "payment_sale",
        sa.Column("station_code", sa.String(40), primary_key=True),
        sa.Column("sale_id", sa.Uuid, primary_key=True),
        sa.Column("due_fen", sa.BigInteger, nullable=False),
        sa.Column("live_fen", sa.BigInteger, nullable=False),
        sa.Column("paid_fen", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("live_fen >= 0 AND live_fen <= due_fen", name="payment_sale_live"),
        sa.CheckConstraint("paid_fen >= 0 AND paid_fen <= live_fen", name="payment_sale_paid"),
        schema=schema,
    )
    op.create_table(
        "payment_notification",
        sa.Column("provider", sa.String(16), primary_key=True),
        sa.Column("notification_id", sa.String(128), primary_key=True),
        sa.Column("out_trade_no", sa.String(32), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        schema=schema,
    )


def downgrade() -> None:
    schema = tree_schema()
    for table in ("payment_notification", "payment_sale", "payment_refund", "payment_order"):
        op.drop_table(table, schema=schema)
