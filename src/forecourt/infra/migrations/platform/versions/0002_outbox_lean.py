"""platform: a leaner outbox — drop two indexes the relay no longer needs.

The relay deletes rows once the broker has acknowledged them, so every row in the table is
unpublished: the partial index on unpublished ids duplicated the primary key. The unique
index on ``event_id`` only ever covered rows not yet published; de-duplication by event id
is the broker's (``Nats-Msg-Id`` window) and the consumers' inbox's. Each ingested sale
writes an outbox row, so two index insertions fewer per sale. (On SQLite the unique
constraint is part of the table and stays.)

Revision ID: platform_0002
Revises: platform_0001
Create Date: 2026-11-25
"""

from alembic import op

from forecourt.infra.migrate import tree_schema

revision = "platform_0002"
down_revision = "platform_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = tree_schema()
    op.drop_index("ix_outbox_unpublished", table_name="outbox", schema=schema)
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("outbox_event_id_key", "outbox", schema=schema, type_="unique")


def downgrade() -> None:
    import sqlalchemy as sa

    schema = tree_schema()
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
