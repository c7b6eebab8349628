"""platform: idempotency records with an owner, a lease and a state.

* ``owner`` (who holds the key: process and request), ``state`` (``reserved``, ``started``,
  ``completed``), ``lease_until`` (the owner's lease), ``response_headers`` (stored with the
  status and body), ``recovery_point`` (what the handler recorded before its outside call).
* ``key`` up to 255 characters (the ``Idempotency-Key`` header's limit).
* ``expires_at`` nullable: NULL while a ``started`` record has no outcome, so no purge frees it.

Existing rows with a stored response become ``completed``. The others may have done their
work without recording its outcome (or were ``started`` before a downgrade): they become
``started`` without a lease or expiry, so a retry goes to recovery and never runs them again.
A downgrade keeps ``key`` at 255 characters (narrowing it could not keep longer keys).

Revision ID: platform_0004
Revises: platform_0003
Create Date: 2026-12-08
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "platform_0004"
down_revision = "platform_0003"
branch_labels = None
depends_on = None


def _table(schema: str | None) -> str:
    return f'"{schema}".idempotency' if schema else "idempotency"


def upgrade() -> None:
    schema = tree_schema()
    with op.batch_alter_table("idempotency", schema=schema) as batch:
        batch.add_column(sa.Column("owner", sa.String(200), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("state", sa.String(20), nullable=False, server_default="reserved")
        )
        batch.add_column(sa.Column("lease_until", UTCDateTime()))
        batch.add_column(sa.Column("response_headers", sa.Text()))
        batch.add_column(sa.Column("recovery_point", sa.Text()))
        batch.alter_column(
            "key", existing_type=sa.String(200), type_=sa.String(255), existing_nullable=False
        )
        batch.alter_column("expires_at", existing_type=UTCDateTime(), nullable=True)
    op.get_bind().execute(
        sa.text(
            f"UPDATE {_table(schema)} SET state = 'completed' "  # noqa: S608 - fixed identifiers
            "WHERE status_code IS NOT NULL"
        )
    )
    op.get_bind().execute(
        sa.text(
            f"UPDATE {_table(schema)} SET state = 'started', expires_at = NULL "  # noqa: S608
            "WHERE status_code IS NULL"
        )
    )


def downgrade() -> None:
    schema = tree_schema()
    # The old schema cannot say "outcome unknown": keep such a record as in progress for good
    # (the old code refuses a retry of a record without a response), never free it.
    op.get_bind().execute(
        sa.text(
            f"UPDATE {_table(schema)} SET expires_at = :forever "  # noqa: S608 - fixed identifiers
            "WHERE expires_at IS NULL"
        ).bindparams(sa.bindparam("forever", datetime(9999, 12, 31, tzinfo=UTC), UTCDateTime()))
    )
    with op.batch_alter_table("idempotency", schema=schema) as batch:
        batch.alter_column("expires_at", existing_type=UTCDateTime(), nullable=False)
        batch.drop_column("recovery_point")
        batch.drop_column("response_headers")
        batch.drop_column("lease_until")
        batch.drop_column("state")
        batch.drop_column("owner")
