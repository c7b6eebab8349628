"""A busy demo chain whose forecourt controllers misbehave still reconciles exactly.

1. A station's simulated PTS-2 is restarted twice in the middle of traffic, once with SIGTERM
   and once with SIGKILL, each time with its transaction counters reset (as a reset or swapped
   controller does): numbers 1, 2, 3… come again for new sales.
2. Another run drops closes and loses close answers on the cable, and answers status polls of
   some pumps with more decimals than configured.

Either way the dispensers' transaction memory, the edge journals and HQ agree in count,
millilitres and fen, with nothing lost and nothing doubled.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from forecourt.demo import DemoChain, DemoOptions, report
from tests.support import eventually

pytestmark = pytest.mark.e2e


async def _agree(demo: DemoChain) -> dict[str, object]:
    assert await demo.quiesce()
    result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
    assert result["lost"] == 0, result["lost_sales"]
    assert result["duplicates"] == 0
    assert result["sales_at_dispensers"] == result["sales_at_edges"] == result["sales_at_hq"]
    assert result["volume_ml_at_dispensers"] == result["volume_ml_at_edges"]
    assert result["volume_ml_at_edges"] == result["volume_ml_at_hq"]
    assert result["amount_fen_at_dispensers"] == result["amount_fen_at_edges"]
    assert result["amount_fen_at_edges"] == result["amount_fen_at_hq"]
    assert result["agree"] is True
    return result


async def test_controller_restarts_with_counters_reset_lose_no_sale(tmp_path: Path) -> None:
    demo = DemoChain(
        DemoOptions(duration_s=12, stations=2, workdir=tmp_path, arrivals_per_hour=400)
    )
    try:
        await demo.start()
        victim = demo.stations[0]
        traffic = asyncio.create_task(demo.run_traffic())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # In the middle of traffic: this controller life has sold a few first.
            life_start = victim.edge.controller.stats.journaled
            await eventually(
                lambda start=life_start: victim.edge.controller.stats.journaled >= start + 5,
                interval=0.05,
                what="five sales in this controller life",
            )
            journaled = victim.edge.controller.stats.journaled
            before, address = victim.simulator.process, victim.simulator.base_url
            assert before is not None
            await demo.restart_controller(victim.code, sig, reset_counters=True)
            # A new controller process, on the address the edge knows.
            assert victim.simulator.process is not None
            assert victim.simulator.process.pid != before.pid
            assert victim.simulator.base_url == address
        await traffic
        result = await _agree(demo)
        assert result["sales_at_dispensers"] >= 30
        stats = victim.edge.controller.stats
        assert stats.journaled > journaled  # it kept selling after the second restart
        assert stats.epoch_changes >= 2
        names = {a["name"] for a in victim.edge.controller.alarms.as_json()}
        assert names & {"controller_restarted", "device_epoch_change"}
        epochs = {p["device_epoch"] for p in await _payloads(victim)}
        assert len(epochs) >= 2  # sales of more than one controller life
    finally:
        await demo.stop()


async def _payloads(station: object) -> list[dict[str, object]]:
    import json

    import sqlalchemy as sa

    from forecourt.edge.journal import journal_t

    journal = station.edge.journal  # type: ignore[attr-defined]
    with journal.engine.connect() as conn:
        return [json.loads(r.payload) for r in conn.execute(sa.select(journal_t.c.payload))]


async def test_dropped_closes_and_odd_decimals_on_status_polls_lose_no_sale(
    tmp_path: Path,
) -> None:
    demo = DemoChain(
        DemoOptions(duration_s=10, stations=2, workdir=tmp_path, arrivals_per_hour=400)
    )
    try:
        await demo.start()
        first, second = demo.stations
        await demo.set_faults(first.code, {"drop_close_every": 3, "lose_close_reply_every": 4})
        await demo.set_faults(second.code, {"odd_decimals_pumps": [1, 2]})
        await demo.run_traffic()
        await demo.set_faults(
            first.code, {"drop_close_every": None, "lose_close_reply_every": None}
        )
        await demo.set_faults(second.code, {"odd_decimals_pumps": None})
        result = await _agree(demo)
        assert result["sales_at_dispensers"] >= 25
        assert first.edge.controller.stats.close_failures >= 1
        assert first.edge.controller.stats.closed_elsewhere >= 1  # an answer was lost
        assert second.edge.controller.stats.journaled >= 5
        assert second.edge.controller.stats.pump_errors >= 1  # the odd packets were seen
    finally:
        await demo.stop()
