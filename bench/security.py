"""Security benchmark: what authentication and audit cost on the sale-ingest path, and how
fast the audit trail verifies.

Two variants of HQ, the same code and settings, one HTTP process each:

* ``secured``: HQ as it runs — every upload's station credential checked (the bounded cache
  keyed by the credential's hash, the database on a miss), the route's policy evaluated, and
  the upload's audit record written in its transaction;
* ``plain``: the same HQ with the credential check replaced by a dictionary lookup of the
  benchmark's own tokens and ``record_audit`` made a no-op (the policy check itself stays).

The same load (bench/ingest.py's upload clients: C closed-loop station clients, 80 % of
batches of 1–10 sales, 20 % of 100–1 000, 5 % re-uploads) drives each in turn. Every run
(one variant, one round) starts from the same state, so that what is compared is the variant
and not what earlier runs left behind:

* a fresh database, copied from a template made once (migrated, the chain imported, the
  credentials issued, ``VACUUM (FREEZE, ANALYZE)``): no table or index grown by earlier runs,
  no outbox or audit-outbox backlog, and every station's ``station_seq`` starting afresh (a
  client of a later round re-using the numbers of an earlier one on the same database would
  have every sale flagged and quarantined, with an alert each: another workload);
* a fresh JetStream stream (deleted before the run; HQ creates it again);
* its statistics analyzed halfway through the run's warm-up (see ``fresh_database``: plans
  cached while the tables were empty would otherwise seq-scan them, at random);
* a ``CHECKPOINT`` just before the variant's HQ starts, so each run has the same WAL distance
  to the next checkpoint (autovacuum may be off on the server: nothing vacuums for us);
* only the measured variant's HQ running (its relay and audit chainer included; the other
  variant's are not there to poll or publish meanwhile).

``--warmup-rounds`` (1) rounds of both variants run first and are discarded (caches of the
machine, PostgreSQL and NATS). Then ``--rounds`` pairs, each pair one run of each variant with
the same load seed, the order alternated ABBA (plain, secured | secured, plain | …) so neither
variant always goes first. ``overhead`` = the median over the pairs of 1 − secured ÷ plain
sales per second (negative values are noise and are reported as measured); ``overhead_mean``
the mean of the same pair figures, ``overhead_pairs`` each, ``overhead_of_means`` 1 − mean
secured ÷ mean plain (the figure this benchmark used to report), ``spread`` max ÷ min sales
per second of each variant over the measured runs. Each run also reports what could make it
drift: WAL written and checkpoints during the window, the outbox and audit-outbox backlogs at
its end, the answers' statuses, and CPU per process group (``other``: whatever else ran on the
machine meanwhile). Then the audit trail verification speed (bench/audit_verify.py's fill and
verify, ``--verify-records`` records): ``verify_records_per_s``.

``--json`` prints one JSON object as the last line with ``overhead``, ``overhead_mean``,
``overhead_pairs``, ``spread``, ``sales_per_s_plain``, ``sales_per_s_secured`` (medians over
the measured runs), ``sales_per_s_rounds``, ``p99_ack_ms_*`` (the highest of the measured
runs), the runs, ``verify_records_per_s``.

    .venv/bin/python bench/security.py --json
    .venv/bin/python bench/security.py --quick --json     # short rounds, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Run as a script, this file's folder comes first on sys.path, and bench/forecourt.py there
# would hide the forecourt package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _bench_module(name: str) -> Any:
    """A script of this folder as a module (bench/ingest.py's load generator)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


load = _bench_module("ingest")

DB = "forecourt_bench_security"
TEMPLATE = f"{DB}_template"  # every run's database is a copy of it


def serve(variant: str, port: int, tokens_file: Path) -> None:
    """One HQ HTTP process (``--serve``): ``secured`` as it ships, or ``plain``."""
    import uvicorn

    from forecourt.bootstrap import create_app
    from forecourt.infra.db import UnitOfWork
    from forecourt.kernel.access import Principal

    app = create_app()
    if variant == "plain":
        from forecourt.kernel.access import STATION_PERMISSIONS, Grant, PrincipalKind, Scope

        known = {
            token: Principal(
                PrincipalKind.STATION,
                code,
                (Grant("station", Scope.station(code), STATION_PERMISSIONS),),
            )
            for code, token in json.loads(tokens_file.read_text()).items()
        }

        class Plain:
            async def principal(self, token: str, source: str | None) -> Principal:  # noqa: ARG002
                return known[token]

        async def no_audit(_self: Any, **_: Any) -> None:
            return None

        app.state.authenticator = Plain()
        UnitOfWork.record_audit = no_audit  # type: ignore[method-assign,assignment]
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(variant: str, port: int, tokens_file: Path, prefix: str, logfile: Path) -> Any:
    env = {
        **os.environ,
        "FORECOURT_DATABASE_URL": f"postgresql://{load.PG_USER}@{load.PG_HOST}/{DB}",
        **load.bus_env(prefix),
        "FORECOURT_LOG_LEVEL": "WARNING",
        "FORECOURT_CONSUMERS": "none",
    }
    args = [sys.executable, str(Path(__file__)), "--serve", variant, "--port", str(port)]
    args += ["--tokens-file", str(tokens_file)]
    with logfile.open("wb") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


# What could make one run differ from another, read around its measured window: WAL written,
# checkpoints started (requested: max_wal_size reached; timed: checkpoint_timeout).
WAL_SQL = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
CHECKPOINTS_SQL = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
AUDIT_WAITING = "SELECT count(*) FROM platform.audit_outbox"


async def fresh_database() -> None:
    """The run's database: a copy of the template (nothing left by an earlier run), then a
    checkpoint, so every run starts the same distance from the next one.

    Its sales tables start empty, and an empty table's statistics make a seq scan the
    cheapest plan of every per-sale lookup: a pooled connection that caches its generic plan
    of a prepared statement then (PostgreSQL does after five executions) seq-scans a table
    of a hundred thousand rows on every upload until something invalidates the plan.
    Autovacuum's analyze would, soon; where it is off (as on the benchmark machine) nothing
    does, and which connections, hence how slow a run, was luck: one such backend took a
    core and halved a run's rate. ``one_round`` analyzes the database halfway through each
    run's warm-up."""
    await load.admin(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    await load.admin(f'CREATE DATABASE "{DB}" TEMPLATE "{TEMPLATE}"')
    await load.admin("CHECKPOINT")


async def one_round(
    variant: str,
    tokens_file: Path,
    tokens: dict[str, str],
    work: Path,
    args: argparse.Namespace,
    seconds: float,
    seed: int,
    label: str,
) -> dict[str, Any]:
    """One run of one variant: fresh database and stream, its HQ started, the load, HQ
    stopped; the sales per second of the measured window and what it left behind."""
    prefix = f"sec{uuid.uuid4().hex[:8]}"
    await fresh_database()
    port = free_port()
    proc = start(variant, port, tokens_file, prefix, work / f"{label}-{variant}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        await load.wait_ready(url)
        # Each client its own station: a station's uploads are serialised by its lock.
        station_clients = [
            load.StationClient(code, tokens[code], random.Random(seed * 1000 + i))
            for i, code in enumerate(sorted(tokens)[: args.clients])
        ]
        stats = load.LoadStats()
        now = time.monotonic()
        measure_from, stop_at = now + args.warmup, now + args.warmup + seconds
        task = asyncio.create_task(load.drive(station_clients, url, stop_at, measure_from, stats))
        # Halfway through the warm-up, the statistics of what the warm-up wrote, as
        # autovacuum's analyze would have them (see fresh_database): cached plans are made
        # again, for tables of their true size.
        await asyncio.sleep(max(0.0, now + args.warmup / 2 - time.monotonic()))
        await load.admin("ANALYZE", DB)
        await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
        cpu = load.CpuWindow(DB, {proc.pid: "hq"})
        rows_before = await load.sale_count(DB)
        wal_before = int(await load.admin(WAL_SQL))
        checkpoints_before = int(await load.admin(CHECKPOINTS_SQL))
        await cpu.opened()
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        cores = (await cpu.closed(seconds))["cpu_cores"]
        rows_after = await load.sale_count(DB)
        wal_after = int(await load.admin(WAL_SQL))
        checkpoints_after = int(await load.admin(CHECKPOINTS_SQL))
        await task
        outbox_left = int(await load.admin(load.UNPUBLISHED, DB))
        audit_left = int(await load.admin(AUDIT_WAITING, DB))
    finally:
        load.stop_group(proc)
        await load.delete_stream(f"BENCH_{prefix}")
    measured = stats.small.sales + stats.large.sales
    # HQ is one process here (no supervisor): its group is HQ.
    cores = {("hq" if k == "hq supervisor" else k): v for k, v in cores.items()}
    figures: dict[str, Any] = {
        "sales_per_s": round(measured / seconds, 1),
        "rows_per_s": round((rows_after - rows_before) / seconds, 1),
        "rows_added": rows_after,
        "p99_ack_ms": round(load.pct(stats.latencies(), 99), 1),
        "errors": stats.errors,
        "statuses": stats.statuses,
        "wal_mb": round((wal_after - wal_before) / 2**20, 1),
        "checkpoints": checkpoints_after - checkpoints_before,
        "outbox_backlog_end": outbox_left,
        "audit_outbox_backlog_end": audit_left,
        "cpu_cores": cores,
    }
    load.log(
        f"{label} {variant}: {figures['sales_per_s']} sales/s, p99 {figures['p99_ack_ms']} ms, "
        f"WAL {figures['wal_mb']} MB, checkpoints {figures['checkpoints']}, backlog "
        f"{outbox_left}/{audit_left}, cpu hq {cores.get('hq')} other {cores.get('other')}"
    )
    return {"variant": variant, **figures}


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures over the measured runs: pairs (the two runs of a round), medians, spread."""
    by_round: dict[int, dict[str, float]] = {}
    for r in rounds:
        by_round.setdefault(r["round"], {})[r["variant"]] = r["sales_per_s"]
    pairs = [
        round(1 - v["secured"] / v["plain"], 4)
        for _, v in sorted(by_round.items())
        if v.get("plain") and "secured" in v
    ]
    rates = {
        variant: [r["sales_per_s"] for r in rounds if r["variant"] == variant]
        for variant in ("plain", "secured")
    }
    plain_mean, secured_mean = (statistics.fmean(rates[v]) for v in ("plain", "secured"))
    return {
        "overhead": round(statistics.median(pairs), 4) if pairs else None,
        "overhead_mean": round(statistics.fmean(pairs), 4) if pairs else None,
        "overhead_pairs": pairs,
        "overhead_of_means": round(1 - secured_mean / plain_mean, 4) if plain_mean else None,
        "sales_per_s_plain": round(statistics.median(rates["plain"]), 1),
        "sales_per_s_secured": round(statistics.median(rates["secured"]), 1),
        "sales_per_s_rounds": rates,
        "spread": {
            v: round(max(rates[v]) / min(rates[v]), 3) if min(rates[v]) else None
            for v in ("plain", "secured")
        },
        "p99_ack_ms_plain": max(r["p99_ack_ms"] for r in rounds if r["variant"] == "plain"),
        "p99_ack_ms_secured": max(r["p99_ack_ms"] for r in rounds if r["variant"] == "secured"),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    await load.admin(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    tokens = await load.prepare_hq_db(TEMPLATE, args.clients)
    await load.admin("VACUUM (FREEZE, ANALYZE)", TEMPLATE)
    work = Path(tempfile.mkdtemp(prefix="forecourt-bench-security-"))
    tokens_file = work / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    warmups: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for n in range(args.warmup_rounds):
            for variant in ("plain", "secured") if n % 2 == 0 else ("secured", "plain"):
                figures = await one_round(
                    variant,
                    tokens_file,
                    tokens,
                    work,
                    args,
                    args.warmup_round_seconds,
                    10_000 + n,
                    f"warm-up {n + 1}",
                )
                warmups.append({"round": -(n + 1), **figures})
        for n in range(args.rounds):
            for variant in ("plain", "secured") if n % 2 == 0 else ("secured", "plain"):
                figures = await one_round(
                    variant, tokens_file, tokens, work, args, args.seconds, n, f"round {n + 1}"
                )
                rounds.append({"round": n + 1, **figures})
    finally:
        for db in (DB, TEMPLATE):
            await load.admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = summary(rounds) | {
        "clients": args.clients,
        "round_seconds": args.seconds,
        "rounds_measured": args.rounds,
        "ingest_s": round(time.monotonic() - started, 1),
        "rounds": rounds,
        "warmup_rounds": warmups,
    }
    load.log(
        f"overhead {result['overhead']} (pairs {result['overhead_pairs']}), spread "
        f"{result['spread']}, sales/s {result['sales_per_s_rounds']}"
    )
    result.update(await verify_figures(args.verify_records))
    return result


async def verify_figures(records: int) -> dict[str, Any]:
    """bench/audit_verify.py, run as its own process (it fills a database of its own)."""
    if records <= 0:
        return {"verify_records_per_s": None}
    done = subprocess.run(
        [sys.executable, str(HERE / "audit_verify.py"), "--records", str(records), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        load.log(f"audit_verify failed: {done.stderr.strip()[-500:]}")
        return {"verify_records_per_s": None}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "verify_records": figures.get("records"),
        "verify_s": figures.get("verify_s"),
        "verify_records_per_s": figures.get("verify_records_per_s"),
    }


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object as the last line")
    p.add_argument("--clients", type=int, default=16, help="upload clients (one station each)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per round")
    p.add_argument(
        "--rounds", type=int, default=5, help="measured rounds: pairs of runs, ABBA order"
    )
    p.add_argument(
        "--warmup-rounds", type=int, default=1, help="rounds of both variants run first, discarded"
    )
    p.add_argument(
        "--warmup-round-seconds", type=float, default=10.0, help="measured seconds of those"
    )
    p.add_argument(
        "--verify-records", type=int, default=1_000_000, help="audit records to verify (0: skip)"
    )
    p.add_argument("--quick", action="store_true", help="short rounds (smoke run)")
    p.add_argument("--serve", choices=("plain", "secured"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tokens-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.rounds = 8.0, 2.0, 2
        args.warmup_rounds, args.warmup_round_seconds = 1, 3.0
        args.verify_records = min(args.verify_records, 200_000)
    return args


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve:
        serve(arguments.serve, arguments.port, arguments.tokens_file)
    else:
        outcome = asyncio.run(main(arguments))
        print(json.dumps(outcome, separators=(",", ":") if arguments.json else None))
