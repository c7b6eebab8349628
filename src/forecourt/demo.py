"""``forecourt demo``: a small chain end to end, then a three-way reconciliation.

HQ runs in this process (HTTP on a free local port). Each station's forecourt is split between
the pump protocols asked for (by default pumps 1-4 behind a simulated PTS-2 controller speaking
jsonPTS, 5-8 on a Wayne DART line) and its tanks are read by a Veeder-Root TLS gauge; every
device simulator runs in its own process with simulated customers, and an edge node talks to
them over their real protocols and to HQ over HTTP. A simulated clock runs ``speed`` times
faster than wall time and is placed so that it reaches the real current time only after the
demo's whole time budget: no sale is stamped later than now. The DART line fills at the same
``speed``.

At the end the demo stops new customers (the PTS-2 takes no more arrivals; DART pumps are no
longer authorised, so their customers give up), lets fuellings finish, drains the edge outboxes
and the HQ relay (bounded waits), then reads each figure from its own store: the dispensers'
own records (the PTS-2's transaction memory over jsonPTS ``ReportGetPumpTransactions``, the
DART line's record of completed fillings), each edge's journal, and HQ's query API. Tank
readings are reported beside the reconciliation; they are not part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
import uvicorn
from pydantic import SecretStr

from forecourt.audit.store import waiting_count as audit_waiting_count
from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.edge.controller import ForecourtController
from forecourt.edge.node import EdgeNode, PumpLine, build_edge_node, jsonpts_factory
from forecourt.infra.db import SCHEMAS, Database
from forecourt.infra.listener import listening_socket
from forecourt.kernel.access import Scope
from forecourt.kernel.clock import SimulatedClock
from forecourt.kernel.errors import ForecourtError
from forecourt.kernel.money import UnitPrice
from forecourt.network.contracts import StationSnapshot
from forecourt.network.domain import Chain, Price, PriceScope, Station
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    build_snapshot,
    import_chain,
    issue_credential,
    load_chain_file,
)
from forecourt.protocols.driver import PumpDriver
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.protocols.model import DeviceRejected, DriverUnavailable
from forecourt.sales.store import sale_t
from forecourt.settings import DeviceLine, EdgeSettings, Settings
from forecourt.sim.pts_controller import SimulatorProcess


class DemoError(ForecourtError):
    code = "demo.database_not_empty"


async def reset_database(db: Database) -> None:
    """Drop every Forecourt table (PostgreSQL schemas, or the SQLite file's tables)."""
    await db.connect()
    async with db.engine.begin() as conn:
        if db.is_sqlite:
            names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            for name in names:
                await conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
        else:
            for schema in SCHEMAS:
                await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


DRAIN_BUDGET_S = 60.0  # wall seconds allowed for fuellings to end and outboxes to drain
START_BUDGET_S = 20.0  # wall seconds a device simulator has to start serving
GAUGE_INTERVAL_S = 2.0  # the edges read their tank gauges this often in the demo
PTS_PASSWORD = "demo-controller"
DEMO_AUDITOR = "demo-auditor"  # the staff account the reconciliation reads HQ with

PUMP_PROTOCOLS = ("jsonpts", "dart")  # in the order they take a station's fuelling points
GAUGE_PROTOCOLS = ("tls",)
DEFAULT_PROTOCOLS = ("jsonpts", "dart", "tls")
# DART statuses in which nothing can flow and nothing is about to: not programmed, filling
# completed, switched off. RESET (1) with a nozzle out is a pump being authorised (the driver
# resets a pump on its way to authorising it); with every nozzle hung it rests too.
_DART_AT_REST = frozenset({0, 5, 7})
_DART_RESET = 1


def parse_protocols(text: str) -> tuple[str, ...]:
    """``jsonpts,dart,tls`` → the demo's device protocols, refused when unknown or when no
    pump protocol is among them."""
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    known = (*PUMP_PROTOCOLS, *GAUGE_PROTOCOLS)
    unknown = [name for name in names if name not in known]
    if unknown or not any(name in PUMP_PROTOCOLS for name in names):
        raise DemoError(
            f"protocols {text!r}: give one or more of {', '.join(known)}, at least one of them "
            f"a pump protocol ({', '.join(PUMP_PROTOCOLS)})",
            code="demo.protocols_invalid",
        )
    return names


@dataclass
class DemoOptions:
    duration_s: float = 20.0
    stations: int = 3
    speed: float = 120.0
    arrivals_per_hour: float = 150.0
    database_url: str | None = None
    bus_url: str = "memory://"
    nats_stream: str = "FORECOURT"
    nats_subject_prefix: str | None = None
    workdir: Path | None = None
    seed: int = 7
    price_change: bool = True  # a scheduled price change half-way through
    reset: bool = False  # drop Forecourt's schemas in the given database first
    # Device protocols at every station: the pump protocols share its fuelling points in
    # order (jsonpts first), "tls" adds a tank gauge; ("jsonpts",) is one PTS-2 for all pumps.
    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS


@dataclass(frozen=True)
class StationLayout:
    """Which fuelling points each pump protocol drives at a station, and whether a tank
    gauge reads its tanks."""

    pumps: dict[str, tuple[int, ...]]
    gauge: bool

    def protocol_of(self, fuelling_point: int) -> str:
        return next((p for p, fps in self.pumps.items() if fuelling_point in fps), "unknown")

    @property
    def one_controller(self) -> bool:
        """Every pump on one PTS-2 and no gauge: the edge's single-controller settings."""
        return list(self.pumps) == ["jsonpts"] and not self.gauge


def plan_layout(fuelling_points: Sequence[int], protocols: Sequence[str]) -> StationLayout:
    """The station's fuelling points in number order, split into consecutive runs of nearly
    equal length, one per pump protocol asked for (the first runs take any extra)."""
    pump_protocols = [p for p in PUMP_PROTOCOLS if p in protocols]
    numbers = sorted(fuelling_points)
    if not pump_protocols or len(numbers) < len(pump_protocols):
        raise DemoError(
            f"{len(numbers)} fuelling points cannot be shared by {', '.join(pump_protocols)}",
            code="demo.protocols_invalid",
        )
    share, extra = divmod(len(numbers), len(pump_protocols))
    pumps: dict[str, tuple[int, ...]] = {}
    start = 0
    for index, protocol in enumerate(pump_protocols):
        size = share + (1 if index < extra else 0)
        pumps[protocol] = tuple(numbers[start : start + size])
        start += size
    return StationLayout(pumps, gauge=any(p in GAUGE_PROTOCOLS for p in protocols))


T = TypeVar("T")


class DeviceProcess:
    """One device simulator in a process of its own (``forecourt simulate KIND ...``), its
    output in ``KIND.log`` beside its files; always :meth:`stop` it."""

    def __init__(self, kind: str, args: Sequence[str], workdir: Path) -> None:
        self.kind = kind
        self.args = list(args)
        self.workdir = workdir
        self.log_path = workdir / f"{kind}.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, ready: Callable[[], T | None], timeout_s: float = START_BUDGET_S) -> T:
        """Start the process and wait (with a deadline) until ``ready()`` gives a value."""
        command = [sys.executable, "-m", "forecourt.cli", "simulate", self.kind, *self.args]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while (found := ready()) is None:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the {self.kind} simulator exited ({self.process.returncode}) before "
                        f"it served:\n{self.log_tail()}"
                    )
                if loop.time() > deadline:
                    raise TimeoutError(
                        f"the {self.kind} simulator did not serve within {timeout_s} s:\n"
                        f"{self.log_tail()}"
                    )
                await asyncio.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        return found

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _port_in(path: Path) -> int | None:
    """The port a simulator wrote to ``path`` (written whole, then renamed into place)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


async def start_dart_simulator(
    workdir: Path,
    args: Sequence[str],
    keep: Callable[[DeviceProcess], object],
    *,
    control: bool = False,
) -> tuple[DeviceProcess, int, int | None]:
    """A DART line simulator (``forecourt simulate dart ARGS``) in ``workdir``, on a port the
    kernel picks (and with ``control``, a control port too), handed to ``keep`` (to stop it
    later) before it starts; once it serves, the process, its line port and its control port
    (None without ``control``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file, control_file = workdir / "port", workdir / "control-port"
    for path in (port_file, control_file):
        path.unlink(missing_ok=True)
    command = ["--listen", "127.0.0.1:0", *args, "--port-file", str(port_file)]
    if control:
        command += ["--control", "127.0.0.1:0", "--control-port-file", str(control_file)]
    process = DeviceProcess("dart", command, workdir)
    keep(process)

    def ports() -> tuple[int, int | None] | None:
        # The control port is written first, so both are there once the line's port is.
        line = _port_in(port_file)
        if line is None:
            return None
        if not control:
            return line, None
        control_port = _port_in(control_file)
        return None if control_port is None else (line, control_port)

    line_port, control_port = await process.start(ports)
    return process, line_port, control_port


async def start_gauge_simulator(
    workdir: Path, snapshot: StationSnapshot, keep: Callable[[DeviceProcess], object]
) -> tuple[DeviceProcess, str]:
    """A TLS gauge console simulator in ``workdir`` holding the station's tanks, handed to
    ``keep`` before it starts; the process and its endpoint, from the line it prints once it
    listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gauge.json"
    config.write_text(json.dumps(gauge_config(snapshot), indent=2), encoding="utf-8")
    process = DeviceProcess("tls", ["--listen", "127.0.0.1:0", "--config", str(config)], workdir)
    keep(process)
    announced = re.compile(r"TLS gauge simulator on (tcp://\S+)")

    def endpoint() -> str | None:
        found = announced.search(process.log_text())
        return found.group(1) if found else None

    return process, await process.start(endpoint)


@dataclass
class DartLine:
    """A station's Wayne DART pump line: its simulator process, the record of completed
    fillings it keeps, its control port, and which station fuelling point is which address."""

    process: DeviceProcess
    record: Path
    transport: str
    control: tuple[str, int]
    addresses: dict[int, int]  # station fuelling point → DART address

    def fuelling_point(self, address: int) -> int | None:
        return next((fp for fp, a in self.addresses.items() if a == address), None)

    async def state(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """The simulator's own view of its pumps (control command ``state``)."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.control), timeout_s)
        try:
            writer.write(b'{"cmd": "state"}\n')
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout_s)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"DART simulator control refused 'state': {answer.get('error')}")
        return answer

    def fillings(self) -> list[dict[str, Any]]:
        """Every completed filling the line recorded (complete lines only)."""
        try:
            text = self.record.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        whole = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in whole.splitlines() if line.strip()]


