"""edge: counter payments (POS API): each payment attempt of a sale (a payment code sent to
HQ, or cash taken at the counter) with its idempotency key, its outcome and, for cash, when
HQ took its upload; and HQ's staff-token keys, kept so a restart without HQ still checks a
cashier's token.

Revision ID: edge_0006
Revises: edge_0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "edge_0006"
down_revision = "edge_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pos_payment",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sale_id", sa.String(36), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("idempotency_key", sa.String(80), nullable=False, unique=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("amount_minor", sa.Integer, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("tendered_minor", sa.Integer),
        sa.Column("change_minor", sa.Integer),
        sa.Column("cashier", sa.String(200), nullable=False),
        sa.Column("order_id", sa.String(80)),
        sa.Column("auth_code", sa.String(64)),  # only while the attempt's outcome is open
        sa.Column("reason", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("paid_at", sa.DateTime),
        sa.Column("uploaded_at", sa.DateTime),
        sa.Column("upload_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("upload_rejected", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("upload_error", sa.Text),
        sa.UniqueConstraint("sale_id", "attempt", name="pos_payment_sale_attempt"),
    )
    op.create_index("pos_payment_sale", "pos_payment", ["sale_id", "status"])
    op.create_index("pos_payment_cash_pending", "pos_payment", ["method", "uploaded_at", "id"])
    op.create_table(
        "staff_key",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("jwk", sa.Text, nullable=False),
        sa.Column("fetched_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("staff_key")
    op.drop_index("pos_payment_cash_pending", "pos_payment")
    op.drop_index("pos_payment_sale", "pos_payment")
    op.drop_table("pos_payment")
