"""The ``forecourt`` command line: demo, serve (HQ), edge, import, migrate, credential."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from forecourt.infra.logging import configure_logging

console = Console(stderr=False)
err = Console(stderr=True)


@click.group()
@click.version_option(package_name="forecourt")
def main() -> None:
    """Forecourt: run a chain of fuel stations — edge nodes at stations, one head office."""


# --- demo ---------------------------------------------------------------------------------


@main.command()
@click.option(
    "--duration",
    "duration",
    type=float,
    default=20.0,
    show_default=True,
    help="Wall-clock seconds of customer traffic (draining comes after).",
)
@click.option("--stations", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option(
    "--speed",
    type=float,
    default=120.0,
    show_default=True,
    help="Simulated seconds per wall second.",
)
@click.option(
    "--arrivals-per-hour",
    type=float,
    default=150.0,
    show_default=True,
    help="Customers per simulated hour per station.",
)
@click.option("--database-url", default=None, help="HQ database (default: a SQLite file).")
@click.option(
    "--bus-url",
    default="memory://",
    show_default=True,
    help="memory:// (in-process) or nats://host:4222 (JetStream).",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep journals, databases and logs here (default: a temporary folder).",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--reset",
    is_flag=True,
    help="Drop Forecourt's tables in the database first (it must be empty).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def demo(
    duration: float,
    stations: int,
    speed: float,
    arrivals_per_hour: float,
    database_url: str | None,
    bus_url: str,
    workdir: Path | None,
    seed: int,
    reset: bool,
    as_json: bool,
) -> None:
    """HQ + N simulated stations (4 dispensers each), then a three-way reconciliation."""
    from forecourt.demo import DemoOptions, run_demo

    configure_logging(os.environ.get("FORECOURT_LOG_LEVEL", "ERROR"), json_lines=False)
    opts = DemoOptions(
        duration_s=duration,
        stations=stations,
        speed=speed,
        arrivals_per_hour=arrivals_per_hour,
        database_url=database_url,
        reset=reset,
        bus_url=bus_url,
        workdir=workdir,
        seed=seed,
    )

    def progress(line: str) -> None:
        if not as_json:
            err.print(line, highlight=False)

    if not as_json:
        err.print(
            f"Forecourt demo: {stations} stations, {duration:.0f} s at {speed:.0f}x, "
            f"database {'PostgreSQL' if database_url else 'SQLite'}, bus {bus_url}"
        )
    from forecourt.kernel.errors import ForecourtError

    try:
        result = asyncio.run(run_demo(opts, progress))
    except ForecourtError as exc:
        err.print(f"[red]{exc.code}: {exc.message}[/red]")
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":")))
    else:
        _print_demo(result)
    if not result["agree"]:
        sys.exit(1)


def _print_demo(result: dict[str, Any]) -> None:
    table = Table(title="Reconciliation: dispensers vs edge journals vs HQ")
    for col in ("station", "grade", "sales", "litres", "amount", "edge journal", "HQ"):
        table.add_column(col, justify="left" if col in ("station", "grade") else "right")

    def versus(d: dict[str, int], x: dict[str, int]) -> str:
        if d == x:
            return "[green]equal[/green]"
        return (
            f"[red]{x['sales'] - d['sales']:+d} sales {x['volume_ml'] - d['volume_ml']:+d} ml "
            f"{x['amount_minor'] - d['amount_minor']:+d} fen[/red]"
        )

    for row in result["per_station_grade"]:
        d = row["dispensers"]
        table.add_row(
            row["station"],
            row["grade"],
            str(d["sales"]),
            f"{d['volume_ml'] / 1000:.2f}",
            f"{d['amount_minor'] / 100:.2f}",
            versus(d, row["edges"]),
            versus(d, row["hq"]),
        )
    console.print(table)
    verdict = "[green]AGREE[/green]" if result["agree"] else "[red]DISAGREE[/red]"
    console.print(
        f"sales at dispensers/edges/HQ: {result['sales_at_dispensers']}/{result['sales_at_edges']}/"
        f"{result['sales_at_hq']}  lost {result['lost']}  duplicates {result['duplicates']}  "
        f"quarantined {result['quarantined']}  drained {result['drained']}  {verdict}"
    )


def _hq_settings(database_url: str | None) -> Any:
    from forecourt.settings import Settings

    return Settings(database_url=database_url) if database_url else Settings()


# --- head office ----------------------------------------------------------------------------


@main.command()
@click.option("--services", default=None, help="Comma-separated contexts to serve (default: all).")
@click.option("--host", default=None)
@click.option("--port", type=int, default=None, help="HTTP port (0: one the kernel picks).")
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the port HQ listens on to this file (atomically) once it serves requests.",
)
@click.option("--database-url", default=None)
@click.option("--bus-url", default=None)
@click.option(
    "--reuse-port", is_flag=True, hidden=True, help="Bind with SO_REUSEPORT (worker processes)."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="HTTP worker processes (more than one needs PostgreSQL).",
)
def serve(
    services: str | None,
    host: str | None,
    port: int | None,
    port_file: Path | None,
    database_url: str | None,
    bus_url: str | None,
    workers: int | None,
    reuse_port: bool,
) -> None:
    """Run the head office (HTTP API, outbox relay) on the configured database and bus."""
    from forecourt.infra.db import normalise_url
    from forecourt.settings import Settings

    # Options become environment variables so that every worker process sees them.
    for key, value in {
        "SERVICES": services,
        "HOST": host,
        "PORT": port,
        "DATABASE_URL": database_url,
        "BUS_URL": bus_url,
        "WORKERS": workers,
    }.items():
        if value is not None:
            os.environ[f"FORECOURT_{key}"] = str(value)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    if settings.workers > 1 and normalise_url(settings.database_url).startswith("sqlite"):
        raise click.UsageError("several workers need PostgreSQL (SQLite has one writer)")
    if settings.workers > 1:
        sys.exit(_supervise_workers(settings.workers, settings.host, settings.port, port_file))
    _serve_one(settings.host, settings.port, reuse_port=reuse_port, port_file=port_file)


def _serve_one(host: str, port: int, *, reuse_port: bool, port_file: Path | None) -> None:
    """One HQ process: uvicorn on uvloop/httptools, the app built by the factory, on a socket
    this process binds and listens on itself (``port`` 0: the kernel picks one)."""
    import uvicorn

    from forecourt.infra.listener import PortFileServer, listening_socket

    config = uvicorn.Config(
        "forecourt.bootstrap:create_app",
        factory=True,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    # A worker (``reuse_port``) binds its own socket with SO_REUSEPORT: the kernel spreads
    # connections over the workers evenly, where one shared accept queue lets one worker
    # take most of them.
    sock = listening_socket(host, port, reuse_port=reuse_port)
    PortFileServer(config, port_file).run(sockets=[sock])


WORKERS_START_S = 120.0  # every HTTP worker listens within this, or the supervisor gives up


def _supervise_workers(count: int, host: str, port: int, port_file: Path | None) -> int:
    """Start ``count`` single-worker HQ processes on the same port; stop them together.

    The supervisor binds the port first (SO_REUSEPORT, never listening, so it takes no
    connection): ``port`` 0 becomes a real number that every worker then binds too, and that
    nobody else can take while they start. The port file is written once every worker has
    written its own, that is once every worker serves requests.
    """
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    from forecourt.infra.listener import bound_socket, port_of, remove_port_file, write_port_file

    if port_file is not None:
        remove_port_file(port_file)
    reserved = bound_socket(host, port, reuse_port=True)
    chosen = port_of(reserved)
    ready_dir = Path(tempfile.mkdtemp(prefix="forecourt-workers-"))
    worker_files = [ready_dir / f"worker-{i}.port" for i in range(count)]
    # HTTP workers do not relay; one relay process of its own gets a fair share of the CPU
    # (inside busy HTTP workers it would starve and the outbox backlog would grow).
    args = [sys.executable, "-m", "forecourt.cli", "serve", "--workers", "1", "--reuse-port"]
    args += ["--port", str(chosen)]
    http_env = {**os.environ, "FORECOURT_RELAY": "false"}
    children = [
        subprocess.Popen([*args, "--port-file", str(path)], env=http_env) for path in worker_files
    ]
    children.append(subprocess.Popen([sys.executable, "-m", "forecourt.cli", "relay"]))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    started_by = time.monotonic() + WORKERS_START_S
    starting = True
    failed = False
    while all(child.poll() is None for child in children):
        if starting and all(path.exists() for path in worker_files):
            starting = False
            if port_file is not None:
                write_port_file(port_file, chosen)
        elif starting and time.monotonic() > started_by:
            err.print(f"[red]HQ workers not serving after {WORKERS_START_S:.0f} s[/red]")
            failed = True
            break
        time.sleep(0.2)
    if port_file is not None:
        remove_port_file(port_file)
    # One died (or they never all started): stop the rest, let the process manager restart us.
    forward(signal.SIGTERM, None)
    deadline = time.monotonic() + 20
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    reserved.close()
    shutil.rmtree(ready_dir, ignore_errors=True)
    codes = max((abs(c.returncode or 0) for c in children), default=0)
    return codes or int(failed)


@main.command()
def relay() -> None:
    """Run only the outbox relay (publishes committed events to the bus) until stopped."""
    import signal

    from forecourt.bootstrap import build_relay
    from forecourt.infra.bus import make_bus
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)

    async def run() -> None:
        db = Database(settings.database_url, application_name="forecourt-relay")
        bus = make_bus(
            settings.bus_url,
            stream=settings.nats_stream,
            subject_prefix=settings.nats_subject_prefix,
        )
        await db.connect()
        await upgrade(db)
        await bus.connect()
        worker = build_relay(db, bus, settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker.start()
        try:
            await stop.wait()
        finally:
            await worker.stop()
            await bus.close()
            await db.dispose()

    import uvloop

    uvloop.run(run())


@main.command()
@click.option("--database-url", default=None)
def migrate(database_url: str | None) -> None:
    """Bring the HQ database schema up to date (every context's tree)."""
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade

    settings = _hq_settings(database_url)

    async def run() -> None:
        db = Database(settings.database_url)
        await db.connect()
        try:
            await upgrade(db)
        finally:
            await db.dispose()

    asyncio.run(run())
    console.print("schema up to date")


@main.command("import")
@click.argument(
    "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False
)
@click.option("--database-url", default=None)
@click.option("--sample", is_flag=True, help="Import the sample chain shipped with Forecourt.")
def import_(path: Path | None, database_url: str | None, sample: bool) -> None:
    """Import chain master data (regions, stations, equipment, grades, prices) from YAML."""
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file

    if path is None and not sample:
        raise click.UsageError("give a YAML file or --sample")
    chain = load_chain_file(SAMPLE_CHAIN if sample else path)  # type: ignore[arg-type]
    settings = _hq_settings(database_url)

    async def run() -> Any:
        db = Database(settings.database_url)
        await db.connect()
        try:
            await upgrade(db)
            return await import_chain(db, chain)
        finally:
            await db.dispose()

    result = asyncio.run(run())
    console.print(
        f"imported revision {result.revision}: {result.stations} stations, "
        f"{result.prices_added} new prices"
    )


@main.command()
@click.argument("station")
@click.option("--database-url", default=None)
def credential(station: str, database_url: str | None) -> None:
    """Issue a new upload credential for STATION (printed once; HQ keeps only its hash)."""
    from forecourt.infra.db import Database
    from forecourt.network.handlers import issue_credential

    settings = _hq_settings(database_url)

    async def run() -> tuple[str, str]:
        db = Database(settings.database_url)
        await db.connect()
        try:
            return await issue_credential(db, station)
        finally:
            await db.dispose()

    key_id, token = asyncio.run(run())
    click.echo(json.dumps({"station": station, "key_id": key_id, "credential": token}))


# --- edge node ------------------------------------------------------------------------------


@main.command()
@click.option("--station", required=True, help="The station code this edge node runs.")
@click.option("--hq-url", default=None)
@click.option("--journal", "journal_path", type=click.Path(path_type=Path), default=None)
@click.option("--controller-url", default=None, help="The PTS-2 forecourt controller (jsonPTS).")
@click.option(
    "--port", type=int, default=None, help="Port of the edge's own HTTP API (0: the kernel picks)."
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the port of the edge's API to this file (atomically) once it serves requests.",
)
def edge(
    station: str,
    hq_url: str | None,
    journal_path: Path | None,
    controller_url: str | None,
    port: int | None,
    port_file: Path | None,
) -> None:
    """Run one station's edge node (credential from FORECOURT_EDGE_CREDENTIAL)."""
    import uvicorn

    from forecourt.edge.node import build_edge_node, jsonpts_factory
    from forecourt.infra.listener import PortFileServer, listening_socket
    from forecourt.kernel.clock import SimulatedClock, SystemClock
    from forecourt.settings import EdgeSettings

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "station": station,
            "hq_url": hq_url,
            "journal_path": journal_path,
            "controller_url": controller_url,
            "port": port,
        }.items()
        if v is not None
    }
    settings = EdgeSettings(**overrides)
    configure_logging(settings.log_level, settings.log_json)
    clock = SimulatedClock.from_env(dict(os.environ)) or SystemClock()

    async def run() -> None:
        node = build_edge_node(settings, clock, jsonpts_factory(settings))
        server = PortFileServer(
            uvicorn.Config(
                node.app,
                host=settings.host,
                port=settings.port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            ),
            port_file,
        )
        sock = listening_socket(settings.host, settings.port)
        server_task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await node.start()
            await server_task
        finally:
            server.should_exit = True
            await node.stop()

    asyncio.run(run())


if __name__ == "__main__":
    main()
