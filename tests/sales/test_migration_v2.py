"""sales_0003 on both databases: stored sales survive it both ways, and going back refuses
while a stored sale has no totalizer (v1 cannot hold it)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from forecourt.infra.migrate import HQ_TREES, downgrade, upgrade
from forecourt.sales.store import sale_t
from tests.sales.conftest import Hq, make_sale, make_sale_v2


async def stored(hq: Hq) -> dict[str, tuple[object, ...]]:
    async with hq.office.db.connection() as conn:
        rows = await conn.execute(
            sa.select(
                sale_t.c.sale_id,
                sale_t.c.totalizer_end_ml,
                sale_t.c.payload_hash,
                sale_t.c.volume_ml,
            )
        )
        return {str(r.sale_id): tuple(r[1:]) for r in rows}


async def test_going_back_keeps_v1_sales_and_refuses_while_a_sale_lacks_a_totalizer(
    hq: Hq,
) -> None:
    v1 = make_sale()
    blind = make_sale_v2(totalizer_start_ml=None, totalizer_end_ml=None)
    response = await hq.upload("S001", [v1, blind], schema_version=2)
    assert [r["status"] for r in response.json()["results"]] == ["created", "created"]
    before = await stored(hq)

    with pytest.raises(RuntimeError, match="have no totalizer"):
        await downgrade(hq.office.db, "sales", "sales_0002")
    assert await stored(hq) == before  # the refused step left everything as it was

    async with hq.office.db.begin() as uow:
        await uow.conn.execute(sale_t.delete().where(sale_t.c.totalizer_end_ml.is_(None)))
    await downgrade(hq.office.db, "sales", "sales_0002")
    async with hq.office.db.engine.connect() as conn:
        columns = await conn.run_sync(
            lambda c: {
                col["name"]: col["nullable"]
                for col in sa.inspect(c).get_columns(
                    "sale", schema=None if hq.office.db.is_sqlite else "sales"
                )
            }
        )
    assert "device_id" not in columns
    assert columns["totalizer_end_ml"] is False

    await upgrade(hq.office.db, HQ_TREES)
    assert await stored(hq) == {v1["sale_id"]: before[v1["sale_id"]]}
    again = await hq.upload("S001", [v1])
    assert [r["status"] for r in again.json()["results"]] == ["duplicate"]
