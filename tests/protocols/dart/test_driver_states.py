"""The states the DART driver reports never make the edge's fuelling-point machine refuse.

Two ways: hypothesis drives the simulated pump with random customers, commands and power
cuts and maps each step through the driver's own :func:`standard_state` (fast, many cases);
and seeded random event sequences run the real driver against the simulator over TCP, the
controller's policy (authorise a calling pump, close what it holds) in the loop.
"""

from __future__ import annotations

import asyncio
import random
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from forecourt.edge.domain import TRANSITIONS, FpState, FuellingPointMachine, Refusal
from forecourt.protocols.dart.application import (
    Command,
    PriceUpdate,
    PumpCommand,
    PumpStatusCode,
)
from forecourt.protocols.dart.driver import HOLDING, RELEASED, standard_state
from forecourt.protocols.dart.sim_pump import Filling, SimulatedPump
from forecourt.protocols.model import DeviceRejected, Preset, PumpState
from tests.protocols.dart.test_driver import PRICE, rig, status

S = PumpStatusCode


class HeldFilling:
    """What the driver keeps of the filling a pump shows (as in DartDriver: numbered when
    seen finished with product, released when the pump is RESET or fills again)."""

    def __init__(self) -> None:
        self.filling: Filling | None = None
        self.closed = False

    def observe(self, pump: SimulatedPump) -> bool:
        if pump.status in RELEASED:
            self.filling = None
        elif pump.status in HOLDING:
            shown = pump.display
            if shown is not None and shown.volume > 0 and shown is not self.filling:
                self.filling, self.closed = shown, False
        return pump.status in HOLDING and self.filling is not None and not self.closed


def reported(pump: SimulatedPump, held: HeldFilling) -> PumpState:
    volume = pump.filling.volume if pump.filling else 0
    return standard_state(pump.status, pump.nozzle_out is not None, held.observe(pump), volume)


def authorise(pump: SimulatedPump) -> None:
    """What DartDriver.authorize sends: prices if needed, RESET, AUTHORIZE."""
    if pump.prices is None:
        pump.handle(PriceUpdate((789, 789)))
    if pump.status is not S.RESET:
        pump.handle(Command(PumpCommand.RESET))
    pump.handle(Command(PumpCommand.AUTHORIZE))


events = st.lists(
    st.one_of(
        st.tuples(st.just("lift"), st.integers(1, 2)),
        st.tuples(st.just("hang"), st.just(0)),
        st.tuples(st.just("flow"), st.integers(1, 120)),
        st.tuples(st.just("trigger_off"), st.just(0)),
        st.tuples(st.just("stop"), st.just(0)),
        st.tuples(st.just("suspend"), st.just(0)),
        st.tuples(st.just("resume"), st.just(0)),
        st.tuples(st.just("reboot"), st.just(0)),
        st.tuples(st.just("controller"), st.just(0)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_random_pump_lives_never_make_the_fuelling_point_machine_refuse(
    steps: list[tuple[str, int]],
) -> None:
    pump = SimulatedPump(0x50, nozzles=2, flow_l_per_min=30)
    held = HeldFilling()
    machine = FuellingPointMachine(1)
    now = 0.0
    seen: list[PumpState] = []

    def look() -> None:
        state = reported(pump, held)
        seen.append(state)
        outcome = machine.observe(state, now)
        assert not isinstance(outcome, Refusal), (seen, outcome)

    look()
    for event, value in steps:
        now += 10.0  # events seconds apart: past the authorisation grace
        if event == "lift":
            pump.lift(value)
        elif event == "hang":
            pump.hang()
        elif event == "flow":
            pump.advance(float(value))
        elif event == "trigger_off":
            pump.trigger(False)
        elif event == "stop":
            # the controller stops only a pump that dispensed, or an expired authorisation
            pump.handle(Command(PumpCommand.STOP))
        elif event == "suspend":
            if pump.filling is not None and pump.filling.volume:
                pump.handle(Command(PumpCommand.SUSPEND))
        elif event == "resume":
            pump.handle(Command(PumpCommand.RESUME))
        elif event == "reboot":
            pump.reboot()
        elif event == "controller" and machine.state is FpState.FINISHED_UNPAID:
            held.closed = True  # journaled, then closed at the pump
            machine.move(FpState.CLOSED)
        look()
        if machine.state is FpState.CALLING:
            # the controller authorises a calling pump at once (ForecourtController._authorise)
            authorise(pump)
            assert not isinstance(machine.authorised(now), Refusal)
            look()
    for before, after in machine.history:
        assert after in TRANSITIONS[before] or after in (FpState.ERROR, FpState.OFFLINE)


async def run_sequence(seed: int, steps: int) -> FuellingPointMachine:
    """Random customers and operators against the real driver; returns the machine."""
    rng = random.Random(seed)
    # The driver's authorize returns once the pump shows it authorised, so the grace for a
    # lagging device can be short; a pump that loses power right after is calling again.
    machine = FuellingPointMachine(1, authorise_grace_s=0.2)
    async with rig(speed=8.0) as setup:
        driver, sim = setup.driver, setup.sim

        async def look(count: int = 6) -> None:
            for _ in range(count):
                state = (await status(driver, 1)).state
                outcome = machine.observe(state, time.monotonic())
                assert not isinstance(outcome, Refusal), (seed, outcome, machine.history)
                if machine.state is FpState.CALLING:
                    try:
                        await driver.totals(1, 1)
                        await driver.authorize(1, None, Preset(), PRICE)
                        machine.authorised(time.monotonic())
                    except DeviceRejected:
                        pass  # the customer hung up meanwhile: the next look says so
                elif machine.state is FpState.FINISHED_UNPAID:
                    held = await driver.finished_transaction(1)
                    if held is not None:
                        await driver.close_transaction(1, held.transaction)
                        machine.move(FpState.CLOSED)
                await asyncio.sleep(0.03)

        for _ in range(steps):
            pump = sim.pump(1)
            flowing = pump.status is S.FILLING and bool(pump.filling and pump.filling.volume)
            choice = rng.random()
            if choice < 0.35 and pump.nozzle_out is None:
                sim.lift(1, rng.randint(1, 2), target_ml=rng.randint(1, 8) * 1000, hang=True)
            elif choice < 0.45 and pump.nozzle_out is not None:
                sim.hang(1)
            elif choice < 0.5 and flowing:
                await driver.suspend(1)
                await look(2)
                await driver.resume(1)
            elif (
                choice < 0.55 and pump.status is S.FILLING and pump.filling and pump.filling.volume
            ):
                await driver.stop(1)
            elif choice < 0.6:
                sim.set_fault("reboot", "1")
                await asyncio.sleep(0.3)  # several seconds of simulated time
            elif choice < 0.65:
                sim.set_fault("corrupt_crc", "2")
            await look()
    return machine


async def test_random_sequences_on_the_real_driver_never_make_the_machine_refuse() -> None:
    for seed in (1, 2, 3):
        machine = await run_sequence(seed, steps=15)
        assert machine.refused == 0
        for before, after in machine.history:
            assert after in TRANSITIONS[before] or after in (FpState.ERROR, FpState.OFFLINE)
