"""Pump commands through the edge's HTTP API, over real simulator processes: a simulated PTS-2
controller (jsonPTS) drives pumps 1-4, a Wayne DART line (``forecourt simulate dart``) pump 5.

A cashier terminal authorises with a preset or a full tank, stops, suspends, resumes, stops
the whole forecourt in an emergency and releases a pump after it; every command is audited;
whatever the state or the input, a refusal is a 4xx (503 for a line that does not answer) in
the project's error envelope, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from forecourt.demo import DemoOptions, DeviceProcess, simulator_config
from forecourt.edge.node import EdgeNode, build_edge_node
from forecourt.kernel.clock import SimulatedClock
from forecourt.network.contracts import StationSnapshot
from forecourt.network.handlers import build_snapshot, issue_credential
from forecourt.settings import DeviceLine, EdgeSettings
from forecourt.sim.pts_controller import SimulatorProcess
from tests.edge.conftest import READER_HEADERS, READER_TOKEN, HqServer
from tests.support import eventually

TILL1 = "till-one-secret-0123456789"
TILL2 = "till-two-secret-0123456789"
JSONPTS_PUMPS = (1, 2, 3, 4)
DART_PUMP = 5  # on the DART line at address 0x50 (the simulator's pump 1)
DART_SPEED = 2.0  # simulated seconds per wall second on the DART line: 40 L/min is 1.3 L/s
GRADE_IDS = {"92": 1, "95": 2, "98": 3, "0": 4}


@pytest.fixture
def clock() -> SimulatedClock:
    # Slower than the other edge tests: a customer fuels for seconds of wall time, long enough
    # for a cashier to suspend, resume and stop the fuelling.
    return SimulatedClock.ending_before_now(3600, 10.0)


def port_in(path: Path) -> int | None:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() else None


@dataclass
class Forecourt:
    node: EdgeNode
    api: httpx.AsyncClient
    pts: SimulatorProcess
    dart: DeviceProcess
    dart_control: int
    snapshot: StationSnapshot
    journal: Path

    async def dart_command(self, **command: Any) -> dict[str, Any]:
        """One command on the DART simulator's control port (lift/hang nozzles, state)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.dart_control)
        try:
            writer.write(json.dumps(command).encode() + b"\n")
            await writer.drain()
            answer: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), 5))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert answer["ok"], answer
        return answer

    async def arrivals(self, on: bool) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.post(f"{self.pts.base_url}/sim/control", json={"arrivals": on})
            answer.raise_for_status()

    async def get(self, path: str) -> httpx.Response:
        """A read of the edge's API, with the station's read-only credential."""
        return await self.api.get(path, headers=READER_HEADERS)

    async def pump(self, pump: int) -> dict[str, Any]:
        answer = await self.get(f"/v1/pumps/{pump}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    async def in_state(self, pump: int, *states: str) -> dict[str, Any] | None:
        found = await self.pump(pump)
        return found if found["state"] in states else None

    async def post(self, path: str, body: Any = None, *, secret: str | None = TILL1) -> Any:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return await self.api.post(path, json=body, headers=headers)

    def audits(self, action: str | None = None) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT actor, action, target, details FROM audit_outbox ORDER BY id"
            ).fetchall()
        return [
            {"actor": a, "action": act, "target": t, "details": json.loads(d)}
            for a, act, t, d in rows
            # Without an action: the commands' trail (the price schedule's downloads aside).
            if act == action or (action is None and act != "pump.prices")
        ]

    def price(self, pump: int, nozzle: int) -> tuple[str, int]:
        fp = self.snapshot.fuelling_point(pump)
        assert fp is not None
        grade = next(n.grade for n in fp.nozzles if n.number == nozzle)
        price = self.snapshot.prices_at(self.node.clock.now())[grade]
        return price.price_id, price.milli_minor_per_litre


