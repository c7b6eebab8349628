"""edge: the audit outbox is uploaded to HQ's audit trail: each record gets its own id (HQ
takes an upload repeated after a lost answer once), the time HQ's trail took it (kept here
for the station's retention period after that), and a record HQ refuses is kept, marked.

Revision ID: edge_0005
Revises: edge_0004
Create Date: 2026-12-02
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "edge_0005"
down_revision = "edge_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_outbox", sa.Column("record_id", sa.String(36)))
    op.add_column(
        "audit_outbox",
        sa.Column("rejected", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.add_column("audit_outbox", sa.Column("last_error", sa.Text))
    op.add_column("audit_outbox", sa.Column("uploaded_at", sa.DateTime))
    conn = op.get_bind()
    ids = [row[0] for row in conn.execute(sa.text("SELECT id FROM audit_outbox"))]
    for row_id in ids:
        conn.execute(
            sa.text("UPDATE audit_outbox SET record_id = :rid WHERE id = :id"),
            {"rid": str(uuid.uuid4()), "id": row_id},
        )
    op.create_index("audit_outbox_record_id", "audit_outbox", ["record_id"], unique=True)
    op.create_index("audit_outbox_pending", "audit_outbox", ["uploaded_at", "rejected", "id"])


def downgrade() -> None:
    op.drop_index("audit_outbox_pending", "audit_outbox")
    op.drop_index("audit_outbox_record_id", "audit_outbox")
    with op.batch_alter_table("audit_outbox") as batch:
        batch.drop_column("uploaded_at")
        batch.drop_column("last_error")
        batch.drop_column("rejected")
        batch.drop_column("record_id")
