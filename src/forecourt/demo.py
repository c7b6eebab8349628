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
import functools
import json
import random
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
from forecourt.edge.pos import PosStore
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
    # Customers pay at the counter (WeChat Pay, Alipay, cash) through each edge's POS API,
    # against provider simulators in processes of their own; the reconciliation adds payments.
    # On in `forecourt demo` (--no-payments turns it off); off by default for a chain built in
    # code, which asks for it.
    payments: bool = False


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
        command = self.command()
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

    def command(self) -> list[str]:
        return [sys.executable, "-m", "forecourt.cli", "simulate", self.kind, *self.args]

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
    # Payments per station (when the demo took them), and provider trades no station's
    # payments at HQ account for.
    payments_enabled: bool = False
    payments: dict[str, PaymentFigures] = field(default_factory=dict)
    payment_strays: list[dict[str, Any]] = field(default_factory=list)

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


# --- payments at the counter ------------------------------------------------------------------

# The demo's merchant at WeChat Pay and app at Alipay (their documentation's sample numbers);
# the keys are generated afresh for every run.
WECHAT_MCHID = "1900000109"
WECHAT_APPID = "wxd678efh567hg6787"
WECHAT_MERCHANT_SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
ALIPAY_APP_ID = "2021000122600001"
ALIPAY_SELLER_ID = "2088102146225135"
TENDERS = ("wechat", "alipay", "cash")
# Each run of ten customers at a station pays 4 by WeChat Pay, 3 by Alipay and 3 in cash, in
# an order the seed shuffles; every DECLINE_EVERY-th code payer (the first included) first
# shows a code the payer's wallet declines (balance short) and then a new one.
TENDER_MIX = ("wechat",) * 4 + ("alipay",) * 3 + ("cash",) * 3
DECLINE_EVERY = 8
DECLINED_SUFFIX = "0001"  # both simulators: the payer's balance is short
_SPECIAL_SUFFIXES = frozenset(f"{n:04d}" for n in range(1, 7))  # the simulators' payer cases
COUNTER_LANES = 3  # customers a station's counter serves at once
COUNTER_POLL_S = 0.5  # how often the counter looks for finished, unpaid sales
POS_HQ_TIMEOUT_S = 15.0  # an edge's call to HQ for a code payment gives up after this
CASHIER_PREFIX = "demo-cashier-"
# A provider trade's net money (charged less returned and refunded) by state.
UNPAID_NOTE = (
    "a sale that finished after the counter's last look (still pumping when the demo ended) "
    "may stay unpaid: it is counted, not a disagreement"
)


