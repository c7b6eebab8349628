"""``forecourt chaos delivery``: event delivery under faults, end to end, on real processes.

HQ (``forecourt serve`` with ``FORECOURT_RELAY=false`` and ``FORECOURT_CONSUMERS=none``), the
outbox relay (``forecourt relay``) and a consumer host (``forecourt worker --consumers
probe``) run as separate processes on one database and one bus:

* by default a PostgreSQL database of the run's own (created, then dropped) and NATS
  JetStream with a stream and subject prefix of the run's own (deleted at the end), whose
  duplicate window is 1 s, so that a relay killed between publish and delete really
  publishes twice and the consumers' inbox has to absorb it;
* ``embedded``: a SQLite file in the work folder and the in-process bus (its deliveries
  live in that file, so the three processes share them).

While a few station clients upload N ordinary sales through the HTTP API with their own
credentials, the run injects:

1. an outage of the consumer host's database, longer than its retry budget (5 attempts,
   about 7.5 s of backoff), while ingest goes on: on PostgreSQL the worker reaches the
   database through a :class:`~forecourt.chaos.proxy.FaultProxy` that is cut; on SQLite the
   run holds an exclusive lock on the file (``BEGIN EXCLUSIVE``), shorter than the 30 s
   ``busy_timeout``, so every writer (the worker, and HQ's ingest too: one file) waits;
2. the consumer host SIGKILLed on the last allowed delivery of a poison event (sales with
   ``shift_id`` ``probe:fail``, which the probe consumer always refuses): crash point
   ``consumer.last_delivery``; the run restarts it;
3. the relay SIGKILLed between publish and delete (``relay.after_publish``), restarted;
4. repeated conflicts for one sale: one sale id uploaded again with several other payloads,
   two of them in one batch, one of them twice;
5. an outbox row too large for the bus (over 1 MiB), written straight into
   ``platform.outbox``: the relay parks it and the rest flow;
6. the restarted consumer host SIGKILLed once more, after an effect committed and before
   its ack (``consumer.after_effect``), and restarted again.

The last tenth of the sales is held back until the first consumer crash, so the restarted
host has new events to apply. Then the run drains (outbox empty but for parked rows, nothing
pending for ``probe`` on the bus, every expected event accounted for) and counts, from the
database: the events expected (derived from ``sales.sale`` and ``sales.sale_conflict`` with
the sales domain's own event ids), processed (at least one ``platform.probe_effect`` row),
dead-lettered, lost, processed twice, pending. See docs/chaos.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from forecourt.chaos.processes import (
    ChaosError,
    Service,
    first_failure,
    read_marker,
    reason,
)
from forecourt.chaos.proxy import FaultProxy
from forecourt.infra.db import (
    Database,
    dead_letter_table,
    delivery_table,
    outbox_parked_table,
    outbox_table,
    probe_effect_table,
)
from forecourt.infra.migrate import upgrade
from forecourt.infra.probe import FAIL_MARKER, PROBE
from forecourt.kernel.ids import new_id
from forecourt.kernel.money import Rounding, charge_minor
from forecourt.sales.contracts import (
    SALE_AMOUNT_MISMATCH,
    SALE_COMPLETED,
    SALE_CONFLICT,
    SALE_NATURAL_KEY_COLLISION,
    SALE_QUARANTINED,
)
from forecourt.sales.domain import DispenseType, Flag, Sale
from forecourt.sales.store import conflict_t, sale_t

__all__ = [
    "EXPECTED_CRASHES",
    "ChaosError",
    "DeliveryOptions",
    "ExpectedEvents",
    "expected_events",
    "run_delivery",
    "verdict",
]

CONSUMER = PROBE.name
RELAY_CRASH = "relay.after_publish"
LAST_DELIVERY_CRASH = "consumer.last_delivery"
AFTER_EFFECT_CRASH = "consumer.after_effect"
EXPECTED_CRASHES = (RELAY_CRASH, LAST_DELIVERY_CRASH, AFTER_EFFECT_CRASH)
OVERSIZED_TYPE = "com.forecourt.chaos.oversized.v1"  # bus subject forecourt.chaos.oversized.v1
OVERSIZED_BYTES = 1024**2 + 64 * 1024  # over the 1 MiB both buses take
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DUPLICATE_WINDOW_S = 1.0  # the NATS stream's: a restarted relay republishes outside it
RELAY_RESTART_S = 2 * DUPLICATE_WINDOW_S  # a killed relay is restarted after this
ACK_WAIT_S = 3.0  # a killed consumer host's deliveries come back this soon
SQLITE_BUSY_TIMEOUT_S = 30.0  # what every Forecourt SQLite connection waits for a lock
MAX_UNEXPECTED_EXITS = 8  # per process: then the run gives up

Progress = Callable[[str], None]

# --- options and plan -------------------------------------------------------------------


@dataclass
class DeliveryOptions:
    embedded: bool = False
    sales: int | None = None  # None: 5000, or 1500 with quick
    quick: bool = False
    workdir: Path | None = None  # None: a temporary folder, removed at the end
    postgres_url: str = DEFAULT_POSTGRES_URL  # where the run's database is created
    nats_url: str = DEFAULT_NATS_URL
    seed: int = 1
    clients: int = 4  # station clients uploading at once, one credential each


@dataclass(frozen=True)
class Plan:
    """When and how hard each fault hits (seconds from the start of ingest)."""

    sales: int
    fail_sales: int  # of them with shift_id probe:fail
    ingest_s: float  # the main part of the sales is paced over this
    tail_share: float  # held back until the consumer host was killed once
    max_batch: int
    outage_at_s: float
    outage_s: float
    relay_crash_pass: int  # the relay dies on this pass that published rows
    after_effect_crash: int  # the restarted host dies after this many committed batches
    injections_timeout_s: float  # the tail is released after this even without a crash
    drain_s: float


def plan_for(opts: DeliveryOptions) -> Plan:
    sales = opts.sales if opts.sales is not None else (1500 if opts.quick else 5000)
    quick = opts.quick
    outage = 4.0 if quick else 8.0
    if opts.embedded:
        # Every writer of the file waits for the lock (busy_timeout) rather than failing:
        # the lock must end well before that timeout, or ingest itself fails.
        outage = min(outage, SQLITE_BUSY_TIMEOUT_S / 3)
    return Plan(
        sales=sales,
        fail_sales=max(3, min(20, sales // 500)),
        ingest_s=8.0 if quick else 20.0,
        tail_share=0.1,
        max_batch=60 if quick else 120,
        outage_at_s=1.5 if quick else 3.0,
        outage_s=outage,
        relay_crash_pass=5 if sales >= 1000 else 2,  # a small run makes few passes
        after_effect_crash=1,
        injections_timeout_s=60.0 if quick else 120.0,
        drain_s=60.0 if quick else 180.0,
    )


# --- backends ---------------------------------------------------------------------------


class Backend:
    """Where the run's data lives and how the consumer host's database is taken away."""

    name = ""
    bus_url = ""
    db_url = ""  # HQ, the relay and the run itself
    worker_db_url = ""  # the consumer host

    def env(self) -> dict[str, str]:
        return {}

    async def setup(self) -> None: ...

    async def outage(self, seconds: float) -> float:
        """Take the consumer host's database away for ``seconds``; the seconds it lasted."""
        raise NotImplementedError

    async def pending(self, db: Database) -> int | None:
        """Events of the probe consumer not settled on the bus (None: no durable yet)."""
        raise NotImplementedError

    async def pending_ids(self, db: Database) -> set[str]:  # noqa: ARG002 - NATS cannot tell
        return set()

    async def bus_messages(self) -> int | None:
        return None

    async def teardown(self) -> None: ...


