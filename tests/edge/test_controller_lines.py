"""One controller per device line: it drives only its own pumps, names its device by its line,
and acts on what its driver tells it (a new identity, a device back online, a pump that
moved) without waiting for its next tick.

The forecourt is the in-process PTS-2 simulator of :mod:`tests.edge.forecourt_rig` (jsonPTS
over an ASGI transport, on a hand-driven clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forecourt.edge.controller import ForecourtController
from forecourt.edge.journal import Journal
from forecourt.edge.node import EdgeNode, build_edge_node, station_devices
from forecourt.kernel.clock import SystemClock
from forecourt.protocols.dart.application import PumpStatusCode
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.jsonpts.driver import CAPABILITIES
from forecourt.protocols.model import (
    Capability,
    DeviceEvent,
    DeviceHealth,
    DeviceHealthState,
    DeviceTransaction,
    HealthChanged,
    IdentityChanged,
    PumpState,
    PumpStatus,
    PumpStatusChanged,
    TransactionFinished,
)
from forecourt.settings import DeviceLine, EdgeSettings
from tests.edge.forecourt_rig import T0, Rig, snapshot
from tests.support import eventually


def identity_reads(rig: Rig) -> int:
    """How many times the controller asked the PTS-2 who it is (its identity POST)."""
    return rig.wire.sent.count("GetUniqueIdentifier")


# --------------------------------------------------------------------------- its own pumps


async def test_a_controller_drives_only_the_pumps_of_its_line(tmp_path: Path) -> None:
    # Given a station with pumps 1 and 2, and a controller for a line that serves pump 2 only
    async with Rig(tmp_path, serves=frozenset({2})) as rig:
        assert rig.controller.pumps() == [2]
        # When a customer waits at pump 1
        rig.customer(pump_grade=92, litres=5)
        await rig.poll(40)
        # Then this controller neither authorises nor journals nor even watches pump 1
        assert rig.station.pumps[1].phase.value != "filling"
        assert "PumpAuthorize" not in rig.wire.sent
        assert await rig.journaled() == []
        assert 1 not in rig.controller.states()
        # And a customer at its own pump 2 is sold as usual
        await rig.sell(pump_grade=95, litres=5, number=2)
        (sale,) = await rig.journaled()
        assert sale["fuelling_point"] == 2


async def test_a_controller_of_the_stations_only_line_drives_every_pump(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        assert rig.controller.pumps() == [1, 2]


# --------------------------------------------------------------------------- its device


async def test_a_controller_names_its_device_by_its_line_and_journals_under_that_name(
    tmp_path: Path,
) -> None:
    # Given a controller for the line "left" of a station with several lines
    async with Rig(tmp_path, device="left") as rig:
        device_id = (await rig.driver.identity()).device_id
        # When it sells
        await rig.sell(litres=3)
        # Then the device is named line:device, in its identity and on the journaled sale
        assert rig.controller.device_id == f"left:{device_id}"
        (sale,) = await rig.journaled()
        assert sale["device_id"] == f"left:{device_id}"


async def test_the_controller_of_the_stations_only_line_names_the_device_as_it_says(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        device_id = (await rig.driver.identity()).device_id
        await rig.sell(litres=3)
        assert rig.controller.device_id == device_id
        (sale,) = await rig.journaled()
        assert sale["device_id"] == device_id


async def test_each_lines_controller_runs_as_a_task_named_after_its_line(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "edge.db", SystemClock())
    controllers = [
        ForecourtController(None, journal, lambda: None, SystemClock(), device=device)
        for device in (None, "left", "right")
    ]
    assert [c.task_name for c in controllers] == [
        "edge-controller",
        "edge-controller-left",
        "edge-controller-right",
    ]


# --------------------------------------------------------------------------- its driver's events


async def restarted_meanwhile(rig: Rig) -> None:
    """The controller has read the identity of a PTS-2 up for ten minutes; then the PTS-2
    restarts (its uptime falls: a new boot marker)."""
    rig.clock.advance(600)
    await rig.poll()
    assert rig.controller.identity is not None
    assert rig.controller.epoch == 0
    rig.restart_controller(reset_counters=False)


@pytest.mark.parametrize(
    "event",
    [
        IdentityChanged("pts", reason="pump 0x50 power-cycled"),
        HealthChanged("pts", DeviceHealth("pts", DeviceHealthState.ONLINE)),
    ],
    ids=["identity_changed", "back_online"],
)
async def test_a_new_identity_or_a_device_back_online_is_read_at_once_and_begins_an_epoch(
    tmp_path: Path, event: IdentityChanged | HealthChanged
) -> None:
    async with Rig(tmp_path) as rig:
        # Given a controller that knows its device, which restarted since
        await restarted_meanwhile(rig)
        reads = identity_reads(rig)
        rig.controller.wake.clear()
        # When the driver says the identity changed, or that the device is back online
        rig.controller.on_event(event)
        # Then the controller's loop is woken, and its next poll asks who answers: a new
        # boot marker, a new epoch, an alarm
        if isinstance(event, IdentityChanged):
            assert rig.controller.wake.is_set()
        await rig.poll()
        assert identity_reads(rig) == reads + 1
        assert rig.controller.epoch == 1
        assert "controller_restarted" in {a["name"] for a in rig.controller.alarms.as_json()}
        # And it asks once: the polls after that do not ask again
        await rig.poll(3)
        assert identity_reads(rig) == reads + 1
        assert rig.controller.epoch == 1


@pytest.mark.parametrize(
    "event",
    [
        PumpStatusChanged("pts", PumpStatus(1, PumpState.CALLING, nozzle=1)),
        TransactionFinished(
            "pts",
            DeviceTransaction(
                pump=1,
                nozzle=1,
                transaction=4,
                volume_ml=2000,
                amount_minor=1578,
                unit_price_mmu=789_000,
                totalizer_start_ml=None,
                totalizer_end_ml=None,
                started_at=None,
                ended_at=T0,
            ),
        ),
    ],
    ids=["pump_status_changed", "transaction_finished"],
)
async def test_a_pump_event_makes_the_controller_poll_now_not_at_its_next_tick(
    tmp_path: Path, event: PumpStatusChanged | TransactionFinished
) -> None:
    # Given a controller whose loop polls every 60 s, running, over a driver with a loop of
    # its own (its events may come between polls)
    async with Rig(tmp_path, poll_interval_s=60.0) as rig:
        rig.driver.capabilities = CAPABILITIES - {Capability.EVENTS_ONLY_WHEN_ASKED}
        controller = rig.controller
        controller.start()
        try:
            await eventually(lambda: controller.stats.polls >= 1, 10, what="the first poll")
            await asyncio.sleep(0)
            polls = controller.stats.polls
            # When the driver reports a pump event
            controller.on_event(event)
            # Then the loop polls again at once
            await eventually(lambda: controller.stats.polls > polls, 10, what="a second poll")
        finally:
            await controller.stop()


async def test_a_driver_reporting_only_when_asked_does_not_make_the_controller_poll_twice(
    tmp_path: Path,
) -> None:
    # Given a jsonPTS line (the driver reports while the controller asks it), and a customer
    # arriving at pump 1
    async with Rig(tmp_path, poll_interval_s=60.0) as rig:
        assert Capability.EVENTS_ONLY_WHEN_ASKED in rig.driver.capabilities
        seen: list[DeviceEvent] = []
        rig.driver.subscribe(lambda event: (seen.append(event), rig.controller.on_event(event)))
        await rig.poll()
        rig.customer()
        seen.clear()
        # When the controller polls, and the driver reports the pump's changes during polls
        for _ in range(40):
            rig.controller.wake.clear()
            await rig.poll()
            # Then after each poll the loop is not woken for another (that poll saw them)
            assert not rig.controller.wake.is_set()
            if len({e.status.state for e in seen if isinstance(e, PumpStatusChanged)}) >= 2:
                break
        else:
            raise AssertionError(f"the pump's changes were not reported: {seen}")


# --------------------------------------------------------------------------- the station's lines

CREDENTIAL = "a-real-station-credential-0123456789"


def dead_endpoint(scheme: str = "tcp") -> str:
    """An address nothing listens on (a line whose device is away)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"{scheme}://127.0.0.1:{port}"


