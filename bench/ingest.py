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

Those runs have no consumer (``FORECOURT_CONSUMERS=none``). Right after the main run (and the
second pgbench), the same HQ gets a ``forecourt worker --consumers probe`` process beside it
on the same database and stream (purged first, so the probe starts at nothing): a closed loop
like the main run gives ``sales_per_s_with_consumer`` and ``ratio_with_consumer`` (÷ the same
pgbench reference) and ``consumer_backlog_end_s`` (sales events committed and not yet applied
by the probe when the window closes, counted exactly in one database snapshot, ÷
``sales_per_s_with_consumer``); then a paced run at ``--paced-with-consumer`` (8 000/s; when
the probe cannot keep up, retried a little under the rate it applied) gives
``consumer_lag_p99_ms``: p99 over the window's events of ``probe_effect.applied_at`` − the
commit of the sale's transaction (stamped by a deferred trigger the benchmark puts on
``platform.outbox`` for that run only). A probe that has not caught up within
``--consumer-drain-timeout`` after a run is restarted on a purged stream before the next.

``--json`` prints one JSON object as the last line with ``sales_per_s``, ``pgbench_tps``,
``ratio``, ``p99_ack_ms``, ``outbox_backlog_end``, ``synchronous_commit``, the sweep and the
``*_with_consumer`` / ``consumer_*`` figures.

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
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, and bench/forecourt.py there
# would hide the package it measures (hence the imports below it, E402).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from forecourt.demo import free_port, pick_stations  # noqa: E402
from forecourt.infra.db import Database  # noqa: E402
from forecourt.infra.migrate import upgrade  # noqa: E402
from forecourt.network.handlers import (  # noqa: E402
    SAMPLE_CHAIN,
    import_chain,
    issue_credential,
    load_chain_file,
)

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")


# The stream's size limit for the benchmark (HQ, the worker and the benchmark's own bus
# connection must agree, or each connect() would set it back): a closed-loop window alone
# publishes about a million events of ~1.3 kB, more than the default 1 GiB; the stream is
# also purged before each phase (nobody reads it then).
STREAM_MAX_BYTES = 4 * 1024**3


def bus_env(prefix: str) -> dict[str, str]:
    return {
        "FORECOURT_BUS_URL": NATS_URL,
        "FORECOURT_NATS_STREAM": f"BENCH_{prefix}",
        "FORECOURT_NATS_SUBJECT_PREFIX": prefix,
        "FORECOURT_NATS_MAX_BYTES": str(STREAM_MAX_BYTES),
    }


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
    window_hook: WindowHook | None = None,
) -> dict[str, Any]:
    """One phase: warm-up, then the measured window. ``window_hook`` is told when the window
    opens and closes (right after the closing row count) and adds its figures."""
    stats = LoadStats()
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    task = asyncio.create_task(drive(clients, url, stop_at, measure_from, stats, offered))
    await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
    rows_before = await sale_count(db)
    t0 = time.monotonic()
    if window_hook is not None:
        await window_hook.opened()
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    extra = await window_hook.closed(time.monotonic() - t0) if window_hook is not None else {}
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
    } | extra


# --- the probe consumer beside HQ ------------------------------------------------------------


