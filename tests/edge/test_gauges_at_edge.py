"""Tank gauges at the edge: a TLS gauge line beside the pump line, read on a schedule into the
standard model; a gauge that goes silent or sends damaged frames never stops a pump."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import httpx

from forecourt.edge.gauges import GaugeReader
from forecourt.edge.node import EdgeNode
from forecourt.kernel.clock import SystemClock
from forecourt.protocols.driver import DeviceConfig, DriverContext
from forecourt.protocols.store import MemoryDriverStore
from forecourt.protocols.tls.driver import TlsGaugeDriver
from forecourt.protocols.tls.sim_gauge import GaugeConfig, SimTank
from forecourt.protocols.tls.simulator import GaugeServer, serve
from forecourt.settings import DeviceLine
from tests.edge.conftest import READER_HEADERS, Station
from tests.support import eventually

T = TypeVar("T")

GAUGE = "tanks"
# Station tank -> gauge tank: the gauge counts its tanks in another order than the station.
TANK_MAP = {1: 1, 2: 2, 3: 4, 4: 3}
READ_S = 0.1  # gauge_interval_s: a read every tenth of a second
START_S = 30.0
STOP_S = 15.0


async def until(check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """What ``check`` gives once it gives something truthy; fails after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := await check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return found


def gauge_config(*, unsupported: list[str] | None = None) -> GaugeConfig:
    """Four tanks with figures a single-precision float holds exactly (no drift)."""
    return GaugeConfig(
        tanks=[
            SimTank(
                number=1,
                product="1",
                capacity=30000.0,
                volume=21000.5,
                tc_volume=20977.0,
                height=1543.25,
                water=4.5,
                water_volume=20.0,
                temperature=16.25,
            ),
            SimTank(number=2, product="2", capacity=30000.0, volume=12000.0, height=960.0),
            SimTank(
                number=3,
                product="4",
                capacity=20000.0,
                volume=5000.25,
                tc_volume=5001.0,
                height=512.5,
                temperature=12.75,
            ),
            SimTank(
                number=4,
                product="3",
                capacity=40000.0,
                volume=33000.0,
                tc_volume=32990.0,
                height=2750.0,
                water=12.25,
                water_volume=48.5,
                temperature=-2.5,
            ),
        ],
        unsupported=unsupported or [],
    )


# What /v1/tanks must show for each station tank (TANK_MAP applied): ml, µm and m°C.
EXPECTED = {
    "1": {
        "volume_ml": 21_000_500,
        "tc_volume_ml": 20_977_000,
        "ullage_ml": 8_999_500,
        "product_height_um": 1_543_250,
        "water_height_um": 4_500,
        "temperature_mdegc": 16_250,
        "water_volume_ml": 20_000,
        "product_code": "1",
    },
    "2": {
        "volume_ml": 12_000_000,
        "ullage_ml": 18_000_000,
        "product_height_um": 960_000,
        "water_height_um": 0,
        "water_volume_ml": 0,
        "temperature_mdegc": 15_000,
        "product_code": "2",
    },
    "3": {
        "volume_ml": 33_000_000,
        "tc_volume_ml": 32_990_000,
        "ullage_ml": 7_000_000,
        "product_height_um": 2_750_000,
        "water_height_um": 12_250,
        "temperature_mdegc": -2_500,
        "water_volume_ml": 48_500,
        "product_code": "3",
    },
    "4": {
        "volume_ml": 5_000_250,
        "tc_volume_ml": 5_001_000,
        "ullage_ml": 14_999_750,
        "product_height_um": 512_500,
        "temperature_mdegc": 12_750,
        "product_code": "4",
    },
}


def pump_line(station: Station) -> DeviceLine:
    return DeviceLine(
        name="forecourt",
        protocol="jsonpts",
        transport=station.sim.base_url,
        pumps={n: n for n in range(1, 9)},
        options={"user": "admin", "password": "demo-controller"},
    )


def gauge_line(gauge: GaugeServer) -> DeviceLine:
    return DeviceLine(
        name=GAUGE,
        protocol="tls",
        transport=gauge.endpoint,
        tanks=TANK_MAP,
        options={"timeout_s": 1.0, "connect_timeout_s": 1.0},
    )


@asynccontextmanager
async def running(node: EdgeNode) -> AsyncIterator[httpx.AsyncClient]:
    """The node started, and a client of its own HTTP API; it must stop within STOP_S."""
    await asyncio.wait_for(node.start(), START_S)
    try:
        transport = httpx.ASGITransport(app=node.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://edge", headers=READER_HEADERS
        ) as api:
            yield api
    finally:
        await stopped_within(node.stop(), STOP_S, "the edge node")