def dart_line(name: str, transport: str, pumps: dict[int, int]) -> DeviceLine:
    return DeviceLine(
        name=name,
        protocol="dart",
        transport=transport,
        pumps=pumps,
        options={"timeout_s": 0.25, "offline_after": 2, "status_refresh_s": 0.3},
    )


@contextlib.asynccontextmanager
async def started_node(tmp_path: Path, lines: list[DeviceLine]) -> AsyncIterator[EdgeNode]:
    """An edge node of station S001 (pumps 1 and 2) with these device lines, started with
    its snapshot in hand and HQ away; its controllers' own tick is 30 s."""
    settings = EdgeSettings(
        station="S001",
        credential=CREDENTIAL,
        hq_url=dead_endpoint("http"),
        journal_path=tmp_path / "edge.db",
        poll_interval_s=30.0,
        gauge_interval_s=0.2,
        snapshot_refresh_s=600.0,
        log_json=False,
        devices=lines,
    )
    node = build_edge_node(settings, SystemClock())
    node.snapshots.current = snapshot((1, 2))
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def alarm_devices(node: EdgeNode) -> set[tuple[str, str | None]]:
    return {(a["name"], a.get("device")) for a in node.alarms()}


async def test_each_lines_driver_wakes_its_own_controller_which_drives_only_its_pumps(
    tmp_path: Path,
) -> None:
    # Given pump 1 on DART line "a" and pump 2 on DART line "b", each its own simulator
    async with (
        DartSimulator(speed=40, flow_l_per_min=60) as left,
        DartSimulator(speed=40, flow_l_per_min=60) as right,
    ):
        await left.start("127.0.0.1:0")
        await right.start("127.0.0.1:0")
        lines = [
            dart_line("a", left.endpoints()["tcp"], {1: 0x50}),
            dart_line("b", right.endpoints()["tcp"], {2: 0x50}),
        ]
        async with started_node(tmp_path, lines) as node:
            a, b = node.controllers
            await eventually(
                lambda: node.fuelling_points() == {1: "idle", 2: "idle"}, 15, what="both idle"
            )
            # When a customer lifts the nozzle of pump 2
            right.lift(1, 1)
            # Then line b's own controller hears of it and authorises it now, not in 30 s
            await eventually(
                lambda: right.pump(1).status in (PumpStatusCode.AUTHORIZED, PumpStatusCode.FILLING),
                10,
                what="pump 2 authorised",
            )
            assert left.pump(1).status is not PumpStatusCode.FILLING
            # And each controller drives, names and runs as its own line
            status = await node.status()
            assert [(d["name"], d["pumps"]) for d in status["devices"]] == [("a", [1]), ("b", [2])]
            assert status["devices"][0]["device_id"].startswith("a:dart:")
            assert status["devices"][1]["device_id"].startswith("b:dart:")
            assert {"edge-controller-a", "edge-controller-b"} <= set(status["tasks"])
            assert (a.stats.pump_errors, b.stats.pump_errors) == (0, 0)
            # When line b's device goes away, its alarm names line b, and only it
            await right.stop()
            await eventually(
                lambda: ("controller_unreachable", "b") in alarm_devices(node),
                15,
                what="line b unreachable",
            )
            assert ("controller_unreachable", "a") not in alarm_devices(node)


