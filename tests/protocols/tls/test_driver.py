"""TlsGaugeDriver against the simulated gauge over a real TCP socket and over a pty.

Every test that takes ``gauge`` runs twice: once on ``tcp://127.0.0.1:<port 0>`` and once on
``serial://<pty slave>``. Timeouts are short (0.4 s) so a silent gauge fails fast; nothing
sleeps for a fixed time where a condition can be awaited.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from forecourt.kernel.clock import SystemClock
from forecourt.protocols.driver import DeviceConfig, DeviceConfigError, DriverContext, GaugeDriver
from forecourt.protocols.model import (
    AlarmReported,
    Capability,
    DeliveryRecorded,
    DeviceEvent,
    DeviceHealthState,
    DeviceRejected,
    DriverUnavailable,
    FrameRefused,
    HealthChanged,
    TankMeasured,
)
from forecourt.protocols.store import MemoryDriverStore
from forecourt.protocols.tls.driver import TlsGaugeDriver, create, poll_once
from forecourt.protocols.tls.sim_gauge import GaugeConfig, SimDelivery, SimTank
from forecourt.protocols.tls.simulator import GaugeServer, PtyGauge, open_pty, serve

PARIS = ZoneInfo("Europe/Paris")
TIMEOUT_S = 0.4


def station_gauge(**settings: Any) -> GaugeConfig:
    """Two tanks with values exact in single precision (so the expected ml are exact)."""
    return GaugeConfig(
        tanks=[
            SimTank(
                number=1,
                product="1",
                capacity=30000.0,
                volume=12000.5,
                tc_volume=11950.125,
                height=1234.25,
                water=10.5,
                water_volume=20.25,
                temperature=18.75,
                deliveries=[
                    SimDelivery(
                        started=datetime(2026, 11, 30, 6, 0, tzinfo=PARIS),
                        ended=datetime(2026, 11, 30, 6, 25, tzinfo=PARIS),
                        start_volume=4000.0,
                        end_volume=12000.5,
                        start_tc_volume=3990.0,
                        end_tc_volume=11950.125,
                        start_water=10.5,
                        end_water=10.5,
                        start_temperature=14.5,
                        end_temperature=18.75,
                        start_height=410.0,
                        end_height=1234.25,
                    )
                ],
            ),
            SimTank(number=2, product="2", volume=8000.0, height=800.0, alarms=["05", "11"]),
        ],
        timezone="Europe/Paris",
        **settings,
    )


async def start(kind: str, config: GaugeConfig) -> GaugeServer | PtyGauge:
    if kind == "tcp":
        return await serve("127.0.0.1", 0, config)
    return await open_pty(config)


@pytest.fixture(params=["tcp", "pty"])
async def gauge(request: pytest.FixtureRequest) -> AsyncIterator[GaugeServer | PtyGauge]:
    line = await start(request.param, station_gauge())
    yield line
    await line.close()


class Recorded:
    """A driver and the events it gave its sink."""

    def __init__(self, driver: TlsGaugeDriver) -> None:
        self.driver = driver
        self.events: list[DeviceEvent] = []
        driver.subscribe(self.events.append)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def make_driver(
    endpoint: str, *, tanks: dict[int, int] | None = None, **options: Any
) -> TlsGaugeDriver:
    config = DeviceConfig(
        name="gauge-1",
        protocol="tls",
        transport=endpoint,
        tanks=tanks or {},
        options={"timeout_s": TIMEOUT_S, **options},
    )
    context = DriverContext(clock=SystemClock(), store=MemoryDriverStore(), timezone="Europe/Paris")
    return create(config, context)


@pytest.fixture
async def recorded(gauge: GaugeServer | PtyGauge) -> AsyncIterator[Recorded]:
    driver = make_driver(gauge.endpoint)
    await driver.open()
    yield Recorded(driver)
    await driver.close()


# --- reading ---------------------------------------------------------------------------------


async def test_the_driver_reads_the_inventory_in_millilitres_micrometres_and_millidegrees(
    recorded,
):
    tank_1, tank_2 = await recorded.driver.measurements()

    assert tank_1.tank == 1
    assert tank_1.volume_ml == 12_000_500
    assert tank_1.tc_volume_ml == 11_950_125
    assert tank_1.ullage_ml == 17_999_500
    assert tank_1.product_height_um == 1_234_250
    assert tank_1.water_height_um == 10_500
    assert tank_1.temperature_mdegc == 18_750
    assert tank_1.water_volume_ml == 20_250
    assert tank_1.product_code == "1"
    assert tank_1.measured_at.tzinfo is not None
    assert ("volume", "463B8200") in tank_1.raw
    assert dict(tank_1.raw)["gauge_time"].isdigit()
    assert (tank_2.tank, tank_2.volume_ml, tank_2.product_code) == (2, 8_000_000, "2")


async def test_the_driver_reads_the_deliveries_with_the_gauges_local_times(recorded):
    (delivery,) = await recorded.driver.deliveries()

    assert delivery.tank == 1
    assert delivery.started_at == datetime(2026, 11, 30, 6, 0, tzinfo=PARIS)
    assert delivery.ended_at == datetime(2026, 11, 30, 6, 25, tzinfo=PARIS)
    assert delivery.start_volume_ml == 4_000_000
    assert delivery.end_volume_ml == 12_000_500
    assert delivery.volume_ml == 8_000_500
    assert delivery.start_tc_volume_ml == 3_990_000
    assert delivery.end_tc_volume_ml == 11_950_125
    assert delivery.start_temperature_mdegc == 14_500
    assert delivery.end_product_height_um == 1_234_250
    assert delivery.product_code == "1"


async def test_the_driver_reads_the_active_alarms_by_their_standard_names(recorded):
    alarms = await recorded.driver.alarms()

    assert [(a.source, a.number, a.code, a.device_code) for a in alarms] == [
        ("tank", 2, "low_product", "05"),
        ("tank", 2, "delivery_needed", "11"),
    ]


async def test_the_driver_gives_its_readings_to_the_sink_and_goes_online(recorded):
    await recorded.driver.measurements()
    await recorded.driver.deliveries()
    await recorded.driver.alarms()

    assert [e.measurement.tank for e in recorded.of(TankMeasured)] == [1, 2]
    assert [e.delivery.tank for e in recorded.of(DeliveryRecorded)] == [1]
    assert [e.alarm.code for e in recorded.of(AlarmReported)] == ["low_product", "delivery_needed"]
    assert [e.health.state for e in recorded.of(HealthChanged)] == [DeviceHealthState.ONLINE]
    assert all(e.device == "gauge-1" for e in recorded.events)
    health = recorded.driver.health()
    assert (health.state, health.frames_refused, health.timeouts) == ("online", 0, 0)


async def test_the_identity_is_the_configured_address_with_the_consoles_software(recorded, gauge):
    identity = await recorded.driver.identity()

    assert identity.device_id == str(recorded.driver.endpoint)
    assert identity.device_id.startswith(gauge.endpoint.split("?")[0])
    assert identity.firmware == "346330-100-B"
    assert identity.boot_marker is None


async def test_station_tank_numbers_are_mapped_to_the_gauges_and_filtered(gauge):
    driver = make_driver(gauge.endpoint, tanks={7: 2, 8: 1})
    try:
        assert [m.tank for m in await driver.measurements()] == [7, 8]
        (only,) = await driver.measurements([7])
        assert (only.tank, only.volume_ml) == (7, 8_000_000)
        assert [a.number for a in await driver.alarms([8])] == []
        assert [d.tank for d in await driver.deliveries()] == [8]
    finally:
        await driver.close()


async def test_a_gauge_sending_fewer_fields_leaves_the_missing_values_none():
    config = GaugeConfig(tanks=[SimTank(number=1, volume=1000.0, fields=3)])
    async with await serve("127.0.0.1", 0, config) as server:
        driver = make_driver(server.endpoint)
        try:
            (m,) = await driver.measurements()
        finally:
            await driver.close()
    assert (m.volume_ml, m.ullage_ml, m.product_height_um, m.water_volume_ml) == (
        1_000_000,
        29_000_000,
        None,
        None,
    )


async def test_the_driver_converts_from_gallons_inches_and_fahrenheit_when_told():
    config = GaugeConfig(
        tanks=[SimTank(number=1, volume=1000.0, height=40.0, temperature=68.0, capacity=8000.0)]
    )
    async with await serve("127.0.0.1", 0, config) as server:
        driver = make_driver(
            server.endpoint, volume_unit="us_gallons", length_unit="inches", temperature_unit="F"
        )
        try:
            (m,) = await driver.measurements()
        finally:
            await driver.close()
    assert m.volume_ml == 3_785_412  # 1000 × 3785.411784
    assert m.product_height_um == 1_016_000  # 40 × 25400
    assert m.temperature_mdegc == 20_000  # 68 °F


async def test_requests_asked_together_go_on_the_line_one_at_a_time(recorded, gauge):
    measured, alarms, deliveries = await asyncio.gather(
        recorded.driver.measurements(), recorded.driver.alarms(), recorded.driver.deliveries()
    )
    assert (len(measured), len(alarms), len(deliveries)) == (2, 2, 1)
    assert gauge.simulator.stats.answered == 3


# --- faults survived -------------------------------------------------------------------------


async def test_a_corrupt_checksum_is_refused_counted_and_the_retry_reads_the_tanks(recorded, gauge):
    gauge.simulator.faults.set("corrupt_checksum", "1")

    assert len(await recorded.driver.measurements()) == 2

    (refused,) = recorded.of(FrameRefused)
    assert refused.reason == "bad_checksum"
    assert refused.frame_hex.startswith("01693230313030")  # SOH i20100
    health = recorded.driver.health()
    assert health.state == DeviceHealthState.DEGRADED
    assert health.frames_refused == 1
    assert dict(health.counters)["refused.bad_checksum"] == 1

    assert len(await recorded.driver.measurements()) == 2  # the next poll is clean
    assert recorded.driver.health().state == DeviceHealthState.ONLINE


async def test_a_gauge_that_stops_answering_goes_offline_and_comes_back_by_itself(recorded, gauge):
    await recorded.driver.measurements()
    gauge.simulator.faults.set("no_answer")

    with pytest.raises(DriverUnavailable):
        await recorded.driver.measurements()
    health = recorded.driver.health()
    assert health.state == DeviceHealthState.OFFLINE
    assert health.timeouts == 2  # the request and its one retry
    with pytest.raises(DriverUnavailable):
        await recorded.driver.alarms()

    gauge.simulator.faults.clear("no_answer")
    assert len(await recorded.driver.measurements()) == 2
    assert recorded.driver.health().state == DeviceHealthState.ONLINE
    assert [e.health.state for e in recorded.of(HealthChanged)] == ["online", "offline", "online"]


async def test_a_reply_split_into_several_writes_is_read_whole(recorded, gauge):
    gauge.simulator.faults.set("split", "6")

    assert len(await recorded.driver.measurements()) == 2
    assert len(await recorded.driver.deliveries()) == 1
    assert recorded.of(FrameRefused) == []
    assert recorded.driver.health().state == DeviceHealthState.ONLINE


async def test_two_replies_merged_in_one_write_are_read_and_the_extra_one_discarded(
    recorded, gauge
):
    gauge.simulator.faults.set("merge", "1")

    assert len(await recorded.driver.measurements()) == 2
    assert len(await recorded.driver.alarms()) == 2  # not the left-over i201 reply
    assert dict(recorded.driver.health().counters)["stale_frames"] == 1
    assert recorded.of(FrameRefused) == []


async def test_garbage_before_a_reply_is_skipped_and_counted(recorded, gauge):
    gauge.simulator.faults.set("garbage", "20")

    assert len(await recorded.driver.measurements()) == 2
    assert dict(recorded.driver.health().counters)["garbage_bytes"] == 20
    assert recorded.of(FrameRefused) == []


async def test_lower_case_hex_digits_are_read_like_upper_case(recorded, gauge):
    gauge.simulator.faults.set("lowercase")

    tank_1, _ = await recorded.driver.measurements()
    assert tank_1.volume_ml == 12_000_500
    assert recorded.of(FrameRefused) == []


async def test_a_slow_reply_within_the_timeout_is_waited_for(recorded, gauge):
    gauge.simulator.faults.set("delay", "0.1")

    assert len(await recorded.driver.measurements()) == 2
    assert recorded.driver.health().timeouts == 0


async def test_a_reply_slower_than_the_timeout_fails_and_the_gauge_recovers_after(recorded, gauge):
    gauge.simulator.faults.set("delay", "1.0")
    with pytest.raises(DriverUnavailable):
        await recorded.driver.measurements()
    assert recorded.driver.health().timeouts == 2

    gauge.simulator.faults.clear("delay")
    assert len(await recorded.driver.measurements()) == 2


async def test_a_gauge_that_reboots_is_reconnected_and_read_on_the_retry(recorded, gauge):
    await recorded.driver.measurements()
    gauge.simulator.faults.set("reboot")

    assert len(await recorded.driver.measurements()) == 2
    health = recorded.driver.health()
    assert health.state == DeviceHealthState.DEGRADED
    assert dict(health.counters)["connects"] == 2
    assert dict(health.counters)["retries"] == 1


async def test_a_reply_longer_than_the_maximum_frame_is_refused_as_oversized(gauge):
    config = DeviceConfig(
        name="gauge-1", protocol="tls", transport=gauge.endpoint, options={"timeout_s": TIMEOUT_S}
    )
    context = DriverContext(clock=SystemClock(), store=MemoryDriverStore(), timezone="UTC")
    driver = Recorded(TlsGaugeDriver(config, context, max_frame=64))
    try:
        with pytest.raises(DriverUnavailable):
            await driver.driver.measurements()  # the i201 reply of two tanks is 154 bytes
        assert [e.reason for e in driver.of(FrameRefused)] == ["oversized", "oversized"]
        assert len(await driver.driver.alarms()) == 2  # short replies still pass
    finally:
        await driver.driver.close()


# --- refusals and configuration ----------------------------------------------------------


async def test_a_function_the_console_does_not_know_raises_device_rejected():
    async with await serve("127.0.0.1", 0, station_gauge(unsupported=["i201"])) as server:
        driver = make_driver(server.endpoint)
        try:
            with pytest.raises(DeviceRejected) as caught:
                await driver.measurements()
            assert caught.value.details["device_code"] == "9999"
            assert caught.value.details["function"] == "i20100"
            assert driver.health().state == DeviceHealthState.ONLINE  # it did answer
            assert len(await driver.alarms()) == 2
        finally:
            await driver.close()


async def test_a_console_without_the_revision_report_still_has_an_identity():
    async with await serve("127.0.0.1", 0, station_gauge(unsupported=["i902"])) as server:
        driver = make_driver(server.endpoint)
        try:
            identity = await driver.identity()
        finally:
            await driver.close()
    assert identity.firmware is None
    assert identity.device_id == server.endpoint


async def test_the_right_security_code_is_answered_and_a_wrong_one_is_not():
    async with await serve("127.0.0.1", 0, station_gauge(security_code="ABC123")) as server:
        right = make_driver(server.endpoint, security_code="ABC123")
        wrong = make_driver(server.endpoint, security_code="XYZ789")
        missing = make_driver(server.endpoint)
        try:
            assert len(await right.measurements()) == 2
            with pytest.raises(DriverUnavailable):
                await wrong.measurements()
            with pytest.raises(DriverUnavailable):
                await missing.measurements()
        finally:
            for driver in (right, wrong, missing):
                await driver.close()
        # The wrong code was sent twice (request and retry); a request without a code is still
        # waiting for its twelfth character when the driver gives up.
        assert server.simulator.stats.wrong_security_code == 2


async def test_a_gauge_not_listening_is_unavailable_until_it_starts():
    server = await serve("127.0.0.1", 0, station_gauge())
    port = server.port
    await server.close()
    driver = make_driver(f"tcp://127.0.0.1:{port}")
    try:
        with pytest.raises(DriverUnavailable):
            await driver.open()
        with pytest.raises(DriverUnavailable):
            await driver.measurements()
        assert driver.health().state == DeviceHealthState.OFFLINE
        async with await serve("127.0.0.1", port, station_gauge()):
            assert len(await driver.measurements()) == 2
        assert driver.health().state == DeviceHealthState.ONLINE
    finally:
        await driver.close()


def test_the_factory_makes_a_gauge_driver_for_tank_readings():
    driver = make_driver("tcp://127.0.0.1:10001")
    assert isinstance(driver, GaugeDriver)
    assert driver.capabilities == frozenset({Capability.TANK_GAUGE})
    assert driver.name == "gauge-1"
    assert driver.health().state == DeviceHealthState.OFFLINE


@pytest.mark.parametrize(
    "options",
    [
        {"volume_unit": "barrels"},
        {"length_unit": "cubits"},
        {"temperature_unit": "kelvin"},
        {"timeout_s": "0"},
        {"timeout_s": "soon"},
        {"security_code": "12345"},
    ],
)
def test_bad_options_are_refused_when_the_driver_is_made(options):
    with pytest.raises(DeviceConfigError):
        make_driver("tcp://127.0.0.1:10001", **options)


def test_a_bad_transport_is_refused_when_the_driver_is_made():
    with pytest.raises(DeviceConfigError):
        make_driver("ftp://gauge:21")


# --- one poll ----------------------------------------------------------------------------------


async def test_poll_once_gives_identity_measurements_alarms_and_deliveries_as_json(gauge):
    result = await poll_once(
        gauge.endpoint, {"timeout_s": str(TIMEOUT_S), "timezone": "Europe/Paris"}
    )
    json.dumps(result)

    assert result["protocol"] == "tls"
    assert result["identity"]["firmware"] == "346330-100-B"
    assert [m["volume_ml"] for m in result["measurements"]] == [12_000_500, 8_000_000]
    assert [a["code"] for a in result["alarms"]] == ["low_product", "delivery_needed"]
    (delivery,) = result["deliveries"]
    assert delivery["volume_ml"] == 8_000_500
    assert delivery["started_at"] == "2026-11-30T06:00:00+01:00"
    assert result["units"] == {
        "volume": "litres",
        "length": "millimetres",
        "temperature": "celsius",
    }
    assert result["health"]["state"] == "online"
