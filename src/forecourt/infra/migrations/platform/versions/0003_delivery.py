"""platform: the delivery contract's tables.

* ``subscription`` and ``delivery``: the in-process bus's durable store. The relay writes one
  ``delivery`` row per (consumer, event) in the transaction that deletes the outbox row; a
  consumer deletes it once its effect (or dead letter) is committed. ``attempts`` counts
  hand-outs (a crash included), ``lease_until`` is the in-flight lease (``ack_wait``).
* ``outbox_parked``: outbox rows the broker refused for good, kept with the reason.
* ``dead_letter``: one row per (consumer, event); replay requests and counts.
* ``probe_effect``: the effect of the diagnostic ``probe`` consumer (one row per
  processing, deliberately without a unique key so a doubled effect shows).

Revision ID: platform_0003
Revises: platform_0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "platform_0003"
down_revision = "platform_0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    schema = tree_schema()
    op.create_table(
        "subscription",
        sa.Column("consumer", sa.String(100), primary_key=True),
        sa.Column("subjects", sa.Text(), nullable=False),  # JSON list of filters
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_table(
        "delivery",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("consumer", sa.String(100), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("available_at", UTCDateTime(), nullable=False),
        sa.Column("lease_until", UTCDateTime()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_index(
        "ix_delivery_consumer_available", "delivery", ["consumer", "available_at"], schema=schema
    )
    op.create_table(
        "outbox_parked",
        sa.Column("id", BigId, primary_key=True),  # the outbox row's id
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("subject", sa.String(200)),
        sa.Column("time", UTCDateTime(), nullable=False),
        sa.Column("traceparent", sa.String(64)),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("parked_at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        schema=schema,
    )
    # One dead letter per (consumer, event): a second failure updates it.
    bind = op.get_bind()
    dl = f'"{schema}".dead_letter' if schema else "dead_letter"
    bind.execute(
        sa.text(
            f"DELETE FROM {dl} WHERE id NOT IN "  # noqa: S608 - fixed identifiers
            f"(SELECT MIN(id) FROM {dl} GROUP BY consumer, event_id)"
        )
    )
    with op.batch_alter_table("dead_letter", schema=schema) as batch:
        batch.add_column(sa.Column("replay_requested_at", UTCDateTime()))
        batch.add_column(sa.Column("replays", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("subject", sa.String(200), nullable=False, server_default=""))
    op.create_index(
        "ux_dead_letter_consumer_event",
        "dead_letter",
        ["consumer", "event_id"],
        unique=True,
        schema=schema,
    )
    op.create_table(
        "probe_effect",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("consumer", sa.String(100), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("event_time", UTCDateTime(), nullable=False),
        sa.Column("applied_at", UTCDateTime(), nullable=False),
        schema=schema,
    )
    op.create_index("ix_probe_effect_event", "probe_effect", ["event_id"], schema=schema)


def downgrade() -> None:
    schema = tree_schema()
    op.drop_table("probe_effect", schema=schema)
    op.drop_index("ux_dead_letter_consumer_event", table_name="dead_letter", schema=schema)
    with op.batch_alter_table("dead_letter", schema=schema) as batch:
        batch.drop_column("subject")
        batch.drop_column("replays")
        batch.drop_column("replay_requested_at")
    op.drop_table("outbox_parked", schema=schema)
    op.drop_index("ix_delivery_consumer_available", table_name="delivery", schema=schema)
    op.drop_table("delivery", schema=schema)
    op.drop_table("subscription", schema=schema)