async def test_with_one_pump_line_and_a_gauge_every_alarm_names_its_device(
    tmp_path: Path,
) -> None:
    # Given one DART line and one tank gauge, both away
    lines = [
        dart_line("pumps", dead_endpoint(), {1: 0x50, 2: 0x51}),
        DeviceLine(name="tanks", protocol="tls", transport=dead_endpoint(), tanks={1: 1}),
    ]
    async with started_node(tmp_path, lines) as node:
        # Then the line's controller and the gauge each raise an alarm naming its device
        await eventually(
            lambda: (
                {("controller_unreachable", "pumps"), ("gauge_unreachable", "tanks")}
                <= alarm_devices(node)
            ),
            15,
            what="both alarms",
        )
        # And the station's only pump line drives every pump, under its device's own name
        (controller,) = node.controllers
        assert controller.pumps() == [1, 2]
        assert controller.task_name == "edge-controller"


def register_both_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A protocol that has a pump driver and a gauge driver (as a forecourt controller that
    also reads probes would)."""
    from forecourt.protocols import driver as registry

    registry.pump_protocols()  # the built-in drivers first
    monkeypatch.setitem(registry._PUMP_DRIVERS, "both-kinds", registry._PUMP_DRIVERS["dart"])
    monkeypatch.setitem(registry._GAUGE_DRIVERS, "both-kinds", registry._GAUGE_DRIVERS["tls"])


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"tanks": {1: 1}}, "gauge"),
        ({"pumps": {1: 0x50}}, "pump"),
        ({"pumps": {1: 0x50}, "tanks": {1: 1}}, "pump"),
        ({}, "pump"),
    ],
)
def test_a_line_of_a_protocol_of_both_kinds_is_a_gauge_only_when_it_names_tanks_alone(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, dict[int, int]], kind: str
) -> None:
    register_both_kinds(monkeypatch)
    line = DeviceLine(name="x", protocol="both-kinds", transport="tcp://127.0.0.1:1", **fields)
    pumps, gauges = station_devices(
        EdgeSettings(station="S001", credential=CREDENTIAL, log_json=False, devices=[line])
    )
    assert [c.name for c in (gauges if kind == "gauge" else pumps)] == ["x"]
    assert not (pumps if kind == "gauge" else gauges)


@pytest.mark.parametrize("protocol", ["jsonpts", "dart"])
def test_a_pump_protocol_line_naming_only_tanks_is_still_a_pump_line(protocol: str) -> None:
    line = DeviceLine(name="x", protocol=protocol, transport="tcp://127.0.0.1:1", tanks={1: 1})
    pumps, gauges = station_devices(
        EdgeSettings(station="S001", credential=CREDENTIAL, log_json=False, devices=[line])
    )
    assert ([c.name for c in pumps], gauges) == (["x"], [])


@pytest.mark.parametrize(
    ("line", "drives"),
    [
        (dart_line("pumps", "tcp://127.0.0.1:1", {1: 0x50}), [1]),
        (
            DeviceLine(
                name="pts",
                protocol="jsonpts",
                transport="http://127.0.0.1:1",
                options={"password": "secret"},
            ),
            [1, 2],
        ),
    ],
    ids=["names_pump_1", "names_none"],
)
def test_the_stations_only_pump_line_drives_the_pumps_it_names_or_else_every_one(
    tmp_path: Path, line: DeviceLine, drives: list[int]
) -> None:
    # Given a station with pumps 1 and 2 and a single pump line
    settings = EdgeSettings(
        station="S001",
        credential=CREDENTIAL,
        journal_path=tmp_path / "edge.db",
        log_json=False,
        devices=[line],
    )
    node = build_edge_node(settings, SystemClock())
    node.snapshots.current = snapshot((1, 2))
    # Then its controller drives the pumps the line names, or all of them when it names none
    (controller,) = node.controllers
    assert controller.pumps() == drives
    assert controller.task_name == "edge-controller"
