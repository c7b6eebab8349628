"""identity: users and service accounts, grants, refresh tokens, signing keys.

Revision ID: identity_0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import tree_schema

revision = "identity_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = tree_schema()
    users = f"{schema}.identity_user" if schema else "identity_user"
    op.create_table(
        "identity_user",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("display_name", sa.String(200)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("disabled_at", UTCDateTime()),
        sa.Column("failed_sign_ins", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", UTCDateTime()),
        sa.CheckConstraint("kind IN ('user', 'service')", name="identity_user_kind"),
        schema=schema,
    )
    op.create_table(
        "identity_grant",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(64), primary_key=True),
        sa.Column("level", sa.String(16), primary_key=True),
        sa.Column("code", sa.String(64), primary_key=True),
        sa.Column("granted_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], [f"{users}.id"], ondelete="CASCADE"),
        schema=schema,
    )
    op.create_table(
        "identity_refresh_token",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("family_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime()),
        sa.Column("revoked_at", UTCDateTime()),
        sa.Column("terminal", sa.String(64)),
        sa.ForeignKeyConstraint(["user_id"], [f"{users}.id"], ondelete="CASCADE"),
        schema=schema,
    )
    op.create_index(
        "identity_refresh_token_family", "identity_refresh_token", ["family_id"], schema=schema
    )
    op.create_index(
        "identity_refresh_token_user", "identity_refresh_token", ["user_id"], schema=schema
    )
    op.create_table(
        "identity_signing_key",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("algorithm", sa.String(16), nullable=False),
        sa.Column("private_pem", sa.Text, nullable=False),
        sa.Column("public_pem", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("retired_at", UTCDateTime()),
        schema=schema,
    )


def downgrade() -> None:
    schema = tree_schema()
    op.drop_table("identity_signing_key", schema=schema)
    op.drop_index("identity_refresh_token_user", "identity_refresh_token", schema=schema)
    op.drop_index("identity_refresh_token_family", "identity_refresh_token", schema=schema)
    op.drop_table("identity_refresh_token", schema=schema)
    op.drop_table("identity_grant", schema=schema)
    op.drop_table("identity_user", schema=schema)
