"""The demo's three-way reconciliation counts each station on its own and agrees only when
every figure does (written against surviving mutants of forecourt.demo)."""

from __future__ import annotations

import uuid
from pathlib import Path

import sqlalchemy as sa

from forecourt.demo import DemoChain, DemoOptions, Figures, Reconciliation, report
from forecourt.sales.store import sale_t
from tests.e2e.test_demo import names_the_sale


def _agreeing(
    sales: int = 3, volume_ml: int = 90_000, amount_minor: int = 70_000
) -> Reconciliation:
    rec = Reconciliation()
    rec.per_station_grade[("S001", "92")] = {
        where: Figures(sales, volume_ml, amount_minor) for where in ("dispensers", "edges", "hq")
    }
    return rec


def test_the_report_agrees_only_when_counts_litres_and_money_all_agree() -> None:
    assert report(_agreeing(), 1, True, 0.0)["agree"] is True
    for where, change in (
        ("hq", Figures(0, 10, 0)),  # same count, other litres
        ("edges", Figures(0, 0, 1)),  # same count and litres, one fen more
        ("dispensers", Figures(1, 30_000, 23_000)),
    ):
        rec = _agreeing()
        cell = rec.per_station_grade[("S001", "92")][where]
        cell.add(change.sales, change.volume_ml, change.amount_minor)
        assert report(rec, 1, True, 0.0)["agree"] is False, where


def test_the_report_does_not_agree_when_hq_holds_a_duplicate() -> None:
    rec = _agreeing()
    rec.duplicates = 1  # the figures match, yet one dispensing is held twice by sale_id
    result = report(rec, 1, True, 0.0)
    assert result["duplicates"] == 1
    assert result["agree"] is False


def test_the_report_does_not_agree_when_a_sale_moves_to_another_grade_or_pump_line() -> None:
    """The totals match, yet one sale sits under another grade (or another pump protocol) at
    HQ than at the dispensers: that is a disagreement."""
    for cells in ("per_station_grade", "per_station_protocol"):
        rec = _agreeing()
        if cells == "per_station_protocol":
            rec.per_station_protocol = {
                ("S001", p): {w: Figures() for w in ("dispensers", "edges", "hq")}
                for p in ("jsonpts", "dart")
            }
            rec.per_station_protocol[("S001", "jsonpts")]["dispensers"].add(3, 90_000, 70_000)
            rec.per_station_protocol[("S001", "jsonpts")]["edges"].add(3, 90_000, 70_000)
            rec.per_station_protocol[("S001", "jsonpts")]["hq"].add(2, 60_000, 50_000)
            rec.per_station_protocol[("S001", "dart")]["hq"].add(1, 30_000, 20_000)
        else:
            one_sale = Figures(1, 30_000, 20_000)
            rec.per_station_grade[("S001", "92")]["hq"] = Figures(2, 60_000, 50_000)
            rec.per_station_grade[("S001", "95")] = {
                "dispensers": Figures(),
                "edges": Figures(),
                "hq": one_sale,
            }
        result = report(rec, 1, True, 0.0)
        assert result["sales_at_dispensers"] == result["sales_at_hq"], cells
        assert result["amount_fen_at_dispensers"] == result["amount_fen_at_hq"], cells
        assert result["agree"] is False, cells


async def test_a_sale_lost_at_the_second_station_cannot_hide_behind_the_first(
    tmp_path: Path,
) -> None:
    """A sale of the second station is lost at HQ while the first station holds one with the
    same pump, number, volume and amount; and one sale per station is quarantined."""
    demo = DemoChain(DemoOptions(duration_s=4, stations=2, workdir=tmp_path))
    try:
        await demo.start()
        await demo.run_traffic()
        assert await demo.quiesce()
        first, second = (st.code for st in demo.stations)
        assert demo.hq is not None
        async with demo.hq.db.begin() as uow:
            picked = {}
            for code in (first, second):
                rows = (
                    await uow.conn.execute(
                        sa.select(sale_t).where(sale_t.c.station_code == code).limit(2)
                    )
                ).all()
                assert len(rows) == 2
                picked[code] = [dict(r._mapping) for r in rows]
            moved = picked[second][0]
            await uow.conn.execute(sa.delete(sale_t).where(sale_t.c.sale_id == moved["sale_id"]))
            moved.update(sale_id=uuid.uuid4(), station_code=first, station_seq=10**9)
            await uow.conn.execute(sa.insert(sale_t).values(**moved))
            quarantined = [picked[first][1]["sale_id"], picked[second][1]["sale_id"]]
            await uow.conn.execute(
                sa.update(sale_t).where(sale_t.c.sale_id.in_(quarantined)).values(quarantined=True)
            )
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["lost"] == 1
        assert [s["station"] for s in result["lost_sales"]] == [second]
        assert names_the_sale(result["lost_sales"][0], {**moved, "station_code": second})
        assert result["quarantined"] == 2
        assert result["duplicates"] == 0
        assert result["agree"] is False
    finally:
        await demo.stop()
