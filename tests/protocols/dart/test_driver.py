"""DartDriver against the DART simulator over a real TCP socket and a pty: whole sales.

The simulator runs fast (``speed``) so a 20 L sale takes a fraction of a second; every wait
has a deadline and waits for a condition, never a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from forecourt.kernel.clock import SystemClock
from forecourt.protocols.dart.driver import DartDriver, create, poll_once
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.driver import DeviceConfig, DriverContext, DriverStore, PumpDriver
from forecourt.protocols.model import (
    Capability,
    DeviceEvent,
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    FillingProgress,
    HealthChanged,
    Preset,
    PresetType,
    PumpState,
    PumpStatus,
    PumpStatusChanged,
    TransactionFinished,
)
from forecourt.protocols.store import MemoryDriverStore

PRICE = 789_000  # 7.89 per litre, in milli-fen


@dataclass
class Rig:
    sim: DartSimulator
    driver: DartDriver
    store: DriverStore
    events: list[DeviceEvent] = field(default_factory=list)

    def of(self, kind: type[DeviceEvent]) -> list[DeviceEvent]:
        return [e for e in self.events if isinstance(e, kind)]


def driver_for(
    sim: DartSimulator,
    store: DriverStore,
    *,
    via: str = "tcp",
    pumps: int | None = None,
    **options: float,
) -> DartDriver:
    endpoints = sim.endpoints()
    transport = endpoints["tcp"] if via == "tcp" else endpoints["serial"]
    count = pumps if pumps is not None else len(sim.pumps)
    settings: dict[str, float] = {
        "timeout_s": 0.25,
        "poll_interval_s": 0.01,
        "offline_after": 2,
        "offline_retry_s": 0.2,
        "status_refresh_s": 0.3,
        "command_timeout_s": 3.0,
        **options,
    }
    return DartDriver(
        "line",
        transport,
        {n: 0x4F + n for n in range(1, count + 1)},
        store=store,
        timeout_s=settings["timeout_s"],
        poll_interval_s=settings["poll_interval_s"],
        offline_after=int(settings["offline_after"]),
        offline_retry_s=settings["offline_retry_s"],
        status_refresh_s=settings["status_refresh_s"],
        command_timeout_s=settings["command_timeout_s"],
    )


@contextlib.asynccontextmanager
async def rig(
    *,
    pumps: int = 1,
    via: str = "tcp",
    speed: float = 40.0,
    faults: Sequence[str] = (),
    store: MemoryDriverStore | None = None,
    **options: float,
) -> AsyncIterator[Rig]:
    async with DartSimulator(pumps=pumps, speed=speed, flow_l_per_min=60, faults=faults) as sim:
        await sim.start("127.0.0.1:0" if via == "tcp" else None, pty=via == "pty")
        store = store or MemoryDriverStore()
        driver = driver_for(sim, store, via=via, pumps=None, **options)
        setup = Rig(sim, driver, store)
        driver.subscribe(setup.events.append)
        async with driver:
            yield setup


async def until(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 8.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


async def status(driver: PumpDriver, pump: int) -> PumpStatus:
    (found,) = await driver.pump_status([pump])
    return found


async def reach(
    driver: PumpDriver, pump: int, *states: PumpState, timeout: float = 8.0
) -> PumpStatus:
    async def arrived() -> bool:
        return (await status(driver, pump)).state in states

    await until(arrived, timeout=timeout, what=f"pump {pump} in {[s.value for s in states]}")
    return await status(driver, pump)


async def sell(
    setup: Rig,
    *,
    pump: int = 1,
    nozzle: int = 1,
    preset: Preset | None = None,
    price: int = PRICE,
    litres: float = 20.0,
) -> DeviceTransaction:
    """A customer lifts the nozzle, is authorised, fills ``litres`` (or to the preset) and
    hangs up; the finished transaction the pump holds."""
    setup.sim.lift(pump, nozzle, target_ml=int(litres * 1000), hang=True)
    await reach(setup.driver, pump, PumpState.CALLING)
    await setup.driver.totals(pump, nozzle)  # the controller reads the start totalizer
    await setup.driver.authorize(pump, nozzle, preset or Preset(), price)
    await reach(setup.driver, pump, PumpState.END_OF_TRANSACTION)
    found = await setup.driver.finished_transaction(pump)
    assert found is not None
    return found


@pytest.mark.parametrize("via", ["tcp", "pty"])
async def test_a_whole_sale_from_nozzle_up_to_idle(via: str) -> None:
    # Given one pump on a line reached over TCP or a pty (serial://)
    async with rig(via=via) as setup:
        driver = setup.driver
        assert (await status(driver, 1)).state is PumpState.IDLE
        # When a customer who wants 30 L lifts nozzle 1
        setup.sim.lift(1, 1, target_ml=30_000, hang=True)
        calling = await reach(driver, 1, PumpState.CALLING)
        assert calling.nozzle == 1
        # And the controller reads the start totalizer and authorises 20 L at 7.89/L
        before = await driver.totals(1, 1)
        preset = Preset(PresetType.VOLUME, volume_ml=20_000)
        assert await driver.authorize(1, 1, preset, PRICE) is None
        # Then the pump fills to the preset and ends holding the sale
        held = await reach(driver, 1, PumpState.END_OF_TRANSACTION)
        sale = await driver.finished_transaction(1)
        assert sale is not None
        assert held.transaction == sale.transaction == 1
        assert sale.nozzle == 1
        assert sale.unit_price_mmu == PRICE
        assert sale.volume_ml == 20_000
        assert sale.amount_minor == 15_780  # 20.00 L x 7.89
        # With the totalizers read from the meter, before and after
        assert sale.totalizer_start_ml == before.volume_ml == 0
        assert sale.totalizer_end_ml == 20_000
        assert sale.started_at is not None
        assert sale.started_at <= sale.ended_at
        assert sale.ended_at.tzinfo is not None
        assert not sale.closed
        # When the controller closes it
        await driver.close_transaction(1, sale.transaction)
        # Then the pump is idle (it still shows the sale, as a real one does) and holds none
        assert (await status(driver, 1)).state is PumpState.IDLE
        assert await driver.finished_transaction(1) is None
        assert await driver.unacknowledged_transactions([1]) == []
        # And the events told the story
        assert setup.of(TransactionFinished)
        assert setup.of(FillingProgress)
        assert setup.of(HealthChanged)
        states = [e.status.state for e in setup.of(PumpStatusChanged)]  # type: ignore[attr-defined]
        assert PumpState.FUELLING in states
        assert states[-1] is PumpState.IDLE


async def test_a_sale_without_preset_ends_when_the_customer_hangs_up() -> None:
    async with rig() as setup:
        sale = await sell(setup, litres=7)
        assert sale.volume_ml >= 7_000
        assert sale.amount_minor == (sale.volume_ml * 789 + 500) // 1000  # fen, half up
        assert sale.totalizer_end_ml == sale.volume_ml


async def test_the_next_sale_gets_the_next_number_and_continues_the_totalizer() -> None:
    async with rig() as setup:
        first = await sell(setup, litres=10)
        await setup.driver.close_transaction(1, first.transaction)
        second = await sell(setup, litres=5)
        assert second.transaction == first.transaction + 1
        assert second.totalizer_start_ml == first.totalizer_end_ml
        assert second.totalizer_end_ml == first.totalizer_end_ml + second.volume_ml  # type: ignore[operator]
        totals = await setup.driver.totals(1, 1)
        assert totals.volume_ml == second.totalizer_end_ml
        assert totals.amount_minor == first.amount_minor + second.amount_minor


@pytest.mark.parametrize(
    ("preset", "field_name", "value"),
    [
        (Preset(PresetType.VOLUME, volume_ml=12_340), "volume_ml", 12_340),
        (Preset(PresetType.AMOUNT, amount_minor=5_000), "amount_minor", 5_000),
    ],
)
async def test_a_preset_stops_the_filling_at_the_preset(
    preset: Preset, field_name: str, value: int
) -> None:
    # Given a customer who would take 50 L
    async with rig() as setup:
        # When authorised with a preset
        sale = await sell(setup, preset=preset, litres=50)
        # Then the filling stopped exactly at the preset
        assert getattr(sale, field_name) == value
        assert sale.volume_ml < 50_000


async def test_authorising_programs_the_prices_of_a_pump_not_programmed_since_power_up() -> None:
    async with rig() as setup:
        # Given a pump just powered up (status 0: it refuses to be authorised without prices)
        assert setup.sim.pump(1).prices is None
        # When a sale is authorised at 6.50/L on nozzle 2
        sale = await sell(setup, nozzle=2, price=650_000, litres=3)
        # Then the driver downloaded a price for each nozzle first, and the sale ran at it
        assert setup.sim.pump(1).prices == (650, 650)
        assert sale.unit_price_mmu == 650_000
        assert sale.nozzle == 2


async def test_the_pump_refuses_to_start_another_sale_while_one_is_unclosed() -> None:
    async with rig() as setup:
        sale = await sell(setup, litres=2)
        setup.sim.lift(1, 1)
        with pytest.raises(DeviceRejected) as caught:
            await setup.driver.authorize(1, 1, Preset(), PRICE)
        assert caught.value.details["device_code"] == "unclosed_filling"
        await setup.driver.close_transaction(1, sale.transaction)
        await setup.driver.authorize(1, 1, Preset(), PRICE)
        await reach(setup.driver, 1, PumpState.FUELLING)


async def test_close_refuses_a_number_the_pump_no_longer_holds() -> None:
    async with rig() as setup:
        sale = await sell(setup, litres=2)
        # A number it never held
        with pytest.raises(DeviceRejected):
            await setup.driver.close_transaction(1, sale.transaction + 7)
        await setup.driver.close_transaction(1, sale.transaction)
        await setup.driver.close_transaction(1, sale.transaction)  # still held: idempotent
        # Once the next sale RESET the pump, the old number is gone
        setup.sim.lift(1, 1, target_ml=1000, hang=True)
        await reach(setup.driver, 1, PumpState.CALLING)
        await setup.driver.authorize(1, 1, Preset(), PRICE)
        await reach(setup.driver, 1, PumpState.END_OF_TRANSACTION)
        with pytest.raises(DeviceRejected):
            await setup.driver.close_transaction(1, sale.transaction)


async def test_suspend_resume_and_stop_act_on_a_running_filling() -> None:
    async with rig(speed=4.0) as setup:
        driver = setup.driver
        setup.sim.lift(1, 1)  # a customer who keeps the trigger pressed
        await reach(driver, 1, PumpState.CALLING)
        await driver.authorize(1, 1, Preset(), PRICE)
        await reach(driver, 1, PumpState.FUELLING)
        await driver.suspend(1)
        assert (await reach(driver, 1, PumpState.SUSPENDED)).volume_ml
        await driver.resume(1)
        await reach(driver, 1, PumpState.FUELLING)
        await driver.stop(1)
        stopped = await reach(driver, 1, PumpState.END_OF_TRANSACTION)
        assert stopped.volume_ml
        assert stopped.transaction == 1


async def test_an_emergency_stop_switches_the_pump_off() -> None:
    async with rig(speed=4.0) as setup:
        driver = setup.driver
        setup.sim.lift(1, 1)
        await reach(driver, 1, PumpState.CALLING)
        await driver.authorize(1, 1, Preset(), PRICE)
        await reach(driver, 1, PumpState.FUELLING)
        await driver.emergency_stop(1)
        held = await reach(driver, 1, PumpState.END_OF_TRANSACTION)
        assert held.transaction is not None
        await driver.close_transaction(1, held.transaction)
        assert (await reach(driver, 1, PumpState.STOPPED)).state is PumpState.STOPPED


async def test_set_prices_downloads_a_price_per_nozzle() -> None:
    async with rig() as setup:
        await setup.driver.set_prices(1, [789_000, 650_000])
        assert setup.sim.pump(1).prices == (789, 650)
        with pytest.raises(Exception, match="decimals"):
            await setup.driver.set_prices(1, [789_500, 650_000])  # finer than the pump shows


async def test_the_transaction_report_comes_from_the_store() -> None:
    async with rig() as setup:
        clock = SystemClock()
        t0 = clock.now()
        first = await sell(setup, litres=3)
        await setup.driver.close_transaction(1, first.transaction)
        second = await sell(setup, litres=4)
        t1 = clock.now()
        report = await setup.driver.transactions(1, t0 - timedelta(seconds=1), t1)
        assert [(t.transaction, t.closed) for t in report] == [(1, True), (2, False)]
        later = t1 + timedelta(seconds=5)
        assert await setup.driver.transactions(1, later, later + timedelta(days=1)) == []
        assert report[1] == second


async def test_identity_names_the_line_and_its_pumps_epochs() -> None:
    async with rig(pumps=2) as setup:
        found = await setup.driver.identity()
        assert found.device_id == "dart:line"
        assert found.boot_marker == "50:0,51:0"
    async with rig(pumps=1) as setup:
        found = await setup.driver.identity()
        # one pump: its DC9 identity names the device
        assert found.device_id == f"dart:line:{setup.sim.pump(1).identity}"


async def test_capabilities_say_what_a_dart_pump_can_do() -> None:
    async with rig() as setup:
        assert Capability.PRICE_BEFORE_AUTHORISE in setup.driver.capabilities
        assert Capability.TOTALS in setup.driver.capabilities
        assert Capability.DEVICE_TRANSACTION_NUMBERS not in setup.driver.capabilities
        assert isinstance(setup.driver, PumpDriver)


async def test_create_builds_a_driver_from_the_station_configuration() -> None:
    config = DeviceConfig(
        name="north",
        protocol="dart",
        transport="serial:///dev/ttyUSB0",
        pumps={1: 0x50, 2: 0x51},
        options={"timeout_s": "0.2", "price_decimals": 3, "currency": "EUR"},
    )
    driver = create(config, DriverContext(clock=SystemClock(), store=MemoryDriverStore()))
    assert driver.endpoint.parity == "O"
    assert driver.endpoint.baudrate == 9600
    assert driver.base_decimals.price == 3
    assert driver.base_decimals.currency == "EUR"
    assert [link.address for link in driver.links.values()] == [0x50, 0x51]
    with pytest.raises(DriverUnavailable):
        await driver.pump_status([1])  # not opened


async def test_poll_once_reports_identity_status_and_totals_as_json() -> None:
    async with DartSimulator(pumps=2) as sim:
        await sim.start("127.0.0.1:0")
        host, port = sim.tcp_address or ("", 0)
        result = await poll_once(
            f"{host}:{port}", {"addresses": "0x50-0x51", "totals": "true", "timeout_s": "0.2"}
        )
    json.dumps(result)
    assert result["identity"]["boot_marker"] == "50:0,51:0"
    assert [p["address"] for p in result["pumps"]] == ["0x50", "0x51"]
    assert result["pumps"][0]["dart_status"] == 0
    assert result["pumps"][0]["totals"][0] == {"nozzle": 1, "volume_ml": 0, "amount_minor": 0}


async def test_with_reset_on_close_the_pump_clears_its_display_at_once() -> None:
    async with DartSimulator(speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        store = MemoryDriverStore()
        endpoint = sim.endpoints()["tcp"]
        async with DartDriver("line", endpoint, {1: 0x50}, store=store, reset_on_close=True) as d:
            sale = await sell(Rig(sim, d, store), litres=2)
            await d.close_transaction(1, sale.transaction)

            async def reset() -> bool:
                return sim.pump(1).status == 1 and sim.pump(1).display is None

            await until(reset, what="the pump to be reset")
            assert (await status(d, 1)).state is PumpState.IDLE