class PostgresNats(Backend):
    name = "postgresql+nats"

    def __init__(self, admin_url: str, nats_url: str, run_id: str) -> None:
        self.admin_url = make_url(admin_url)
        if self.admin_url.get_backend_name() != "postgresql":
            raise ChaosError(f"--postgres-url must be a postgresql:// URL, not {admin_url!r}")
        self.nats_url = nats_url
        self.bus_url = nats_url
        self.database = f"forecourt_chaos_{run_id}"
        self.stream = f"CHAOS_{run_id.upper()}"
        self.prefix = f"chaos{run_id}"
        host = self.admin_url.host or "127.0.0.1"
        port = self.admin_url.port or 5432
        self.proxy = FaultProxy(host, port)
        self.db_url = self._url(host, port)
        self._created = False
        self._nc: Any = None
        self._js: Any = None

    def _url(self, host: str, port: int) -> str:
        url = self.admin_url.set(
            drivername="postgresql", host=host, port=port, database=self.database
        )
        return url.render_as_string(hide_password=False)

    def env(self) -> dict[str, str]:
        return {
            "FORECOURT_NATS_STREAM": self.stream,
            "FORECOURT_NATS_SUBJECT_PREFIX": self.prefix,
            "FORECOURT_NATS_DUPLICATE_WINDOW_S": str(DUPLICATE_WINDOW_S),
        }

    async def _admin(self, sql: str) -> None:
        import asyncpg

        url = self.admin_url
        conn = await asyncpg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password,
            database=url.database or "postgres",
            timeout=10,
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def setup(self) -> None:
        import nats

        async def quiet(_exc: Exception) -> None:
            return None  # the client's default prints a traceback per failed attempt

        try:  # the broker first: a database is only made once both answer
            self._nc = await nats.connect(
                self.nats_url,
                connect_timeout=3,
                max_reconnect_attempts=3,
                reconnect_time_wait=0.5,
                error_cb=quiet,
                name="forecourt-chaos",
            )
            self._js = self._nc.jetstream()
            await self._js.account_info()
        except Exception as exc:
            raise ChaosError(
                f"cannot use NATS JetStream at {self.nats_url}: {reason(exc)} — is "
                "nats-server running with -js? (--nats-url; or --embedded)"
            ) from exc
        self._created = True  # dropped at the end even if this is cut short
        try:
            await self._admin(f'CREATE DATABASE "{self.database}"')
        except Exception as exc:
            self._created = False
            host = f"{self.admin_url.host or '127.0.0.1'}:{self.admin_url.port or 5432}"
            raise ChaosError(
                f"cannot create a database on PostgreSQL at {host}: {reason(exc)} — is it "
                "running, and may this user create databases? (--postgres-url; or --embedded)"
            ) from exc
        await self.proxy.start()
        self.worker_db_url = self._url("127.0.0.1", self.proxy.port)

    async def outage(self, seconds: float) -> float:
        started = time.monotonic()
        await self.proxy.cut_for(seconds)
        return time.monotonic() - started

    async def pending(self, db: Database) -> int | None:  # noqa: ARG002 - the broker knows
        import nats.js.errors

        try:
            info = await self._js.consumer_info(self.stream, CONSUMER)
        except nats.js.errors.NotFoundError:
            return None
        return int((info.num_pending or 0) + (info.num_ack_pending or 0))

    async def bus_messages(self) -> int | None:
        info = await self._js.stream_info(self.stream)
        return int(info.state.messages or 0)

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.proxy.stop()
        if self._js is not None:
            with contextlib.suppress(Exception):
                await self._js.delete_stream(self.stream)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        if self._created:
            with contextlib.suppress(Exception):
                await self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


