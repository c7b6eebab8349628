"""platform: the audit outbox records where an action came from.

* ``source``: the client's address (HTTP), or NULL (the command line, a background task).
* ``actor`` up to 200 characters as before; ``user:NAME``, ``station:CODE``,
  ``service:NAME``, ``terminal:NAME``, ``cli``.

Revision ID: platform_0005
Revises: platform_0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.migrate import tree_schema

revision = "platform_0005"
down_revision = "platform_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_outbox", schema=tree_schema()) as batch:
        batch.add_column(sa.Column("source", sa.String(100)))


def downgrade() -> None:
    with op.batch_alter_table("audit_outbox", schema=tree_schema()) as batch:
        batch.drop_column("source")