@pytest.fixture
async def forecourt(
    tmp_path: Path, clock: SimulatedClock, hq: HqServer
) -> AsyncIterator[Forecourt]:
    """HQ, a PTS-2 process for pumps 1-4 (customers off until a test lets them in), a DART
    process for pump 5 (customers played through its control port), and an edge node with
    two terminal credentials that authorises nothing by itself (a cashier station)."""
    _, token = await issue_credential(hq.office.db, "S001")
    snapshot = await build_snapshot(hq.office.db, "S001", clock.now())
    config = simulator_config(
        snapshot, clock.now(), GRADE_IDS, DemoOptions(arrivals_per_hour=600), 3, pumps=JSONPTS_PUMPS
    )
    config["customers"]["arrivals"] = False
    pts = SimulatorProcess(config, tmp_path / "pts", env=clock.to_env())
    (tmp_path / "dart").mkdir()
    line_file, control_file = tmp_path / "dart" / "port", tmp_path / "dart" / "control-port"
    dart = DeviceProcess(
        "dart",
        [
            *("--listen", "127.0.0.1:0", "--pumps", "1", "--nozzles", "3"),
            *("--control", "127.0.0.1:0", "--speed", str(DART_SPEED)),
            *("--port-file", str(line_file), "--control-port-file", str(control_file)),
        ],
        tmp_path / "dart",
    )
    node: EdgeNode | None = None
    api: httpx.AsyncClient | None = None
    try:
        await asyncio.to_thread(pts.start)

        def ports() -> tuple[int, int] | None:
            line, control = port_in(line_file), port_in(control_file)
            return None if line is None or control is None else (line, control)

        line_port, control_port = await dart.start(ports)
        password = {"user": "admin", "password": "demo-controller"}
        settings = EdgeSettings(
            station="S001",
            hq_url=hq.url,
            credential=token,
            journal_path=tmp_path / "edge.db",
            poll_interval_s=0.05,
            log_json=False,
            sync_backoff_initial_s=0.05,
            sync_backoff_max_s=0.5,
            min_free_disk_bytes=0,
            terminal_tokens={"till1": TILL1, "till2": TILL2},
            reader_tokens={"tests": READER_TOKEN},
            devices=[
                DeviceLine(
                    name="pts",
                    protocol="jsonpts",
                    transport=pts.base_url,
                    pumps={n: n for n in JSONPTS_PUMPS},
                    options=password,
                ),
                DeviceLine(
                    name="dart",
                    protocol="dart",
                    transport=f"tcp://127.0.0.1:{line_port}",
                    pumps={DART_PUMP: 0x50},
                    options={
                        "nozzles": 3,
                        "timeout_s": 0.2,
                        "offline_retry_s": 0.5,
                        "status_refresh_s": 0.5,
                        "command_timeout_s": 3.0,
                    },
                ),
            ],
        )
        node = build_edge_node(settings, clock)
        for controller in node.controllers:
            controller.auto_authorise = False
        await node.start()
        api = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=node.app), base_url="http://edge", timeout=30
        )
        site = Forecourt(node, api, pts, dart, control_port, snapshot, settings.journal_path)
        await eventually(
            lambda: all(c.reachable for c in node.controllers), 30, what="both lines reachable"
        )
        await eventually(lambda: site.in_state(DART_PUMP, "idle"), 30, what="the DART pump")
        yield site
    finally:
        if api is not None:
            await api.aclose()
        if node is not None:
            await node.stop()
        dart.stop()
        pts.stop()


