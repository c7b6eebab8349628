"""The demo chain end to end: dispensers, edge journals and HQ agree; a lost row is seen."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from forecourt.demo import DemoChain, DemoOptions, report
from forecourt.kernel.errors import ForecourtError
from forecourt.sales.store import sale_t


def names_the_sale(lost: dict[str, Any], row: Mapping[str, Any]) -> bool:
    """A lost sale is named by its station, pump, nozzle, litres and money, and a jsonPTS one
    by its controller transaction number too (a DART filling has none of its own)."""
    fields = ("fuelling_point", "volume_ml", "amount_minor")
    same = all(lost[f] == row[f] for f in fields) and lost["station"] == row["station_code"]
    if lost["protocol"] == "jsonpts":
        return same and lost["device_txn"] == row["device_txn"]
    return same and lost["protocol"] == "dart" and lost["nozzle"] == row["nozzle"]


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
        # The edges' own audit records (price downloads, totalizer checks …) reached HQ's
        # one chain, which verifies.
        audit = result["audit"]
        assert audit["verified"] is True, audit
        assert audit["from_station_edges"] > 0
        assert audit["records"] > audit["from_station_edges"]  # HQ's own: uploads, sign-ins
        for st in demo.stations:
            assert await st.edge.journal.audit_usage() == (0, 0)

        # Given HQ loses one row, the reconciliation names it.
        assert demo.hq is not None
        async with demo.hq.db.begin() as uow:
            victim = (await uow.conn.execute(sa.select(sale_t).limit(1))).one()
            await uow.conn.execute(sa.delete(sale_t).where(sale_t.c.sale_id == victim.sale_id))
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["lost"] == 1
        assert result["sales_at_hq"] == result["sales_at_dispensers"] - 1
        assert names_the_sale(result["lost_sales"][0], victim._mapping)
        assert result["agree"] is False
    finally:
        await demo.stop()


async def test_the_reconciliation_counts_every_station_on_its_own(tmp_path: Path) -> None:
    """A duplicate at the first station is counted, and a sale lost at one station cannot hide
    behind the same device transaction at another (numbers start at 1 on every pump)."""
    demo = DemoChain(DemoOptions(duration_s=5, stations=2, workdir=tmp_path))
    try:
        await demo.start()
        await demo.run_traffic()
        assert await demo.quiesce()
        first, second = (st.code for st in demo.stations)
        assert demo.hq is not None
        async with demo.hq.db.begin() as uow:
            rows = (
                await uow.conn.execute(
                    sa.select(sale_t).where(sale_t.c.station_code == first).limit(2)
                )
            ).all()
            assert len(rows) == 2
            copy, moved = (dict(r._mapping) for r in rows)
            # 1. a natural-key duplicate at the first station (a second sale_id, same meter)
            copy["sale_id"] = uuid.uuid4()
            copy["station_seq"] = 10**9
            await uow.conn.execute(sa.insert(sale_t).values(**copy))
            # 2. a sale of the first station lost at HQ, while the second station holds one
            #    with the same pump, number, volume and amount
            await uow.conn.execute(sa.delete(sale_t).where(sale_t.c.sale_id == moved["sale_id"]))
            moved.update(sale_id=uuid.uuid4(), station_code=second, station_seq=10**9 + 1)
            await uow.conn.execute(sa.insert(sale_t).values(**moved))
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["duplicates"] == 1
        assert result["lost"] == 1
        assert result["lost_sales"][0]["station"] == first
        assert result["agree"] is False
    finally:
        await demo.stop()


async def test_a_second_run_in_the_same_work_folder_resets_or_refuses(tmp_path: Path) -> None:
    first = DemoChain(DemoOptions(duration_s=3, stations=1, workdir=tmp_path))
    try:
        await first.start()
        await first.run_traffic()
        assert await first.quiesce()
    finally:
        await first.stop()
    again = DemoChain(DemoOptions(duration_s=3, stations=1, workdir=tmp_path))
    with pytest.raises(ForecourtError) as refused:
        await again.start()
    await again.stop()
    assert refused.value.code == "demo.workdir_not_empty"
    assert "--reset" in refused.value.message
    demo = DemoChain(DemoOptions(duration_s=3, stations=1, workdir=tmp_path, reset=True))
    try:
        await demo.start()
        await demo.run_traffic()
        assert await demo.quiesce()
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["sales_at_dispensers"] > 0
        assert result["sales_at_dispensers"] == result["sales_at_edges"] == result["sales_at_hq"]
        assert result["agree"] is True
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


async def test_the_demo_tells_where_hq_listens_and_when_the_price_rises(tmp_path: Path) -> None:
    from forecourt.demo import run_demo

    lines: list[str] = []
    result = await run_demo(
        DemoOptions(duration_s=3, stations=1, workdir=tmp_path, speed=2400, protocols=("jsonpts",)),
        lines.append,
    )
    assert result["agree"] is True
    (hq_line,) = [line for line in lines if line.startswith("HQ listening on http://127.0.0.1:")]
    assert hq_line.endswith("/docs)")
    (scheduled,) = [line for line in lines if line.startswith("scheduled: 92# rises to ")]
    assert "CNY/L at sim " in scheduled
    assert any(line.startswith("92# price rise now in force") for line in lines)