class PaymentSimulator(DeviceProcess):
    """A payment provider simulator (``python -m forecourt.sim.<module>``) in a process of its
    own, its config, port file and log in ``workdir``; always :meth:`stop` it."""

    def __init__(self, module: str, name: str, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.module = module
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(config), encoding="utf-8")
        self.port_file = workdir / f"{name}.port"
        self.port_file.unlink(missing_ok=True)
        self.base_url = ""
        super().__init__(name, [], workdir)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            self.module,
            "--config",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(self.port_file),
            "--log-level",
            "WARNING",
        ]

    async def serve(self) -> str:
        """Start it; its base URL once it listens (the port file is written then)."""
        port = await self.start(lambda: _port_in(self.port_file))
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def trades(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        """Every trade the simulator made (``GET /sim/trades``)."""
        answer = await client.get(f"{self.base_url}/sim/trades")
        answer.raise_for_status()
        return list(answer.json()["trades"])


@dataclass(frozen=True)
class ProviderKeys:
    """The RSA keys of one demo run: WeChat Pay's merchant and platform keys (and the platform
    certificate), Alipay's app and Alipay keys, PEM."""

    wechat_merchant_private: str
    wechat_merchant_public: str
    wechat_platform_private: str
    wechat_platform_certificate: str
    wechat_apiv3_key: str
    alipay_app_private: str
    alipay_app_public: str
    alipay_private: str
    alipay_public: str


def make_provider_keys() -> ProviderKeys:
    """Fresh keys (a few tenths of a second of CPU: run it in a thread)."""
    import secrets

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from forecourt.sim.wechatpay import make_platform_certificate

    def private(key: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat) -> str:
        return key.private_bytes(
            serialization.Encoding.PEM, fmt, serialization.NoEncryption()
        ).decode()

    def public(key: rsa.RSAPrivateKey) -> str:
        return (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    merchant, platform, app, alipay = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(4)
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    return ProviderKeys(
        wechat_merchant_private=private(merchant, pkcs8),
        wechat_merchant_public=public(merchant),
        wechat_platform_private=private(platform, pkcs8),
        wechat_platform_certificate=make_platform_certificate(platform),
        wechat_apiv3_key=secrets.token_hex(16),
        alipay_app_private=private(app, pkcs8),
        alipay_app_public=public(app),
        alipay_private=private(alipay, serialization.PrivateFormat.TraditionalOpenSSL),
        alipay_public=public(alipay),
    )


def wechat_sim_config(keys: ProviderKeys, seed: int) -> dict[str, Any]:
    return {
        "mchid": WECHAT_MCHID,
        "appid": WECHAT_APPID,
        "merchant": {
            "serial_no": WECHAT_MERCHANT_SERIAL,
            "public_key_pem": keys.wechat_merchant_public,
        },
        "platform": {
            "private_key_pem": keys.wechat_platform_private,
            "mode": "certificate",
            "certificate_pem": keys.wechat_platform_certificate,
        },
        "apiv3_key": keys.wechat_apiv3_key,
        "notify_url": None,
        "seed": seed,
    }


def alipay_sim_config(keys: ProviderKeys, seed: int) -> dict[str, Any]:
    return {
        "app_id": ALIPAY_APP_ID,
        "app_public_key_pem": keys.alipay_app_public,
        "alipay_private_key_pem": keys.alipay_private,
        "seller_id": ALIPAY_SELLER_ID,
        "seed": seed,
    }


@dataclass
class PaymentProviders:
    """The two provider simulators of a demo run and HQ's settings for them."""

    wechat: PaymentSimulator
    alipay: PaymentSimulator
    settings: dict[str, Any]

    def of(self, tender: str) -> PaymentSimulator:
        return self.wechat if tender == "wechat" else self.alipay


async def start_payment_providers(
    workdir: Path, seed: int, keep: Callable[[DeviceProcess], object]
) -> PaymentProviders:
    """Fresh keys, both simulators side by side (each handed to ``keep`` before it starts),
    and HQ's ``payments_*`` settings pointing at them (key files in ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys = await asyncio.to_thread(make_provider_keys)
    wechat = PaymentSimulator(
        "forecourt.sim.wechatpay", "wechatpay", wechat_sim_config(keys, seed), workdir
    )
    alipay = PaymentSimulator(
        "forecourt.sim.alipay", "alipay", alipay_sim_config(keys, seed), workdir
    )
    for simulator in (wechat, alipay):
        keep(simulator)
    await _concurrently([wechat.serve(), alipay.serve()])

    def pem(name: str, text: str) -> Path:
        path = workdir / name
        path.write_text(text, encoding="ascii")
        return path

    settings: dict[str, Any] = {
        "payments_wechat_mchid": WECHAT_MCHID,
        "payments_wechat_appid": WECHAT_APPID,
        "payments_wechat_base_url": wechat.base_url,
        "payments_wechat_merchant_serial_no": WECHAT_MERCHANT_SERIAL,
        "payments_wechat_merchant_key_file": pem(
            "wechat-merchant.pem", keys.wechat_merchant_private
        ),
        "payments_wechat_apiv3_key": SecretStr(keys.wechat_apiv3_key),
        "payments_wechat_platform_certificate_file": pem(
            "wechat-platform.pem", keys.wechat_platform_certificate
        ),
        "payments_wechat_timeout_s": 5.0,
        "payments_alipay_app_id": ALIPAY_APP_ID,
        "payments_alipay_gateway_url": f"{alipay.base_url}/gateway.do",
        "payments_alipay_app_key_file": pem("alipay-app.pem", keys.alipay_app_private),
        "payments_alipay_public_key_file": pem("alipay-public.pem", keys.alipay_public),
        "payments_alipay_seller_id": ALIPAY_SELLER_ID,
        "payments_alipay_timeout_s": 5.0,
        # HQ's order deadlines and rechecks run on its (simulated) clock: the longest allowed,
        # so that no order still open is given up during the demo, and the recovery worker
        # leaves an order alone while its charge is under way (it looks at the rest).
        "payments_pending_deadline_s": 3600.0,
        "payments_unknown_deadline_s": 86_400.0,
        "payments_recheck_s": 600.0,
        "payments_recheck_max_s": 3600.0,
        "payments_confirm_wait_s": 3.0,
        "payments_poll_interval_s": 0.2,
    }
    return PaymentProviders(wechat, alipay, settings)


def payment_code(rng: random.Random, tender: str, suffix: str | None = None) -> str:
    """A payer's payment code: WeChat's 18 digits from 13, Alipay's 18 from 28. The last four
    digits pick the payer's behaviour at the simulators: ``suffix``, else one that pays."""
    prefix = "13" if tender == "wechat" else "28"
    while True:
        digits = "".join(rng.choice("0123456789") for _ in range(16))
        if suffix is not None:
            return prefix + digits[:12] + suffix
        if digits[12:] not in _SPECIAL_SUFFIXES:
            return prefix + digits


def cash_tendered(rng: random.Random, amount_fen: int) -> int:
    """What a customer hands over: the exact amount, or rounded up to a ¥10, ¥50 or ¥100 note."""
    note = rng.choice((1, 1000, 5000, 10_000))
    return -(-amount_fen // note) * note


@dataclass
class _Customer:
    """One sale's payer at the counter: the tender, the codes still to show, the next try."""

    tender: str
    declines: int = 0  # declining codes still to be shown first
    not_before: float = 0.0
    gave_up: bool = False
    tendered_fen: int | None = None


@dataclass
class CounterStats:
    """What a station's counter did, as its customers saw it."""

    paid: Counter[str] = field(default_factory=Counter)  # tender → sales paid
    declined: int = 0  # codes the payer's wallet declined (a new code followed)
    retried: int = 0  # answers that meant "ask again" (pending, HQ away, in progress)
    sign_ins: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # error code → times


class StationCounter:
    """A station's counter: customers pay their finished sales through the edge's POS API as
    the station's cashier (a staff token from HQ), in the seeded tender mix, a declined code
    followed by a new one; up to ``lanes`` customers at once, never two payments of one sale.

    The counter asks the edge for the unpaid sales only when it has no customer waiting (and
    at most every ``COUNTER_POLL_S``): the list is the journal's whole backlog."""

    def __init__(
        self,
        station: StationRun,
        hq_url: str,
        username: str,
        password: str,
        rng: random.Random,
        lanes: int = COUNTER_LANES,
    ) -> None:
        self.station = station
        self.hq_url = hq_url
        self.username = username
        self.password = password
        self.rng = rng
        self.lanes = lanes
        self.stats = CounterStats()
        self._customers: dict[str, _Customer] = {}
        self._waiting: dict[str, dict[str, Any]] = {}  # sale_id → sale, oldest first
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._mix: list[str] = []
        self._code_payers = 0
        self._listed_at = float("-inf")
        self._token: str | None = None
        self._edge = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=station.edge.app),
            base_url="http://edge",
            timeout=30.0,
        )
        self._sign_in_lock = asyncio.Lock()

    async def close(self) -> None:
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._edge.aclose()

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve customers until ``stop`` is set, then let the payments under way end."""
        while not stop.is_set():
            await self._step(stop)
        await self._settle_in_flight()

    async def pay_all(self, deadline: float) -> bool:
        """Serve until the edge lists no finished sale unpaid (True) or ``deadline`` (loop
        time); a sale given up on (its payment refused for good) stays unpaid."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            if not self._waiting and not self._in_flight:
                self._listed_at = float("-inf")  # look again now
                if await self._list() == 0:
                    return True
            await self._step(None, until=deadline)
        await self._settle_in_flight()
        return False

    async def _step(self, stop: asyncio.Event | None, until: float | None = None) -> None:
        """List the unpaid sales when due, start paying those waiting as lanes are free,
        then wait for a payment to end, ``stop``, or the next look."""
        loop = asyncio.get_running_loop()
        if not self._waiting and loop.time() - self._listed_at >= COUNTER_POLL_S:
            await self._list()
        now = loop.time()
        for sale_id, sale in list(self._waiting.items()):
            if len(self._in_flight) >= self.lanes:
                break
            customer = self._customer(sale)
            if customer.not_before > now:
                continue
            del self._waiting[sale_id]
            task = asyncio.create_task(self._pay(sale, customer))
            self._in_flight[sale_id] = task
            task.add_done_callback(functools.partial(self._done, sale_id))
        pause = COUNTER_POLL_S
        if self._waiting and len(self._in_flight) < self.lanes:
            # A lane is free and every waiting customer is to try again later.
            soonest = min(self._customer(s).not_before for s in self._waiting.values())
            pause = min(pause, max(0.01, soonest - now))
        if until is not None:
            pause = min(pause, max(0.0, until - now))
        waits: list[asyncio.Future[Any]] = list(self._in_flight.values())
        stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stopping is not None:
            waits.append(stopping)
        try:
            if waits:
                await asyncio.wait(waits, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(pause)
        finally:
            if stopping is not None:
                stopping.cancel()

    async def _list(self) -> int:
        """The edge's unpaid sales, oldest first, into the waiting line (those under way and
        those given up on apart); how many the edge listed (-1: it did not answer)."""
        self._listed_at = asyncio.get_running_loop().time()
        try:
            answer = await self._call(
                "GET", "/v1/pos/sales", params={"unpaid": "true", "limit": 500}
            )
        except (httpx.HTTPError, OSError) as exc:
            self.stats.errors[type(exc).__name__] += 1
            return -1
        if answer.status_code != 200:
            self.stats.errors[f"list_{answer.status_code}"] += 1
            return -1
        sales = answer.json()
        for sale in reversed(sales):  # the edge lists the newest first
            sale_id = sale["sale_id"]
            if sale_id in self._in_flight or self._customer(sale).gave_up:
                continue
            self._waiting.setdefault(sale_id, sale)
        return sum(1 for sale in sales if not self._customer(sale).gave_up)

    async def _settle_in_flight(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    def _customer(self, sale: dict[str, Any]) -> _Customer:
        found = self._customers.get(sale["sale_id"])
        if found is not None:
            return found
        if not self._mix:
            self._mix = list(TENDER_MIX)
            self.rng.shuffle(self._mix)
        tender = self._mix.pop()
        customer = _Customer(tender)
        if tender == "cash":
            customer.tendered_fen = cash_tendered(self.rng, int(sale["amount_fen"]))
        else:
            customer.declines = 1 if self._code_payers % DECLINE_EVERY == 0 else 0
            self._code_payers += 1
        self._customers[sale["sale_id"]] = customer
        return customer

    def _done(self, sale_id: str, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(sale_id, None)

    async def _pay(self, sale: dict[str, Any], customer: _Customer) -> None:
        """One try at paying ``sale``; a sale not paid yet waits in line again."""
        body: dict[str, Any]
        if customer.tender == "cash":
            body = {"method": "cash", "tendered_fen": customer.tendered_fen}
        else:
            declining = customer.declines > 0
            code = payment_code(self.rng, customer.tender, DECLINED_SUFFIX if declining else None)
            body = {"method": "code", "auth_code": code}
        try:
            answer = await self._call("POST", f"/v1/pos/sales/{sale['sale_id']}/pay", json=body)
        except (httpx.HTTPError, OSError) as exc:
            self.stats.errors[type(exc).__name__] += 1
            self._again(sale, customer, 0.5)
            return
        status = answer.status_code
        code_ = _error_code(answer)
        if status == 200 or code_ == "pos.sale_paid":
            customer.gave_up = True  # nothing more to do for this sale
            self.stats.paid[customer.tender] += 1
        elif status == 402:
            self.stats.declined += 1
            customer.declines = max(0, customer.declines - 1)  # the next code is a new one
            self._again(sale, customer, 0.0)
        elif status in (202, 503) or code_ == "pos.payment_in_progress":
            self.stats.retried += 1
            self._again(sale, customer, 0.3)
        else:
            self.stats.errors[code_ or f"http_{status}"] += 1
            if customer.tender != "cash":
                # A code the counter cannot take (HQ refused the sale, say): cash instead.
                customer.tender = "cash"
                customer.tendered_fen = cash_tendered(self.rng, int(sale["amount_fen"]))
                self._again(sale, customer, 0.3)
            else:
                customer.gave_up = True

    def _again(self, sale: dict[str, Any], customer: _Customer, delay_s: float) -> None:
        customer.not_before = asyncio.get_running_loop().time() + delay_s
        self._waiting[sale["sale_id"]] = sale

    async def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """A request to the edge as the cashier, signed in again when the token is refused."""
        token = self._token or await self._sign_in(None)
        answer = await self._edge.request(
            method, path, headers={"authorization": f"Bearer {token}"}, **kw
        )
        if answer.status_code == 401:
            token = await self._sign_in(token)
            answer = await self._edge.request(
                method, path, headers={"authorization": f"Bearer {token}"}, **kw
            )
        return answer

    async def _sign_in(self, refused: str | None) -> str:
        async with self._sign_in_lock:
            if self._token is not None and self._token != refused:
                return self._token  # another lane signed in meanwhile
            async with httpx.AsyncClient(base_url=self.hq_url, timeout=10.0) as hq:
                answer = await hq.post(
                    "/v1/auth/sign-in",
                    json={"username": self.username, "password": self.password},
                )
            answer.raise_for_status()
            self.stats.sign_ins += 1
            self._token = str(answer.json()["access_token"])
            return self._token


def _error_code(answer: httpx.Response) -> str | None:
    if answer.status_code < 400:
        return None
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        return str(answer.json()["error"]["code"])
    return None


@dataclass
class Tally:
    """A count and its money."""

    count: int = 0
    fen: int = 0

    def add(self, count: int, fen: int) -> None:
        self.count += count
        self.fen += fen


def _tenders(*names: str) -> dict[str, Tally]:
    return {name: Tally() for name in names}


@dataclass
class PaymentFigures:
    """One station's payments, each figure from its own store: the edge's journal (its sales
    and their payment attempts), HQ's payments API, the provider simulators' trades."""

    sales: int = 0  # the journal's sales to be paid (pump tests and own use apart)
    paid_at_edge: Tally = field(default_factory=Tally)  # sales paid, at their journaled amount
    unpaid: int = 0
    hq_paid: Tally = field(default_factory=Tally)  # sales HQ holds money for, and that money
    hq_paid_fen: int = 0  # paid at HQ (orders paid, refunding or (partly) refunded)
    hq_refunded_fen: int = 0
    by_tender: dict[str, Tally] = field(default_factory=lambda: _tenders(*TENDERS))  # HQ, net
    declined: int = 0  # code orders HQ holds failed or cancelled (nothing charged)
    at_providers: dict[str, Tally] = field(default_factory=lambda: _tenders("wechat", "alipay"))
    paid_twice: int = 0  # sales paid more than once, in any store; trades charged twice
    open_orders: int = 0  # HQ orders not settled (pending, unknown, reversing ...)
    mismatched: list[dict[str, Any]] = field(default_factory=list)  # sales whose money differs
    counter: CounterStats | None = None

    @property
    def agree(self) -> bool:
        providers_agree = all(
            self.at_providers[t] == self.by_tender[t] for t in ("wechat", "alipay")
        )
        return (
            self.hq_paid_fen - self.hq_refunded_fen == self.paid_at_edge.fen
            and self.hq_paid.count == self.paid_at_edge.count
            and sum(t.fen for t in self.by_tender.values()) == self.paid_at_edge.fen
            and providers_agree
            and self.paid_twice == 0
            and self.open_orders == 0
            and not self.mismatched
        )

    def as_json(self) -> dict[str, Any]:
        counter = self.counter
        return {
            "sales": self.sales,
            "paid_sales": self.paid_at_edge.count,
            "paid_fen_at_edge": self.paid_at_edge.fen,
            "unpaid_sales": self.unpaid,
            "paid_sales_at_hq": self.hq_paid.count,
            "paid_fen_at_hq": self.hq_paid_fen,
            "refunded_fen_at_hq": self.hq_refunded_fen,
            "net_fen_at_hq": self.hq_paid_fen - self.hq_refunded_fen,
            "by_tender": {t: dataclasses.asdict(v) for t, v in self.by_tender.items()},
            "at_providers": {t: dataclasses.asdict(v) for t, v in self.at_providers.items()},
            "declined_at_hq": self.declined,
            "paid_twice": self.paid_twice,
            "open_orders": self.open_orders,
            "mismatched_sales": self.mismatched,
            "counter": None
            if counter is None
            else {
                "paid": {t: counter.paid.get(t, 0) for t in TENDERS},
                "declined_codes": counter.declined,
                "retried": counter.retried,
                "sign_ins": counter.sign_ins,
                "errors": dict(sorted(counter.errors.items())),
            },
            "agree": self.agree,
        }


_HQ_PAID_STATES = frozenset({"paid", "refunding", "partially_refunded", "refunded"})
_HQ_DECLINED_STATES = frozenset({"failed", "cancelled"})


async def _journal_payments(path: Path) -> tuple[dict[str, int], dict[str, list[str]]]:
    """An edge journal's sales to be paid (sale_id → amount) and each sale's payment attempts
    that were paid (sale_id → their methods), read from its file."""

    def read() -> tuple[dict[str, int], dict[str, list[str]]]:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            sales = {
                str(sale_id): int(amount)
                for sale_id, amount in conn.execute(
                    "SELECT sale_id, amount_minor FROM journal WHERE dispense_type = 'sale'"
                )
            }
            paid: dict[str, list[str]] = {}
            for sale_id, method in conn.execute(
                "SELECT sale_id, method FROM pos_payment WHERE status = 'paid' ORDER BY id"
            ):
                paid.setdefault(str(sale_id), []).append(str(method))
        return sales, paid

    return await asyncio.to_thread(read)


def _trade_net(trade: dict[str, Any]) -> tuple[int, int]:
    """(times charged, net fen) of a simulator trade: charged less returned and refunded."""
    amount = int(trade.get("total", trade.get("amount_fen", 0)) or 0)
    charged = int(trade.get("charged_times", 0) or 0)
    net = amount * charged - int(trade.get("returned_fen", 0) or 0)
    return charged, net - int(trade.get("refunded_fen", 0) or 0)


def describe_payments(result: dict[str, Any], station: str) -> str | None:
    """``S001 payments: 31 of 31 sales paid (12 WeChat, 10 Alipay, 9 cash; 2 declined codes
    paid with a new one), ¥2,345.67 at HQ = the paid sales; providers agree``; None when the
    demo took no payments."""
    row = next((p for p in result.get("per_station_payments", []) if p["station"] == station), None)
    if row is None:
        return None
    tenders = row["by_tender"]
    names = {"wechat": "WeChat", "alipay": "Alipay", "cash": "cash"}
    mix = ", ".join(f"{tenders[t]['count']} {names[t]}" for t in TENDERS)
    declined = row["counter"]["declined_codes"] if row["counter"] else row["declined_at_hq"]
    text = f"{station} payments: {row['paid_sales']} of {row['sales']} sales paid ({mix}"
    if declined:
        text += f"; {declined} declined code{'s' if declined != 1 else ''} paid with a new one"
    text += f"), ¥{row['net_fen_at_hq'] / 100:,.2f} at HQ"
    if row["agree"]:
        text += " = the paid sales; providers agree"
    else:
        problems = []
        if row["net_fen_at_hq"] != row["paid_fen_at_edge"]:
            problems.append(f"the paid sales ¥{row['paid_fen_at_edge'] / 100:,.2f}")
        for t in ("wechat", "alipay"):
            hq, sim = tenders[t], row["at_providers"][t]
            if hq != sim:
                problems.append(
                    f"{names[t]} {sim['count']} trades ¥{sim['fen'] / 100:,.2f} vs HQ "
                    f"{hq['count']} ¥{hq['fen'] / 100:,.2f}"
                )
        if row["paid_twice"]:
            problems.append(f"{row['paid_twice']} paid twice")
        if row["mismatched_sales"]:
            problems.append(f"{len(row['mismatched_sales'])} sales differ")
        text += " DISAGREE: " + "; ".join(problems or ["see the report"])
    if row["unpaid_sales"]:
        text += f"; {row['unpaid_sales']} unpaid (finished after the counter's last look)"
    return text


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
        # Payments: the provider simulators, each station's cashier (password) and counter.
        self.providers: PaymentProviders | None = None
        self._cashiers: dict[str, str] = {}
        self.counters: dict[str, StationCounter] = {}
        self._counter_tasks: list[asyncio.Task[None]] = []
        self._counters_stop: asyncio.Event | None = None

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
        payments: dict[str, Any] = {}
        if opts.payments:
            # HQ charges payment codes at the two provider simulators (started first: HQ's
            # settings name where they listen).
            self.providers = await start_payment_providers(
                self.workdir / "payments", opts.seed, self._processes.append
            )
            payments = self.providers.settings
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
            **payments,
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
        if opts.payments:
            # One cashier per station, who takes its payments at the counter.
            for station in chain.stations:
                _, password = await self.hq.identity.create_user(
                    f"{CASHIER_PREFIX}{station.code.lower()}",
                    password=None,
                    display_name=f"demo cashier of {station.code}",
                    actor="demo",
                    grants=[("cashier", Scope.station(station.code))],
                )
                assert password is not None  # generated
                self._cashiers[station.code] = password
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
        if opts.payments:
            self._open_counters()

    def _open_counters(self) -> None:
        """Every station's counter, serving its customers until :meth:`quiesce`."""
        self._counters_stop = asyncio.Event()
        for index, st in enumerate(self.stations):
            counter = StationCounter(
                st,
                self.hq_url,
                f"{CASHIER_PREFIX}{st.code.lower()}",
                self._cashiers[st.code],
                random.Random(self.opts.seed * 1_000 + index),
            )
            self.counters[st.code] = counter
            self._counter_tasks.append(
                asyncio.create_task(counter.serve(self._counters_stop), name=f"counter-{st.code}")
            )

    async def _close_counters(self) -> None:
        """Stop the counters' own rounds (the payments under way end first)."""
        if self._counters_stop is not None:
            self._counters_stop.set()
        tasks, self._counter_tasks = self._counter_tasks, []
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pay_remaining(self, deadline: float) -> bool:
        """Once the forecourts are idle: every finished sale paid (True), or the deadline."""
        await self._close_counters()
        done = await _concurrently(c.pay_all(deadline) for c in self.counters.values())
        return all(done)

    async def _cash_uploaded(self, deadline: float) -> bool:
        """Wait (until ``deadline``, loop time) for every edge's cash records to reach HQ."""
        loop = asyncio.get_running_loop()
        stores = [(st.edge, PosStore(st.edge.journal)) for st in self.stations]
        while True:
            waiting = 0
            for edge, store in stores:
                pending, _ = await store.cash_usage()
                if pending and edge.cash_upload is not None:
                    edge.cash_upload.wake.set()
                waiting += pending
            if waiting == 0:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)

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
            # HQ, on one busy process with every station, may take a few seconds to answer a
            # code payment: the counter waits for it rather than asking again.
            pos_hq_timeout_s=POS_HQ_TIMEOUT_S,
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
        if self.counters:
            # The last customers pay (a sale finishing after this stays unpaid), with the
            # pumps no longer polled.
            await self._pay_remaining(deadline)
        for st in self.stations:
            remaining = max(1.0, deadline - loop.time())
            drained = await st.edge.drain(remaining) and drained
        if self.counters:
            drained = await self._cash_uploaded(max(deadline, loop.time() + 1.0)) and drained
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
            if self.providers is not None:
                await self._reconcile_payments(hq, rec, self.providers)
            rec.audit = await _audit_trail(hq)
        return rec

    async def _reconcile_payments(
        self, hq: httpx.AsyncClient, rec: Reconciliation, providers: PaymentProviders
    ) -> None:
        """Per station: the sales the edge's journal holds paid (at their journaled amount),
        HQ's payment orders (paid less refunded, by tender), the provider simulators' trades;
        every sale paid once at most."""
        rec.payments_enabled = True
        station_of: dict[str, str] = {}  # a code payment's out_trade_no → its station
        for st in self.stations:
            counter = self.counters.get(st.code)
            figures = PaymentFigures(counter=counter.stats if counter else None)
            rec.payments[st.code] = figures
            # 1. the edge's journal: its sales, and the payment attempts paid
            sales, paid_attempts = await _journal_payments(st.edge.journal.path)
            figures.sales = len(sales)
            at_edge: dict[str, int] = {}
            for sale_id, methods in paid_attempts.items():
                figures.paid_twice += len(methods) - 1
                at_edge[sale_id] = sales.get(sale_id, 0)
            figures.paid_at_edge = Tally(len(at_edge), sum(at_edge.values()))
            figures.unpaid = sum(1 for sale_id in sales if sale_id not in at_edge)
            # 2. HQ's payment orders, through its API
            at_hq: dict[str, int] = {}  # sale_id → paid less refunded
            paid_orders: Counter[str] = Counter()
            for order in await _hq_orders(hq, st.code):
                if order["out_trade_no"]:
                    station_of[order["out_trade_no"]] = st.code
                state, tender = order["state"], order["tender"]
                if state in _HQ_PAID_STATES:
                    net = int(order["amount_fen"]) - int(order["refunded_fen"])
                    figures.hq_paid_fen += int(order["amount_fen"])
                    figures.hq_refunded_fen += int(order["refunded_fen"])
                    paid_orders[order["sale_id"]] += 1
                    at_hq[order["sale_id"]] = at_hq.get(order["sale_id"], 0) + net
                    if net > 0:
                        figures.by_tender.setdefault(tender, Tally()).add(1, net)
                elif state in _HQ_DECLINED_STATES:
                    figures.declined += 1 if tender != "cash" else 0
                else:
                    figures.open_orders += 1
            figures.paid_twice += sum(n - 1 for n in paid_orders.values())
            held = {sale_id: fen for sale_id, fen in at_hq.items() if fen > 0}
            figures.hq_paid = Tally(len(held), sum(held.values()))
            for sale_id in sorted(set(at_edge) | set(at_hq)):
                edge_fen, hq_fen = at_edge.get(sale_id, 0), at_hq.get(sale_id, 0)
                if edge_fen != hq_fen:
                    figures.mismatched.append(
                        {"sale_id": sale_id, "paid_fen_at_edge": edge_fen, "net_fen_at_hq": hq_fen}
                    )
        # 3. the providers' own trades (their simulators' record), by the station whose
        #    payment at HQ names each (WeChat Pay's also carry the station as the store)
        async with httpx.AsyncClient(timeout=10.0) as client:
            for tender in ("wechat", "alipay"):
                for trade in await providers.of(tender).trades(client):
                    charged, net = _trade_net(trade)
                    if charged == 0:
                        continue  # declined: nobody was charged
                    code = station_of.get(trade["out_trade_no"]) or trade.get("store_id")
                    held_by = rec.payments.get(code) if code else None
                    if held_by is None:
                        rec.payment_strays.append(
                            {"tender": tender, "out_trade_no": trade["out_trade_no"], "fen": net}
                        )
                        continue
                    held_by.paid_twice += charged - 1
                    if net > 0:
                        held_by.at_providers[tender].add(1, net)

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
        for task in self._counter_tasks:
            task.cancel()
        await self._close_counters()
        for counter in self.counters.values():
            with contextlib.suppress(Exception):
                await counter.close()
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


async def _hq_orders(hq: httpx.AsyncClient, station: str) -> list[dict[str, Any]]:
    """Every payment order HQ holds for the station, through its payments API."""
    orders: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if after:
            params["after"] = after
        answer = await hq.get(f"/v1/stations/{station}/payments", params=params)
        answer.raise_for_status()
        page = answer.json()
        orders.extend(page["items"])
        after = page["next_after"]
        if not after:
            return orders


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
    payments = payments_report(rec)
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
        "agree": agree
        and cells_agree
        and rec.lost == 0
        and rec.duplicates == 0
        and payments["agree"],
        "payments": payments,
        "per_station_payments": [
            {"station": code, **figures.as_json()} for code, figures in sorted(rec.payments.items())
        ],
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


def payments_report(rec: Reconciliation) -> dict[str, Any]:
    """The chain's payments: the stations' figures summed, and whether they all agree (no
    payments taken: nothing to disagree about)."""
    if not rec.payments_enabled:
        return {"enabled": False, "agree": True}
    stations = list(rec.payments.values())

    def total(get: Callable[[PaymentFigures], dict[str, Tally]], names: Sequence[str]) -> Any:
        out = {name: Tally() for name in names}
        for figures in stations:
            for name, tally in get(figures).items():
                out.setdefault(name, Tally()).add(tally.count, tally.fen)
        return {name: dataclasses.asdict(t) for name, t in out.items()}

    paid_at_hq = sum(f.hq_paid_fen for f in stations)
    refunded = sum(f.hq_refunded_fen for f in stations)
    return {
        "enabled": True,
        "sales": sum(f.sales for f in stations),
        "paid_sales": sum(f.paid_at_edge.count for f in stations),
        "paid_fen_at_edges": sum(f.paid_at_edge.fen for f in stations),
        "paid_sales_at_hq": sum(f.hq_paid.count for f in stations),
        "paid_fen_at_hq": paid_at_hq,
        "refunded_fen_at_hq": refunded,
        "net_fen_at_hq": paid_at_hq - refunded,
        "unpaid_sales": sum(f.unpaid for f in stations),
        "unpaid_note": UNPAID_NOTE,
        "by_tender": total(lambda f: f.by_tender, TENDERS),
        "at_providers": total(lambda f: f.at_providers, ("wechat", "alipay")),
        "declined_at_hq": sum(f.declined for f in stations),
        "declined_codes": sum(f.counter.declined for f in stations if f.counter),
        "paid_twice": sum(f.paid_twice for f in stations),
        "open_orders": sum(f.open_orders for f in stations),
        "mismatched_sales": sum(len(f.mismatched) for f in stations),
        "stray_trades": rec.payment_strays,
        "agree": all(f.agree for f in stations) and not rec.payment_strays,
    }


def describe_chain_payments(result: dict[str, Any]) -> str | None:
    """``payments: 93 of 93 sales paid, ¥7,654.32 at HQ, 37 WeChat Pay trades ¥... and 28
    Alipay trades ¥... as HQ has them; 0 unpaid; AGREE``; None without payments."""
    pay = result.get("payments") or {}
    if not pay.get("enabled"):
        return None
    sims = pay["at_providers"]
    text = (
        f"payments: {pay['paid_sales']} of {pay['sales']} sales paid, "
        f"¥{pay['net_fen_at_hq'] / 100:,.2f} at HQ (paid ¥{pay['paid_fen_at_hq'] / 100:,.2f}, "
        f"refunded ¥{pay['refunded_fen_at_hq'] / 100:,.2f}); provider trades: "
        f"WeChat Pay {sims['wechat']['count']} ¥{sims['wechat']['fen'] / 100:,.2f}, "
        f"Alipay {sims['alipay']['count']} ¥{sims['alipay']['fen'] / 100:,.2f}; "
        f"paid twice {pay['paid_twice']}; unpaid {pay['unpaid_sales']}"
    )
    if pay["unpaid_sales"]:
        text += f" ({UNPAID_NOTE})"
    return text + ("; AGREE" if pay["agree"] else "; DISAGREE")


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
                if (paid := describe_payments(result, st.code)) is not None:
                    progress(paid)
            if (paid := describe_chain_payments(result)) is not None:
                progress(paid)
        return result
    finally:
        await demo.stop()
