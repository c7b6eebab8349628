"""A finished filling keeps the nozzle it was dispensed from, whatever is lifted next."""

from __future__ import annotations

from forecourt.protocols.dart.driver import DartDriver
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.model import Preset, PumpState
from forecourt.protocols.store import MemoryDriverStore
from tests.protocols.dart.test_driver import PRICE, reach
from tests.support import eventually


async def test_the_next_customer_lifting_another_nozzle_does_not_move_the_finished_sale() -> None:
    """Given a filling on nozzle 1 that has just ended, when the next customer lifts nozzle 2
    before the driver has read the finished filling (the pump's DC3 now names nozzle 2), then
    the transaction is still nozzle 1's: its grade, price and totalizer are nozzle 1's."""
    async with DartSimulator(pumps=1, nozzles=3, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        host, port = sim.tcp_address
        driver = DartDriver(
            "dart", f"tcp://{host}:{port}", {1: 0x50}, nozzles=3, store=MemoryDriverStore()
        )
        await driver.open()
        try:
            sim.lift(1, 1)
            await reach(driver, 1, PumpState.CALLING)
            await driver.authorize(1, 1, Preset(), PRICE)
            await eventually(
                lambda: sim.pump(1).filling is not None and sim.pump(1).filling.volume >= 500,
                10,
                what="product to flow",
            )
            sim.hang(1)
            sim.lift(1, 2)
            found = await eventually(lambda: driver.finished_transaction(1), 10)
            assert sim.completed[-1].nozzle == 1
            assert found.nozzle == 1
            assert found.volume_ml == sim.completed[-1].volume * 10  # 2 decimals: 0.01 L = 10 ml
            assert found.totalizer_end_ml == sim.completed[-1].total_volume * 10
        finally:
            await driver.close()