def envelope(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error envelope of a refused command, checked for its status and code."""
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


async def calling_jsonpts_pump(site: Forecourt) -> tuple[int, int]:
    """Let customers in until one waits at a pump with a nozzle up: (pump, nozzle)."""
    await site.arrivals(True)

    async def calling() -> tuple[int, int] | None:
        for pump in JSONPTS_PUMPS:
            found = await site.pump(pump)
            if found["state"] == "calling":
                return pump, int(found["nozzle"])
        return None

    try:
        return await eventually(calling, 60, interval=0.05, what="a customer calling")
    finally:
        await site.arrivals(False)


# --------------------------------------------------------------------------- authorise


async def test_a_cashier_authorises_a_dart_pump_with_a_volume_preset_and_the_sale_journals_like_an_automatic_one(  # noqa: E501
    forecourt: Forecourt,
) -> None:
    site = forecourt
    # Given a customer lifting nozzle 1 of the DART pump, wanting more than the preset
    await site.dart_command(cmd="lift", pump=1, nozzle=1, target_ml=40_000, hang=True)
    await eventually(lambda: site.in_state(DART_PUMP, "calling"), 20, what="the call")
    # When the cashier authorises it for 3 litres
    answer = await site.post(f"/v1/pumps/{DART_PUMP}/authorize", {"preset": {"volume_ml": 3000}})
    # Then the pump runs at the price in force, and the answer says so
    assert answer.status_code == 200, answer.text
    body = answer.json()
    price_id, price = site.price(DART_PUMP, 1)
    assert body["state"] in ("authorised", "fuelling", "end_of_transaction")
    assert (body["nozzle"], body["unit_price_mmu"], body["price_version"]) == (1, price, price_id)
    assert body["preset"] == {"type": "volume", "volume_ml": 3000, "amount_minor": None}
    # And the sale stops at the preset and is journaled with its price version and its start
    # totalizer, exactly as an automatic authorisation journals it
    sales = await eventually(lambda: site_sales(site), 30, what="the sale journaled")
    (sale,) = sales
    assert sale["volume_ml"] == 3000
    assert sale["unit_price_mmu"] == price
    assert sale["price_version"] == price_id
    assert sale["totalizer_start_ml"] is not None
    assert sale["totalizer_end_ml"] - sale["totalizer_start_ml"] == 3000
    # And the command is audited under the terminal's name
    (audit,) = site.audits("pump.authorize")
    assert audit["actor"] == "till1"
    assert audit["target"] == f"fp:{DART_PUMP}"
    assert audit["details"]["preset"] == {"type": "volume", "volume_ml": 3000, "amount_minor": None}
    assert audit["details"]["price_version"] == price_id


async def site_sales(site: Forecourt) -> list[dict[str, Any]]:
    """Every sale the edge journaled (uploaded to HQ or not), in journal order."""
    with contextlib.closing(sqlite3.connect(f"file:{site.journal}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT payload FROM journal ORDER BY seq").fetchall()
    return [json.loads(payload) for (payload,) in rows]


async def test_a_prepay_by_amount_on_an_idle_jsonpts_pump_gives_the_device_transaction_and_price(
    forecourt: Forecourt,
) -> None:
    site = forecourt
    # Given an idle PTS-2 pump
    assert (await site.pump(2))["state"] == "idle"
    # When the cashier authorises nozzle 2 for 100.00 before anyone lifts it
    answer = await site.post(
        "/v1/pumps/2/authorize", {"nozzle": 2, "preset": {"amount_minor": 10000}}
    )
    # Then the pump waits authorised, under the device's transaction number, at the price
    assert answer.status_code == 200, answer.text
    body = answer.json()
    price_id, price = site.price(2, 2)
    assert body["state"] == "authorised"
    assert isinstance(body["device_txn"], int)
    assert body["device_txn"] > 0
    assert (body["unit_price_mmu"], body["price_version"]) == (price, price_id)
    # When the cashier stops it again (nobody came)
    stopped = await site.post("/v1/pumps/2/stop")
    # Then it is free again, and both commands are audited
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["state"] == "idle"
    assert [a["action"] for a in site.audits()] == ["pump.authorize", "pump.stop"]
    assert site.audits("pump.stop")[0]["details"] == {
        "state_before": "authorised",
        "state_after": "idle",
    }


async def test_a_full_tank_is_given_only_when_asked_for(forecourt: Forecourt) -> None:
    site = forecourt
    # Given a customer calling at a PTS-2 pump
    pump, nozzle = await calling_jsonpts_pump(site)
    # When the cashier sends no preset and does not ask for a full tank
    refused = await site.post(f"/v1/pumps/{pump}/authorize", {"nozzle": nozzle})
    # Then it is refused, the pump still calls
    envelope(refused, 422, "pump.preset_required")
    # When the cashier asks for a full tank
    answer = await site.post(f"/v1/pumps/{pump}/authorize", {"full": True})
    # Then the pump is released for the nozzle that is up
    assert answer.status_code == 200, answer.text
    assert answer.json()["preset"]["type"] == "full_tank"
    assert answer.json()["nozzle"] == nozzle
    assert [a["details"].get("refused") for a in site.audits("pump.authorize")] == [
        "pump.preset_required",
        None,
    ]


# --------------------------------------------------------------------------- suspend, resume, stop


@pytest.mark.parametrize("protocol", ["jsonpts", "dart"])
async def test_a_fuelling_is_suspended_resumed_and_stopped_and_journaled_with_what_flowed(
    forecourt: Forecourt, protocol: str
) -> None:
    site = forecourt
    # Given a customer fuelling a full tank on a pump of this protocol
    if protocol == "dart":
        pump = DART_PUMP
        await site.dart_command(cmd="lift", pump=1, nozzle=2, target_ml=60_000, hang=True)
        await eventually(lambda: site.in_state(pump, "calling"), 20, what="the call")
    else:
        pump, _ = await calling_jsonpts_pump(site)
    answer = await site.post(f"/v1/pumps/{pump}/authorize", {"full": True})
    assert answer.status_code == 200, answer.text
    await eventually(lambda: site.in_state(pump, "fuelling"), 30, what="product flowing")
    # When the cashier suspends it
    suspended = await site.post(f"/v1/pumps/{pump}/suspend")
    # Then it is suspended; suspending again or resuming twice is refused by the state rule
    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["state"] == "suspended"
    again = envelope(await site.post(f"/v1/pumps/{pump}/suspend"), 409, "pump.state_forbids")
    assert again["details"]["state"] == "suspended"
    # When the cashier resumes it
    resumed = await site.post(f"/v1/pumps/{pump}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["state"] in ("fuelling", "authorised")
    await eventually(lambda: site.in_state(pump, "fuelling"), 30, what="flowing again")
    # When the cashier stops it
    stopped = await site.post(f"/v1/pumps/{pump}/stop", secret=TILL2)
    # Then the pump stops (a DART pump shows the ended filling until it is read), and the
    # partial sale is journaled once
    assert stopped.status_code == 200, stopped.text
    await eventually(
        lambda: site.in_state(pump, "stopped", "end_of_transaction", "idle"), 30, what="stopped"
    )
    sales = await eventually(lambda: site_sales(site), 30, what="the stopped sale journaled")
    assert len(sales) == 1
    assert 0 < sales[0]["volume_ml"] < 60_000
    assert sales[0]["fuelling_point"] == pump
    # And every command is audited under the terminal that sent it
    trail = [(a["actor"], a["action"], a["details"].get("refused")) for a in site.audits()]
    assert trail[:5] == [
        ("till1", "pump.authorize", None),
        ("till1", "pump.suspend", None),
        ("till1", "pump.suspend", "pump.state_forbids"),
        ("till1", "pump.resume", None),
        ("till2", "pump.stop", None),
    ]


# --------------------------------------------------------------------------- emergency stop


async def test_an_emergency_stop_halts_a_dart_and_a_jsonpts_line_at_once_until_each_is_released(
    forecourt: Forecourt,
) -> None:
    site = forecourt
    # Given the DART pump fuelling and a PTS-2 pump authorised in advance
    await site.dart_command(cmd="lift", pump=1, nozzle=1, target_ml=60_000, hang=True)
    await eventually(lambda: site.in_state(DART_PUMP, "calling"), 20, what="the call")
    answer = await site.post(f"/v1/pumps/{DART_PUMP}/authorize", {"full": True})
    assert answer.status_code == 200, answer.text
    await eventually(lambda: site.in_state(DART_PUMP, "fuelling"), 30, what="product flowing")
    prepaid = await site.post(
        "/v1/pumps/1/authorize", {"nozzle": 1, "preset": {"volume_ml": 20_000}}
    )
    assert prepaid.status_code == 200, prepaid.text
    # When a cashier presses the emergency stop
    answer = await site.post("/v1/forecourt/emergency-stop")
    # Then every pump of both lines is stopped, each reported
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["all_stopped"] is True, body
    assert [(p["pump"], p["line"], p["stopped"]) for p in body["pumps"]] == [
        (1, "pts", True),
        (2, "pts", True),
        (3, "pts", True),
        (4, "pts", True),
        (5, "dart", True),
    ]
    # And what flowed on the DART pump is journaled; nothing flows any more
    sales = await eventually(lambda: site_sales(site), 30, what="the stopped DART sale")
    assert [s["fuelling_point"] for s in sales] == [DART_PUMP]
    # And no pump can be authorised until it is released
    blocked = await site.post("/v1/pumps/3/authorize", {"nozzle": 1, "preset": {"volume_ml": 5000}})
    envelope(blocked, 409, "pump.emergency_stopped")
    assert {a["name"] for a in site.node.alarms()} >= {f"emergency_stop_fp{n}" for n in range(1, 6)}
    # When the PTS-2 pump is released (the controller takes a resume) it sells again
    released = await site.post("/v1/pumps/3/release")
    assert released.status_code == 200, released.text
    assert released.json()["state"] == "idle"
    again = await site.post("/v1/pumps/3/authorize", {"nozzle": 1, "preset": {"volume_ml": 5000}})
    assert again.status_code == 200, again.text
    # When the DART pump is released (its stopped sale journaled and closed), it is reset
    await eventually(lambda: site.in_state(DART_PUMP, "stopped"), 30, what="switched off")
    await eventually(lambda: _no_open_sales(site), 30, what="the stopped sale closed at the pump")
    released = await site.post(f"/v1/pumps/{DART_PUMP}/release")
    assert released.status_code == 200, released.text
    assert released.json()["state"] == "idle"
    await site.dart_command(cmd="hang", pump=1)
    await site.dart_command(cmd="lift", pump=1, nozzle=1, target_ml=2000, hang=True)
    dart_again = await site.post(
        f"/v1/pumps/{DART_PUMP}/authorize", {"preset": {"volume_ml": 1000}, "nozzle": 1}
    )
    assert dart_again.status_code == 200, dart_again.text
    await eventually(lambda: len_sales(site, 2), 30, what="the DART pump selling again")
    # And each pump's stop and each release is audited
    assert len(site.audits("pump.emergency_stop")) == 5
    assert [a["target"] for a in site.audits("pump.release")] == ["fp:3", f"fp:{DART_PUMP}"]


async def _no_open_sales(site: Forecourt) -> bool:
    return not await site.node.journal.open_sales()


async def len_sales(site: Forecourt, count: int) -> bool:
    return len(await site_sales(site)) >= count


async def test_an_emergency_stop_racing_an_authorisation_leaves_the_pump_stopped(
    forecourt: Forecourt,
) -> None:
    site = forecourt
    # Given the DART pump has sold once (it holds its prices: a pump never programmed ignores
    # a switch-off, there being nothing to stop) and a customer calls at it
    await site.dart_command(cmd="lift", pump=1, nozzle=1, target_ml=1000, hang=True)
    await eventually(lambda: site.in_state(DART_PUMP, "calling"), 20, what="the first call")
    first = await site.post(f"/v1/pumps/{DART_PUMP}/authorize", {"full": True})
    assert first.status_code == 200, first.text
    await eventually(lambda: len_sales(site, 1), 30, what="the first sale")
    await eventually(lambda: site.in_state(DART_PUMP, "idle"), 30, what="the pump free")
    await site.dart_command(cmd="lift", pump=1, nozzle=1, target_ml=60_000, hang=True)
    await eventually(lambda: site.in_state(DART_PUMP, "calling"), 20, what="the call")
    # When a cashier authorises it while another presses the emergency stop
    authorised, stopped = await asyncio.gather(
        site.post(f"/v1/pumps/{DART_PUMP}/authorize", {"full": True}),
        site.post("/v1/forecourt/emergency-stop", secret=TILL2),
    )
    # Then the emergency stop holds whichever came first: the pump ends switched off
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["all_stopped"] is True, stopped.text
    if authorised.status_code != 200:
        envelope(authorised, 409, "pump.emergency_stopped")

    async def switched_off() -> bool:
        state = await site.dart_command(cmd="state")
        return bool(state["pumps"][0]["status"] == 7)  # DART SWITCHED OFF

    await eventually(switched_off, 20, what="the DART pump switched off")
    assert (await site.pump(DART_PUMP))["state"] in ("stopped", "end_of_transaction")


# --------------------------------------------------------------------------- races and faults


async def test_two_cashiers_authorising_one_pump_at_once_release_it_once(
    forecourt: Forecourt,
) -> None:
    site = forecourt
    # Given an idle PTS-2 pump
    # When two terminals authorise it at the same moment
    body = {"nozzle": 1, "preset": {"volume_ml": 10_000}}
    first, second = await asyncio.gather(
        site.post("/v1/pumps/4/authorize", body, secret=TILL1),
        site.post("/v1/pumps/4/authorize", body, secret=TILL2),
    )
    # Then exactly one authorisation reaches the pump; the other is refused by its state
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 409], (first.text, second.text)
    loser = first if first.status_code == 409 else second
    assert envelope(loser, 409, "pump.state_forbids")["details"]["state"] == "authorised"
    refused = [a for a in site.audits("pump.authorize") if a["details"].get("refused")]
    assert len(site.audits("pump.authorize")) == 2
    assert len(refused) == 1
    # And the poll loop, racing the commands, authorised nothing twice
    assert site.node.controllers[0].stats.authorisations == 1


async def test_a_command_while_the_device_line_is_down_is_503_with_the_reason(
    forecourt: Forecourt,
) -> None:
    site = forecourt
    # Given the PTS-2 controller process is gone
    site.pts.stop()
    # When the cashier authorises or stops one of its pumps
    authorise = await site.post(
        "/v1/pumps/1/authorize", {"nozzle": 1, "preset": {"volume_ml": 5000}}
    )
    stop = await site.post("/v1/pumps/1/stop")
    # Then each is refused as unavailable, saying which line does not answer, and audited
    for answer in (authorise, stop):
        error = envelope(answer, 503, "pump.device_unavailable")
        assert "'pts'" in error["message"]
    assert [a["details"]["refused"] for a in site.audits()] == ["pump.device_unavailable"] * 2
    # And the pumps of the other line are still served
    assert (await site.pump(DART_PUMP))["state"] == "idle"


async def test_an_emergency_stop_with_a_line_down_says_which_pumps_it_could_not_stop(
    forecourt: Forecourt,
) -> None:
    site = forecourt
    # Given the PTS-2 controller process is gone
    site.pts.stop()
    # When a cashier presses the emergency stop
    answer = await site.post("/v1/forecourt/emergency-stop")
    # Then the answer names each pump of that line as not stopped, with why
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["all_stopped"] is False
    by_pump = {p["pump"]: p for p in body["pumps"]}
    for pump in JSONPTS_PUMPS:
        assert by_pump[pump]["stopped"] is False
        assert by_pump[pump]["error"]["code"] == "pump.device_unavailable"
    # And the edge still holds those pumps: none is authorised, by it or a cashier, until
    # each is released
    assert site.node.controllers[0].emergency_stopped == set(JSONPTS_PUMPS)
    refused = [a for a in site.audits("pump.emergency_stop") if a["details"].get("refused")]
    assert {a["target"] for a in refused} >= {f"fp:{n}" for n in JSONPTS_PUMPS}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"nozzle": 1, "preset": {"volume_ml": 0}}, "pump.preset_invalid"),
        ({"nozzle": 1, "preset": {"amount_minor": -500}}, "pump.preset_invalid"),
        ({"nozzle": 1, "preset": {"volume_ml": 500_001}}, "pump.preset_above_maximum"),
        ({"nozzle": 1, "preset": {"amount_minor": 1_000_001}}, "pump.preset_above_maximum"),
        ({"nozzle": 1}, "pump.preset_required"),
        ({"nozzle": 1, "full": True, "preset": {"volume_ml": 1000}}, "pump.preset_required"),
        ({"preset": {"volume_ml": 1000}}, "pump.nozzle_required"),
        ({"nozzle": 9, "preset": {"volume_ml": 1000}}, "pump.nozzle_unknown"),
        ({"nozzle": 1, "preset": {"volume_ml": "lots"}}, "request.invalid"),
        ({"nozzle": 1, "preset": {"volume_ml": 1000, "amount_minor": 1000}}, "request.invalid"),
        ({"nozzle": 1, "preset": {"volume_ml": 1.5}}, "request.invalid"),
        ({"nozzle": 1, "full": True, "tip": 5}, "request.invalid"),
        ("full", "request.invalid"),
    ],
)
async def test_a_bad_authorisation_is_refused_with_422_in_the_envelope_and_audited(
    forecourt: Forecourt, body: Any, code: str
) -> None:
    site = forecourt
    # Given an idle pump on each line
    for pump in (1, DART_PUMP):
        # When the cashier sends a bad authorisation
        answer = await site.post(f"/v1/pumps/{pump}/authorize", body)
        # Then it is refused, 422 in the envelope, and the pump stays idle
        envelope(answer, 422, code)
        assert (await site.pump(pump))["state"] == "idle"
    # And each refusal is audited with its code
    assert [a["details"]["refused"] for a in site.audits("pump.authorize")] == [code, code]


async def test_a_body_that_is_not_json_is_refused_as_invalid(forecourt: Forecourt) -> None:
    answer = await forecourt.api.post(
        "/v1/pumps/1/authorize",
        content=b"{" * 100_000,
        headers={"Authorization": f"Bearer {TILL1}", "Content-Type": "application/json"},
    )
    envelope(answer, 422, "request.invalid")


@pytest.mark.parametrize(
    ("command", "state_needed"),
    [("stop", "authorised"), ("suspend", "fuelling"), ("resume", "suspended")],
)
async def test_a_command_the_pumps_state_forbids_is_409_with_the_state(
    forecourt: Forecourt, command: str, state_needed: str
) -> None:
    site = forecourt
    for pump in (2, DART_PUMP):
        # Given an idle pump; When the cashier sends a command that needs another state
        answer = await site.post(f"/v1/pumps/{pump}/{command}")
        # Then it is refused with the pump's state and what the command needs
        error = envelope(answer, 409, "pump.state_forbids")
        assert error["details"]["state"] == "idle"
        assert state_needed in error["details"]["allowed"]
    assert len(site.audits(f"pump.{command}")) == 2


async def test_a_command_for_an_unknown_pump_is_404_and_audited(forecourt: Forecourt) -> None:
    site = forecourt
    for path in ("/v1/pumps/42/authorize", "/v1/pumps/42/stop", "/v1/pumps/6/suspend"):
        envelope(await site.post(path, {"full": True}), 404, "pump.unknown")
    envelope(await site.get("/v1/pumps/42"), 404, "pump.unknown")
    assert [a["details"]["refused"] for a in site.audits()] == ["pump.unknown"] * 3


@pytest.mark.parametrize("secret", [None, "not-a-terminal-secret-at-all", TILL1[:-1]])
async def test_a_command_without_a_terminal_credential_is_401_and_reaches_no_pump(
    forecourt: Forecourt, secret: str | None
) -> None:
    site = forecourt
    for path in ("/v1/pumps/1/authorize", "/v1/forecourt/emergency-stop"):
        answer = await site.post(path, {"nozzle": 1, "full": True}, secret=secret)
        envelope(answer, 401, "auth.terminal_credential")
    assert (await site.pump(1))["state"] == "idle"
    assert not site.node.controllers[0].emergency_stopped


async def test_the_pumps_are_listed_with_their_line_and_state(forecourt: Forecourt) -> None:
    answer = await forecourt.get("/v1/pumps")
    assert answer.status_code == 200, answer.text
    assert [(p["pump"], p["line"], p["state"]) for p in answer.json()] == [
        (1, "pts", "idle"),
        (2, "pts", "idle"),
        (3, "pts", "idle"),
        (4, "pts", "idle"),
        (5, "dart", "idle"),
    ]


async def test_with_auto_authorise_on_a_call_is_authorised_once_and_a_later_cashier_is_refused(
    forecourt: Forecourt,
) -> None:
    site = forecourt
    # Given the DART line authorising calling pumps by itself
    dart = site.node.controllers[1]
    dart.auto_authorise = True
    # When a customer lifts the nozzle and the edge authorises the call
    await site.dart_command(cmd="lift", pump=1, nozzle=1, target_ml=60_000, hang=True)
    await eventually(lambda: dart.stats.authorisations == 1, 20, what="the edge's authorisation")
    # Then a cashier's authorisation of the same call is refused by the pump's state
    answer = await site.post(f"/v1/pumps/{DART_PUMP}/authorize", {"full": True})
    error = envelope(answer, 409, "pump.state_forbids")
    assert error["details"]["state"] in ("authorised", "fuelling")
    # And the call was authorised once, by the edge; the cashier's try is audited as refused
    assert dart.stats.authorisations == 1
    trail = [(a["actor"], a["details"].get("refused")) for a in site.audits("pump.authorize")]
    assert trail == [("edge:S001", None), ("till1", "pump.state_forbids")]
    # And stop and suspend still work on the pump the edge authorised
    await eventually(lambda: site.in_state(DART_PUMP, "fuelling"), 30, what="product flowing")
    suspended = await site.post(f"/v1/pumps/{DART_PUMP}/suspend")
    assert suspended.status_code == 200, suspended.text
    stopped = await site.post(f"/v1/pumps/{DART_PUMP}/stop")
    assert stopped.status_code == 200, stopped.text
    await eventually(lambda: len_sales(site, 1), 30, what="the stopped sale journaled")


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "value",
    [f'{{"till1": "{TILL1}", "till2": "{TILL2}"}}', f"till1={TILL1}, till2={TILL2}"],
)
def test_terminal_credentials_come_from_the_environment_as_json_or_name_secret_pairs(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # Given the terminals in the environment, in either form
    monkeypatch.setenv("FORECOURT_EDGE_TERMINAL_TOKENS", value)
    # When the edge reads its settings
    settings = EdgeSettings(station="S001", credential="a-real-station-credential-0123456789")
    # Then each terminal has its secret
    tokens = {name: secret.get_secret_value() for name, secret in settings.terminal_tokens.items()}
    assert tokens == {"till1": TILL1, "till2": TILL2}


@pytest.mark.parametrize("value", ["till1=short", "till1", "bad name=" + TILL1])
def test_a_weak_or_malformed_terminal_credential_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FORECOURT_EDGE_TERMINAL_TOKENS", value)
    with pytest.raises(ValidationError, match="terminal"):
        EdgeSettings(station="S001", credential="a-real-station-credential-0123456789")