class Embedded(Backend):
    name = "sqlite+memory"
    bus_url = "memory://"

    def __init__(self, workdir: Path, run_id: str, *, keep: bool) -> None:
        self.path = (workdir / f"chaos-{run_id}.db").resolve()
        self.db_url = f"sqlite+aiosqlite:///{self.path}"
        self.worker_db_url = self.db_url
        self.keep = keep

    async def outage(self, seconds: float) -> float:
        """Hold the file's write lock (``BEGIN EXCLUSIVE``) for ``seconds``."""

        def lock() -> sqlite3.Connection:
            conn = sqlite3.connect(
                self.path,
                timeout=SQLITE_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("BEGIN EXCLUSIVE")
            return conn

        def unlock(conn: sqlite3.Connection) -> None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()

        conn = await asyncio.to_thread(lock)
        started = time.monotonic()
        try:
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(unlock, conn)
        return time.monotonic() - started

    async def pending(self, db: Database) -> int | None:
        from forecourt.infra.bus.memory import MemoryBus

        return await MemoryBus(db).pending(CONSUMER)

    async def pending_ids(self, db: Database) -> set[str]:
        t = delivery_table
        async with db.connection() as conn:
            rows = await conn.execute(sa.select(t.c.event_id).where(t.c.consumer == CONSUMER))
            return set(rows.scalars())

    async def teardown(self) -> None:
        if not self.keep:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)


# --- what the run expects: the events HQ's database says were emitted --------------------


@dataclass
class ExpectedEvents:
    ids: set[str] = field(default_factory=set)
    failing: set[str] = field(default_factory=set)  # of sales marked probe:fail
    sales: int = 0
    conflicts: int = 0


