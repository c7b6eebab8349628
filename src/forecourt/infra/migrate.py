"""Alembic runner: one version tree per context (and one for the edge), each with its own
version table (``alembic_version_<tree>``), so contexts evolve their schemas independently.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from forecourt.infra.db import Database

_ROOT = Path(__file__).resolve().parent.parent
TREES: dict[str, Path] = {
    "platform": _ROOT / "infra" / "migrations" / "platform",
    "network": _ROOT / "network" / "migrations",
    "sales": _ROOT / "sales" / "migrations",
    "devices": _ROOT / "devices" / "migrations",
    "identity": _ROOT / "identity" / "migrations",
    "edge": _ROOT / "edge" / "migrations",
    "audit": _ROOT / "audit" / "migrations",
    "payments": _ROOT / "payments" / "migrations",
}
HQ_TREES = ("platform", "network", "sales", "devices", "identity", "audit", "payments")


def _config(tree: str, connection: sa.Connection, schema: str | None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(TREES[tree]))
    cfg.attributes["connection"] = connection
    cfg.attributes["tree"] = tree
    cfg.attributes["schema"] = schema
    return cfg


def upgrade_sync(connection: sa.Connection, tree: str, schema: str | None) -> None:
    command.upgrade(_config(tree, connection, schema), "heads")


async def upgrade(db: Database, trees: Iterable[str] = HQ_TREES) -> None:
    """Bring the given trees to their heads. Safe to run from several processes at once."""
    for tree in trees:
        schema = db.schema(tree)
        async with db.engine.begin() as conn:
            if schema is not None:
                # Serialise concurrent migrators (several HQ processes starting together).
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
                await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            await conn.run_sync(upgrade_sync, tree, schema)


def downgrade_sync(connection: sa.Connection, tree: str, schema: str | None, rev: str) -> None:
    command.downgrade(_config(tree, connection, schema), rev)


async def downgrade(db: Database, tree: str, revision: str) -> None:
    """Take one tree back to ``revision`` (an operator's rollback of a release)."""
    schema = db.schema(tree)
    async with db.engine.begin() as conn:
        if schema is not None:
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
        await conn.run_sync(downgrade_sync, tree, schema, revision)


def run_env() -> None:
    """Body of every tree's ``env.py``: run migrations on the connection we were handed."""
    from alembic import context

    config = context.config
    connection: Any = config.attributes["connection"]
    context.configure(
        connection=connection,
        version_table=f"alembic_version_{config.attributes['tree']}",
        version_table_schema=config.attributes["schema"],
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def tree_schema() -> str | None:
    """The schema the running migration writes to (None on SQLite)."""
    from alembic import context

    return context.config.attributes["schema"]  # type: ignore[no-any-return]
