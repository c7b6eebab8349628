"""platform: a leaner outbox — drop what the relay no longer needs.

The relay deletes rows once the broker has acknowledged them, so every row in the table is
unpublished: ``published_at``, ``attempts`` and ``last_error`` were never set, and the
partial index on unpublished ids duplicated the primary key (the relay claims in key
order). The unique index on ``event_id`` only ever covered rows not yet published;
de-duplication by event id is the broker's (``Nats-Msg-Id`` window) and the consumers'
inbox's. Each ingested sale writes an outbox row, so that is two index insertions fewer
per sale. (On SQLite the unique constraint is part of the table and stays.)

Revision ID: platform_0002
Revises: platform_0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "platform_0002"
down_revision = "platform_0001"
branch_labels = None
depends_on = None


UNUSED = ("published_at", "attempts", "last_error")


def upgrade() -> None:
    schema = tree_schema()
    op.drop_index("ix_outbox_unpublished", table_name="outbox", schema=schema)
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("outbox_event_id_key", "outbox", schema=schema, type_="unique")
    with op.batch_alter_table("outbox", schema=schema) as batch:
        for column in UNUSED:
            batch.drop_column(column)


def downgrade() -> None:
    schema = tree_schema()
    with op.batch_alter_table("outbox", schema=schema) as batch:
        batch.add_column(sa.Column("published_at", UTCDateTime()))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_error", sa.Text()))
    if op.get_bind().dialect.name == "postgresql":
        op.create_unique_constraint("outbox_event_id_key", "outbox", ["event_id"], schema=schema)
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        schema=schema,
        postgresql_where=sa.text("published_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL"),
    )
