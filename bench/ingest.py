"""Ingest benchmark: HQ sales ingest on PostgreSQL + NATS against pgbench on the same machine.

Runs, in one process tree:

* the reference: ``pgbench -i -s SCALE`` on its own database, then
  ``pgbench -M prepared -c C -j 2 -T SECONDS -n``, with a ``CHECKPOINT`` before each phase, once
  before and once after the ingest phase (the mean is reported);
* the ingest: ``forecourt serve`` (HQ) on PostgreSQL (``synchronous_commit`` as configured,
  on by default) with the outbox relay publishing to NATS JetStream; C concurrent upload
  clients, each with its own station credential, speaking the real HTTP API; batch mix 80 %
  of 1–10 sales and 20 % of 100–1 000, 5 % re-uploads of an earlier batch; a warm-up, then
  the measured window. ``sales_per_s`` = new HQ rows ÷ window.

Then, beside the closed loop, paced runs (``--paced``): the same 16 clients
offering a fixed total rate, which shows the latency at a load below saturation.

``--json`` prints one JSON object as the last line with ``sales_per_s``, ``pgbench_tps``,
``ratio``, ``p99_ack_ms``, ``outbox_backlog_end``, ``synchronous_commit`` and the sweep.

    .venv/bin/python bench/ingest.py --json
    .venv/bin/python bench/ingest.py --quick          # short phases, for a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from forecourt.demo import free_port, pick_stations
from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def admin(sql: str, database: str = "postgres") -> Any:
    conn = await asyncpg.connect(host=PG_HOST, user=PG_USER, database=database)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


# --- pgbench reference -------------------------------------------------------------------


def pgbench_init(db: str, scale: int) -> None:
    subprocess.run(["dropdb", "-h", PG_HOST, "-U", PG_USER, "--if-exists", db], check=True)
    subprocess.run(["createdb", "-h", PG_HOST, "-U", PG_USER, db], check=True)
    log(f"pgbench -i -s {scale}")
    subprocess.run(
        ["pgbench", "-h", PG_HOST, "-U", PG_USER, "-i", "-s", str(scale), "-q", db],
        check=True,
        capture_output=True,
    )


async def pgbench_run(db: str, clients: int, seconds: int) -> float:
    await admin("CHECKPOINT")
    log(f"pgbench -M prepared -c {clients} -j 2 -T {seconds} -n")
    out = subprocess.run(
        [
            "pgbench",
            "-h",
            PG_HOST,
            "-U",
            PG_USER,
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(seconds),
            "-n",
            db,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out) or re.search(
        r"tps = ([0-9.]+)", out
    )
    if not match:
        raise RuntimeError(f"cannot read pgbench output:\n{out}")
    return float(match.group(1))


# --- the ingest load -----------------------------------------------------------------------


@dataclass
class ClassStats:
    batches: int = 0
    sales: int = 0
    latencies_ms: list[float] = field(default_factory=list)


@dataclass
class LoadStats:
    small: ClassStats = field(default_factory=ClassStats)
    large: ClassStats = field(default_factory=ClassStats)
    reuploads: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def latencies(self) -> list[float]:
        return self.small.latencies_ms + self.large.latencies_ms


class StationClient:
    """One load generator: a station uploading journaled sales with its own credential."""

    def __init__(self, code: str, token: str, rng: random.Random) -> None:
        self.code = code
        self.token = token
        self.rng = rng
        self.seq = 0
        self.txn = 0
        self.sent: list[bytes] = []

    def sale_id(self) -> str:
        """A UUIDv7 (millisecond time, then random bits) from the client's own seeded
        generator: the edge's ``new_id`` draws from the OS on every call, which in a load
        generator sharing two cores with HQ is CPU taken from what is measured."""
        ms = time.time_ns() // 1_000_000
        bits = self.rng.getrandbits(74)
        value = (
            (ms << 80) | (0x7 << 76) | ((bits >> 62) << 64) | (0b10 << 62) | (bits & (2**62 - 1))
        )
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def sale_json(self, now: str, started: str, day: str) -> str:
        """One v1 sale written straight to JSON text: the load generator shares the machine
        with HQ, so it spends as little CPU per sale as it can."""
        self.seq += 1
        self.txn += 1
        fp = self.rng.randint(1, 8)
        volume = self.rng.randint(500, 6000) * 10
        amount = (volume * 755000 + 500_000) // 1_000_000
        start = self.txn * 100_000
        return (
            f'{{"sale_id":"{self.sale_id()}","station_seq":{self.seq},"fuelling_point":{fp},'
            f'"nozzle":1,"grade":"92","volume_ml":{volume},"unit_price_mmu":755000,'
            f'"amount_minor":{amount},"currency":"CNY","price_version":"bench",'
            f'"snapshot_version":1,"totalizer_start_ml":{start},'
            f'"totalizer_end_ml":{start + volume},"device_txn":{self.txn},'
            f'"dispense_type":"sale","started_at":"{started}","ended_at":"{now}",'
            f'"business_date":"{day}","shift_id":"{day}/1"}}'
        )

    def next_batch(self) -> tuple[bytes, str, bool]:
        if self.sent and self.rng.random() < 0.05:
            return self.rng.choice(self.sent), "reupload", True
        large = self.rng.random() < 0.2
        n = self.rng.randint(100, 1000) if large else self.rng.randint(1, 10)
        now = datetime.now(UTC)
        stamps = (now.isoformat(), (now - timedelta(minutes=2)).isoformat(), now.date().isoformat())
        sales = ",".join(self.sale_json(*stamps) for _ in range(n))
        body = f'{{"schema_version":1,"sales":[{sales}]}}'.encode()
        if len(self.sent) < 50:
            self.sent.append(body)
        else:
            self.sent[self.rng.randrange(50)] = body
        return body, "large" if large else "small", False


async def drive(
    clients: list[StationClient],
    url: str,
    stop_at: float,
    measure_from: float,
    stats: LoadStats,
    offered: float | None = None,
) -> None:
    """Closed loop by default (the next batch as soon as the last is answered). With
    ``offered`` (sales per second over all clients) each client paces itself: after a batch
    of n sales it waits until n ÷ (offered ÷ C) seconds have passed since sending it."""
    per_client = offered / len(clients) if offered else None

    async def one(client: StationClient) -> None:
        async with httpx.AsyncClient(
            base_url=url,
            timeout=60,
            transport=httpx.AsyncHTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            ),
            headers={"authorization": f"Bearer {client.token}", "content-type": "application/json"},
        ) as http:
            while time.monotonic() < stop_at:
                body, kind, reupload = client.next_batch()
                started = time.monotonic()
                try:
                    response = await http.post(
                        f"/v1/stations/{client.code}/sales:batch", content=body
                    )
                except httpx.HTTPError:
                    stats.errors += 1
                    await asyncio.sleep(0.1)
                    continue
                elapsed = (time.monotonic() - started) * 1000
                if per_client and not reupload:
                    n_sales = body.count(b'"sale_id"')
                    await asyncio.sleep(max(0.0, started + n_sales / per_client - time.monotonic()))
                if response.status_code != 200:
                    stats.errors += 1
                    continue
                if started < measure_from:
                    continue
                if reupload:
                    stats.reuploads += 1
                else:
                    cls = stats.large if kind == "large" else stats.small
                    cls.batches += 1
                    cls.latencies_ms.append(elapsed)
                    # Counted in the raw answer rather than decoded: same figures, less CPU
                    # taken from HQ on a shared machine (a test checks the answer's shape).
                    answer = response.content
                    for status in STATUSES:
                        n = answer.count(b'"status":"%s"' % status.encode())
                        if n:
                            stats.statuses[status] = stats.statuses.get(status, 0) + n
                    cls.sales += answer.count(b'"sale_id"')

    await asyncio.gather(*(one(c) for c in clients))


STATUSES = ("created", "duplicate", "quarantined", "conflict")
UNPUBLISHED = "SELECT count(*) FROM platform.outbox"  # the relay deletes what it published


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def sale_count(db: str) -> int:
    return int(await admin("SELECT count(*) FROM sales.sale", db))


async def ingest_phase(
    url: str,
    db: str,
    clients: list[StationClient],
    warmup: int,
    seconds: int,
    offered: float | None = None,
) -> dict[str, Any]:
    stats = LoadStats()
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    task = asyncio.create_task(drive(clients, url, stop_at, measure_from, stats, offered))
    await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
    rows_before = await sale_count(db)
    t0 = time.monotonic()
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    rows_after = await sale_count(db)
    window = time.monotonic() - t0
    await task
    backlog = int(await admin(UNPUBLISHED, db))
    # How long the relay needs to publish what piled up: the honest sustained rate counts it.
    drain_started = time.monotonic()
    while int(await admin(UNPUBLISHED, db)) and time.monotonic() - drain_started < 300:
        await asyncio.sleep(0.2)
    drain_s = time.monotonic() - drain_started
    lat = stats.latencies()
    return {
        "clients": len(clients),
        "offered_sales_per_s": offered,
        "sales_per_s": round((rows_after - rows_before) / window, 1),
        "sustained_sales_per_s": round((rows_after - rows_before) / (window + drain_s), 1),
        "outbox_drain_s": round(drain_s, 1),
        "p50_ack_ms": round(pct(lat, 50), 1),
        "p99_ack_ms": round(pct(lat, 99), 1),
        "batches": len(lat),
        "reuploads": stats.reuploads,
        "errors": stats.errors,
        "statuses": stats.statuses,
        "outbox_backlog_end": backlog,
        "by_batch_size": {
            name: {
                "batches": c.batches,
                "sales": c.sales,
                "p50_ack_ms": round(pct(c.latencies_ms, 50), 1),
                "p99_ack_ms": round(pct(c.latencies_ms, 99), 1),
                "mean_ack_ms": round(statistics.fmean(c.latencies_ms), 1) if c.latencies_ms else 0,
            }
            for name, c in (("1-10", stats.small), ("100-1000", stats.large))
        },
    }


# --- orchestration ---------------------------------------------------------------------------


async def prepare_hq_db(db: str, stations: int) -> dict[str, str]:
    await admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    await admin(f'CREATE DATABASE "{db}"')
    database = Database(f"postgresql://{PG_USER}@{PG_HOST}/{db}")
    await database.connect()
    try:
        await upgrade(database)
        chain = pick_stations(load_chain_file(SAMPLE_CHAIN), stations)
        await import_chain(database, chain, actor="bench")
        return {
            s.code: (await issue_credential(database, s.code, actor="bench"))[1]
            for s in chain.stations
        }
    finally:
        await database.dispose()


def start_hq(
    db: str, port: int, workers: int, prefix: str, logfile: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FORECOURT_DATABASE_URL": f"postgresql://{PG_USER}@{PG_HOST}/{db}",
        "FORECOURT_BUS_URL": NATS_URL,
        "FORECOURT_NATS_STREAM": f"BENCH_{prefix}",
        "FORECOURT_NATS_SUBJECT_PREFIX": prefix,
        "FORECOURT_LOG_LEVEL": "WARNING",
    }
    args = [sys.executable, "-m", "forecourt.cli", "serve", "--port", str(port)]
    if workers > 1:
        args += ["--workers", str(workers)]
    with logfile.open("wb") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


async def delete_stream(name: str) -> None:
    """The benchmark's JetStream stream holds hundreds of thousands of events: drop it."""
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().delete_stream(name)
    except Exception as exc:  # noqa: BLE001 - cleanup only
        log(f"could not delete stream {name}: {exc}")
    finally:
        await nc.close()


