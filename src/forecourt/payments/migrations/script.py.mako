"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.migrate import tree_schema

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = tree_schema()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    schema = tree_schema()
    ${downgrades if downgrades else "pass"}