def sale_of(row: Any) -> Sale:
    """The domain's sale for a ``sales.sale`` row."""
    raw = None if row.device_raw is None else tuple(sorted(json.loads(row.device_raw).items()))
    return Sale(
        sale_id=row.sale_id,
        station_code=row.station_code,
        station_seq=row.station_seq,
        fuelling_point=row.fuelling_point,
        nozzle=row.nozzle,
        grade=row.grade,
        volume_ml=row.volume_ml,
        unit_price_mmu=row.unit_price_mmu,
        amount_minor=row.amount_minor,
        currency=row.currency,
        price_version=row.price_version,
        snapshot_version=row.snapshot_version,
        totalizer_start_ml=row.totalizer_start_ml,
        totalizer_end_ml=row.totalizer_end_ml,
        device_txn=row.device_txn,
        dispense_type=DispenseType(row.dispense_type),
        started_at=row.started_at,
        ended_at=row.ended_at,
        business_date=row.business_date,
        shift_id=row.shift_id,
        schema_version=row.schema_version,
        device_id=row.device_id,
        device_epoch=row.device_epoch,
        device_flags=tuple(f for f in (row.device_flags or "").split(",") if f),
        device_raw=raw,
    )


def sale_events(sale: Sale, *, quarantined: bool, flags: Sequence[str]) -> list[str]:
    """The ids of the events ingest emits for a stored sale (as ``ingest_batch`` does)."""
    ids = [sale.event_id(SALE_QUARANTINED if quarantined else SALE_COMPLETED)]
    if Flag.AMOUNT_MISMATCH.value in flags:
        ids.append(sale.event_id(SALE_AMOUNT_MISMATCH))
    if Flag.NATURAL_KEY_COLLISION.value in flags:
        ids.append(sale.event_id(SALE_NATURAL_KEY_COLLISION))
    return ids


async def expected_events(db: Database) -> ExpectedEvents:
    """Every sales event HQ emitted, derived from what it stored: a sale's completed or
    quarantined event and its flag events, and one conflict event per conflicting payload
    (its payload hash the variant)."""
    out = ExpectedEvents()
    stored: dict[tuple[str, Any], Sale] = {}
    async with db.connection() as conn:
        for row in await conn.execute(sa.select(sale_t)):
            sale = sale_of(row)
            stored[(sale.station_code, sale.sale_id)] = sale
            flags = [f for f in row.flags.split(",") if f]
            ids = sale_events(sale, quarantined=bool(row.quarantined), flags=flags)
            out.ids.update(ids)
            if sale.shift_id == FAIL_MARKER:
                out.failing.update(ids)
            out.sales += 1
        query = sa.select(
            conflict_t.c.station_code,
            conflict_t.c.sale_id,
            conflict_t.c.payload_hash,
            conflict_t.c.payload,
        )
        for row in await conn.execute(query):
            first = stored.get((row.station_code, row.sale_id))
            if first is None:  # a conflict is always with a stored sale
                raise ChaosError(f"conflict for sale {row.sale_id} that HQ does not hold")
            event_id = first.event_id(SALE_CONFLICT, row.payload_hash)
            out.ids.add(event_id)
            if json.loads(row.payload).get("shift_id") == FAIL_MARKER:
                out.failing.add(event_id)
            out.conflicts += 1
    return out


@dataclass
class Observed:
    """What the consumer side holds now."""

    effects: dict[str, int]  # event id → probe_effect rows
    dead: set[str]
    outbox_ids: set[str]
    parked: int
    bus_pending: int | None
    bus_pending_ids: set[str]

    @property
    def pending(self) -> int:
        return len(self.outbox_ids) + (self.bus_pending or 0)


async def observe(db: Database, backend: Backend) -> Observed:
    e, d, o = probe_effect_table, dead_letter_table, outbox_table
    async with db.connection() as conn:
        rows = await conn.execute(
            sa.select(e.c.event_id, sa.func.count())
            .where(e.c.consumer == CONSUMER)
            .group_by(e.c.event_id)
        )
        effects = {r[0]: int(r[1]) for r in rows}
        dead = set(
            (await conn.execute(sa.select(d.c.event_id).where(d.c.consumer == CONSUMER))).scalars()
        )
        outbox_ids = set((await conn.execute(sa.select(o.c.event_id))).scalars())
        parked = int(
            await conn.scalar(sa.select(sa.func.count()).select_from(outbox_parked_table)) or 0
        )
    return Observed(
        effects=effects,
        dead=dead,
        outbox_ids=outbox_ids,
        parked=parked,
        bus_pending=await backend.pending(db),
        bus_pending_ids=await backend.pending_ids(db),
    )


# --- the station clients ----------------------------------------------------------------