@dataclass
class StationDevices:
    """A station's device simulators once they serve."""

    layout: StationLayout
    pts: SimulatorProcess | None = None
    dart: DartLine | None = None
    gauge: tuple[DeviceProcess, str] | None = None  # the process and its endpoint


@dataclass
class StationRun:
    code: str
    credential: str
    simulator: SimulatorProcess | None  # the PTS-2 behind the jsonPTS pumps
    edge: EdgeNode
    layout: StationLayout
    dart: DartLine | None = None
    gauge: DeviceProcess | None = None

    def journaled(self) -> int:
        return sum(c.stats.journaled for c in self.edge.controllers)

    def lines(self, protocol: str) -> list[PumpLine]:
        """The edge's pump lines of one protocol (the single-controller line is jsonPTS)."""
        return [
            line
            for line in self.edge.lines
            if (line.config.protocol if line.config else "jsonpts") == protocol
        ]


@dataclass
class Figures:
    sales: int = 0
    volume_ml: int = 0
    amount_minor: int = 0

    def add(self, sales: int, volume_ml: int, amount_minor: int) -> None:
        self.sales += sales
        self.volume_ml += volume_ml
        self.amount_minor += amount_minor


def _three() -> dict[str, Figures]:
    return {"dispensers": Figures(), "edges": Figures(), "hq": Figures()}


