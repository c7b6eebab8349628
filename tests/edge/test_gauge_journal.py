"""Tank gauges journaled at the edge: every read's inventory, each delivery once, each device
alarm from the read it appears in to the read it is gone in, across an edge restart; a
journal that fails loses one read and never stops the gauge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from forecourt.edge.gauges import GaugeReader
from forecourt.edge.journal import GaugeJournaled, Journal
from forecourt.edge.retention import JournalRetention
from forecourt.protocols.driver import DeviceConfig, DriverContext
from forecourt.protocols.model import DeviceAlarm
from forecourt.protocols.store import MemoryDriverStore
from forecourt.protocols.tls.driver import TlsGaugeDriver
from forecourt.protocols.tls.sim_gauge import GaugeConfig, SimDelivery, SimTank
from forecourt.protocols.tls.simulator import GaugeServer, serve
from tests.edge.forecourt_rig import T0, ManualClock

GAUGE = "tanks"


def console() -> GaugeConfig:
    delivery = SimDelivery(
        started=datetime(2026, 11, 30, 22, 10, tzinfo=UTC),
        ended=datetime(2026, 11, 30, 22, 40, tzinfo=UTC),
        start_volume=4000.0,
        end_volume=21000.5,
        start_height=400.0,
        end_height=1543.25,
    )
    return GaugeConfig(
        tanks=[
            SimTank(
                number=1,
                product="1",
                capacity=30000.0,
                volume=21000.5,
                height=1543.25,
                deliveries=[delivery],
            ),
            SimTank(number=2, product="2", capacity=30000.0, volume=12000.0, height=960.0),
        ]
    )


@asynccontextmanager
async def reader_on(
    gauge: GaugeServer, journal: Journal, clock: ManualClock
) -> AsyncIterator[GaugeReader]:
    config = DeviceConfig(
        name=GAUGE, protocol="tls", transport=gauge.endpoint, options={"timeout_s": 1.0}
    )
    context = DriverContext(clock=clock, store=MemoryDriverStore(), timezone="UTC")
    driver = TlsGaugeDriver(config, context)
    await driver.open()
    try:
        yield GaugeReader(driver, clock, journal=journal, deliveries_every=1)
    finally:
        await driver.close()


async def test_each_read_is_journaled_deliveries_once_and_alarms_from_raised_to_cleared(
    tmp_path: Path,
) -> None:
    # Given an edge journal and a gauge with two tanks, one delivery held, tank 2 raising
    # high water (i205 type 05)
    clock = ManualClock()
    journal = Journal(tmp_path / "edge.db", clock)
    await journal.open()
    heard: list[GaugeJournaled | None] = []
    async with await serve("127.0.0.1", 0, console()) as gauge:
        gauge.simulator.model.set_alarms(2, ["05"])
        async with reader_on(gauge, journal, clock) as reader:
            reader.on_read.append(lambda _reader, journaled: heard.append(journaled))
            # When the gauge is read three times, the alarm going away before the third
            assert await reader.read_once()
            clock.advance(60)
            assert await reader.read_once()
            gauge.simulator.model.set_alarms(2, [])
            clock.advance(60)
            assert await reader.read_once()
    # Then every read's inventory is journaled, newest first
    tank1 = await journal.tank_readings(GAUGE, 1)
    assert len(tank1) == 3
    assert [r["volume_ml"] for r in tank1] == [21_000_500] * 3
    assert tank1[0]["product_height_um"] == 1_543_250
    assert len(await journal.tank_readings(GAUGE, 2)) == 3
    # And the delivery read three times is journaled once, as the gauge recorded it
    deliveries = await journal.tank_deliveries(GAUGE)
    assert len(deliveries) == 1
    assert (deliveries[0]["tank"], deliveries[0]["end_volume_ml"]) == (1, 21_000_500)
    # And the alarm is journaled once, open from the first read, cleared at the third
    (alarm,) = await journal.device_alarms(GAUGE)
    assert (alarm["source"], alarm["number"], alarm["device_code"]) == ("tank", 2, "05")
    assert alarm["first_seen"] == T0
    assert alarm["cleared_at"] == T0 + timedelta(seconds=120)
    # And each read told its listeners what it added
    assert [h.readings for h in heard if h] == [2, 2, 2]
    assert [len(h.deliveries) for h in heard if h] == [1, 0, 0]
    assert [len(h.raised) for h in heard if h] == [1, 0, 0]
    assert [h.cleared for h in heard if h] == [[], [], [("tank", 2, alarm["code"])]]
    await journal.close()


async def test_after_an_edge_restart_a_known_delivery_and_an_open_alarm_are_not_journaled_again(
    tmp_path: Path,
) -> None:
    # Given a read journaled with its delivery and an open alarm, then the edge restarted
    clock = ManualClock()
    async with await serve("127.0.0.1", 0, console()) as gauge:
        gauge.simulator.model.set_alarms(1, ["05"])
        for _ in range(2):
            journal = Journal(tmp_path / "edge.db", clock)
            await journal.open()
            async with reader_on(gauge, journal, clock) as reader:
                # When the new process reads the gauge again
                assert await reader.read_once()
            await journal.close()
            clock.advance(60)
        journal = Journal(tmp_path / "edge.db", clock)
        await journal.open()
    # Then the delivery and the alarm are each there once; the readings twice
    assert len(await journal.tank_deliveries(GAUGE)) == 1
    alarms = await journal.device_alarms(GAUGE)
    assert len(alarms) == 1
    assert alarms[0]["cleared_at"] is None
    assert len(await journal.tank_readings(GAUGE, 1)) == 2
    await journal.close()


async def test_a_journal_that_fails_loses_that_read_only_and_the_gauge_keeps_being_read(
    tmp_path: Path,
) -> None:
    # Given a gauge reader whose journal is closed under it (a disk gone read-only, say)
    clock = ManualClock()
    journal = Journal(tmp_path / "edge.db", clock)
    await journal.open()
    async with await serve("127.0.0.1", 0, console()) as gauge:
        async with reader_on(gauge, journal, clock) as reader:
            await journal.close()
            reader.journal = Journal(tmp_path / "missing" / "x" / "edge.db", clock)  # never opened
            heard: list[GaugeJournaled | None] = []
            reader.on_read.append(lambda _reader, journaled: heard.append(journaled))
            # When it reads the gauge
            answered = await reader.read_once()
            # Then the read answers and is shown, the journal failure is counted, and the
            # listeners hear that nothing was journaled
            assert answered is True
            assert reader.measurements[1].volume_ml == 21_000_500
            assert reader.journal_failures == 1
            assert reader.as_json()["journal_failures"] == 1
            assert heard == [None]


async def test_retention_prunes_readings_past_it_and_keeps_the_rest(tmp_path: Path) -> None:
    # Given readings journaled 100 days ago and now, and 90 days of retention
    clock = ManualClock()
    journal = Journal(tmp_path / "edge.db", clock)
    await journal.open()
    async with await serve("127.0.0.1", 0, console()) as gauge:
        async with reader_on(gauge, journal, clock) as reader:
            assert await reader.read_once()
            clock.advance(100 * 86_400)
            assert await reader.read_once()
    # When retention runs
    await JournalRetention(journal, clock, archive_dir=tmp_path / "archive").run_once()
    # Then only the recent read's readings are left; the delivery stays
    assert len(await journal.tank_readings(GAUGE, 1)) == 1
    assert len(await journal.tank_deliveries(GAUGE)) == 1
    await journal.close()


async def test_an_alarm_the_device_reports_inactive_is_not_journaled_as_open(
    tmp_path: Path,
) -> None:
    # Given a device that reports one alarm active and one as no longer active
    clock = ManualClock()
    journal = Journal(tmp_path / "edge.db", clock)
    await journal.open()
    active = DeviceAlarm("tank", 1, "high_water", "05", raised_at=T0)
    inactive = DeviceAlarm("tank", 2, "overfill", "03", raised_at=T0, active=False)
    # When the read is journaled
    journaled = await journal.record_gauge_read(GAUGE, [], None, [active, inactive])
    # Then only the active one is open
    assert journaled.raised == [active]
    assert [(a["number"], a["cleared_at"]) for a in await journal.device_alarms(GAUGE)] == [
        (1, None)
    ]
    await journal.close()