async def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            try:
                if (await c.get(f"{url}/ready", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("HQ did not become ready")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    sweep = [int(c) for c in args.sweep.split(",")] if args.sweep else []
    max_clients = max([args.clients, *sweep])
    hq_db, ref_db = "forecourt_bench", "forecourt_pgbench"
    pgbench_init(ref_db, args.scale)
    tps_before = await pgbench_run(ref_db, args.clients, args.pgbench_seconds)
    log(f"pgbench before: {tps_before:.0f} tps")

    tokens = await prepare_hq_db(hq_db, max_clients)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prefix = f"b{uuid.uuid4().hex[:8]}"
    logfile = Path(args.log)
    hq = start_hq(hq_db, port, args.workers, prefix, logfile)
    try:
        await wait_ready(url)
        sync_commit = str(await admin("SHOW synchronous_commit", hq_db))
        rng = random.Random(args.seed)
        codes = sorted(tokens)
        results: dict[int, dict[str, Any]] = {}

        async def make_clients(c: int) -> list[StationClient]:
            clients = [
                StationClient(code, tokens[code], random.Random(rng.random())) for code in codes[:c]
            ]
            for sc in clients:  # continue each station's sequence where the last phase left it
                sc.seq = sc.txn = int(
                    await admin(
                        "SELECT coalesce(max(station_seq), 0) FROM sales.sale"
                        f" WHERE station_code = '{sc.code}'",
                        hq_db,
                    )
                )
            return clients

        for c in [args.clients] + [c for c in sweep if c != args.clients]:
            clients = await make_clients(c)
            seconds = args.seconds if c == args.clients else args.sweep_seconds
            log(f"ingest: {c} clients, {args.warmup}s warm-up + {seconds}s")
            results[c] = await ingest_phase(url, hq_db, clients, args.warmup, seconds)
            log(
                f"ingest {c} clients: {results[c]['sales_per_s']} sales/s, "
                f"p99 {results[c]['p99_ack_ms']} ms, backlog {results[c]['outbox_backlog_end']}"
            )
            if c == args.clients:
                tps_after = await pgbench_run(ref_db, args.clients, args.pgbench_seconds)
                log(f"pgbench after: {tps_after:.0f} tps")
        paced: dict[str, dict[str, Any]] = {}
        for rate in [float(r) for r in args.paced.split(",") if r]:
            log(f"paced: {args.clients} clients offering {rate:.0f} sales/s")
            result = await ingest_phase(
                url, hq_db, await make_clients(args.clients), args.warmup, args.sweep_seconds, rate
            )
            paced[f"{rate:.0f}"] = result
            log(f"paced {rate:.0f}: {result['sales_per_s']} sales/s, p99 {result['p99_ack_ms']} ms")
    finally:
        os.killpg(hq.pid, signal.SIGTERM)
        try:
            hq.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(hq.pid, signal.SIGKILL)
        await delete_stream(f"BENCH_{prefix}")
    main_run = results[args.clients]
    pgbench_tps = (tps_before + tps_after) / 2
    return {
        "sales_per_s": main_run["sales_per_s"],
        "pgbench_tps": round(pgbench_tps, 1),
        "pgbench_tps_before": round(tps_before, 1),
        "pgbench_tps_after": round(tps_after, 1),
        "ratio": round(main_run["sales_per_s"] / pgbench_tps, 2) if pgbench_tps else None,
        "p99_ack_ms": main_run["p99_ack_ms"],
        "p50_ack_ms": main_run["p50_ack_ms"],
        "outbox_backlog_end": main_run["outbox_backlog_end"],
        "outbox_drain_s": main_run["outbox_drain_s"],
        "sustained_sales_per_s": main_run["sustained_sales_per_s"],
        "synchronous_commit": sync_commit,
        "clients": args.clients,
        "hq_workers": args.workers,
        "by_batch_size": main_run["by_batch_size"],
        "reuploads": main_run["reuploads"],
        "errors": main_run["errors"],
        "sweep": {
            str(c): {k: v for k, v in r.items() if k != "by_batch_size"}
            | {"by_batch_size": r["by_batch_size"]}
            for c, r in sorted(results.items())
        },
        "paced": paced,
        "goal_met": bool(
            pgbench_tps
            and main_run["sales_per_s"] / pgbench_tps >= 2
            and main_run["p99_ack_ms"] <= 250
        ),
    }


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--sweep", default="4,16,64", help="client counts for the sweep ('' = none)")
    p.add_argument("--seconds", type=int, default=60, help="measured window of the main run")
    p.add_argument("--sweep-seconds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--scale", type=int, default=50, help="pgbench scale")
    p.add_argument("--pgbench-seconds", type=int, default=60)
    p.add_argument("--workers", type=int, default=2, help="HQ worker processes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log", default="bench-hq.log", help="HQ process log file")
    p.add_argument(
        "--paced",
        default="4000,8000,12000",
        help="offered loads (sales/s over all clients) for paced runs after the sweep ('' = none)",
    )
    p.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    args = p.parse_args()
    if args.quick:
        args.seconds = args.sweep_seconds = args.pgbench_seconds = 10
        args.warmup = 3
        args.scale = 5
    return args


if __name__ == "__main__":
    arguments = parse()
    result = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(result, separators=(",", ":")))
    else:
        print(json.dumps(result, indent=2))