class StationClient:
    """One station uploading its journaled sales with its own credential."""

    def __init__(self, code: str, token: str, rng: random.Random) -> None:
        self.code = code
        self.token = token
        self.rng = rng
        self.seq = 0
        self.txn = 0
        self.statuses: dict[str, int] = {}
        self.retries = 0

    def sale(self, shift_id: str | None = None) -> dict[str, Any]:
        self.seq += 1
        self.txn += 1
        now = datetime.now(UTC)
        volume = self.rng.randint(500, 6000) * 10
        start = self.txn * 100_000
        fp = self.rng.randint(1, 8)
        # The sample chain's S001: fuelling points 3, 4, 7 and 8 round half-even.
        rounding = Rounding.HALF_EVEN if fp in (3, 4, 7, 8) else Rounding.HALF_UP
        return {
            "sale_id": str(new_id()),
            "station_seq": self.seq,
            "fuelling_point": fp,
            "nozzle": 1,
            "grade": "92",
            "volume_ml": volume,
            "unit_price_mmu": 755_000,
            "amount_minor": charge_minor(volume, 755_000, 1, rounding),
            "currency": "CNY",
            "price_version": "chaos",
            "snapshot_version": 1,
            "totalizer_start_ml": start,
            "totalizer_end_ml": start + volume,
            "device_txn": self.txn,
            "dispense_type": "sale",
            "started_at": (now - timedelta(minutes=2)).isoformat(),
            "ended_at": now.isoformat(),
            "business_date": now.date().isoformat(),
            "shift_id": shift_id or f"{now.date().isoformat()}/1",
        }

    async def upload(self, http: httpx.AsyncClient, sales: list[dict[str, Any]]) -> None:
        """POST one batch until HQ answers it (a repeat is answered from what is stored)."""
        body = json.dumps({"schema_version": 1, "sales": sales}).encode()
        deadline = time.monotonic() + 120.0
        while True:
            try:
                answer = await http.post(f"/v1/stations/{self.code}/sales:batch", content=body)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if answer.status_code == 200:
                    for result in answer.json()["results"]:
                        status = str(result["status"])
                        self.statuses[status] = self.statuses.get(status, 0) + 1
                    return
                if answer.status_code < 500:
                    raise ChaosError(
                        f"HQ refused an upload of {self.code} ({answer.status_code}): "
                        f"{answer.text[:200]}"
                    )
                problem = f"status {answer.status_code}"
            if time.monotonic() > deadline:
                raise ChaosError(f"HQ did not take an upload of {self.code} in 120 s: {problem}")
            self.retries += 1
            await asyncio.sleep(0.5)


def batches_of(
    client: StationClient, count: int, rng: random.Random, max_batch: int
) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    left = count
    while left > 0:
        n = min(left, rng.randint(1, max_batch))
        out.append([client.sale() for _ in range(n)])
        left -= n
    return out


