"""The edge's forecourt controller on a DART line: it sells, journals and closes DART fillings
exactly once, through restarts of the edge and power cuts of a pump."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from forecourt.edge.controller import ForecourtController
from forecourt.edge.journal import Journal
from forecourt.kernel.clock import SystemClock
from forecourt.protocols.dart.driver import DartDriver
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.model import PumpState
from forecourt.protocols.store import FileDriverStore
from tests.edge.forecourt_rig import PRICE_92, snapshot
from tests.protocols.dart.test_driver import driver_for, reach, status


class DartEdge(ForecourtController):
    driver: DartDriver


@asynccontextmanager
async def edge(sim: DartSimulator, tmp_path: Path, **controller: Any) -> AsyncIterator[DartEdge]:
    """One life of the edge: its journal, a DART driver on its store, its controller."""
    clock = SystemClock()
    journal = Journal(tmp_path / "edge.db", clock)
    driver: DartDriver = driver_for(sim, FileDriverStore(tmp_path / "drivers"), pumps=2)
    snap = snapshot((1, 2))
    await journal.open()
    await driver.open()
    try:
        yield DartEdge(
            driver,
            journal,
            lambda: snap,
            clock,
            close_backoff_initial_s=0.0,
            close_backoff_max_s=0.0,
            **controller,
        )
    finally:
        await driver.close()
        await journal.close()


async def run_until(
    controller: ForecourtController, done: Any, *, timeout: float = 15.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        await controller.poll_once()
        if await done():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}; stats {controller.stats}")
        await asyncio.sleep(0.02)


async def journaled(controller: ForecourtController) -> list[dict[str, Any]]:
    return [u.payload for u in await controller.journal.pending_uploads(1000)]


async def test_the_edge_sells_journals_and_closes_a_dart_filling(tmp_path: Path) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        async with edge(sim, tmp_path) as controller:
            # Given a customer at pump 1 who wants 20 L
            sim.lift(1, 1, target_ml=20_000, hang=True)

            async def closed() -> bool:
                return controller.stats.closed >= 1

            # When the edge runs
            await run_until(controller, closed, what="the sale to be closed")
            # Then the sale is journaled once, at the price in force, with the meter's readings
            (sale,) = await journaled(controller)
            assert sale["fuelling_point"] == 1
            assert sale["device_txn"] == 1
            assert sale["unit_price_mmu"] == PRICE_92
            assert sale["volume_ml"] >= 20_000
            assert sale["totalizer_start_ml"] == 0
            assert sale["totalizer_end_ml"] == sale["volume_ml"]
            assert sale["device_flags"] == []
            assert controller.stats.refused_moves == 0
            # And the pump is free again
            assert (await status(controller.driver, 1)).state is PumpState.IDLE


async def test_an_edge_restart_between_journal_and_close_closes_without_a_second_sale(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        # Given an edge that journals a sale and dies before closing it at the pump
        async with edge(sim, tmp_path, auto_settle=False) as first:
            sim.lift(1, 1, target_ml=5_000, hang=True)

            async def journaled_once() -> bool:
                return first.stats.journaled >= 1

            await run_until(first, journaled_once, what="the sale to be journaled")
        # When the edge comes back (new driver, same store and journal)
        async with edge(sim, tmp_path) as second:

            async def closed() -> bool:
                return second.stats.closed + second.stats.closed_elsewhere >= 1

            await run_until(second, closed, what="the sale to be closed after the restart")
            # Then the pump's filling kept its number, it is closed, and it is one sale
            (sale,) = await journaled(second)
            assert sale["device_txn"] == 1
            assert second.stats.journaled == 0
            assert (await reach(second.driver, 1, PumpState.IDLE)).state is PumpState.IDLE


async def test_a_pump_power_cut_mid_sale_is_a_new_epoch_and_the_partial_sale_is_kept(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=4, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        async with edge(sim, tmp_path) as controller:
            # Given a sale flowing at pump 1
            sim.lift(1, 1)

            async def flowing() -> bool:
                filling = sim.pump(1).filling
                return filling is not None and filling.volume >= 100

            await run_until(controller, flowing, what="product to flow")
            assert (await controller.driver.identity()).boot_marker == "50:0,51:0"
            # When the pump loses power
            sim.set_fault("reboot", "1")

            async def kept() -> bool:
                return controller.stats.closed >= 1

            await run_until(controller, kept, what="the partial sale to be closed")
            # Then the line's boot marker names the new life of pump 1 (the edge reads it when
            # it asks the line who it is), and the partial sale is journaled once
            assert (await controller.driver.identity()).boot_marker == "50:1,51:0"
            (sale,) = await journaled(controller)
            shown = sim.pump(1).display
            assert shown is not None
            assert sale["volume_ml"] == shown.volume * 10
            assert sale["device_txn"] == 1
            # And the next customer is served on the reprogrammed pump
            sim.hang(1)
            sim.lift(1, 1, target_ml=1_000, hang=True)

            async def second_sale() -> bool:
                return controller.stats.closed >= 2

            await run_until(controller, second_sale, what="the next sale")
            assert [s["device_txn"] for s in await journaled(controller)] == [1, 2]
