"""The demo chain end to end: dispensers, edge journals and HQ agree; a lost row is seen."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from forecourt.demo import DemoChain, DemoOptions, report
from forecourt.sales.store import sale_t


async def test_the_demo_chain_agrees_three_ways_and_notices_a_deleted_hq_row(
    tmp_path: Path,
) -> None:
    demo = DemoChain(DemoOptions(duration_s=6, stations=2, workdir=tmp_path))
    try:
        await demo.start()
        await demo.run_traffic()
        assert await demo.quiesce()
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["sales_at_dispensers"] >= 20
        assert result["sales_at_dispensers"] == result["sales_at_edges"] == result["sales_at_hq"]
        assert result["volume_ml_at_dispensers"] == result["volume_ml_at_hq"]
        assert result["amount_fen_at_dispensers"] == result["amount_fen_at_edges"]
        assert result["amount_fen_at_edges"] == result["amount_fen_at_hq"]
        assert (result["lost"], result["duplicates"], result["quarantined"]) == (0, 0, 0)
        assert result["agree"] is True

        # Given HQ loses one row, the reconciliation names it.
        assert demo.hq is not None
        async with demo.hq.db.begin() as uow:
            victim = (await uow.conn.execute(sa.select(sale_t).limit(1))).one()
            await uow.conn.execute(sa.delete(sale_t).where(sale_t.c.sale_id == victim.sale_id))
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["lost"] == 1
        assert result["sales_at_hq"] == result["sales_at_dispensers"] - 1
        assert result["lost_sales"][0]["device_txn"] == victim.device_txn
        assert result["agree"] is False
    finally:
        await demo.stop()


async def test_the_demo_chain_agrees_on_postgresql_and_nats(
    tmp_path: Path, pg_url: str, nats_url: str, unique_stream: str
) -> None:
    demo = DemoChain(
        DemoOptions(
            duration_s=5,
            stations=2,
            workdir=tmp_path,
            database_url=pg_url,
            bus_url=nats_url,
            nats_stream=unique_stream,
            nats_subject_prefix=unique_stream.lower(),
        )
    )
    try:
        await demo.start()
        await demo.run_traffic()
        assert await demo.quiesce()
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["sales_at_dispensers"] >= 15
        assert result["sales_at_dispensers"] == result["sales_at_edges"] == result["sales_at_hq"]
        assert result["amount_fen_at_dispensers"] == result["amount_fen_at_hq"]
        assert result["volume_ml_at_dispensers"] == result["volume_ml_at_hq"]
        assert (result["lost"], result["duplicates"]) == (0, 0)
        assert demo.hq is not None
        assert await demo.hq.relay.backlog() == 0  # every event reached JetStream
    finally:
        await demo.stop()