def conflict_batches(sale: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Other payloads for one stored sale: two new ones in one batch, then one of them again
    with the original (a known conflict and a duplicate: no new event), then a third."""

    def variant(extra_ml: int) -> dict[str, Any]:
        volume = sale["volume_ml"] + extra_ml
        return {
            **sale,
            "volume_ml": volume,
            "amount_minor": (volume * 755_000 + 500_000) // 1_000_000,
            "totalizer_end_ml": sale["totalizer_start_ml"] + volume,
        }

    first, second, third = variant(10), variant(20), variant(30)
    return [[first, second], [first, dict(sale)], [third]]


# --- the run ----------------------------------------------------------------------------


class DeliveryRun:
    def __init__(self, opts: DeliveryOptions, progress: Progress) -> None:
        self.opts = opts
        self.plan = plan_for(opts)
        self.say = progress
        self.run_id = uuid.uuid4().hex[:10]
        self.rng = random.Random(opts.seed)
        self.own_workdir = opts.workdir is None
        if opts.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="forecourt-chaos-"))
        else:
            self.workdir = opts.workdir.resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.marker = self.workdir / f"crash-{self.run_id}.marker"
        self.backend: Backend = (
            Embedded(self.workdir, self.run_id, keep=not self.own_workdir)
            if opts.embedded
            else PostgresNats(opts.postgres_url, opts.nats_url, self.run_id)
        )
        self.services: list[Service] = []
        self.hq: Service | None = None
        self.relay: Service | None = None
        self.worker: Service | None = None
        self.db: Database | None = None
        self.crashes: list[dict[str, Any]] = []
        self.outage_s = 0.0
        self.first_crash = asyncio.Event()
        self.clients: list[StationClient] = []
        self.non_sales_events = 0

    # --- setup ------------------------------------------------------------------------

    def _env(self, database_url: str) -> dict[str, str]:
        # The run's settings only: none of the caller's FORECOURT_* (a crash point, another
        # database) leaks into its processes, and ./forecourt.toml is the work folder's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORECOURT_")}
        env.update(
            FORECOURT_DATABASE_URL=database_url,
            FORECOURT_BUS_URL=self.backend.bus_url,
            FORECOURT_CONSUMER_ACK_WAIT_S=str(ACK_WAIT_S),
            FORECOURT_LOG_LEVEL="WARNING",
            FORECOURT_LOG_JSON="true",
            **self.backend.env(),
        )
        return env

    def _crash(self, point: str, nth: int = 1) -> dict[str, str]:
        return {
            "FORECOURT_CRASH_AT": point if nth == 1 else f"{point}:{nth}",
            "FORECOURT_CRASH_MARKER": str(self.marker),
        }

    async def _prepare_database(self) -> list[tuple[str, str]]:
        from forecourt.demo import pick_stations
        from forecourt.network.handlers import (
            SAMPLE_CHAIN,
            import_chain,
            issue_credential,
            load_chain_file,
        )

        db = self.db
        assert db is not None
        await db.connect()
        await upgrade(db)
        chain = pick_stations(load_chain_file(SAMPLE_CHAIN), self.opts.clients)
        await import_chain(db, chain, actor="chaos")
        tokens = [
            (s.code, (await issue_credential(db, s.code, actor="chaos"))[1]) for s in chain.stations
        ]
        async with db.connection() as conn:
            self.non_sales_events = int(
                await conn.scalar(sa.select(sa.func.count()).select_from(outbox_table)) or 0
            )
        return tokens

    async def _start_services(self) -> str:
        plan = self.plan
        hq_port = self.workdir / f"hq-{self.run_id}.port"
        hq_env = {
            **self._env(self.backend.db_url),
            "FORECOURT_RELAY": "false",
            "FORECOURT_CONSUMERS": "none",
        }
        self.hq = Service(
            "hq", ["serve", "--port", "0", "--port-file", str(hq_port)], hq_env, self.workdir
        )
        self.worker = Service(
            "worker",
            ["worker", "--consumers", CONSUMER],
            self._env(self.backend.worker_db_url),
            self.workdir,
            stages=[
                self._crash(LAST_DELIVERY_CRASH),
                self._crash(AFTER_EFFECT_CRASH, plan.after_effect_crash),
            ],
        )
        self.relay = Service(
            "relay",
            ["relay"],
            self._env(self.backend.db_url),
            self.workdir,
            stages=[self._crash(RELAY_CRASH, plan.relay_crash_pass)],
        )
        self.services = [self.worker, self.relay, self.hq]
        self.hq.start()
        self.worker.start()
        deadline = time.monotonic() + 90.0
        while not hq_port.exists() or "consumers running" not in self.worker.text():
            for service in (self.hq, self.worker):
                if not service.alive():
                    raise ChaosError(
                        f"{service.name} exited before it ran (status {service.poll()}): "
                        f"{service.last_lines()}"
                    )
            if time.monotonic() > deadline:
                raise ChaosError("HQ and the consumer host did not start within 90 s")
            await asyncio.sleep(0.1)
        # The relay last: the in-process bus keeps events only for consumers subscribed
        # when they are published (the worker is, now).
        self.relay.start()
        return f"http://127.0.0.1:{int(hq_port.read_text())}"

    async def _insert_oversized(self) -> None:
        db = self.db
        assert db is not None
        now = datetime.now(UTC)
        data = json.dumps({"note": "larger than the bus takes", "padding": "x" * OVERSIZED_BYTES})
        async with db.begin() as uow:
            await uow.conn.execute(
                outbox_table.insert().values(
                    event_id=str(uuid.uuid4()),
                    type=OVERSIZED_TYPE,
                    source="/forecourt/chaos",
                    subject=f"oversized/{self.run_id}",
                    time=now,
                    traceparent=None,
                    data=data,
                    created_at=now,
                )
            )

    # --- during the run ----------------------------------------------------------------

    async def _supervise(self) -> None:
        """Restart the relay and the consumer host whenever they die; note where they died.

        A killed relay comes back only after the stream's duplicate window: what it
        published and did not delete is then stored twice, for the consumers' inbox to
        absorb (the broker's de-duplication does not hide it)."""
        assert self.hq is not None
        assert self.relay is not None
        assert self.worker is not None
        due: dict[str, float] = {}  # service name -> when to start it again
        while True:
            if self.hq.poll() is not None:
                raise ChaosError(f"HQ exited (status {self.hq.poll()}): {self.hq.last_lines()}")
            now = time.monotonic()
            for service in (self.relay, self.worker):
                if service.name in due:
                    if now >= due[service.name]:
                        del due[service.name]
                        service.start()
                    continue
                code = service.poll()
                if code is None:
                    continue
                point = read_marker(self.marker).get(service.pid)
                if code == -signal.SIGKILL and point is not None:
                    self.crashes.append(
                        {"process": service.name, "point": point, "life": service.lives}
                    )
                    service.stage += 1
                    if service is self.worker:
                        self.first_crash.set()
                    delay = RELAY_RESTART_S if service is self.relay else 0.0
                    self.say(f"{service.name} was killed at {point}: restarting it")
                else:
                    service.unexpected_exits.append(code)
                    if len(service.unexpected_exits) > MAX_UNEXPECTED_EXITS:
                        raise ChaosError(
                            f"{service.name} keeps exiting (status {code}): {service.last_lines()}"
                        )
                    delay = 1.0
                    self.say(f"{service.name} exited (status {code}): restarting it in 1 s")
                due[service.name] = now + delay
            await asyncio.sleep(0.05)

    async def _outage(self) -> None:
        await asyncio.sleep(self.plan.outage_at_s)
        how = "connections cut" if isinstance(self.backend, PostgresNats) else "file locked"
        self.say(f"consumer host's database: {how} for {self.plan.outage_s:g} s")
        self.outage_s = await self.backend.outage(self.plan.outage_s)
        self.say("consumer host's database back")

    async def _ingest(self, url: str, tokens: list[tuple[str, str]]) -> None:
        plan = self.plan
        self.clients = [
            StationClient(code, token, random.Random(self.rng.random())) for code, token in tokens
        ]
        share = [plan.sales // len(self.clients)] * len(self.clients)
        share[0] += plan.sales - sum(share)
        main: list[list[list[dict[str, Any]]]] = []
        tails: list[list[list[dict[str, Any]]]] = []
        for client, count in zip(self.clients, share, strict=True):
            tail = int(count * plan.tail_share)
            main.append(batches_of(client, count - tail, self.rng, plan.max_batch))
            tails.append(batches_of(client, tail, self.rng, plan.max_batch))
        # Poison sales early, so that their budget runs out while ingest goes on.
        early = [
            (c, b, i)
            for c, batches in enumerate(main)
            for b, batch in enumerate(batches[: max(1, len(batches) // 4)])
            for i in range(len(batch))
            if (c, b, i) != (0, 0, 0)  # the sale that conflicts stays ordinary
        ]
        for c, b, i in self.rng.sample(early, min(plan.fail_sales, len(early))):
            main[c][b][i]["shift_id"] = FAIL_MARKER
        # Repeated conflicts: the first sale of the first station, uploaded again and again.
        base = main[0][0][0]
        specials = dict(zip((1, 3, 5), conflict_batches(base), strict=True))
        started = time.monotonic()

        async def station(index: int) -> None:
            client = self.clients[index]
            batches = main[index]
            interval = plan.ingest_s / max(1, len(batches))
            timeout = httpx.Timeout(120.0, connect=10.0)
            headers = {
                "authorization": f"Bearer {client.token}",
                "content-type": "application/json",
            }
            async with httpx.AsyncClient(base_url=url, timeout=timeout, headers=headers) as http:
                for number, batch in enumerate(batches):
                    await asyncio.sleep(max(0.0, started + number * interval - time.monotonic()))
                    await client.upload(http, batch)
                    if index == 0 and number in specials:
                        await client.upload(http, specials.pop(number))
                for batch in specials.values() if index == 0 else ():
                    await client.upload(http, batch)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.first_crash.wait(), plan.injections_timeout_s)
                for batch in tails[index]:
                    await client.upload(http, batch)

        held = sum(len(b) for t in tails for b in t)
        self.say(
            f"ingest: {plan.sales} sales from {len(self.clients)} stations "
            f"({plan.fail_sales} marked {FAIL_MARKER}; {held} held back until the consumer "
            "host was killed once)"
        )
        await asyncio.gather(*(station(i) for i in range(len(self.clients))))
        self.say(f"ingest done in {time.monotonic() - started:.1f} s")

    async def _drain(self) -> bool:
        db = self.db
        assert db is not None
        deadline = time.monotonic() + self.plan.drain_s
        expected = await expected_events(db)
        while True:
            seen = await observe(db, self.backend)
            accounted = set(seen.effects) | seen.dead
            if (
                not seen.outbox_ids
                and seen.bus_pending == 0
                and expected.ids <= accounted
                and all(service.alive() for service in self.services)
            ):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)

    # --- the whole run -----------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        plan = self.plan
        self.say(
            f"chaos delivery on {self.backend.name}: {plan.sales} sales, outage "
            f"{plan.outage_s:g} s ({'temporary ' if self.own_workdir else ''}work folder "
            f"{self.workdir})"
        )
        try:
            await self.backend.setup()
            self.db = Database(self.backend.db_url, application_name="forecourt-chaos")
            tokens = await self._prepare_database()
            url = await self._start_services()
            self.say(f"HQ at {url}, relay and consumer host running")
            await self._insert_oversized()
            supervisor = asyncio.create_task(self._supervise(), name="chaos-supervisor")
            outage = asyncio.create_task(self._outage(), name="chaos-outage")
            ingest = asyncio.create_task(self._ingest(url, tokens), name="chaos-ingest")
            try:
                await first_failure(ingest, supervisor, outage)
                await first_failure(outage, supervisor)
                drain = asyncio.create_task(self._drain(), name="chaos-drain")
                await first_failure(drain, supervisor)
                drained = drain.result()
            finally:
                for task in (supervisor, outage, ingest):
                    task.cancel()
                for task in (supervisor, outage, ingest):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            self.say("drained" if drained else f"not drained after {plan.drain_s:g} s")
            await self._stop_services()
            return await self._result(drained, time.monotonic() - started)
        finally:
            await self._stop_services()
            if self.db is not None:
                await self.db.dispose()
            await self.backend.teardown()
            if self.own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    async def _stop_services(self) -> None:
        first = [s for s in (self.worker, self.relay) if s is not None]
        await asyncio.gather(*(s.stop() for s in first))
        if self.hq is not None:
            await self.hq.stop()

    async def _result(self, drained: bool, seconds: float) -> dict[str, Any]:
        db = self.db
        assert db is not None
        expected = await expected_events(db)
        seen = await observe(db, self.backend)
        processed = set(seen.effects)
        twice = {event_id for event_id, n in seen.effects.items() if n > 1}
        waiting = seen.outbox_ids | seen.bus_pending_ids
        lost = expected.ids - processed - seen.dead - waiting
        messages = await self.backend.bus_messages()
        published = len(expected.ids) + self.non_sales_events
        statuses: dict[str, int] = {}
        for client in self.clients:
            for status, n in client.statuses.items():
                statuses[status] = statuses.get(status, 0) + n
        assert self.relay is not None
        assert self.worker is not None
        return {
            "backend": self.backend.name,
            "run_id": self.run_id,
            "sales": expected.sales,
            "sales_uploaded": self.plan.sales,
            "conflicts": expected.conflicts,
            "upload_statuses": statuses,
            "events": len(expected.ids),
            "processed": len(processed & expected.ids),
            "dead_lettered": len(seen.dead),
            "dead_lettered_marked": len(seen.dead & expected.failing),
            "marked_to_fail": len(expected.failing),
            "dead_lettered_ordinary": len(seen.dead - expected.failing),
            "lost": len(lost),
            "processed_twice": len(twice),
            "pending": seen.pending,
            "pending_outbox": len(seen.outbox_ids),
            "pending_bus": seen.bus_pending,
            "unexpected": len((processed | seen.dead) - expected.ids),
            "parked": seen.parked,
            "crashes": [c["point"] for c in self.crashes],
            "crashes_expected": list(EXPECTED_CRASHES),
            "restarts": {
                "relay": self.relay.lives - 1,
                "worker": self.worker.lives - 1,
            },
            "unexpected_exits": {
                "relay": len(self.relay.unexpected_exits),
                "worker": len(self.worker.unexpected_exits),
            },
            "republished": None if messages is None else max(0, messages - published),
            "outage_s": round(self.outage_s, 1),
            "drained": drained,
            "upload_retries": sum(c.retries for c in self.clients),
            "seconds": round(seconds, 1),
            "lost_ids": sorted(lost)[:10],
            "processed_twice_ids": sorted(twice)[:10],
        }


def verdict(result: dict[str, Any]) -> list[str]:
    """What is wrong with a run's result (empty: the guarantees held)."""
    problems = []
    for key in ("lost", "processed_twice", "pending"):
        if result[key]:
            problems.append(f"{result[key]} {key.replace('_', ' ')}")
    missing = [point for point in EXPECTED_CRASHES if point not in result["crashes"]]
    if missing:
        problems.append(f"crash not observed: {', '.join(missing)}")
    return problems


async def run_delivery(opts: DeliveryOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole chaos run; its result (see :func:`verdict` for what must hold)."""
    run = DeliveryRun(opts, progress or (lambda _line: None))
    return await run.run()
