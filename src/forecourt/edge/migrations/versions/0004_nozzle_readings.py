"""edge: an index for each nozzle's newest journaled totalizer (the totalizer watch reads it
for every nozzle on every pass).

Revision ID: edge_0004
Revises: edge_0003
Create Date: 2026-12-02
"""

from alembic import op

revision = "edge_0004"
down_revision = "edge_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("journal_nozzle_seq", "journal", ["fuelling_point", "nozzle", "seq"])


def downgrade() -> None:
    op.drop_index("journal_nozzle_seq", "journal")