class WindowHook:
    """Told when a measured window opens and when it closes; adds figures to the phase."""

    async def opened(self) -> None:
        return None

    async def closed(self, window: float) -> dict[str, Any]:  # noqa: ARG002 - for overrides
        return {}


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_ticks() -> dict[int, tuple[int, int, str, int]]:
    """pid → (utime + stime in ticks, process group, comm, start time) of every process."""
    table: dict[int, tuple[int, int, str, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(rest[11]) + int(rest[12]), int(rest[2]), comm, int(rest[19]))
    return table


def _busy_ticks() -> int:
    """CPU ticks spent busy on the whole machine (every core; idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[0] + fields[1] + fields[2] + sum(fields[5:8])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class CpuWindow(WindowHook):
    """CPU per process group over the window, in cores (2 = the whole machine): HQ's HTTP
    workers, relay and supervisor, the consumer worker, PostgreSQL by connection
    (``pg:<application_name>`` on the HQ database), NATS, the load generator, and ``other``
    (whatever else runs on the machine meanwhile: the busy total less the groups)."""

    def __init__(self, hq_db: str, groups: dict[int, str]) -> None:
        self.hq_db = hq_db
        self.groups = groups  # process group id → label ("hq", "worker")
        self.start: tuple[float, int, dict[int, tuple[int, int, str, int]]] | None = None

    async def opened(self) -> None:
        self.start = (time.monotonic(), _busy_ticks(), _proc_ticks())

    async def _pg_labels(self) -> dict[int, str]:
        conn = await asyncpg.connect(host=PG_HOST, user=PG_USER, database="postgres")
        try:
            rows = await conn.fetch(
                "SELECT pid, datname, application_name, backend_type FROM pg_stat_activity"
            )
        finally:
            await conn.close()
        labels: dict[int, str] = {}
        for r in rows:
            if r["datname"] == self.hq_db:
                labels[r["pid"]] = f"pg:{r['application_name'] or 'bench'}"
            elif r["backend_type"] == "client backend":
                labels[r["pid"]] = "pg:other databases"
        return labels

    def _label(self, pid: int, pgrp: int, comm: str, pg: dict[int, str]) -> str | None:
        if pid == os.getpid():
            return "load generator"
        group = self.groups.get(pgrp)
        if group == "hq":
            cmd = _cmdline(pid)
            if " relay" in cmd:
                return "hq relay"
            return "hq http" if "--reuse-port" in cmd or pid != pgrp else "hq supervisor"
        if group is not None:
            return group
        if comm == "postgres":
            return pg.get(pid, "pg:background")
        if comm == "nats-server":
            return "nats"
        return None

    async def closed(self, window: float) -> dict[str, Any]:  # noqa: ARG002 - own clock
        assert self.start is not None
        t0, busy0, before = self.start
        pg = await self._pg_labels()
        after, busy1, t1 = _proc_ticks(), _busy_ticks(), time.monotonic()
        ticks: dict[str, int] = {}
        for pid, (total, pgrp, comm, started) in after.items():
            label = self._label(pid, pgrp, comm, pg)
            if label is None:
                continue
            prior = before.get(pid)
            spent = total - (prior[0] if prior is not None and prior[3] == started else 0)
            ticks[label] = ticks.get(label, 0) + spent
        seconds = (t1 - t0) * CLK_TCK
        cores = {k: round(v / seconds, 2) for k, v in sorted(ticks.items(), key=lambda kv: -kv[1])}
        cores["other"] = round(max(0, busy1 - busy0 - sum(ticks.values())) / seconds, 2)
        cores["machine busy"] = round((busy1 - busy0) / seconds, 2)
        return {"cpu_cores": cores}


class Hooks(WindowHook):
    def __init__(self, *hooks: WindowHook) -> None:
        self.hooks = hooks

    async def opened(self) -> None:
        for hook in self.hooks:
            await hook.opened()

    async def closed(self, window: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for hook in self.hooks:
            out |= await hook.closed(window)
        return out


# Every sales event the ingest commits, counted in the database: one per new sale
# (``sale.completed`` or ``sale.quarantined``), one more per amount mismatch and per
# natural-key collision, one per recorded conflict (sales/handlers.py). ``handled``: the
# events the probe has finished with (its inbox row commits with its effect; or dead
# letters). One statement, so one snapshot: exact at that instant.
EVENTS_SQL = """
SELECT
  (SELECT count(*)
          + count(*) FILTER (WHERE flags LIKE '%amount_mismatch%')
          + count(*) FILTER (WHERE flags LIKE '%natural_key_collision%')
     FROM sales.sale)
  + (SELECT count(*) FROM sales.sale_conflict) AS events,
  (SELECT count(*) FROM platform.inbox WHERE consumer = 'probe')
  + (SELECT count(*) FROM platform.dead_letter WHERE consumer = 'probe') AS handled
"""

# The commit of each ingest transaction and of each probe transaction, stamped by deferred
# triggers (run at COMMIT, after every statement of the transaction, just before the WAL
# flush): the first row of a transaction stamps it, the others only check a transaction-local
# setting. Installed for the paced run with the consumer only (a few µs per row).
STAMPS_SQL = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.sale_commit (
    event_time timestamptz NOT NULL, committed_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS bench.effect_commit (
    xid bigint NOT NULL, committed_at timestamptz NOT NULL);
CREATE OR REPLACE FUNCTION bench.stamp_sale_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('bench.sale_stamped', true) IS DISTINCT FROM 'y' THEN
        PERFORM set_config('bench.sale_stamped', 'y', true);
        INSERT INTO bench.sale_commit VALUES (NEW.time, clock_timestamp());
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION bench.stamp_effect_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('bench.effect_stamped', true) IS DISTINCT FROM 'y' THEN
        PERFORM set_config('bench.effect_stamped', 'y', true);
        INSERT INTO bench.effect_commit VALUES (txid_current() % 4294967296, clock_timestamp());
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_sale_commit ON platform.outbox;
CREATE CONSTRAINT TRIGGER bench_sale_commit AFTER INSERT ON platform.outbox
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench.stamp_sale_commit();
DROP TRIGGER IF EXISTS bench_effect_commit ON platform.probe_effect;
CREATE CONSTRAINT TRIGGER bench_effect_commit AFTER INSERT ON platform.probe_effect
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench.stamp_effect_commit();
"""
DROP_STAMPS_SQL = """
DROP TRIGGER IF EXISTS bench_sale_commit ON platform.outbox;
DROP TRIGGER IF EXISTS bench_effect_commit ON platform.probe_effect;
"""

# Per event of the ingest transactions committed in the window: the probe's applied_at (its
# clock inside the handler), less the sale's commit stamp; the same less the event's time
# (ingest's ``now``, taken before the batch transaction begins); the probe's commit stamp
# less the sale's. A batch's events share ``time`` to the microsecond, which ties them to
# their transaction's stamp.
LAG_SQL = """
WITH c AS (
    SELECT event_time, min(committed_at) AS committed_at FROM bench.sale_commit
    WHERE committed_at >= $1 AND committed_at < $2 GROUP BY event_time
), e AS (
    SELECT p.event_id, min(p.applied_at) AS applied_at, min(p.event_time) AS event_time,
           min(p.xmin::text::bigint) AS xid
    FROM platform.probe_effect p JOIN c USING (event_time) GROUP BY p.event_id
), l AS (
    SELECT extract(epoch FROM e.applied_at - c.committed_at) * 1000 AS commit_to_applied,
           extract(epoch FROM e.applied_at - e.event_time) * 1000 AS time_to_applied,
           extract(epoch FROM x.committed_at - c.committed_at) * 1000 AS commit_to_commit,
           extract(epoch FROM c.committed_at - e.event_time) * 1000 AS time_to_commit
    FROM e JOIN c USING (event_time) LEFT JOIN bench.effect_commit x ON x.xid = e.xid
)
SELECT count(*) AS events, (SELECT count(*) FROM c) AS transactions,
       percentile_disc(0.5) WITHIN GROUP (ORDER BY commit_to_applied) AS p50,
       percentile_disc(0.99) WITHIN GROUP (ORDER BY commit_to_applied) AS p99,
       max(commit_to_applied) AS max,
       percentile_disc(0.99) WITHIN GROUP (ORDER BY time_to_applied) AS p99_time,
       percentile_disc(0.99) WITHIN GROUP (ORDER BY commit_to_commit) AS p99_commit,
       percentile_disc(0.99) WITHIN GROUP (ORDER BY time_to_commit) AS p99_ingest
FROM l
"""


async def fetchrow(sql: str, database: str, *args: Any) -> asyncpg.Record:
    conn = await asyncpg.connect(host=PG_HOST, user=PG_USER, database=database)
    try:
        row = await conn.fetchrow(sql, *args)
        assert row is not None
        return row
    finally:
        await conn.close()


async def execute(sql: str, database: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, user=PG_USER, database=database)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def scrape(url: str) -> dict[str, float]:
    async with httpx.AsyncClient() as c:
        return parse_metrics((await c.get(url, timeout=5)).text)


LAG_BUCKET = 'forecourt_consumer_lag_seconds_bucket{consumer="probe",le="%s"}'
PROCESSED = 'forecourt_consumer_processed_total{consumer="probe"}'


class ProbeWorker:
    """``forecourt worker --consumers probe`` beside HQ, and the probe's backlog: exactly,
    from the database (``EVENTS_SQL``, counted from the worker's start on a purged stream),
    and as JetStream and the outbox see it (a cross-check). ``start()`` purges the stream
    and drops the probe's durable first, so the probe starts at nothing."""

    def __init__(self, hq_db: str, prefix: str, logfile: Path, bus: Any, command: str) -> None:
        self.command = command
        self.hq_db = hq_db
        self.prefix = prefix
        self.stream = f"BENCH_{prefix}"
        self.logfile = logfile
        self.bus = bus
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_url = ""
        self.base = (0, 0)

    async def start(self) -> None:
        """Only while nothing is in the outbox (the ingest phases drain it)."""
        await jetstream("purge", self.stream)
        await jetstream("delete_consumer", self.stream)
        self.base = (0, 0)
        self.base = await self.counts()
        env = {
            **os.environ,
            "FORECOURT_DATABASE_URL": f"postgresql://{PG_USER}@{PG_HOST}/{self.hq_db}",
            **bus_env(self.prefix),
            "FORECOURT_LOG_LEVEL": "WARNING",
        }
        args = [*shlex.split(self.command), "--consumers", "probe", "--metrics-port", "0"]
        # Only what this start writes counts (the log may hold an earlier run's lines).
        offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.logfile.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            urls = re.findall(r"metrics on (http://[0-9.:\[\]]+/metrics)", text)
            if "consumers running: probe" in text and urls:
                self.metrics_url = urls[-1]
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.proc.returncode}):\n{text[-2000:]}")
            await asyncio.sleep(0.2)
        raise RuntimeError("the worker did not say its consumers run")

    async def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    async def restart(self) -> None:
        """A fresh start (nothing pending) when the probe could not catch up."""
        await self.stop()
        await self.start()

    async def counts(self) -> tuple[int, int]:
        """(sales events committed, events the probe is done with) since the start."""
        row = await fetchrow(EVENTS_SQL, self.hq_db)
        return int(row["events"]) - self.base[0], int(row["handled"]) - self.base[1]

    async def pending(self) -> int:
        events, handled = await self.counts()
        return events - handled

    async def pending_as_the_bus_sees_it(self) -> int:
        """JetStream's ``num_pending + num_ack_pending`` (the latter counts a batch whose
        effect is committed and acks not yet confirmed) plus sales events still in the
        outbox: two instants, not one snapshot."""
        nats_pending = await self.bus.pending("probe")
        outbox = await admin(
            "SELECT count(*) FROM platform.outbox WHERE type LIKE 'forecourt.sales.%'", self.hq_db
        )
        return int(nats_pending or 0) + int(outbox)

    async def drain(self, timeout: float) -> tuple[float, int]:
        """(seconds, events still pending) once the probe has handled every event committed
        or ``timeout`` has passed (the ingest has stopped)."""
        started = time.monotonic()
        while (left := await self.pending()) > 0 and time.monotonic() - started < timeout:
            await asyncio.sleep(0.5)
        return time.monotonic() - started, left


