"""network: station credentials that expire, rotate and revoke at once.

``station_credential.expires_at`` (nullable: a credential issued before this revision, or
with no expiry set, never expires) and ``credential_revision``, one row whose counter every
rotation and revocation raises in its own transaction: an HQ process on SQLite compares it
before trusting its cache (on PostgreSQL a NOTIFY does that job). A nullable column changes no
stored row.

Revision ID: network_0003
Revises: network_0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "network_0003"
down_revision = "network_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = tree_schema()
    op.add_column("station_credential", sa.Column("expires_at", UTCDateTime()), schema=schema)
    revision_t = op.create_table(
        "credential_revision",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        schema=schema,
    )
    op.bulk_insert(revision_t, [{"id": 1, "revision": 0}])


def downgrade() -> None:
    schema = tree_schema()
    op.drop_table("credential_revision", schema=schema)
    with op.batch_alter_table("station_credential", schema=schema) as batch:
        batch.drop_column("expires_at")
