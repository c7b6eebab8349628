"""DART reset, the pump's own preset maximum, urgent visits and the line's round counting
(in-process simulator, real driver; the edge's commands where the edge is concerned): what a
mutation run of the DART driver and of the release path found untested."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from forecourt.edge.domain import FpState
from forecourt.kernel.errors import ForecourtError
from forecourt.protocols.dart.application import (
    Command,
    Decimals,
    Direction,
    PumpCommand,
    decode_transactions,
)
from forecourt.protocols.dart.driver import DartDriver
from forecourt.protocols.dart.line import Frame, FrameKind
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.model import (
    DeviceRejected,
    Preset,
    PresetType,
    PumpState,
)
from forecourt.protocols.store import MemoryDriverStore
from tests.protocols.dart.support import emergency_stop_while_flowing
from tests.protocols.dart.test_driver import PRICE, reach, rig, until
from tests.protocols.dart.test_edge_commands import audits, commands, parameters_read
from tests.protocols.dart.test_edge_controller import edge, run_until

SWITCHED_OFF = 7
RESET = 1


class FrameLog:
    """Every frame the simulated pumps receive, in order: (address, kind)."""

    def __init__(self, sim: DartSimulator) -> None:
        self.frames: list[tuple[int, FrameKind]] = []
        handle = sim.handle

        def recording(frame: Frame) -> Frame | None:
            self.frames.append((frame.address, frame.kind))
            return handle(frame)

        sim.handle = recording  # type: ignore[method-assign]

    def visits_to(self, address: int) -> int:
        """How many times the master turned to ``address`` from another pump."""
        return sum(
            1
            for (before, _), (now, _) in zip(self.frames, self.frames[1:], strict=False)
            if now == address and before != address
        )


async def wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    await until(check, timeout=10.0, what=what)


# --------------------------------------------------------------------------- reset


async def test_reset_refuses_a_busy_pump_and_its_filling_goes_on() -> None:
    async with rig(speed=4.0) as setup:
        driver = setup.driver
        # Given a pump fuelling
        setup.sim.lift(1, 1)
        await reach(driver, 1, PumpState.CALLING)
        await driver.authorize(1, 1, Preset(), PRICE)
        await reach(driver, 1, PumpState.FUELLING)
        # When it is reset
        with pytest.raises(DeviceRejected) as refused:
            await driver.reset(1)
        # Then the reset is refused because the pump is busy, and the filling runs on
        assert refused.value.details["device_code"] == "pump_busy"
        assert (await reach(driver, 1, PumpState.FUELLING)).state is PumpState.FUELLING


async def test_reset_refuses_a_pump_whose_ended_filling_is_not_read_yet() -> None:
    async with rig() as setup:
        driver = setup.driver
        tries: list[asyncio.Task[None]] = []
        answer = setup.sim.handle

        def reset_while_read(frame: Frame) -> Frame | None:
            # The moment the driver asks the pump for its ended filling (before it is read)
            if frame.kind is FrameKind.DATA and not tries:
                items = decode_transactions(frame.data, Direction.TO_DEVICE)
                if Command(PumpCommand.RETURN_FILLING_INFORMATION) in items:
                    tries.append(asyncio.get_running_loop().create_task(driver.reset(1)))
            return answer(frame)

        setup.sim.handle = reset_while_read  # type: ignore[method-assign]
        # Given a customer filling 2 L
        setup.sim.lift(1, 1, target_ml=2_000, hang=True)
        await reach(driver, 1, PumpState.CALLING)
        await driver.authorize(1, 1, Preset(), PRICE)

        async def tried() -> bool:
            return bool(tries) and tries[0].done()

        # When a reset comes as the filling ends, while the driver reads it
        await wait_for(tried, "the reset tried")
        # Then it is refused (a RESET would release the filling unread)
        with pytest.raises(DeviceRejected) as refused:
            tries[0].result()
        assert refused.value.details["device_code"] == "filling_unread"
        # And the filling is read and held by the pump for its sale
        held = await reach(driver, 1, PumpState.END_OF_TRANSACTION)
        assert held.volume_ml is not None
        assert held.volume_ml >= 2_000
        assert await driver.finished_transaction(1) is not None


# --------------------------------------------------------------------------- release (edge)


async def test_releasing_a_dart_pump_resets_it_so_it_is_free_and_sells_at_once(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        async with edge(sim, tmp_path) as controller:
            await parameters_read(controller)
            service = commands(controller)
            # Given an idle DART pump emergency-stopped, the edge having seen it stopped
            await service.emergency_stop("till1")
            await reach(controller.driver, 1, PumpState.STOPPED)
            await controller.poll_once()
            assert controller.machine(1).state is FpState.STOPPED
            # When it is released
            released = await service.release("till1", 1)
            # Then it is reset, free at the device and for the edge alike
            assert released["state"] == "idle"
            assert released["emergency_stopped"] is False
            assert controller.machine(1).state is FpState.IDLE
            # And it is authorised straight away, the edge's machine following
            body = {"nozzle": 1, "preset": {"volume_ml": 1_000}}
            answer = await service.authorise("till1", 1, body)
            assert answer["state"] == "authorised"
            assert controller.machine(1).state is FpState.AUTHORISED


async def test_a_dart_pump_holding_its_stopped_filling_is_authorised_once_its_sale_is_closed(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        # Given an edge that closes sales only when told, and a pump stopped mid-sale
        async with edge(sim, tmp_path, auto_settle=False) as controller:
            await parameters_read(controller)
            service = commands(controller)
            full = await emergency_stop_while_flowing(controller, service, sim)
            assert full["preset"]["type"] == "full_tank"

            async def journaled() -> bool:
                return int(sim.pump(1).status) == SWITCHED_OFF and controller.stats.journaled >= 1

            await run_until(controller, journaled, what="the stopped sale journaled")
            # And it is released while the sale is open (the reset waits)
            released = await service.release("till1", 1)
            assert audits(controller, "pump.release")[0]["sent"].startswith("nothing yet")
            assert released["emergency_stopped"] is False
            # When the sale is closed, the pump showing itself switched off
            controller.auto_settle = True

            async def closed() -> bool:
                state = (await controller.read_status(1)).state
                return controller.stats.closed >= 1 and state is PumpState.STOPPED

            await run_until(controller, closed, what="the stopped sale closed")
            # Then the next authorisation resets and authorises it
            again = await service.authorise("till1", 1, {"nozzle": 1, "full": True})
            assert again["state"] in ("authorised", "fuelling")
            assert int(sim.pump(1).status) != SWITCHED_OFF
            assert controller.machine(1).state in (FpState.AUTHORISED, FpState.FUELLING)


async def test_a_dart_pump_switched_off_elsewhere_is_not_authorised_but_released_with_a_reset(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        async with edge(sim, tmp_path) as controller:
            await parameters_read(controller)
            service = commands(controller)
            # Given a programmed idle pump switched off by another master on the line
            sim.pump(1).handle(Command(PumpCommand.SWITCH_OFF))
            await reach(controller.driver, 1, PumpState.STOPPED)
            # When a cashier authorises it
            with pytest.raises(ForecourtError) as refused:
                await service.authorise("till1", 1, {"nozzle": 1, "preset": {"volume_ml": 1_000}})
            # Then it is refused by its state: this edge did not stop it
            assert refused.value.code == "pump.state_forbids"
            assert int(sim.pump(1).status) == SWITCHED_OFF
            # When the cashier releases it
            released = await service.release("till1", 1)
            # Then it is reset and free
            assert released["state"] == "idle"
            assert int(sim.pump(1).status) == RESET
            assert audits(controller, "pump.release")[0]["sent"] == "reset"


# --------------------------------------------------------------------------- max_preset


async def test_the_maximum_amount_a_dart_pump_reports_is_given_in_minor_units_and_0_is_none() -> (
    None
):
    # Given pumps writing amounts with three decimals: pump 1 takes at most 300.000, pump 2
    # reports no maximum (0)
    decimals = Decimals(volume=2, amount=3, price=3)
    async with DartSimulator(pumps=2, speed=40, decimals=decimals) as sim:
        sim.pump(1).max_amount = 300_000
        sim.pump(2).max_amount = 0
        await sim.start("127.0.0.1:0")
        endpoint = sim.endpoints()["tcp"]
        async with DartDriver(
            "line", endpoint, {1: 0x50, 2: 0x51}, store=MemoryDriverStore(), timeout_s=0.25
        ) as driver:

            async def parameters_read() -> bool:
                identity = await driver.identity()
                return identity is not None and driver.max_preset(1, PresetType.AMOUNT) is not None

            await wait_for(parameters_read, "pump 1's parameters")
            # Then pump 1's maximum is 300.00 in fen, for an amount only
            assert driver.max_preset(1, PresetType.AMOUNT) == 30_000
            assert driver.max_preset(1, PresetType.VOLUME) is None
            # And pump 2 (parameters read once a round has visited it) has none
            cycles = driver.line_stats()["cycles"]

            async def two_more_rounds() -> bool:
                return driver.line_stats()["cycles"] >= cycles + 2

            await wait_for(two_more_rounds, "two more rounds of the line")
            assert driver.max_preset(2, PresetType.AMOUNT) is None


# --------------------------------------------------------------------------- the round


async def test_a_command_for_the_last_pump_of_the_round_waits_for_at_most_one_other_pump() -> None:
    # Given a line of six pumps whose every answer takes 10 ms
    async with rig(pumps=6, faults=["slow=0.01"], status_refresh_s=5.0) as setup:
        log = FrameLog(setup.sim)
        last = 0x55
        for _ in range(8):
            # When a command is given to the sixth pump, wherever the round is
            start = len(log.frames)
            await setup.driver.stop(6)
            # Then before it reaches the pump, at most the pump visited then is served
            sent = next(
                i for i in range(start, len(log.frames)) if log.frames[i] == (last, FrameKind.DATA)
            )
            others = {address for address, _ in log.frames[start:sent] if address != last}
            assert len(others) <= 1, (others, log.frames[start : sent + 1])


async def test_the_line_counts_its_rounds_and_the_time_they_take_on_the_line() -> None:
    async with rig(pumps=2) as setup:
        driver = setup.driver
        log = FrameLog(setup.sim)
        opened = time.monotonic()
        first = driver.line_stats()
        visits = log.visits_to(0x51)

        async def rounds(count: int, since: float) -> bool:
            return driver.line_stats()["cycles"] >= since + count

        # When the line runs a dozen rounds
        await wait_for(lambda: rounds(12, first["cycles"]), "a dozen rounds")
        stats = driver.line_stats()
        # Then each round is counted once: once per visit of the round's last pump
        assert abs((stats["cycles"] - first["cycles"]) - (log.visits_to(0x51) - visits)) <= 1
        # And the time on the line is kept finer than seconds, never above the time passed
        assert stats["busy_s"] > 0
        assert stats["busy_s"] != round(stats["busy_s"])
        # When every answer takes 20 ms
        setup.sim.set_fault("slow", "0.02")
        before = driver.line_stats()
        await wait_for(lambda: rounds(5, before["cycles"]), "five slow rounds")
        after = driver.line_stats()
        # Then the busy time adds up every round's (two answers at least a round)
        rounds_run = after["cycles"] - before["cycles"]
        assert after["busy_s"] - before["busy_s"] >= 0.04 * (rounds_run - 1)
        assert after["busy_s"] - first["busy_s"] <= time.monotonic() - opened + 0.1


async def test_a_sale_stopped_in_an_emergency_is_closed_and_its_pump_shows_stopped(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        async with edge(sim, tmp_path) as controller:
            await parameters_read(controller)
            service = commands(controller)
            # Given a fuelling stopped in an emergency
            await emergency_stop_while_flowing(controller, service, sim)

            # When its sale is journaled and closed, the pump still switched off
            async def closed_and_stopped() -> bool:
                state = (await controller.read_status(1)).state
                return controller.stats.closed >= 1 and state is PumpState.STOPPED

            await run_until(controller, closed_and_stopped, what="the sale closed")
            for _ in range(3):
                await controller.poll_once()
            # Then the edge's machine follows the pump to stopped, refusing no move
            assert controller.machine(1).state is FpState.STOPPED
            assert controller.stats.refused_moves == 0
