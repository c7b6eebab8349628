"""Migrations go forward and back on both databases: every tree to its head, the latest
revisions of ``platform`` and ``sales`` down one step (an operator rolling a release back),
and up again, with the schema as each revision describes it."""

from __future__ import annotations

import sqlalchemy as sa

from forecourt.infra.db import Database
from forecourt.infra.migrate import HQ_TREES, downgrade, upgrade


def _shape(sync_conn: sa.Connection, is_pg: bool) -> dict[str, object]:
    inspector = sa.inspect(sync_conn)
    platform, sales = ("platform", "sales") if is_pg else (None, None)
    return {
        "outbox_columns": {c["name"] for c in inspector.get_columns("outbox", schema=platform)},
        "outbox_indexes": {i["name"] for i in inspector.get_indexes("outbox", schema=platform)},
        "sale_indexes": {i["name"] for i in inspector.get_indexes("sale", schema=sales)},
        "sale_key": inspector.get_pk_constraint("sale", schema=sales)["constrained_columns"],
    }


async def shape(db: Database) -> dict[str, object]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(_shape, not db.is_sqlite)


async def test_the_latest_revisions_go_back_and_forth(db_url: str) -> None:
    db = Database(db_url)
    await db.connect()
    try:
        await upgrade(db, HQ_TREES)
        head = await shape(db)
        assert "published_at" not in head["outbox_columns"]  # type: ignore[operator]
        assert "ix_outbox_unpublished" not in head["outbox_indexes"]  # type: ignore[operator]

        await downgrade(db, "platform", "platform_0001")
        await downgrade(db, "sales", "sales_0001")
        before = await shape(db)
        assert {"published_at", "attempts", "last_error"} <= before["outbox_columns"]  # type: ignore[operator]
        assert "ix_outbox_unpublished" in before["outbox_indexes"]  # type: ignore[operator]
        assert "ix_sale_station_sale_id" in before["sale_indexes"]  # type: ignore[operator]
        assert before["sale_key"] == ["station_code", "business_date", "sale_id"]

        await upgrade(db, HQ_TREES)
        assert await shape(db) == head
        if not db.is_sqlite:
            assert head["sale_key"] == ["station_code", "sale_id", "business_date"]
            assert "ix_sale_station_sale_id" not in head["sale_indexes"]  # type: ignore[operator]
    finally:
        await db.dispose()
