"""Our TLS gauge simulator and driver against another project's Veeder-Root TLS client.

The peer is ``veeder-root-tls-socket-library`` (PyPI, eredden/Veeder-Root-TLS-Socket-
Library): its ``TlsSocket.execute`` sends a computer-format command with CR/LF after it, checks
the reply's ``&&`` checksum and refuses ``9999FF1B``; its ``tls_3xx.function_201/205`` parse
the reply's fields. What it reads off our simulator must be what our own driver reads: two
independent implementations of the manual agreeing on the same bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from veeder_root_tls_socket_library import tls_3xx
from veeder_root_tls_socket_library.socket import TlsSocket

from forecourt.kernel.clock import SystemClock
from forecourt.protocols.driver import DeviceConfig, DriverContext
from forecourt.protocols.store import MemoryDriverStore
from forecourt.protocols.tls.codec import decode_request
from forecourt.protocols.tls.driver import TlsGaugeDriver
from forecourt.protocols.tls.simulator import GaugeServer, serve
from tests.protocols.tls.test_driver import station_gauge


@pytest.fixture
async def gauge() -> AsyncIterator[GaugeServer]:
    server = await serve("127.0.0.1", 0, station_gauge())
    try:
        yield server
    finally:
        await server.close()


def peer_execute(port: int, command: str) -> str:
    """The peer's blocking client, as its users call it (one command per connection)."""
    with TlsSocket("127.0.0.1", port) as tls:
        return tls.execute(command, retries=20, timeout=0.1)  # type: ignore[arg-type]


async def our_driver(port: int) -> TlsGaugeDriver:
    config = DeviceConfig(
        name="gauge", protocol="tls", transport=f"tcp://127.0.0.1:{port}", options={}
    )
    driver = TlsGaugeDriver(config, DriverContext(SystemClock(), MemoryDriverStore(), "UTC"))
    await driver.open()
    return driver


async def test_the_peer_client_reads_our_inventory_as_our_driver_does(gauge: GaugeServer) -> None:
    reply = await asyncio.to_thread(peer_execute, gauge.port, "i20100")
    theirs = tls_3xx.function_201(reply)
    driver = await our_driver(gauge.port)
    try:
        ours = {m.tank: m for m in await driver.measurements()}
    finally:
        await driver.close()
    assert [int(t["tank_number"]) for t in theirs["tanks"]] == sorted(ours)
    for tank in theirs["tanks"]:
        mine = ours[int(tank["tank_number"])]
        # Litres, millimetres and °C on the gauge; ml, µm and m°C in our model.
        assert round(tank["volume"] * 1000) == mine.volume_ml
        assert round(tank["tc_volume"] * 1000) == mine.tc_volume_ml
        assert round(tank["ullage"] * 1000) == mine.ullage_ml
        assert round(tank["height"] * 1000) == mine.product_height_um
        assert round(tank["water"] * 1000) == mine.water_height_um
        assert round(tank["temperature"] * 1000) == mine.temperature_mdegc
        assert round(tank["water_volume"] * 1000) == mine.water_volume_ml
        assert tank["product_code"] == mine.product_code


async def test_the_peer_client_reads_our_alarms_as_our_driver_does() -> None:
    """One alarm per tank: the peer's ``function_205`` reads only the first alarm code of a
    tank and then loses its place (with two, it raises on the rest of the record), so the
    comparison keeps to what both can read; our own codec tests cover several per tank."""
    config = station_gauge()
    config.tanks[1].alarms = ["05"]
    server = await serve("127.0.0.1", 0, config)
    try:
        reply = await asyncio.to_thread(peer_execute, server.port, "i20500")
        driver = await our_driver(server.port)
        try:
            ours = await driver.alarms()
        finally:
            await driver.close()
    finally:
        await server.close()
    theirs = tls_3xx.function_205(reply)
    their_codes = {
        (int(item["tank_number"]), item["alarm_type"])
        for item in theirs["alarms"]
        if item["number_of_alarms"]
    }
    assert their_codes == {(2, "05")}
    assert their_codes == {(alarm.number, alarm.device_code) for alarm in ours}


async def test_an_unknown_command_is_refused_as_the_peer_expects(gauge: GaugeServer) -> None:
    with pytest.raises(ValueError, match="Unsupported command"):
        await asyncio.to_thread(peer_execute, gauge.port, "i99900")


def test_our_codec_reads_the_command_the_peer_sends() -> None:
    """The peer writes SOH + function code + CR LF (its fix for i72E); we tolerate the CR LF."""
    request = decode_request(b"\x01" + b"i20100" + b"\r\n")
    assert (request.function, request.tank) == ("i201", 0)