class ConsumerWindow(WindowHook):
    """The probe during a window: its backlog when the window closes, how many events it
    applied meanwhile and its own lag histogram (event time → effect committed)."""

    def __init__(self, worker: ProbeWorker) -> None:
        self.worker = worker
        self.metrics: dict[str, float] = {}
        self.wall: list[datetime] = []

    async def opened(self) -> None:
        self.wall = [datetime.now(UTC)]
        self.metrics = await scrape(self.worker.metrics_url)

    async def closed(self, window: float) -> dict[str, Any]:
        self.wall.append(datetime.now(UTC))
        events, handled = await self.worker.counts()
        on_bus = await self.worker.pending_as_the_bus_sees_it()
        metrics = await scrape(self.worker.metrics_url)
        delta = {k: metrics.get(k, 0.0) - self.metrics.get(k, 0.0) for k in metrics}
        total = delta.get(LAG_BUCKET % "+Inf", 0.0)
        return {
            "consumer_pending_end": events - handled,
            "consumer_pending_end_bus": on_bus,
            "consumer_events_per_s": round(delta.get(PROCESSED, 0.0) / window, 1),
            "consumer_lag_share_by_worker_histogram": {
                le: round(delta.get(LAG_BUCKET % le, 0.0) / total, 4) if total else None
                for le in ("0.1", "0.25", "0.5", "1.0", "5.0")
            },
        }


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def jetstream(action: str, stream: str) -> None:
    """Purge the benchmark's stream, or delete the probe's durable on it."""
    import nats
    import nats.js.errors

    nc = await nats.connect(NATS_URL)
    try:
        if action == "purge":
            await nc.jetstream().purge_stream(stream)
        else:
            await nc.jetstream().delete_consumer(stream, "probe")
    except nats.js.errors.NotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        log(f"could not {action} on {stream}: {exc}")
    finally:
        await nc.close()


