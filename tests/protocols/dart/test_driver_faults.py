"""DartDriver survives every fault the DART simulator injects (TCP unless said otherwise)."""

from __future__ import annotations

import pytest

from forecourt.protocols.dart.driver import DartDriver
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.model import (
    DeviceHealthState,
    DriverUnavailable,
    FrameRefused,
    Preset,
    PresetType,
    PumpState,
    TransactionFinished,
)
from forecourt.protocols.store import MemoryDriverStore
from tests.protocols.dart.test_driver import PRICE, driver_for, reach, rig, sell, status, until


async def test_a_corrupt_crc_is_refused_counted_and_the_pump_repeats_its_frame() -> None:
    async with rig() as setup:
        # Given the pump's next three data frames come with a wrong CRC
        setup.sim.set_fault("corrupt_crc", "3")
        # When a customer lifts a nozzle (the pump has data to send)
        setup.sim.lift(1, 1)
        # Then the driver refuses the bad frames, NAKs, gets them again, and sees the call
        await reach(setup.driver, 1, PumpState.CALLING)
        refused = [e for e in setup.of(FrameRefused) if e.reason == "bad_crc"]  # type: ignore[attr-defined]
        assert len(refused) == 3
        health = setup.driver.health()
        assert health.frames_refused == 3
        assert ("refused.bad_crc", 3) in health.counters
        assert health.state is DeviceHealthState.DEGRADED
        # And a whole sale still goes through
        setup.sim.hang(1)
        await reach(setup.driver, 1, PumpState.IDLE)
        sale = await sell(setup, litres=3)
        assert sale.volume_ml >= 3000


async def test_a_pump_that_stops_answering_is_offline_and_comes_back_by_itself() -> None:
    async with rig() as setup:
        # Given a pump that answered
        await reach(setup.driver, 1, PumpState.IDLE)
        # When it goes silent
        setup.sim.set_fault("no_answer", "1")
        # Then it is OFFLINE, with the reason, and the line's health says so
        offline = await reach(setup.driver, 1, PumpState.OFFLINE)
        assert offline.error == "no answer from 0x50"
        assert setup.driver.health().state is DeviceHealthState.OFFLINE
        with pytest.raises(DriverUnavailable):
            await setup.driver.authorize(1, 1, Preset(), PRICE)
        # When it answers again, it is back without anyone asking
        setup.sim.clear_fault("no_answer")
        await reach(setup.driver, 1, PumpState.IDLE)
        assert setup.driver.health().state is DeviceHealthState.ONLINE


async def test_one_silent_address_does_not_block_another_pump_on_the_line() -> None:
    async with rig(pumps=2) as setup:
        # Given pump 2 (0x51) silent from the start
        setup.sim.set_fault("no_answer", "0x51")
        await reach(setup.driver, 2, PumpState.OFFLINE)
        # Then pump 1 sells as usual
        sale = await sell(setup, pump=1, litres=5)
        assert sale.pump == 1
        await setup.driver.close_transaction(1, sale.transaction)
        assert (await status(setup.driver, 2)).state is PumpState.OFFLINE
        assert setup.driver.health().state is DeviceHealthState.DEGRADED
        # And pump 2 comes in once it answers
        setup.sim.clear_fault("no_answer")
        await reach(setup.driver, 2, PumpState.IDLE)
        assert (await sell(setup, pump=2, litres=2)).pump == 2


@pytest.mark.parametrize(
    ("fault", "refusals"),
    [
        ("split=1", False),  # every reply a byte at a time
        ("split=3", False),
        ("merge", False),  # our request echoed and the reply glued to it
        ("garbage=0.5", True),  # line noise before half of the replies
        ("slow=0.05", False),  # replies late, within the timeout
    ],
)
async def test_a_whole_sale_survives_a_line_fault(fault: str, refusals: bool) -> None:
    async with rig(faults=[fault]) as setup:
        first = await sell(setup, litres=4)
        await setup.driver.close_transaction(1, first.transaction)
        second = await sell(setup, preset=Preset(PresetType.VOLUME, volume_ml=2_500))
        assert second.volume_ml == 2_500
        assert second.transaction == first.transaction + 1
        assert bool(setup.of(FrameRefused)) is refusals


async def test_replies_slower_than_the_timeout_are_retransmitted_and_the_sale_completes() -> None:
    # Given a pump that always answers 0.15 s late, and a driver that waits 0.1 s
    async with rig(
        faults=["slow=0.15"], timeout_s=0.1, offline_after=4, command_timeout_s=20.0
    ) as setup:
        # Then requests are sent again, late answers still count, and a sale completes
        sale = await sell(setup, litres=2)
        assert sale.volume_ml >= 2000
        assert setup.driver.health().timeouts > 0


async def test_the_pumps_transaction_numbers_wrapping_are_followed() -> None:
    # Given a pump whose tx# is about to wrap (and wraps F -> 1)
    async with rig(faults=["tx_wrap=1"]) as setup:
        # Then several sales (dozens of frames each way) go through the wrap
        for litres in (2, 3, 2):
            sale = await sell(setup, litres=litres)
            await setup.driver.close_transaction(1, sale.transaction)
        assert sale.transaction == 3
        assert not setup.of(FrameRefused)


