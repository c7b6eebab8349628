"""audit: the hash-chained records, signed checkpoints and the signing keys.

Revision ID: audit_0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "audit_0001"
down_revision = None
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    schema = tree_schema()
    op.create_table(
        "audit_record",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
        sa.Column("record_id", sa.String(64), nullable=False, unique=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(200), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("trace_id", sa.String(32)),
        sa.Column("source", sa.String(100)),
        sa.Column("hash", sa.String(64), nullable=False),
        schema=schema,
    )
    for column in ("actor", "action", "target"):
        op.create_index(f"ix_audit_record_{column}", "audit_record", [column, "seq"], schema=schema)
    op.create_table(
        "audit_checkpoint",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kid", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        schema=schema,
    )
    op.create_table(
        "audit_signing_key",
        sa.Column("kid", sa.String(64), primary_key=True),
        # One key per generation: two processes creating the first key race on this
        # unique column and one wins; a rotation would add generation + 1.
        sa.Column("generation", sa.Integer(), nullable=False, unique=True),
        sa.Column("public_key", sa.String(64), nullable=False),  # raw Ed25519, hex
        sa.Column("private_key", sa.Text()),  # PKCS#8 PEM; NULL when kept outside
        sa.Column("created_at", UTCDateTime(), nullable=False),
        schema=schema,
    )


def downgrade() -> None:
    schema = tree_schema()
    op.drop_table("audit_signing_key", schema=schema)
    op.drop_table("audit_checkpoint", schema=schema)
    op.drop_table("audit_record", schema=schema)