def lag_figures(row: asyncpg.Record) -> dict[str, Any]:
    def ms(key: str) -> float | None:
        return None if row[key] is None else round(float(row[key]), 1)

    return {
        "events": row["events"],
        "transactions": row["transactions"],
        "p50_ms": ms("p50"),
        "p99_ms": ms("p99"),
        "max_ms": ms("max"),
        "p99_from_event_time_ms": ms("p99_time"),
        "p99_to_effect_commit_ms": ms("p99_commit"),
        "p99_event_time_to_sale_commit_ms": ms("p99_ingest"),
    }


async def consumer_phases(
    args: argparse.Namespace,
    url: str,
    hq_db: str,
    prefix: str,
    hq_pid: int,
    make_clients: Callable[[int], Awaitable[list[StationClient]]],
) -> dict[str, Any]:
    """The probe beside HQ: a closed loop, then paced runs (see the module docstring)."""
    from forecourt.bootstrap import build_bus
    from forecourt.settings import Settings

    settings = Settings(
        database_url=f"postgresql://{PG_USER}@{PG_HOST}/{hq_db}",
        bus_url=NATS_URL,
        nats_stream=f"BENCH_{prefix}",
        nats_subject_prefix=prefix,
        nats_max_bytes=STREAM_MAX_BYTES,
    )
    bus = build_bus(settings, Database(settings.database_url))
    await bus.connect()
    command = args.worker_cmd or f"{shlex.quote(sys.executable)} -m forecourt.cli worker"
    worker = ProbeWorker(hq_db, prefix, Path(args.worker_log), bus, command)
    out: dict[str, Any] = {}
    timeout = args.consumer_drain_timeout
    try:
        await worker.start()

        def hooks(window: ConsumerWindow) -> Hooks:
            assert worker.proc is not None
            return Hooks(
                CpuWindow(hq_db, {hq_pid: "hq", worker.proc.pid: "consumer worker"}), window
            )

        log(f"with the probe: {args.clients} clients, {args.warmup}s warm-up + {args.seconds}s")
        clients = await make_clients(args.clients)
        closed = await ingest_phase(
            url,
            hq_db,
            clients,
            args.warmup,
            args.seconds,
            window_hook=hooks(ConsumerWindow(worker)),
        )
        drain_s, left = await worker.drain(timeout)
        closed |= {"consumer_drain_s": round(drain_s, 1), "consumer_pending_after_drain": left}
        out["closed"] = closed
        log(
            f"with the probe: {closed['sales_per_s']} sales/s, probe pending at the end "
            f"{closed['consumer_pending_end']} (bus {closed['consumer_pending_end_bus']}), "
            f"{left} left after {drain_s:.0f} s; probe {closed['consumer_events_per_s']} "
            f"events/s; cpu {closed['cpu_cores']}"
        )

        await execute(STAMPS_SQL, hq_db)
        paced: dict[str, dict[str, Any]] = {}
        rate = float(args.paced_with_consumer)
        for _attempt in range(args.consumer_attempts):
            if await worker.pending():
                await worker.restart()
            else:  # nothing pending: the stream's events are all done with
                await jetstream("purge", worker.stream)
            log(f"paced with the probe: {args.clients} clients offering {rate:.0f} sales/s")
            window = ConsumerWindow(worker)
            result = await ingest_phase(
                url,
                hq_db,
                await make_clients(args.clients),
                args.warmup,
                args.sweep_seconds,
                rate,
                window_hook=hooks(window),
            )
            drain_s, left = await worker.drain(timeout)
            lag = lag_figures(await fetchrow(LAG_SQL, hq_db, *window.wall))
            in_window = result["sales_per_s"] * (window.wall[1] - window.wall[0]).total_seconds()
            lag["p99_applied_ms"] = lag["p99_ms"]
            if left > 0.01 * in_window:
                # More than 1 % of the window's events (about one per sale) not applied when
                # the wait ended: each has a lag of at least the wait, so the p99 too.
                lag["p99_ms"] = max(lag["p99_ms"] or 0.0, round(drain_s * 1000, 1))
            backlog_s = result["consumer_pending_end"] / max(1.0, result["sales_per_s"])
            result |= {
                "consumer_drain_s": round(drain_s, 1),
                "consumer_pending_after_drain": left,
                # With events still pending, p99_ms is a lower bound (the others are over
                # the events applied by then).
                "consumer_lag": lag | {"complete": left == 0},
                "consumer_backlog_end_s": round(backlog_s, 2),
                # The probe kept up, and the ingest too. Paced clients are bursty (a large
                # batch, then a long wait): below 2 000/s a window holds too few large
                # batches per client for the achieved rate to say anything.
                "sustained": backlog_s < 1.0
                and left == 0
                and (rate < 2000 or result["sales_per_s"] >= 0.9 * rate),
            }
            paced[f"{rate:.0f}"] = result
            log(
                f"paced with the probe {rate:.0f}: {result['sales_per_s']} sales/s, probe "
                f"{result['consumer_events_per_s']} events/s, backlog {backlog_s:.1f} s, "
                f"lag {lag}, sustained {result['sustained']}; cpu {result['cpu_cores']}"
            )
            out["paced_chosen"] = f"{rate:.0f}"
            if result["sustained"]:
                break
            # Next: a little under what the probe applied meanwhile (it gets more CPU then),
            # 500/s at the least.
            lower = max(500, 500 * int(0.8 * result["consumer_events_per_s"] // 500))
            if lower >= rate:
                break
            rate = float(lower)
        out["paced"] = paced
    finally:
        await worker.stop()
        await bus.close()
        await execute(DROP_STAMPS_SQL, hq_db)
        await jetstream("delete_consumer", f"BENCH_{prefix}")
    return out


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
        **bus_env(prefix),
        "FORECOURT_LOG_LEVEL": "WARNING",
        "FORECOURT_CONSUMERS": "none",  # the runs with a consumer start a worker beside it
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

        with_consumer: dict[str, Any] = {}
        for c in [args.clients] + [c for c in sweep if c != args.clients]:
            clients = await make_clients(c)
            seconds = args.seconds if c == args.clients else args.sweep_seconds
            log(f"ingest: {c} clients, {args.warmup}s warm-up + {seconds}s")
            await jetstream("purge", f"BENCH_{prefix}")
            hook = CpuWindow(hq_db, {hq.pid: "hq"}) if c == args.clients else None
            results[c] = await ingest_phase(
                url, hq_db, clients, args.warmup, seconds, window_hook=hook
            )
            log(
                f"ingest {c} clients: {results[c]['sales_per_s']} sales/s, "
                f"p99 {results[c]['p99_ack_ms']} ms, backlog {results[c]['outbox_backlog_end']}"
                + (f"; cpu {results[c]['cpu_cores']}" if hook else "")
            )
            if c == args.clients:
                tps_after = await pgbench_run(ref_db, args.clients, args.pgbench_seconds)
                log(f"pgbench after: {tps_after:.0f} tps")
                if args.consumer:  # right after the main run, on the same-sized database
                    with_consumer = await consumer_phases(
                        args, url, hq_db, prefix, hq.pid, make_clients
                    )
        paced: dict[str, dict[str, Any]] = {}
        for rate in [float(r) for r in args.paced.split(",") if r]:
            log(f"paced: {args.clients} clients offering {rate:.0f} sales/s")
            await jetstream("purge", f"BENCH_{prefix}")
            result = await ingest_phase(
                url, hq_db, await make_clients(args.clients), args.warmup, args.sweep_seconds, rate
            )
            paced[f"{rate:.0f}"] = result
            log(f"paced {rate:.0f}: {result['sales_per_s']} sales/s, p99 {result['p99_ack_ms']} ms")
    finally:
        stop_group(hq)
        await delete_stream(f"BENCH_{prefix}")
    main_run = results[args.clients]
    pgbench_tps = (tps_before + tps_after) / 2
    consumer = consumer_figures(with_consumer, pgbench_tps)
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
        "cpu_cores": main_run.get("cpu_cores"),
    } | consumer


def consumer_figures(phases: dict[str, Any], pgbench_tps: float) -> dict[str, Any]:
    """The top-level keys of the runs with the probe (None without them)."""
    keys = (
        "ratio_with_consumer",
        "sales_per_s_with_consumer",
        "consumer_backlog_end_s",
        "consumer_lag_p99_ms",
        "consumer_lag_complete",
        "paced_with_consumer_offered",
        "paced_with_consumer_achieved",
        "consumer_goals_met",
    )
    if not phases:
        return dict.fromkeys(keys)
    closed = phases["closed"]
    paced = phases.get("paced", {}).get(phases.get("paced_chosen") or "", {})
    rate = closed["sales_per_s"]
    lag = paced.get("consumer_lag", {}).get("p99_ms")
    figures: dict[str, Any] = {
        "ratio_with_consumer": round(rate / pgbench_tps, 2) if pgbench_tps else None,
        "sales_per_s_with_consumer": rate,
        "consumer_backlog_end_s": round(closed["consumer_pending_end"] / rate, 2) if rate else None,
        "consumer_lag_p99_ms": lag,
        # False: some events of the window were not applied within the drain timeout, so
        # the p99 (over those applied) is a lower bound.
        "consumer_lag_complete": paced.get("consumer_lag", {}).get("complete"),
        "paced_with_consumer_offered": paced.get("offered_sales_per_s"),
        "paced_with_consumer_achieved": paced.get("sales_per_s"),
    }
    figures["consumer_goals_met"] = bool(
        figures["ratio_with_consumer"] is not None
        and figures["ratio_with_consumer"] >= 1.5
        and figures["consumer_backlog_end_s"] is not None
        and figures["consumer_backlog_end_s"] < 1.0
        and lag is not None
        and lag <= 500
        and figures["consumer_lag_complete"]
        and (paced.get("offered_sales_per_s") or 0) >= 8000
        and paced.get("sustained")
    )
    return figures | {
        "with_consumer": {
            "closed": {k: v for k, v in closed.items() if k != "by_batch_size"},
            "paced": {
                r: {k: v for k, v in p.items() if k != "by_batch_size"}
                for r, p in phases.get("paced", {}).items()
            },
        }
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
    p.add_argument(
        "--no-consumer",
        dest="consumer",
        action="store_false",
        help="skip the runs with the probe consumer beside HQ",
    )
    p.add_argument(
        "--paced-with-consumer",
        type=float,
        default=8000,
        help="offered load (sales/s) of the paced run with the probe; when the probe cannot "
        "keep up, retried a little under the rate it applied (--consumer-attempts runs)",
    )
    p.add_argument("--consumer-attempts", type=int, default=3)
    p.add_argument(
        "--consumer-drain-timeout",
        type=float,
        default=120,
        help="seconds to wait for the probe to catch up after a run with it",
    )
    p.add_argument("--worker-log", default="bench-worker.log", help="consumer worker log file")
    p.add_argument(
        "--worker-cmd",
        default="",
        help="command that runs the consumer worker, before '--consumers probe --metrics-port 0' "
        "(default: this Python, -m forecourt.cli worker; e.g. under a profiler)",
    )
    p.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    args = p.parse_args()
    if args.quick:
        args.seconds = args.sweep_seconds = args.pgbench_seconds = 10
        args.warmup = 3
        args.scale = 5
        args.consumer_drain_timeout = min(args.consumer_drain_timeout, 20)
    return args


if __name__ == "__main__":
    arguments = parse()
    result = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(result, separators=(",", ":")))
    else:
        print(json.dumps(result, indent=2))