async def stopped_within(stop: Awaitable[None], timeout: float, what: str) -> None:
    """Await ``stop``, failing (and naming the tasks still running) if it takes longer than
    ``timeout``: a deadline that a swallowed cancellation cannot turn into a success."""
    stopping = asyncio.ensure_future(stop)
    done, _ = await asyncio.wait([stopping], timeout=timeout)
    if not done:
        running = sorted(
            f"{task.get_name()} at {frame.f_code.co_name}:{frame.f_lineno}"
            for task in asyncio.all_tasks()
            if task is not asyncio.current_task() and task is not stopping
            for frame in task.get_stack(limit=1)
        )
        raise AssertionError(f"{what} did not stop within {timeout} s; still running: {running}")
    stopping.result()


async def tanks_of(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/v1/tanks")
    assert response.status_code == 200, response.text
    (gauge,) = response.json()
    assert gauge["device"] == GAUGE
    return dict(gauge)


async def alarms_of(api: httpx.AsyncClient) -> set[tuple[str, str | None]]:
    status = (await api.get("/v1/status")).json()
    return {(alarm["name"], alarm.get("device")) for alarm in status["alarms"]}


async def test_every_tank_is_shown_in_the_standard_model_after_the_first_read(
    station: Station,
) -> None:
    # Given an edge with a pump line and a TLS gauge line on a simulated console
    async with await serve("127.0.0.1", 0, gauge_config()) as gauge:
        node = station.node(
            devices=[pump_line(station), gauge_line(gauge)], gauge_interval_s=READ_S
        )
        async with running(node) as api:
            # When the gauge has been read once
            read = await until(lambda: _read_at_least(api, 1), 20, what="a first gauge read")
            # Then /v1/tanks shows each station tank in ml, µm and m°C, under the station's
            # numbers, whatever the gauge calls them
            assert read["reachable"] is True
            assert read["read_error"] is None
            assert sorted(read["tanks"]) == ["1", "2", "3", "4"]
            for tank, expected in EXPECTED.items():
                shown = read["tanks"][tank]
                assert shown["tank"] == int(tank)
                assert {k: shown[k] for k in expected} == expected, tank
                assert shown["flags"] == [], tank
                assert shown["measured_at"] is not None
            assert read["health"]["state"] == "online"
            assert read["frames_refused"] == 0
            # And the status says the same, with no gauge alarm
            status = (await api.get("/v1/status")).json()
            assert [t["device"] for t in status["tanks"]] == [GAUGE]
            assert not any(a["name"] == "gauge_unreachable" for a in status["alarms"])


async def _read_at_least(api: httpx.AsyncClient, reads: int) -> dict[str, Any] | None:
    found = await tanks_of(api)
    return found if found["reads"] >= reads else None


async def test_a_silent_gauge_raises_an_alarm_while_the_pumps_sell_and_clears_when_back(
    station: Station,
) -> None:
    async with AsyncExitStack() as consoles:
        gauge = await serve("127.0.0.1", 0, gauge_config())
        consoles.push_async_callback(gauge.close)
        node = station.node(
            devices=[pump_line(station), gauge_line(gauge)], gauge_interval_s=READ_S
        )
        async with running(node) as api:
            (pumps,) = node.controllers
            await until(lambda: _read_at_least(api, 1), 20, what="a read")
            await eventually(lambda: pumps.stats.journaled >= 1, 60, what="a first sale")

            # When the console stops answering (it hears requests, says nothing)
            gauge.simulator.faults.set("no_answer")

            # Then a gauge_unreachable alarm names the gauge line, not the pumps
            await until(
                lambda: _has_alarm(api, ("gauge_unreachable", GAUGE)),
                20,
                what="the gauge_unreachable alarm",
            )
            silent = await tanks_of(api)
            assert silent["reachable"] is False
            assert silent["read_error"]
            # the last reading is kept while the gauge is away
            assert silent["tanks"]["1"]["volume_ml"] == EXPECTED["1"]["volume_ml"]
            # And the pumps keep selling meanwhile
            sold = pumps.stats.journaled
            await eventually(
                lambda: pumps.stats.journaled >= sold + 2, 60, what="sales during the silence"
            )
            assert ("gauge_unreachable", GAUGE) in await alarms_of(api)
            assert not any(name == "controller_unreachable" for name, _ in await alarms_of(api))

            # When the console answers again, it is read again by itself and the alarm clears
            reads = silent["reads"]
            gauge.simulator.faults.clear("no_answer")
            await until(lambda: _read_at_least(api, reads + 1), 20, what="a read again")
            await until(
                lambda: _lacks_alarm(api, ("gauge_unreachable", GAUGE)),
                10,
                what="the alarm to clear",
            )
            back = await tanks_of(api)
            assert back["reachable"] is True
            assert back["failures"] >= 1

            # The same when the console goes away altogether and comes back on its address
            port = gauge.port
            await gauge.close()
            await until(
                lambda: _has_alarm(api, ("gauge_unreachable", GAUGE)),
                20,
                what="the alarm once the console is gone",
            )
            sold = pumps.stats.journaled
            await eventually(
                lambda: pumps.stats.journaled > sold, 60, what="a sale with the console gone"
            )
            again = await serve("127.0.0.1", port, gauge_config())
            consoles.push_async_callback(again.close)  # after the node has stopped
            await until(
                lambda: _lacks_alarm(api, ("gauge_unreachable", GAUGE)),
                20,
                what="the alarm to clear once the console is back",
            )
            assert (await tanks_of(api))["reachable"] is True
            status = (await api.get("/v1/status")).json()
            assert status["tasks"][f"edge-gauge-{GAUGE}"]["restarts"] == 0


async def _has_alarm(api: httpx.AsyncClient, alarm: tuple[str, str]) -> bool:
    return alarm in await alarms_of(api)


async def _lacks_alarm(api: httpx.AsyncClient, alarm: tuple[str, str]) -> bool:
    return alarm not in await alarms_of(api)


async def test_a_frame_with_a_bad_checksum_is_counted_and_never_stops_the_reader(
    station: Station,
) -> None:
    async with await serve("127.0.0.1", 0, gauge_config()) as gauge:
        node = station.node(
            devices=[pump_line(station), gauge_line(gauge)], gauge_interval_s=READ_S
        )
        async with running(node) as api:
            first = await until(lambda: _read_at_least(api, 1), 20, what="a first read")
            assert first["frames_refused"] == 0
            # When the console sends three replies with a wrong checksum, one every few reads
            for spoiled in range(1, 4):
                gauge.simulator.faults.set("corrupt_checksum", "1")
                await until(
                    partial(_refused_at_least, api, spoiled), 20, f"refused frame {spoiled}"
                )
            # Then each one is counted, the request asked again, and the reader keeps reading
            reads = (await tanks_of(api))["reads"]
            after = await until(lambda: _read_at_least(api, reads + 3), 20, what="more reads")
            assert after["frames_refused"] == 3
            assert after["health"]["frames_refused"] == 3
            assert dict(after["health"]["counters"])["refused.bad_checksum"] == 3
            assert after["reachable"] is True
            assert after["failures"] == 0  # the retry had the answer: no read was lost
            for tank, expected in EXPECTED.items():
                assert after["tanks"][tank]["volume_ml"] == expected["volume_ml"]
            status = (await api.get("/v1/status")).json()
            assert status["tasks"][f"edge-gauge-{GAUGE}"] == {
                "running": True,
                "restarts": 0,
                "last_error": None,
                "alarm": False,
            }
            assert not any(a["name"].startswith("task_") for a in status["alarms"])
            assert not any(a["name"] == "gauge_unreachable" for a in status["alarms"])


async def _refused_at_least(api: httpx.AsyncClient, count: int) -> bool:
    return bool((await tanks_of(api))["frames_refused"] >= count)


async def test_a_console_that_does_not_know_deliveries_still_shows_its_inventory(
    station: Station,
) -> None:
    # Given an older console that answers i202 (deliveries) with 9999FF1B
    config = gauge_config(unsupported=["i202"])
    async with await serve("127.0.0.1", 0, config) as gauge:
        node = station.node(
            devices=[pump_line(station), gauge_line(gauge)], gauge_interval_s=READ_S
        )
        async with running(node) as api:
            # When the edge has read it a few times
            shown = await until(
                lambda: _read_at_least(api, 3), 20, what="three reads of a console without i202"
            )
            # Then its inventory is shown all the same, and it is not called unreachable: it
            # answers, it only lacks one report
            assert gauge.simulator.stats.unknown >= 1  # it was asked, and said it does not know
            assert sorted(shown["tanks"]) == ["1", "2", "3", "4"], shown
            assert shown["tanks"]["1"]["volume_ml"] == EXPECTED["1"]["volume_ml"]
            assert shown["reachable"] is True, shown
            assert shown["deliveries"] == {}
            assert ("gauge_unreachable", GAUGE) not in await alarms_of(api)


async def test_a_gauge_reader_stops_promptly_while_its_console_keeps_dropping_the_line() -> None:
    """Stopping the edge stops its gauge readers, whatever the line is doing at that moment:
    here a console that drops the connection at every request, so a reader is often in the
    middle of closing a connection when it is told to stop."""
    async with await serve("127.0.0.1", 0, gauge_config()) as gauge:
        gauge.simulator.faults.set("reboot", "1000000")
        config = DeviceConfig(
            name=GAUGE, protocol="tls", transport=gauge.endpoint, options={"timeout_s": 0.2}
        )
        context = DriverContext(clock=SystemClock(), store=MemoryDriverStore(), timezone="UTC")
        for attempt in range(1, 21):
            reader = GaugeReader(TlsGaugeDriver(config, context), SystemClock(), interval_s=0.001)
            reader.start()
            await until(partial(_failed, reader, attempt % 5 + 1), 10, "failed reads")
            await stopped_within(reader.stop(), 3.0, f"gauge reader {attempt}")
            assert reader.running is False
            await reader.driver.close()


async def _failed(reader: GaugeReader, reads: int) -> bool:
    return reader.failures >= reads
