"""Security benchmark: what authentication and audit cost on the sale-ingest path, and how
fast the audit trail verifies.

Two HQ processes on one PostgreSQL database and one JetStream stream, the same code and
settings, one HTTP process each:

* ``secured``: HQ as it runs — every upload's station credential checked (the bounded cache
  keyed by the credential's hash, the database on a miss), the route's policy evaluated, and
  the upload's audit record written in its transaction;
* ``plain``: the same HQ with the credential check replaced by a dictionary lookup of the
  benchmark's own tokens and ``record_audit`` made a no-op (the policy check itself stays).

The same load (bench/ingest.py's upload clients: C closed-loop station clients, 80 % of
batches of 1–10 sales, 20 % of 100–1 000, 5 % re-uploads) drives each in turn, alternating
``--rounds`` times (plain, secured, plain, secured, …) so drift on the machine falls on both.
``overhead`` = 1 − secured ÷ plain sales per second (0–1; negative values are noise and are
reported as measured). Then the audit trail verification speed (bench/audit_verify.py's
fill and verify, ``--verify-records`` records): ``verify_records_per_s``.

``--json`` prints one JSON object as the last line with ``overhead``, ``sales_per_s_plain``,
``sales_per_s_secured``, the rounds, ``p99_ack_ms_*``, ``verify_records_per_s``.

    .venv/bin/python bench/security.py --json
    .venv/bin/python bench/security.py --quick --json     # short rounds, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
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


async def one_round(
    url: str, tokens: dict[str, str], clients: int, seconds: float, warmup: float, seed: int
) -> dict[str, Any]:
    # Each client its own station: a station's uploads are serialised by its lock.
    station_clients = [
        load.StationClient(code, tokens[code], random.Random(seed * 1000 + i))
        for i, code in enumerate(sorted(tokens)[:clients])
    ]
    before = await load.sale_count(DB)
    stats = load.LoadStats()
    now = time.monotonic()
    await load.drive(station_clients, url, now + warmup + seconds, now + warmup, stats)
    after = await load.sale_count(DB)
    measured = stats.small.sales + stats.large.sales
    return {
        "sales_per_s": round(measured / seconds, 1),
        "rows_added": after - before,
        "p99_ack_ms": round(load.pct(stats.latencies(), 99), 1),
        "errors": stats.errors,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    tokens = await load.prepare_hq_db(DB, args.clients)
    work = Path(tempfile.mkdtemp(prefix="forecourt-bench-security-"))
    tokens_file = work / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    prefix = f"sec{uuid.uuid4().hex[:8]}"
    servers: dict[str, tuple[Any, str]] = {}
    try:
        for variant in ("plain", "secured"):
            port = free_port()
            proc = start(variant, port, tokens_file, prefix, work / f"{variant}.log")
            servers[variant] = (proc, f"http://127.0.0.1:{port}")
        for _, url in servers.values():
            await load.wait_ready(url)
        rounds: list[dict[str, Any]] = []
        for n in range(args.rounds):
            for variant in ("plain", "secured") if n % 2 == 0 else ("secured", "plain"):
                load.log(f"round {n + 1}: {variant}")
                figures = await one_round(
                    servers[variant][1], tokens, args.clients, args.seconds, args.warmup, n
                )
                rounds.append({"variant": variant, **figures})
    finally:
        for proc, _ in servers.values():
            load.stop_group(proc)
        await load.delete_stream(f"BENCH_{prefix}")
    plain = [r for r in rounds if r["variant"] == "plain"]
    secured = [r for r in rounds if r["variant"] == "secured"]
    plain_rate = sum(r["sales_per_s"] for r in plain) / len(plain)
    secured_rate = sum(r["sales_per_s"] for r in secured) / len(secured)
    result: dict[str, Any] = {
        "overhead": round(1 - secured_rate / plain_rate, 4) if plain_rate else None,
        "sales_per_s_plain": round(plain_rate, 1),
        "sales_per_s_secured": round(secured_rate, 1),
        "p99_ack_ms_plain": max(r["p99_ack_ms"] for r in plain),
        "p99_ack_ms_secured": max(r["p99_ack_ms"] for r in secured),
        "clients": args.clients,
        "round_seconds": args.seconds,
        "rounds": rounds,
    }
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
    p.add_argument("--rounds", type=int, default=4, help="rounds per variant, alternating")
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
        args.verify_records = min(args.verify_records, 200_000)
    return args


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve:
        serve(arguments.serve, arguments.port, arguments.tokens_file)
    else:
        outcome = asyncio.run(main(arguments))
        print(json.dumps(outcome, separators=(",", ":") if arguments.json else None))
