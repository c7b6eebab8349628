"""A station's devices are configuration: several device lines, each its own driver and
controller; one line that fails never blinds the others; bad configuration is refused."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest
from pydantic import ValidationError

from forecourt.demo import DemoOptions, simulator_config
from forecourt.edge.node import build_edge_node, station_devices
from forecourt.network.handlers import build_snapshot
from forecourt.protocols.driver import DeviceConfigError
from forecourt.settings import DeviceLine, EdgeSettings
from forecourt.sim.pts_controller import SimulatorProcess
from tests.edge.conftest import HqServer, Station
from tests.support import eventually

CREDENTIAL = "a-real-station-credential-0123456789"


def settings(**overrides: object) -> EdgeSettings:
    return EdgeSettings(station="S001", credential=CREDENTIAL, log_json=False, **overrides)


def line(name: str, protocol: str = "jsonpts", **fields: object) -> DeviceLine:
    return DeviceLine(
        name=name,
        protocol=protocol,
        transport=str(fields.pop("transport", "http://127.0.0.1:1")),
        **fields,  # type: ignore[arg-type]
    )


def test_a_pump_on_two_device_lines_is_refused() -> None:
    with pytest.raises(ValidationError, match="pump 2 is on both 'a' and 'b'"):
        settings(devices=[line("a", pumps=[1, 2]), line("b", pumps=[2, 3])])


def test_two_device_lines_with_one_name_are_refused() -> None:
    with pytest.raises(ValidationError, match="two devices are named 'a'"):
        settings(devices=[line("a", pumps=[1]), line("a", pumps=[2])])


def test_a_device_address_used_twice_on_one_line_is_refused() -> None:
    with pytest.raises(ValidationError, match="two station numbers map to one device address"):
        line("a", pumps={1: 0x50, 2: 0x50})


def test_an_unknown_protocol_is_refused_before_anything_starts() -> None:
    with pytest.raises(DeviceConfigError, match="no driver for protocol 'ifsf-lon'"):
        station_devices(settings(devices=[line("a", protocol="ifsf-lon", pumps=[1])]))


def test_several_pump_lines_must_each_name_their_pumps() -> None:
    with pytest.raises(DeviceConfigError, match="names no pumps"):
        station_devices(settings(devices=[line("a", pumps=[1]), line("b")]))


def test_device_lines_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FORECOURT_EDGE_DEVICES",
        '[{"name": "line1", "protocol": "jsonpts", "transport": "http://10.0.0.5",'
        ' "pumps": {"1": 1, "2": 2}, "options": {"password": "secret"}}]',
    )
    found = settings().devices
    assert found is not None
    assert found[0].pumps == {1: 1, 2: 2}
    assert found[0].options == {"password": "secret"}


def journal_devices(path: Path) -> dict[int, set[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT fuelling_point, device_id FROM journal").fetchall()
    found: dict[int, set[str]] = {}
    for fp, device_id in rows:
        found.setdefault(fp, set()).add(device_id)
    return found


async def test_one_device_line_down_never_blinds_the_other(
    station: Station, hq: HqServer, tmp_path: Path
) -> None:
    """Pumps 1-4 on one controller, 5-8 on another (two simulator processes): the second is
    killed; pumps 1-4 keep selling, 5-8 are offline with an alarm naming that line, and sell
    again once it is back — each sale journaled under the device that measured it."""
    snapshot = await build_snapshot(hq.office.db, "S001", station.clock.now())
    config = simulator_config(
        snapshot,
        station.clock.now(),
        {"92": 1, "95": 2, "98": 3, "0": 4},
        DemoOptions(arrivals_per_hour=400),
        seed=5,
    )
    second = SimulatorProcess(config, tmp_path / "pts-b", env=station.clock.to_env())
    await asyncio.to_thread(second.start)
    password = {"password": "demo-controller", "user": "admin"}
    node = station.node(
        devices=[
            line("left", transport=station.sim.base_url, pumps=[1, 2, 3, 4], options=password),
            line("right", transport=second.base_url, pumps=[5, 6, 7, 8], options=password),
        ]
    )
    try:
        await node.start()
        assert len(node.controllers) == 2
        left, right = node.controllers

        await eventually(lambda: left.stats.journaled >= 2 and right.stats.journaled >= 2, 60)
        url = second.base_url
        second.stop()
        await eventually(lambda: not right.reachable, what="the right line to go offline")
        before = left.stats.journaled
        await eventually(lambda: left.stats.journaled >= before + 3, 60)
        states = node.fuelling_points()
        assert {states[n] for n in (5, 6, 7, 8)} == {"offline"}
        assert all(states[n] != "offline" for n in (1, 2, 3, 4))
        alarms = {(a["name"], a.get("device")) for a in node.alarms()}
        assert ("controller_unreachable", "right") in alarms
        assert ("controller_unreachable", "left") not in alarms

        await asyncio.to_thread(second.start, port=int(url.rsplit(":", 1)[1]))
        after = right.stats.journaled
        await eventually(lambda: right.stats.journaled > after, 60)
        assert ("controller_unreachable", "right") not in {
            (a["name"], a.get("device")) for a in node.alarms()
        }
        status = await node.status()
        assert [d["name"] for d in status["devices"]] == ["left", "right"]
        assert status["devices"][1]["pumps"] == [5, 6, 7, 8]
    finally:
        await node.stop()
        second.stop()
    by_pump = journal_devices(station.journal)
    left_ids = set().union(*(by_pump.get(n, set()) for n in (1, 2, 3, 4)))
    right_ids = set().union(*(by_pump.get(n, set()) for n in (5, 6, 7, 8)))
    assert left_ids == {f"left:{next(iter(left_ids)).split(':', 1)[1]}"}
    assert len(right_ids) == 1
    assert next(iter(right_ids)).startswith("right:")


def test_no_device_lines_means_one_jsonpts_controller_from_the_controller_settings() -> None:
    node = build_edge_node(settings(), clock=None)  # type: ignore[arg-type]
    assert len(node.lines) == 1
    assert node.lines[0].config is None