async def test_a_reboot_mid_fuelling_is_a_new_epoch_and_the_partial_filling_is_reported_once() -> (
    None
):
    async with rig(speed=4.0) as setup:
        driver = setup.driver
        before = await driver.identity()
        # Given a filling running
        setup.sim.lift(1, 1)
        await reach(driver, 1, PumpState.CALLING)
        await driver.authorize(1, 1, Preset(), PRICE)

        async def flowing() -> bool:
            return ((await status(driver, 1)).volume_ml or 0) >= 2000

        await until(flowing, what="2 L flowed")
        # When the pump loses power
        setup.sim.set_fault("reboot", "1")
        # Then the partial filling is held as a finished transaction
        held = await reach(driver, 1, PumpState.END_OF_TRANSACTION)
        sale = await driver.finished_transaction(1)
        assert sale is not None
        assert sale.transaction == held.transaction == 1
        shown = setup.sim.pump(1).display
        assert shown is not None
        assert sale.volume_ml == shown.volume * 10
        # And the identity's boot marker changed: a new epoch
        after = await driver.identity()
        assert before.boot_marker == "50:0"
        assert after.boot_marker == "50:1"
        # And it was reported once, whatever was polled meanwhile
        await driver.close_transaction(1, sale.transaction)
        finished = setup.of(TransactionFinished)
        assert len(finished) == 1
        assert await driver.unacknowledged_transactions([1]) == []
        # And the pump, not programmed any more, is programmed again by the next sale
        setup.sim.hang(1)
        await reach(driver, 1, PumpState.IDLE)
        again = await sell(setup, litres=1)
        assert again.transaction == 2
        assert (await driver.identity()).boot_marker == "50:1"


async def test_a_nozzle_left_hanging_after_the_flow_is_stopped_and_sold() -> None:
    async with rig(faults=["nozzle_hanging"]) as setup:
        driver = setup.driver
        # Given a customer who stops pumping at 3 L and leaves the nozzle out
        setup.sim.lift(1, 1, target_ml=3000, hang=True)
        await reach(driver, 1, PumpState.CALLING)
        await driver.authorize(1, 1, Preset(), PRICE)

        async def stood_still() -> bool:
            return not setup.sim.pump(1).flowing

        await until(stood_still, what="the flow to stop")
        assert (await status(driver, 1)).state is PumpState.FUELLING
        # When the controller stops the pump
        await driver.stop(1)
        # Then the filling is finished and sold with what flowed
        await reach(driver, 1, PumpState.END_OF_TRANSACTION)
        sale = await driver.finished_transaction(1)
        assert sale is not None
        assert sale.volume_ml >= 3000
        await driver.close_transaction(1, sale.transaction)
        assert (await status(driver, 1)).state is PumpState.CALLING  # the nozzle is still out
        setup.sim.hang(1)
        await reach(driver, 1, PumpState.IDLE)


async def test_a_line_that_cannot_be_opened_is_unavailable_and_reconnects_later() -> None:
    # Given a simulator we stop, so its port is dead
    async with DartSimulator(speed=40) as sim:
        await sim.start("127.0.0.1:0")
        assert sim.tcp_address is not None
        port = sim.tcp_address[1]
    driver = DartDriver("line", f"tcp://127.0.0.1:{port}", {1: 0x50}, timeout_s=0.1)
    async with driver:
        # Then the driver reports the line unavailable
        with pytest.raises(DriverUnavailable):
            await driver.pump_status([1])
        with pytest.raises(DriverUnavailable):
            await driver.identity()
        assert driver.health().state is DeviceHealthState.OFFLINE
        # When a pump line answers on that port again, the driver finds it by itself
        async with DartSimulator(speed=40) as again:
            await again.start(f"127.0.0.1:{port}")

            async def answering() -> bool:
                try:
                    return (await status(driver, 1)).state is PumpState.IDLE
                except DriverUnavailable:
                    return False

            await until(answering, timeout=15, what="the line to come back")


async def test_the_pty_line_survives_corrupt_frames_too() -> None:
    async with rig(via="pty", faults=["corrupt_crc=2"]) as setup:
        sale = await sell(setup, litres=2)
        assert sale.volume_ml >= 2000
        assert setup.of(FrameRefused)


async def test_a_driver_on_a_fresh_store_learns_the_held_filling_of_a_running_pump() -> None:
    # Given a pump that finished a filling under one driver
    async with DartSimulator(speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        store = MemoryDriverStore()
        async with driver_for(sim, store) as first:
            sim.lift(1, 1, target_ml=2000, hang=True)
            await reach(first, 1, PumpState.CALLING)
            await first.authorize(1, 1, Preset(), PRICE)
            await reach(first, 1, PumpState.END_OF_TRANSACTION)
        # When a driver with an empty store (another edge) looks at the pump
        async with driver_for(sim, MemoryDriverStore()) as second:
            # Then it still sees the finished filling, and numbers it in its own store
            held = await reach(second, 1, PumpState.END_OF_TRANSACTION)
            assert held.transaction == 1
