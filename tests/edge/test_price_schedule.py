"""A scheduled price change at the pumps, with an injectable clock: a DART pump that is idle at
the instant is sent the new prices then (never before), one dispensing at the instant keeps
the price it was authorised at and is sent the new ones once idle; on jsonPTS the price
travels with each authorisation. Each sale journals the price version it ran under."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from forecourt.edge.controller import ForecourtController
from forecourt.edge.domain import FpState
from forecourt.edge.journal import Journal
from forecourt.edge.prices import PriceSchedule
from forecourt.network.contracts import StationSnapshot
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.store import MemoryDriverStore
from tests.edge.forecourt_rig import PRICE_92, PRICE_95, T0, ManualClock, Rig, snapshot
from tests.protocols.dart.test_driver import driver_for
from tests.support import eventually

AT = T0 + timedelta(minutes=10)  # the instant the new prices take effect
NEW_92, NEW_95 = 815_000, 869_000


def with_new_prices(snap: StationSnapshot) -> StationSnapshot:
    """``snap`` with a second price set: 92 at 8.15 and 95 at 8.69 from ``AT``."""
    body: dict[str, Any] = snap.model_dump(mode="json")
    body["prices"] += [
        {
            "price_id": f"new{grade}",
            "grade": grade,
            "scope": "chain",
            "scope_code": "C",
            "milli_minor_per_litre": price,
            "currency": "CNY",
            "effective_from": AT.isoformat(),
        }
        for grade, price in (("92", NEW_92), ("95", NEW_95))
    ]
    return StationSnapshot.model_validate(body)


@dataclass
class DartStation:
    sim: DartSimulator
    controller: ForecourtController
    schedule: PriceSchedule
    journal: Journal
    clock: ManualClock

    def shown(self, pump: int) -> tuple[int, ...] | None:
        return self.sim.pump(pump).prices

    async def sales(self) -> list[dict[str, Any]]:
        return [p.payload for p in await self.journal.pending_uploads(100)]


@asynccontextmanager
async def dart_station(tmp_path: Path) -> AsyncIterator[DartStation]:
    clock = ManualClock()
    snap = with_new_prices(snapshot((1, 2)))
    async with DartSimulator(pumps=2, nozzles=1, speed=20, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        driver = driver_for(sim, MemoryDriverStore())
        journal = Journal(tmp_path / "edge.db", clock)
        await journal.open()
        await driver.open()
        controller = ForecourtController(
            driver, journal, lambda: snap, clock, poll_interval_s=0.02, device="dart"
        )
        controller.start()
        try:
            await eventually(lambda: controller.reachable, 10, what="the DART line")
            await eventually(
                lambda: (
                    all(m.state is FpState.IDLE for m in controller.machines.values())
                    and len(controller.machines) == 2
                ),
                10,
                what="both pumps idle",
            )
            yield DartStation(sim, controller, PriceSchedule(controller), journal, clock)
        finally:
            await controller.stop()
            await driver.close()
            await journal.close()


async def test_dart_pumps_show_the_new_prices_at_the_instant_and_a_dispensing_one_once_idle(
    tmp_path: Path,
) -> None:
    async with dart_station(tmp_path) as station:
        # Given both DART pumps idle and sent the prices in force (7.89 and 8.42)
        assert sorted(await station.schedule.tick()) == [1, 2]
        old = {1: station.shown(1), 2: station.shown(2)}
        assert None not in old.values()
        # And a customer at pump 2, authorised at the old price, still fuelling
        station.sim.lift(2, 1)
        await eventually(
            lambda: station.controller.machines[2].state is FpState.FUELLING,
            10,
            what="pump 2 fuelling",
        )
        # When the clock is a second before the instant, nothing is sent
        station.clock.at = AT - timedelta(seconds=1)
        assert await station.schedule.tick() == []
        assert station.shown(1) == old[1]
        # When the instant comes
        station.clock.at = AT
        sent = await station.schedule.tick()
        # Then the idle pump 1 shows the new price at once; pump 2, dispensing, is left alone
        assert sent == [1]
        (new_1,) = station.shown(1) or ()
        assert new_1 * PRICE_92 == old[1][0] * NEW_92
        assert station.shown(2) == old[2]
        assert station.schedule.pending == {2}
        # And when pump 2's customer hangs up, the sale is journaled at the price it was
        # authorised at, with that price's version
        station.sim.hang(2)
        await eventually(lambda: station.controller.machines[2].state is FpState.IDLE, 10)
        (sale,) = await station.sales()
        assert (sale["fuelling_point"], sale["unit_price_mmu"]) == (2, PRICE_95)
        assert sale["price_version"] == "p95"
        # And pump 2 is sent the new price once idle
        assert await station.schedule.tick() == [2]
        (new_2,) = station.shown(2) or ()
        assert new_2 * PRICE_95 == old[2][0] * NEW_95
        assert station.schedule.pending == set()
        # And the next sale on pump 1 runs at the new price, journaled with its version
        station.sim.lift(1, 1, target_ml=2000, hang=True)
        await eventually(
            lambda: len(station.controller.stats.__dict__) and station.controller.stats.closed >= 2,
            15,
        )
        sales = await station.sales()
        last = next(s for s in sales if s["fuelling_point"] == 1)
        assert (last["unit_price_mmu"], last["price_version"]) == (NEW_92, "new92")
        # And every download is audited, and a tick with nothing new sends nothing
        assert await station.schedule.tick() == []
        assert station.schedule.downloads == 4


async def test_on_jsonpts_a_sale_authorised_before_the_instant_keeps_its_price(
    tmp_path: Path,
) -> None:
    # Given a jsonPTS station whose snapshot changes 92 to 8.15 at the instant
    async with Rig(tmp_path) as rig:
        rig.snap = with_new_prices(rig.snap)
        assert PriceSchedule(rig.controller).pushes is False  # the price rides the authorisation
        # When a customer is authorised before the instant and fuels across it
        rig.customer(litres=20)
        for _ in range(40):
            await rig.poll()
            if rig.controller.machines[1].state is FpState.FUELLING:
                break
        rig.clock.at = AT + timedelta(seconds=5)
        for _ in range(400):
            await rig.poll()
            if rig.controller.stats.closed:
                break
        # Then that sale is at the old price and version
        (first,) = await rig.journaled()
        assert (first["unit_price_mmu"], first["price_version"]) == (PRICE_92, "p92")
        # And the next one, authorised after the instant, at the new price
        await rig.sell(number=2)
        second = (await rig.journaled())[-1]
        assert (second["unit_price_mmu"], second["price_version"]) == (NEW_92, "new92")