@dataclass
class Reconciliation:
    per_station_grade: dict[tuple[str, str], dict[str, Figures]] = field(default_factory=dict)
    # The same figures by the protocol of the pump that measured each sale.
    per_station_protocol: dict[tuple[str, str], dict[str, Figures]] = field(default_factory=dict)
    lost: int = 0
    lost_sales: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    quarantined: int = 0
    flagged: Counter[str] = field(default_factory=Counter)  # HQ's flags on the sales it holds
    tanks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # station → readings
    # HQ's audit trail once everything is chained: records, those from the station edges,
    # and the verification of the chain and its signed checkpoints.
    audit: dict[str, Any] = field(default_factory=dict)

    def total(self, where: str) -> Figures:
        out = Figures()
        for figures in self.per_station_grade.values():
            f = figures[where]
            out.add(f.sales, f.volume_ml, f.amount_minor)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_until_started(
    server: uvicorn.Server, sock: socket.socket, timeout_s: float = 20.0
) -> asyncio.Task[None]:
    """Start ``server`` on ``sock`` and wait (with a deadline) until it accepts requests."""
    task = asyncio.create_task(server.serve(sockets=[sock]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("HTTP server stopped before it started")
        if loop.time() > deadline:
            server.should_exit = True
            raise TimeoutError(f"HTTP server not started after {timeout_s} s")
        await asyncio.sleep(0.01)
    return task


def _owned_station_dirs(workdir: Path) -> list[Path]:
    """What an earlier demo left in a work folder: its stations' journals and simulators."""
    return sorted(
        d
        for d in workdir.iterdir()
        if d.is_dir() and any((d / name).exists() for name in ("edge.db", "pts", "dart", "tls"))
    )


def pick_stations(chain: Chain, count: int) -> Chain:
    """The first ``count`` stations of the chain, cloning the layout when more are asked."""
    if count < 1:
        raise ValueError("at least one station")
    base = list(chain.stations)
    chosen: list[Station] = base[:count]
    i = 0
    while len(chosen) < count:
        template = base[i % len(base)]
        chosen.append(
            dataclasses.replace(
                template, code=f"S{len(chosen) + 1:03d}", name=f"{template.name} #{len(chosen) + 1}"
            )
        )
        i += 1
    return dataclasses.replace(chain, stations=tuple(chosen))


def simulator_config(
    snapshot: StationSnapshot,
    at: datetime,
    grade_ids: dict[str, int],
    opts: DemoOptions,
    seed: int,
    *,
    pumps: Collection[int] | None = None,
) -> dict[str, Any]:
    """The PTS-2 simulator's configuration for the station's fuelling points (``pumps``: only
    these, with their share of the station's customers)."""
    prices = snapshot.prices_at(at)
    kinds = {g.code: g.kind for g in snapshot.grades}
    chosen = [fp for fp in snapshot.fuelling_points if pumps is None or fp.number in pumps]
    sold = {n.grade for fp in chosen for n in fp.nozzles}
    config_pumps = []
    for fp in chosen:
        config_pumps.append(
            {
                "pump": fp.number,
                "amount_resolution_minor": fp.model.amount_resolution_minor,
                "rounding": fp.model.rounding.value,
                "nozzles": [
                    {
                        "nozzle": n.number,
                        "grade_id": grade_ids[n.grade],
                        "price_mmu": prices[n.grade].milli_minor_per_litre,
                        "totalizer_ml": 10_000_000 * fp.number + 1_000_000 * n.number,
                    }
                    for n in fp.nozzles
                ],
            }
        )
    weights = {"92": 6, "95": 3, "98": 1, "0": 2}
    share = len(chosen) / len(snapshot.fuelling_points) if snapshot.fuelling_points else 1.0
    return {
        "currency": snapshot.currency,
        "volume_decimals": 2,
        "amount_decimals": 2,
        "price_decimals": 2,
        "auth": {"username": "admin", "password": PTS_PASSWORD},
        "timezone": snapshot.station.timezone,
        "pumps": config_pumps,
        "customers": {
            "arrivals": True,
            "arrivals_per_hour": opts.arrivals_per_hour * share,
            "seed": seed,
            "grade_mix": [
                {"grade_id": grade_ids[g], "weight": weights.get(g, 1)}
                for g in grade_ids
                if g in sold
            ],
            "truck_grade_ids": [
                grade_ids[g] for g, k in kinds.items() if k == "diesel" and g in sold
            ],
        },
    }


def gauge_config(snapshot: StationSnapshot) -> dict[str, Any]:
    """The TLS gauge simulator's configuration: the station's tanks (litres, millimetres,
    °C), part full, drawn down slowly so that successive readings differ."""
    tanks = []
    for index, tank in enumerate(sorted(snapshot.tanks, key=lambda t: t.number)):
        capacity_l = tank.capacity_ml / 1000
        full = 0.75 - 0.1 * (index % 4)
        tanks.append(
            {
                "number": tank.number,
                "product": str(tank.number % 10),
                "capacity": capacity_l,
                "volume": round(capacity_l * full, 1),
                "height": round(2400.0 * full, 1),
                "temperature": 15.0 + index,
            }
        )
    return {"timezone": snapshot.station.timezone, "drift_per_minute": 2.0, "tanks": tanks}


class DemoChain:
    """The running demo; its steps are separate so tests can act between them."""

    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.protocols = parse_protocols(",".join(opts.protocols))
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if opts.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="forecourt-demo-")
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = opts.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        total_wall = opts.duration_s + DRAIN_BUDGET_S + 30.0
        self.clock = SimulatedClock.ending_before_now(total_wall, opts.speed)
        self.sim_start = self.clock.now()
        self.hq: HeadOffice | None = None
        self.hq_url = ""
        self._auditor_password: str | None = None
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self.stations: list[StationRun] = []
        # Every simulator process started, known before it runs: stop() ends each of them
        # however far the start got.
        self._processes: list[SimulatorProcess | DeviceProcess] = []
        self.price_change: Price | None = None  # the scheduled rise, when there is one
        # The polls each DART controller had begun when it stopped authorising (quiesce).
        self._polls_when_closed: dict[ForecourtController, int] = {}

    def _clear_workdir(self) -> None:
        """``--reset`` resets everything the demo owns; without it, an earlier run's journals
        are refused (they would meet a fresh HQ and fresh controllers and disagree)."""
        leftovers = _owned_station_dirs(self.workdir)
        hq_file = self.workdir / "hq.db"
        if not self.opts.reset:
            if leftovers:
                raise DemoError(
                    f"the work folder {self.workdir} holds the journals of an earlier demo "
                    f"({', '.join(d.name for d in leftovers)}); pass --reset to start afresh, "
                    "or give another --workdir",
                    code="demo.workdir_not_empty",
                )
            return
        for directory in leftovers:
            shutil.rmtree(directory)
        if self.opts.database_url is None:
            for path in (hq_file, hq_file.with_name("hq.db-wal"), hq_file.with_name("hq.db-shm")):
                path.unlink(missing_ok=True)

    async def start(self) -> None:
        opts = self.opts
        self._clear_workdir()
        database_url = opts.database_url or f"sqlite+aiosqlite:///{self.workdir / 'hq.db'}"
        sock = listening_socket("127.0.0.1", 0)
        port = int(sock.getsockname()[1])
        settings = Settings(
            database_url=database_url,
            bus_url=opts.bus_url,
            nats_stream=opts.nats_stream,
            nats_subject_prefix=opts.nats_subject_prefix,
            port=port,
            log_json=False,
            # Tokens live in HQ's (simulated) time: a day of it lasts minutes of the demo.
            identity_access_token_s=86_400.0,
        )
        # HQ lives in the same simulated time as the stations, so prices, business days and
        # snapshots agree across the demo.
        self.hq = build_head_office(settings, clock=self.clock)
        if opts.reset:
            await reset_database(self.hq.db)
        await self.hq.start()
        await self._require_empty()
        config = uvicorn.Config(
            self.hq.app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._server_task = await serve_until_started(self._server, sock)
        self.hq_url = f"http://127.0.0.1:{port}"

        chain = pick_stations(load_chain_file(SAMPLE_CHAIN), opts.stations)
        if opts.price_change:
            chain = self._with_price_change(chain)
        await import_chain(self.hq.db, chain, actor="demo")
        # The reconciliation reads HQ as staff do: an auditor of the whole chain, signed in.
        _, self._auditor_password = await self.hq.identity.create_user(
            DEMO_AUDITOR, password=None, display_name="demo reconciliation", actor="demo"
        )
        await self.hq.identity.grant(DEMO_AUDITOR, "auditor", Scope.chain(), actor="demo")
        grade_ids = {g.code: i + 1 for i, g in enumerate(chain.grades)}
        plans = []
        for station in chain.stations:
            _, token = await issue_credential(self.hq.db, station.code, actor="demo")
            snapshot = await build_snapshot(self.hq.db, station.code, self.clock.now())
            plans.append((station.code, token, snapshot))
        # The simulators of every station start side by side (most of a start is waiting for
        # processes); the edges one after the other (a journal's migrations run in-process).
        started = await _concurrently(
            self._start_devices(code, snapshot, grade_ids, opts.seed + index)
            for index, (code, _, snapshot) in enumerate(plans)
        )
        for (code, token, snapshot), devices in zip(plans, started, strict=True):
            edge_settings = self._edge_settings(code, token, snapshot, devices)
            one = devices.layout.one_controller
            edge = build_edge_node(
                edge_settings, self.clock, jsonpts_factory(edge_settings) if one else None
            )
            await edge.start()
            self.stations.append(
                StationRun(
                    code,
                    token,
                    devices.pts,
                    edge,
                    devices.layout,
                    dart=devices.dart,
                    gauge=devices.gauge[0] if devices.gauge else None,
                )
            )

    async def _start_devices(
        self, code: str, snapshot: StationSnapshot, grade_ids: dict[str, int], seed: int
    ) -> StationDevices:
        """The station's device simulators, side by side."""
        layout = plan_layout([fp.number for fp in snapshot.fuelling_points], self.protocols)
        station_dir = self.workdir / code
        devices = StationDevices(layout)

        async def start_pts() -> None:
            pumps = set(layout.pumps["jsonpts"])
            config = simulator_config(
                snapshot, self.clock.now(), grade_ids, self.opts, seed, pumps=pumps
            )
            devices.pts = SimulatorProcess(config, station_dir / "pts", env=self.clock.to_env())
            self._processes.append(devices.pts)
            await asyncio.to_thread(devices.pts.start)

        async def start_dart() -> None:
            devices.dart = await self._start_dart(station_dir / "dart", snapshot, layout, seed)

        async def start_gauge() -> None:
            devices.gauge = await self._start_gauge(station_dir / "tls", snapshot)

        starts = [start_pts()] if "jsonpts" in layout.pumps else []
        starts += [start_dart()] if "dart" in layout.pumps else []
        starts += [start_gauge()] if layout.gauge else []
        await _concurrently(starts)
        return devices

    def _edge_settings(
        self, code: str, token: str, snapshot: StationSnapshot, devices: StationDevices
    ) -> EdgeSettings:
        """The station's edge: one device line per simulator (or, for a station that is one
        PTS-2 and nothing else, the single-controller settings)."""
        lines: list[DeviceLine] = []
        if devices.pts is not None:
            lines.append(
                DeviceLine(
                    name="pts",
                    protocol="jsonpts",
                    transport=devices.pts.base_url,
                    pumps={n: n for n in devices.layout.pumps["jsonpts"]},
                    options={"user": "admin", "password": PTS_PASSWORD},
                )
            )
        if devices.dart is not None:
            lines.append(
                DeviceLine(
                    name="dart",
                    protocol="dart",
                    transport=devices.dart.transport,
                    pumps=devices.dart.addresses,
                    options={"nozzles": _nozzles(snapshot, devices.dart.addresses)},
                )
            )
        if devices.gauge is not None:
            lines.append(
                DeviceLine(
                    name="gauge",
                    protocol="tls",
                    transport=devices.gauge[1],
                    tanks={t.number: t.number for t in snapshot.tanks},
                )
            )
        return EdgeSettings(
            station=code,
            hq_url=self.hq_url,
            credential=SecretStr(token),
            journal_path=self.workdir / code / "edge.db",
            controller_url=devices.pts.base_url if devices.pts else "http://127.0.0.1:8500",
            controller_user="admin",
            controller_password=SecretStr(PTS_PASSWORD),
            poll_interval_s=0.05,
            log_json=False,
            devices=None if devices.layout.one_controller else lines,
            gauge_interval_s=GAUGE_INTERVAL_S,
        )

    async def _start_dart(
        self, workdir: Path, snapshot: StationSnapshot, layout: StationLayout, seed: int
    ) -> DartLine:
        """A DART line process for the station's DART pumps (addresses 0x50 up, in fuelling
        point order), filling at the demo's speed, with its share of the customers."""
        workdir.mkdir(parents=True, exist_ok=True)
        fps = layout.pumps["dart"]
        addresses = {fp: 0x50 + i for i, fp in enumerate(fps)}
        record = workdir / "fillings.jsonl"
        record.unlink(missing_ok=True)  # the simulator appends; this run's fillings only
        per_pump = self.opts.arrivals_per_hour / max(len(snapshot.fuelling_points), 1)
        options = {
            "--pumps": str(len(fps)),
            "--nozzles": str(_nozzles(snapshot, addresses)),
            "--record": str(record),
            "--customers-per-hour": repr(per_pump),
            "--speed": repr(self.opts.speed),
            "--seed": str(seed),
        }
        process, line_port, control_port = await start_dart_simulator(
            workdir,
            [w for pair in options.items() for w in pair],
            self._processes.append,
            control=True,
        )
        assert control_port is not None  # asked for
        return DartLine(
            process,
            record,
            transport=f"tcp://127.0.0.1:{line_port}",
            control=("127.0.0.1", control_port),
            addresses=addresses,
        )

    async def _start_gauge(
        self, workdir: Path, snapshot: StationSnapshot
    ) -> tuple[DeviceProcess, str]:
        """A TLS gauge process holding the station's tanks; its endpoint from the line it
        prints once it listens."""
        return await start_gauge_simulator(workdir, snapshot, self._processes.append)

    async def restart_controller(
        self, code: str, sig: int = signal.SIGTERM, *, reset_counters: bool = True
    ) -> None:
        """Restart one station's simulated PTS-2 (same address, same dispensers and memory);
        with ``reset_counters`` its transaction numbers start again at 1."""
        simulator = self._pts(code)
        await asyncio.to_thread(simulator.restart, sig, reset_counters=reset_counters)

    async def set_faults(self, code: str, faults: dict[str, Any]) -> dict[str, Any]:
        """Switch simulator faults on or off at one station (see forecourt.sim.pts_controller)."""
        simulator = self._pts(code)
        async with httpx.AsyncClient(timeout=5.0) as client:
            answer = await client.post(f"{simulator.base_url}/sim/control", json={"faults": faults})
            answer.raise_for_status()
            body: dict[str, Any] = answer.json()
            return body

    def _pts(self, code: str) -> SimulatorProcess:
        station = next(st for st in self.stations if st.code == code)
        if station.simulator is None:
            raise DemoError(f"station {code} has no PTS-2 controller", code="demo.no_controller")
        return station.simulator

    async def _require_empty(self) -> None:
        """The reconciliation compares whole stores, so the demo needs a database of its own."""
        assert self.hq is not None
        async with self.hq.db.connection() as conn:
            existing = await conn.scalar(sa.select(sa.func.count()).select_from(sale_t))
        if existing:
            raise DemoError(
                f"the HQ database already holds {existing} sales; give the demo an empty "
                "database, or pass --reset to drop Forecourt's schemas in it first"
            )

    def _with_price_change(self, chain: Chain) -> Chain:
        """Schedule a 92# price rise for the whole chain at the simulated half-way point."""
        half = self.sim_start + timedelta(seconds=self.opts.duration_s * self.opts.speed / 2)
        current = max(
            (p for p in chain.prices if p.grade == "92" and p.scope is PriceScope.CHAIN),
            key=lambda p: p.effective_from,
        )
        rise = UnitPrice(current.milli_minor_per_litre + 150_000, chain.currency)
        extra = Price(
            grade="92",
            scope=PriceScope.CHAIN,
            scope_code=chain.code,
            milli_minor_per_litre=rise.milli_minor_per_litre,
            currency=chain.currency,
            effective_from=half.replace(microsecond=0),
            price_id=f"demo-{half.timestamp():.0f}",
        )
        self.price_change = extra
        return dataclasses.replace(chain, prices=(*chain.prices, extra))

    async def run_traffic(self, on_tick: Callable[[float], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.opts.duration_s
        while (now := loop.time()) < end:
            if on_tick:
                on_tick(self.opts.duration_s - (end - now))
            await asyncio.sleep(min(1.0, end - now))

    async def quiesce(self, on_tick: Callable[[str], None] | None = None) -> bool:
        """Stop new customers, let fuellings finish, drain edges and HQ. True if all drained."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_BUDGET_S
        async with httpx.AsyncClient(timeout=5.0) as client:
            for st in self.stations:
                if st.simulator is not None:
                    await client.post(
                        f"{st.simulator.base_url}/sim/control", json={"arrivals": False}
                    )
                # The DART line's customers keep coming; unauthorised, each gives up.
                for line in st.lines("dart"):
                    line.controller.auto_authorise = False
                    self._polls_when_closed[line.controller] = line.controller.stats.polls
            forecourts_idle = False
            calm = 0  # consecutive all-idle looks; a customer walking to a pump shows as idle
            while loop.time() < deadline:
                idle = 0
                for st in self.stations:
                    if await self._forecourt_idle(client, st):
                        idle += 1
                calm = calm + 1 if idle == len(self.stations) else 0
                if on_tick:
                    on_tick(f"finishing fuellings: {idle}/{len(self.stations)} forecourts idle")
                if calm >= 4:
                    forecourts_idle = True
                    break
                await asyncio.sleep(0.25)
        drained = True
        for st in self.stations:
            await st.edge.stop_selling()
        for st in self.stations:
            remaining = max(1.0, deadline - loop.time())
            drained = await st.edge.drain(remaining) and drained
        assert self.hq is not None
        await self.hq.relay.drain(timeout=max(1.0, deadline - loop.time()))
        chained = await self._audit_chained(deadline)
        await self._gauges_read(min(deadline, loop.time() + 10.0))
        return forecourts_idle and drained and chained

    async def _audit_chained(self, deadline: float) -> bool:
        """Wait for HQ's chainer to chain every audit record waiting (the edges' included)."""
        assert self.hq is not None
        loop = asyncio.get_running_loop()
        while True:
            async with self.hq.db.connection() as conn:
                if await audit_waiting_count(conn) == 0:
                    return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _forecourt_idle(self, client: httpx.AsyncClient, st: StationRun) -> bool:
        """Nothing flowing or about to at the station and every finished sale closed: the
        PTS-2 has no queue and idle pumps, the DART pumps rest with nothing unclosed, and the
        edge sees each pump idle (a DART customer waiting in vain may show as calling)."""
        states = st.edge.fuelling_points()
        if st.simulator is not None:
            health = (await client.get(f"{st.simulator.base_url}/sim/health")).json()
            if health.get("queue", 0) or any(p != "idle" for p in health.get("pumps", {}).values()):
                return False
            if any(
                states.get(fp, "idle") not in ("idle", "offline")
                for fp in st.layout.pumps.get("jsonpts", ())
            ):
                return False
        if st.dart is not None:
            try:
                state = await st.dart.state()
            except (OSError, TimeoutError):
                return False  # the line's simulator does not answer: it cannot be at rest
            if not all(_dart_pump_at_rest(pump) for pump in state["pumps"]):
                return False
            fps = st.layout.pumps.get("dart", ())
            if any(states.get(fp, "idle") not in ("idle", "calling", "offline") for fp in fps):
                return False
            for line in st.lines("dart"):
                # A poll begun after authorising stopped: no authorisation is under way.
                if line.controller.stats.polls <= self._polls_when_closed.get(line.controller, -1):
                    return False
                driver = line.driver
                if driver is None:
                    return False
                try:
                    if await driver.unacknowledged_transactions(line.controller.pumps()):
                        return False
                except (DriverUnavailable, DeviceRejected):
                    return False
        return True

    async def _gauges_read(self, until: float) -> None:
        """Wait (until ``until``, loop time) for every tank gauge to have been read once."""
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            if all(g.reads > 0 for st in self.stations for g in st.edge.gauges):
                return
            await asyncio.sleep(0.1)

    async def reconcile(self) -> Reconciliation:
        rec = Reconciliation()
        async with httpx.AsyncClient(base_url=self.hq_url, timeout=30.0) as hq:
            signed_in = await hq.post(
                "/v1/auth/sign-in",
                json={"username": DEMO_AUDITOR, "password": self._auditor_password},
            )
            signed_in.raise_for_status()
            hq.headers["authorization"] = f"Bearer {signed_in.json()['access_token']}"
            for st in self.stations:
                snapshot = st.edge.snapshots.current
                assert snapshot is not None
                tally = _StationTally(rec, st, snapshot)
                # 1. the dispensers, from their own records
                for sale in await self._dispensed(st, snapshot):
                    tally.dispensed(sale)
                # 2. the edge's journal
                for row in await st.edge.journal.summary():
                    tally.cell(row["grade"])["edges"].add(
                        row["sales"], row["volume_ml"], row["amount_minor"]
                    )
                for fp, sales, volume, amount in await _journal_by_fuelling_point(
                    st.edge.journal.path
                ):
                    tally.by_protocol(st.layout.protocol_of(fp))["edges"].add(sales, volume, amount)
                # 3. HQ, through its query API
                summary = (await hq.get("/v1/sales/summary", params={"station": st.code})).json()
                for g in summary["groups"]:
                    tally.cell(g["grade"])["hq"].add(g["sales"], g["volume_ml"], g["amount_minor"])
                    if g["quarantined"]:
                        rec.quarantined += g["sales"]
                rec.duplicates += summary["natural_key_duplicates"]
                after = None
                while True:
                    params: dict[str, Any] = {"station": st.code, "limit": 5000}
                    if after:
                        params["after"] = after
                    page = (await hq.get("/v1/sales", params=params)).json()
                    for item in page["items"]:
                        tally.at_hq(item)
                    after = page["next_after"]
                    if not after:
                        break
                tally.count_lost()
                rec.tanks[st.code] = _tank_readings(st.edge, snapshot)
            rec.audit = await _audit_trail(hq)
        return rec

    async def _dispensed(self, st: StationRun, snapshot: StationSnapshot) -> list[Dispensed]:
        """Every dispensing at the station as its pumps recorded it: the PTS-2's transaction
        memory (over jsonPTS) and the DART line's record of completed fillings."""
        found: list[Dispensed] = []
        if st.simulator is not None:
            driver = JsonPtsDriver(
                st.simulator.base_url,
                "admin",
                PTS_PASSWORD,
                timezone=snapshot.station.timezone,
                currency=snapshot.currency,
            )
            window = (self.sim_start - timedelta(hours=1), self.clock.now() + timedelta(minutes=1))
            await driver.open()
            try:
                for fp in st.layout.pumps.get("jsonpts", ()):
                    found.extend(
                        Dispensed(
                            "jsonpts",
                            txn.pump,
                            txn.nozzle,
                            txn.volume_ml,
                            txn.amount_minor,
                            device_txn=txn.transaction,
                        )
                        for txn in await driver.transactions(fp, *window)
                    )
            finally:
                await driver.close()
        if st.dart is not None:
            for filling in st.dart.fillings():
                found.append(
                    Dispensed(
                        "dart",
                        # An address no station pump has is counted as fuelling point 0.
                        st.dart.fuelling_point(int(filling["address"], 16)) or 0,
                        int(filling["nozzle"]),
                        int(filling["volume_ml"]),
                        int(filling["amount_minor"]),
                        totalizer_end_ml=filling.get("totals", {}).get("volume_ml"),
                        ended_at=filling.get("at"),
                    )
                )
        return found

    async def stop(self) -> None:
        for st in self.stations:
            with contextlib.suppress(Exception):
                await st.edge.stop()
        # Every simulator is told to end at once, then each is waited for.
        for simulator in self._processes:
            if simulator.process is not None and simulator.process.poll() is None:
                simulator.process.terminate()
        for simulator in self._processes:
            simulator.stop()
        if self._server is not None:
            self._server.should_exit = True
            if self._server_task is not None:
                await self._server_task
        if self.hq is not None:
            await self.hq.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


async def _audit_trail(hq: httpx.AsyncClient) -> dict[str, Any]:
    """HQ's audit trail as an auditor reads it: verified, and counted by where it came from."""
    verdict = (await hq.get("/v1/audit/verify")).json()
    records = from_stations = 0
    after = 0
    while True:
        page = (
            await hq.get(
                "/v1/audit/records", params={"order": "seq", "after_seq": after, "limit": 1000}
            )
        ).json()
        records += len(page["items"])
        # An edge's record is ``station:CODE/<edge actor>``; the station's own uploads at HQ
        # are ``station:CODE``.
        from_stations += sum(
            1 for r in page["items"] if r["actor"].startswith("station:") and "/" in r["actor"]
        )
        if page["next_after_seq"] is None:
            break
        after = page["next_after_seq"]
    return {
        "verified": bool(verdict["ok"]),
        "problem": verdict["problem"],
        "records": records,
        "from_station_edges": from_stations,
        "checkpoints": verdict["checkpoints_checked"],
    }


async def _concurrently(work: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``work`` side by side, results in order; the first failure cancels the rest and
    is raised as itself."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _dart_pump_at_rest(pump: dict[str, Any]) -> bool:
    """A pump of the DART simulator's ``state``: nothing flowing and nothing about to."""
    status = int(pump["status"])
    return status in _DART_AT_REST or (status == _DART_RESET and pump["nozzle_out"] is None)


def _nozzles(snapshot: StationSnapshot, fuelling_points: Collection[int]) -> int:
    """Nozzles per pump on a line that carries these fuelling points (the most any has)."""
    return max(
        (len(fp.nozzles) for fp in snapshot.fuelling_points if fp.number in fuelling_points),
        default=1,
    )


@dataclass(frozen=True)
class Dispensed:
    """One dispensing as the pump's own record shows it."""

    protocol: str
    fuelling_point: int
    nozzle: int | None
    volume_ml: int
    amount_minor: int
    device_txn: int | None = None  # jsonPTS: the controller's transaction number
    totalizer_end_ml: int | None = None  # DART: the nozzle's volume total after it
    ended_at: str | None = None


def _sale_key(
    protocol: str,
    fuelling_point: int,
    nozzle: int | None,
    device_txn: int | None,
    volume_ml: int,
    amount_minor: int,
) -> tuple[Any, ...]:
    """How the reconciliation knows one dispensing in every store, by its contents: a jsonPTS
    transaction by pump, number, litres and money (after a controller restart with its
    counters reset, one pump shows the same number for two sales); a DART filling, which has
    no number of its own, by pump, nozzle, litres and money."""
    if protocol == "dart":
        return ("dart", fuelling_point, nozzle, volume_ml, amount_minor)
    return (protocol, fuelling_point, device_txn, volume_ml, amount_minor)


class _StationTally:
    """One station's part of the reconciliation while its stores are read."""

    def __init__(self, rec: Reconciliation, station: StationRun, snapshot: StationSnapshot):
        self.rec = rec
        self.code = station.code
        self.layout = station.layout
        self.nozzle_grade = {
            (fp.number, n.number): n.grade for fp in snapshot.fuelling_points for n in fp.nozzles
        }
        self.at_device: Counter[tuple[Any, ...]] = Counter()
        self.at_hq_keys: Counter[tuple[Any, ...]] = Counter()
        self.sales: dict[tuple[Any, ...], dict[str, Any]] = {}
        for protocol in self.layout.pumps:
            self.by_protocol(protocol)

    def cell(self, grade: str) -> dict[str, Figures]:
        return self.rec.per_station_grade.setdefault((self.code, grade), _three())

    def by_protocol(self, protocol: str) -> dict[str, Figures]:
        return self.rec.per_station_protocol.setdefault((self.code, protocol), _three())

    def dispensed(self, sale: Dispensed) -> None:
        grade = self.nozzle_grade.get((sale.fuelling_point, sale.nozzle or 0), "unknown")
        self.cell(grade)["dispensers"].add(1, sale.volume_ml, sale.amount_minor)
        self.by_protocol(sale.protocol)["dispensers"].add(1, sale.volume_ml, sale.amount_minor)
        key = _sale_key(
            sale.protocol,
            sale.fuelling_point,
            sale.nozzle,
            sale.device_txn,
            sale.volume_ml,
            sale.amount_minor,
        )
        self.at_device[key] += 1
        self.sales[key] = {"grade": grade, **dataclasses.asdict(sale)}

    def at_hq(self, item: dict[str, Any]) -> None:
        protocol = self.layout.protocol_of(item["fuelling_point"])
        self.by_protocol(protocol)["hq"].add(1, item["volume_ml"], item["amount_minor"])
        key = _sale_key(
            protocol,
            item["fuelling_point"],
            item["nozzle"],
            item["device_txn"],
            item["volume_ml"],
            item["amount_minor"],
        )
        self.at_hq_keys[key] += 1
        self.rec.flagged.update(item["flags"])

    def count_lost(self) -> None:
        for key, missing in sorted((self.at_device - self.at_hq_keys).items(), key=repr):
            self.rec.lost += missing
            self.rec.lost_sales.extend(
                {"station": self.code, **self.sales[key]} for _ in range(missing)
            )


async def _journal_by_fuelling_point(path: Path) -> list[tuple[int, int, int, int]]:
    """(fuelling point, sales, ml, fen) of everything in an edge journal, read from its file
    (a reader beside the edge's own connection)."""

    def read() -> list[tuple[int, int, int, int]]:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                "SELECT fuelling_point, count(*), sum(volume_ml), sum(amount_minor) "
                "FROM journal GROUP BY fuelling_point ORDER BY fuelling_point"
            ).fetchall()
        return [(int(fp), int(n), int(ml), int(fen)) for fp, n, ml, fen in rows]

    return await asyncio.to_thread(read)


def _tank_readings(edge: EdgeNode, snapshot: StationSnapshot) -> list[dict[str, Any]]:
    """The latest reading of each tank by the station's gauges."""
    grades = {t.number: t.grade for t in snapshot.tanks}
    readings = []
    for gauge in edge.gauges:
        for number, m in sorted(gauge.measurements.items()):
            readings.append(
                {
                    "device": gauge.driver.name,
                    "tank": number,
                    "grade": grades.get(number),
                    "volume_ml": m.volume_ml,
                    "ullage_ml": m.ullage_ml,
                    "temperature_mdegc": m.temperature_mdegc,
                    "water_height_um": m.water_height_um,
                    "measured_at": m.measured_at.isoformat(),
                }
            )
    return readings


def _protocol_rank(protocol: str) -> tuple[int, str]:
    """The layout's order: jsonPTS, then DART, then anything else by name."""
    known = PUMP_PROTOCOLS.index(protocol) if protocol in PUMP_PROTOCOLS else len(PUMP_PROTOCOLS)
    return known, protocol


def report(rec: Reconciliation, stations: int, drained: bool, elapsed_s: float) -> dict[str, Any]:
    d, e, h = rec.total("dispensers"), rec.total("edges"), rec.total("hq")
    agree = (
        (d.sales, d.volume_ml, d.amount_minor)
        == (e.sales, e.volume_ml, e.amount_minor)
        == (h.sales, h.volume_ml, h.amount_minor)
    )
    # Every station's grades and pump protocols must agree on their own too: a sale counted
    # under the wrong grade or pump line is a disagreement even when the totals match.
    cells_agree = all(
        f["dispensers"] == f["edges"] == f["hq"]
        for cells in (rec.per_station_grade, rec.per_station_protocol)
        for f in cells.values()
    )
    by_protocol = sorted(
        rec.per_station_protocol.items(), key=lambda item: (item[0][0], _protocol_rank(item[0][1]))
    )
    sales_per_protocol: dict[str, dict[str, int]] = {}
    for (station, protocol), figures in by_protocol:
        sales_per_protocol.setdefault(station, {})[protocol] = figures["dispensers"].sales
    return {
        "stations": stations,
        "sales_at_dispensers": d.sales,
        "sales_at_edges": e.sales,
        "sales_at_hq": h.sales,
        "volume_ml_at_dispensers": d.volume_ml,
        "volume_ml_at_edges": e.volume_ml,
        "volume_ml_at_hq": h.volume_ml,
        "amount_fen_at_dispensers": d.amount_minor,
        "amount_fen_at_edges": e.amount_minor,
        "amount_fen_at_hq": h.amount_minor,
        "duplicates": rec.duplicates,
        "lost": rec.lost,
        "quarantined": rec.quarantined,
        "agree": agree and cells_agree and rec.lost == 0 and rec.duplicates == 0,
        "audit": rec.audit,
        "drained": drained,
        "elapsed_s": round(elapsed_s, 1),
        "per_station_grade": [
            {"station": s, "grade": g, **{k: dataclasses.asdict(v) for k, v in figures.items()}}
            for (s, g), figures in sorted(rec.per_station_grade.items())
        ],
        "per_station_protocol": [
            {"station": s, "protocol": p, **{k: dataclasses.asdict(v) for k, v in figures.items()}}
            for (s, p), figures in by_protocol
        ],
        "sales_per_protocol": sales_per_protocol,
        "flagged": dict(sorted(rec.flagged.items())),
        "tanks_read": {s: len(readings) for s, readings in sorted(rec.tanks.items())},
        "tanks": [
            {"station": s, **reading}
            for s, readings in sorted(rec.tanks.items())
            for reading in readings
        ],
        "lost_sales": rec.lost_sales,
    }


_PROTOCOL_NAMES = {"jsonpts": "jsonPTS", "dart": "DART", "tls": "TLS"}


def _ranges(numbers: Sequence[int]) -> str:
    """1, 2, 3, 5 → ``1-3, 5``."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def describe_layout(layout: StationLayout) -> str:
    """``pumps 1-4 jsonPTS, pumps 5-8 DART, tanks on a TLS gauge``."""
    parts = [f"pumps {_ranges(fps)} {_PROTOCOL_NAMES.get(p, p)}" for p, fps in layout.pumps.items()]
    if layout.gauge:
        parts.append("tanks on a TLS gauge")
    return ", ".join(parts)


def describe_station(result: dict[str, Any], station: str) -> str:
    """One line of the report for a station: sales per protocol and its tank readings."""
    sales = result["sales_per_protocol"].get(station, {})
    text = f"{station}: " + " + ".join(f"{n} {_PROTOCOL_NAMES.get(p, p)}" for p, n in sales.items())
    text += " sales"
    tanks = [t for t in result["tanks"] if t["station"] == station]
    if tanks:
        levels = ", ".join(
            f"T{t['tank']} {t['grade']}# {t['volume_ml'] / 1000:,.0f} L"
            for t in tanks
            if t["volume_ml"] is not None
        )
        text += f"; {len(tanks)} tanks read ({levels})"
    return text


def live_devices(edge: EdgeNode) -> dict[str, Any]:
    """A station's devices as its edge sees them now: each pump's state, each pump line's
    and gauge's health, the edge's active alarms."""
    lines = {}
    for line in edge.lines:
        driver = line.driver
        health = driver.health().state.value if isinstance(driver, PumpDriver) else None
        lines[line.name] = health or ("online" if line.controller.reachable else "offline")
    return {
        "pumps": {str(n): state for n, state in edge.fuelling_points().items()},
        "lines": lines,
        "gauges": {g.driver.name: "online" if g.reachable else "offline" for g in edge.gauges},
        "alarms": sorted({a["name"] for a in edge.alarms()}),
    }


def describe_live(result: dict[str, Any], station: str) -> str:
    """``S001 live: pumps 8 idle; lines forecourt online, dart online; gauge tanks online;
    no alarms``."""
    live = result.get("live", {}).get(station)
    if live is None:
        return f"{station} live: not known"
    states: dict[str, int] = {}
    for state in live["pumps"].values():
        states[state] = states.get(state, 0) + 1
    pumps = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
    text = f"{station} live: pumps {pumps}"
    if live["lines"]:
        text += "; lines " + ", ".join(f"{n} {s}" for n, s in live["lines"].items())
    if live["gauges"]:
        text += "; gauge " + ", ".join(f"{n} {s}" for n, s in live["gauges"].items())
    alarms = live["alarms"]
    return text + ("; alarms " + ", ".join(alarms) if alarms else "; no alarms")


async def run_demo(
    opts: DemoOptions, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    started = time.monotonic()
    demo = DemoChain(opts)
    try:
        await demo.start()
        rise = demo.price_change
        if progress is not None:
            progress(f"HQ listening on {demo.hq_url} (API docs: {demo.hq_url}/docs)")
            if demo.stations:
                progress(f"each station: {describe_layout(demo.stations[0].layout)}")
            if rise is not None:
                progress(
                    f"scheduled: {rise.grade}# rises to "
                    f"{UnitPrice(rise.milli_minor_per_litre, rise.currency).to_decimal()} "
                    f"{rise.currency}/L at sim {rise.effective_from.astimezone().strftime('%H:%M')}"
                )
        announced = False

        def tick(elapsed: float) -> None:
            nonlocal announced
            if progress is None:
                return
            if rise is not None and not announced and demo.clock.now() >= rise.effective_from:
                announced = True
                progress(f"{rise.grade}# price rise now in force (price {rise.price_id})")
            journaled = sum(st.journaled() for st in demo.stations)
            uploaded = sum(st.edge.sync.stats.uploaded for st in demo.stations)
            progress(
                f"t={elapsed:4.0f}s  sim {demo.clock.now().astimezone().strftime('%H:%M')}  "
                f"journaled {journaled:5d}  at HQ {uploaded:5d}  "
                + "  ".join(f"{st.code}:{st.journaled()}" for st in demo.stations)
            )

        await demo.run_traffic(tick)
        drained = await demo.quiesce(progress)
        rec = await demo.reconcile()
        result = report(rec, len(demo.stations), drained, time.monotonic() - started)
        result["live"] = {st.code: live_devices(st.edge) for st in demo.stations}
        if progress is not None:
            for st in demo.stations:
                progress(describe_station(result, st.code))
                progress(describe_live(result, st.code))
        return result
    finally:
        await demo.stop()
