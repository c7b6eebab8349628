"""network: price sets — a whole price list for a scope, published ahead of its instant.

A new table ``price_set`` (the set as published: scope, instant, currency, its prices as
JSON, when it was withdrawn) and a nullable column ``price.price_set_id`` tagging each price
row with its set; prices imported from a chain file keep NULL there. Adding a nullable column
changes no stored row, on SQLite and PostgreSQL alike.

Going back drops both: the prices stay as they are, only their set membership is lost.

Revision ID: network_0002
Revises: network_0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "network_0002"
down_revision = "network_0001"
branch_labels = None
depends_on = None

CODE = sa.String(40)


def upgrade() -> None:
    schema = tree_schema()
    op.create_table(
        "price_set",
        sa.Column("price_set_id", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(20), nullable=False),
        sa.Column("scope_code", CODE, nullable=False),
        sa.Column("effective_from", UTCDateTime(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("prices", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("withdrawn_at", UTCDateTime()),
        schema=schema,
    )
    op.add_column("price", sa.Column("price_set_id", sa.String(64)), schema=schema)
    op.create_index("ix_price_price_set_id", "price", ["price_set_id"], schema=schema)


def downgrade() -> None:
    schema = tree_schema()
    op.drop_index("ix_price_price_set_id", "price", schema=schema)
    with op.batch_alter_table("price", schema=schema) as batch:
        batch.drop_column("price_set_id")
    op.drop_table("price_set", schema=schema)
