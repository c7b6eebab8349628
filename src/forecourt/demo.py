"""``forecourt demo``: a small chain end to end, then a three-way reconciliation.

HQ runs in this process (HTTP on a free local port), each station gets a simulated PTS-2
forecourt controller in its own process (with simulated customers) and an edge node that
talks to it over jsonPTS and to HQ over HTTP. A simulated clock runs ``speed`` times faster
than wall time and is placed so that it reaches the real current time only after the demo's
whole time budget: no sale is stamped later than now.

At the end the demo stops new customers, lets fuellings finish, drains the edge outboxes and
the HQ relay (bounded waits), then reads each figure from its own store: the controllers'
transaction memory (jsonPTS ``ReportGetPumpTransactions``), each edge's journal, and HQ's
query API.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn
from pydantic import SecretStr

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.edge.node import EdgeNode, build_edge_node, jsonpts_factory
from forecourt.infra.db import SCHEMAS, Database
from forecourt.infra.listener import listening_socket
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
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.sales.store import sale_t
from forecourt.settings import EdgeSettings, Settings
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


@dataclass
class StationRun:
    code: str
    credential: str
    simulator: SimulatorProcess
    edge: EdgeNode


@dataclass
class Figures:
    sales: int = 0
    volume_ml: int = 0
    amount_minor: int = 0

    def add(self, sales: int, volume_ml: int, amount_minor: int) -> None:
        self.sales += sales
        self.volume_ml += volume_ml
        self.amount_minor += amount_minor


@dataclass
class Reconciliation:
    per_station_grade: dict[tuple[str, str], dict[str, Figures]] = field(default_factory=dict)
    lost: int = 0
    lost_sales: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    quarantined: int = 0

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
    """What an earlier demo left in a work folder: its stations' journals and controllers."""
    return sorted(
        d
        for d in workdir.iterdir()
        if d.is_dir() and ((d / "edge.db").exists() or (d / "pts").exists())
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
    snapshot: StationSnapshot, at: datetime, grade_ids: dict[str, int], opts: DemoOptions, seed: int
) -> dict[str, Any]:
    prices = snapshot.prices_at(at)
    kinds = {g.code: g.kind for g in snapshot.grades}
    pumps = []
    for fp in snapshot.fuelling_points:
        pumps.append(
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
    return {
        "currency": snapshot.currency,
        "volume_decimals": 2,
        "amount_decimals": 2,
        "price_decimals": 2,
        "auth": {"username": "admin", "password": "demo-controller"},
        "timezone": snapshot.station.timezone,
        "pumps": pumps,
        "customers": {
            "arrivals": True,
            "arrivals_per_hour": opts.arrivals_per_hour,
            "seed": seed,
            "grade_mix": [
                {"grade_id": grade_ids[g], "weight": weights.get(g, 1)} for g in grade_ids
            ],
            "truck_grade_ids": [grade_ids[g] for g, k in kinds.items() if k == "diesel"],
        },
    }


class DemoChain:
    """The running demo; its steps are separate so tests can act between them."""

    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
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
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self.stations: list[StationRun] = []
        self.price_change: Price | None = None  # the scheduled rise, when there is one

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
        grade_ids = {g.code: i + 1 for i, g in enumerate(chain.grades)}
        for index, station in enumerate(chain.stations):
            _, token = await issue_credential(self.hq.db, station.code, actor="demo")
            snapshot = await build_snapshot(self.hq.db, station.code, self.clock.now())
            sim = SimulatorProcess(
                simulator_config(snapshot, self.clock.now(), grade_ids, opts, opts.seed + index),
                self.workdir / station.code / "pts",
                env=self.clock.to_env(),
            )
            await asyncio.to_thread(sim.start)
            edge_settings = EdgeSettings(
                station=station.code,
                hq_url=self.hq_url,
                credential=SecretStr(token),
                journal_path=self.workdir / station.code / "edge.db",
                controller_url=sim.base_url,
                controller_user="admin",
                controller_password=SecretStr("demo-controller"),
                poll_interval_s=0.05,
                log_json=False,
            )
            edge = build_edge_node(edge_settings, self.clock, jsonpts_factory(edge_settings))
            await edge.start()
            self.stations.append(StationRun(station.code, token, sim, edge))

    async def restart_controller(
        self, code: str, sig: int = signal.SIGTERM, *, reset_counters: bool = True
    ) -> None:
        """Restart one station's simulated PTS-2 (same address, same dispensers and memory);
        with ``reset_counters`` its transaction numbers start again at 1."""
        station = next(st for st in self.stations if st.code == code)
        await asyncio.to_thread(station.simulator.restart, sig, reset_counters=reset_counters)

    async def set_faults(self, code: str, faults: dict[str, Any]) -> dict[str, Any]:
        """Switch simulator faults on or off at one station (see forecourt.sim.pts_controller)."""
        station = next(st for st in self.stations if st.code == code)
        async with httpx.AsyncClient(timeout=5.0) as client:
            answer = await client.post(
                f"{station.simulator.base_url}/sim/control", json={"faults": faults}
            )
            answer.raise_for_status()
            body: dict[str, Any] = answer.json()
            return body

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
        async with httpx.AsyncClient(timeout=5.0) as client:
            for st in self.stations:
                await client.post(f"{st.simulator.base_url}/sim/control", json={"arrivals": False})
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DRAIN_BUDGET_S
            forecourts_idle = False
            calm = 0  # consecutive all-idle looks; a customer walking to a pump shows as idle
            while loop.time() < deadline:
                idle = 0
                for st in self.stations:
                    health = (await client.get(f"{st.simulator.base_url}/sim/health")).json()
                    pumps_idle = all(p == "idle" for p in health.get("pumps", {}).values())
                    edge_idle = all(
                        s in ("idle", "offline") for s in st.edge.controller.states().values()
                    )
                    if health.get("queue", 0) == 0 and pumps_idle and edge_idle:
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
            remaining = max(1.0, deadline - asyncio.get_running_loop().time())
            drained = await st.edge.drain(remaining) and drained
        assert self.hq is not None
        await self.hq.relay.drain(timeout=max(1.0, deadline - asyncio.get_running_loop().time()))
        return forecourts_idle and drained

    async def reconcile(self) -> Reconciliation:
        rec = Reconciliation()
        window_end = self.clock.now() + timedelta(minutes=1)
        async with httpx.AsyncClient(base_url=self.hq_url, timeout=30.0) as hq:
            for st in self.stations:
                snapshot = st.edge.snapshots.current
                assert snapshot is not None
                nozzle_grade = {
                    (fp.number, n.number): n.grade
                    for fp in snapshot.fuelling_points
                    for n in fp.nozzles
                }

                def cell(grade: str, code: str = st.code) -> dict[str, Figures]:
                    return rec.per_station_grade.setdefault(
                        (code, grade),
                        {"dispensers": Figures(), "edges": Figures(), "hq": Figures()},
                    )

                # 1. the dispensers, through the controller's own interface
                driver = JsonPtsDriver(
                    st.simulator.base_url,
                    "admin",
                    "demo-controller",
                    timezone=snapshot.station.timezone,
                    currency=snapshot.currency,
                )
                await driver.open()
                # A device transaction by its contents: after a controller restart with its
                # counters reset, one pump shows the same number for two sales.
                device_keys: Counter[tuple[int, int, int, int]] = Counter()
                device_grade: dict[tuple[int, int, int, int], str] = {}
                try:
                    for fp in snapshot.fuelling_points:
                        for txn in await driver.transactions(
                            fp.number, self.sim_start - timedelta(hours=1), window_end
                        ):
                            grade = nozzle_grade.get((txn.pump, txn.nozzle), "unknown")
                            cell(grade)["dispensers"].add(1, txn.volume_ml, txn.amount_minor)
                            key = (txn.pump, txn.transaction, txn.volume_ml, txn.amount_minor)
                            device_keys[key] += 1
                            device_grade[key] = grade
                finally:
                    await driver.close()
                # 2. the edge's journal
                for row in await st.edge.journal.summary():
                    cell(row["grade"])["edges"].add(
                        row["sales"], row["volume_ml"], row["amount_minor"]
                    )
                # 3. HQ, through its query API
                summary = (await hq.get("/v1/sales/summary", params={"station": st.code})).json()
                for g in summary["groups"]:
                    cell(g["grade"])["hq"].add(g["sales"], g["volume_ml"], g["amount_minor"])
                    if g["quarantined"]:
                        rec.quarantined += g["sales"]
                rec.duplicates += summary["natural_key_duplicates"]
                at_hq: Counter[tuple[int, int, int, int]] = Counter()
                after = None
                while True:
                    params: dict[str, Any] = {"station": st.code, "limit": 5000}
                    if after:
                        params["after"] = after
                    page = (await hq.get("/v1/sales", params=params)).json()
                    at_hq.update(
                        (s["fuelling_point"], s["device_txn"], s["volume_ml"], s["amount_minor"])
                        for s in page["items"]
                    )
                    after = page["next_after"]
                    if not after:
                        break
                for key, missing in sorted((device_keys - at_hq).items()):
                    rec.lost += missing
                    rec.lost_sales.extend(
                        {
                            "station": st.code,
                            "fuelling_point": key[0],
                            "device_txn": key[1],
                            "grade": device_grade[key],
                            "volume_ml": key[2],
                            "amount_minor": key[3],
                        }
                        for _ in range(missing)
                    )
        return rec

    async def stop(self) -> None:
        for st in self.stations:
            with contextlib.suppress(Exception):
                await st.edge.stop()
            st.simulator.stop()
        if self._server is not None:
            self._server.should_exit = True
            if self._server_task is not None:
                await self._server_task
        if self.hq is not None:
            await self.hq.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def report(rec: Reconciliation, stations: int, drained: bool, elapsed_s: float) -> dict[str, Any]:
    d, e, h = rec.total("dispensers"), rec.total("edges"), rec.total("hq")
    agree = (
        (d.sales, d.volume_ml, d.amount_minor)
        == (e.sales, e.volume_ml, e.amount_minor)
        == (h.sales, h.volume_ml, h.amount_minor)
    )
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
        "agree": agree and rec.lost == 0 and rec.duplicates == 0,
        "drained": drained,
        "elapsed_s": round(elapsed_s, 1),
        "per_station_grade": [
            {"station": s, "grade": g, **{k: dataclasses.asdict(v) for k, v in figures.items()}}
            for (s, g), figures in sorted(rec.per_station_grade.items())
        ],
        "lost_sales": rec.lost_sales,
    }


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
            journaled = sum(st.edge.controller.stats.journaled for st in demo.stations)
            uploaded = sum(st.edge.sync.stats.uploaded for st in demo.stations)
            progress(
                f"t={elapsed:4.0f}s  sim {demo.clock.now().astimezone().strftime('%H:%M')}  "
                f"journaled {journaled:5d}  at HQ {uploaded:5d}  "
                + "  ".join(
                    f"{st.code}:{st.edge.controller.stats.journaled}" for st in demo.stations
                )
            )

        await demo.run_traffic(tick)
        drained = await demo.quiesce(progress)
        rec = await demo.reconcile()
        return report(rec, len(demo.stations), drained, time.monotonic() - started)
    finally:
        await demo.stop()
