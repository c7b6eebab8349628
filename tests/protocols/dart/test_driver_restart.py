"""Synthesised DART transaction numbers survive restarts of the edge (the driver's store)."""

from __future__ import annotations

from pathlib import Path

from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.model import Preset, PresetType, PumpState, TransactionFinished
from forecourt.protocols.store import FileDriverStore
from tests.protocols.dart.test_driver import PRICE, Rig, driver_for, reach, sell


async def test_a_finished_filling_keeps_its_number_across_driver_restarts(tmp_path: Path) -> None:
    # Given a pump holding a finished, unclosed filling numbered by one driver
    async with DartSimulator(speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        store = FileDriverStore(tmp_path / "drivers")
        async with driver_for(sim, store) as first:
            setup = Rig(sim, first, store)
            sale = await sell(setup, litres=6)
        # When the edge restarts (a new driver, the same store) - three times
        for _ in range(3):
            events: list[object] = []
            async with driver_for(sim, store) as again:
                again.subscribe(events.append)
                held = await reach(again, 1, PumpState.END_OF_TRANSACTION)
                found = await again.finished_transaction(1)
                unacknowledged = await again.unacknowledged_transactions([1])
            # Then the same filling has the same number and contents, reported as before
            assert held.transaction == sale.transaction
            assert found == sale
            assert unacknowledged == [sale]
            # And no second number was handed out for it
            assert not [e for e in events if isinstance(e, TransactionFinished)]
        # And once closed, the next filling gets the next number
        async with driver_for(sim, store) as last:
            await last.close_transaction(1, sale.transaction)
            nxt = await sell(Rig(sim, last, store), litres=2)
            assert nxt.transaction == sale.transaction + 1


async def test_a_closed_filling_still_on_display_stays_closed_after_a_restart(
    tmp_path: Path,
) -> None:
    async with DartSimulator(speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        store = FileDriverStore(tmp_path / "drivers")
        async with driver_for(sim, store) as first:
            sale = await sell(Rig(sim, first, store), litres=3)
            await first.close_transaction(1, sale.transaction)
        # The pump still shows the sale (status 5), as a real one does until the next RESET
        assert sim.pump(1).display is not None
        async with driver_for(sim, store) as again:
            assert (await reach(again, 1, PumpState.IDLE)).transaction is None
            assert await again.finished_transaction(1) is None
            (reported,) = await again.transactions(1, sale.ended_at, sale.ended_at)
            assert reported.transaction == sale.transaction
            assert reported.closed


async def test_two_identical_fillings_are_told_apart_by_the_totalizer(tmp_path: Path) -> None:
    # Given two sales of exactly the same volume, amount and price
    async with DartSimulator(speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        store = FileDriverStore(tmp_path / "drivers")
        preset = Preset(PresetType.VOLUME, volume_ml=2_000)
        async with driver_for(sim, store) as driver:
            setup = Rig(sim, driver, store)
            first = await sell(setup, preset=preset)
            await driver.close_transaction(1, first.transaction)
            second = await sell(setup, preset=preset)
        # Then they are two transactions, the meter says which is which
        assert (first.volume_ml, first.amount_minor) == (second.volume_ml, second.amount_minor)
        assert second.transaction == first.transaction + 1
        assert second.totalizer_end_ml == first.totalizer_end_ml + 2_000  # type: ignore[operator]
        # And after a restart the one on display is still the second
        async with driver_for(sim, store) as again:
            assert (await reach(again, 1, PumpState.END_OF_TRANSACTION)).transaction == 2


async def test_a_filling_that_ends_while_the_edge_is_down_is_numbered_when_it_is_back(
    tmp_path: Path,
) -> None:
    async with DartSimulator(speed=4, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        store = FileDriverStore(tmp_path / "drivers")
        # Given a filling authorised by one driver (which read the start totalizer)
        async with driver_for(sim, store) as first:
            sim.lift(1, 1)
            await reach(first, 1, PumpState.CALLING)
            await first.authorize(1, 1, Preset(), PRICE)
            await reach(first, 1, PumpState.FUELLING)
        # When it ends while no driver runs
        sim.hang(1)
        # Then the next driver finds it finished, numbers it once, with both totalizers
        async with driver_for(sim, store) as again:
            await reach(again, 1, PumpState.END_OF_TRANSACTION)
            sale = await again.finished_transaction(1)
        assert sale is not None
        assert sale.transaction == 1
        assert sale.totalizer_start_ml == 0
        assert sale.totalizer_end_ml == sale.volume_ml
