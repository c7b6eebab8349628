"""``forecourt chaos delivery``: HQ, the relay and a consumer host as real processes, on
PostgreSQL + NATS and on SQLite + the in-process bus, with the consumer host's database cut,
the consumer host killed on a last allowed delivery and after an effect, the relay killed
between publish and delete, repeated conflicts and an outbox row too large for the bus.
Every expected event ends processed or dead-lettered, none twice, none pending; every
injected crash was seen where it was meant to happen; the run leaves no process, database or
stream behind, also when interrupted.

The events the run expects are derived from HQ's tables; a test here checks that derivation
against the events ingest really emitted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
import sqlalchemy as sa

from forecourt.bootstrap import build_head_office
from forecourt.chaos.delivery import EXPECTED_CRASHES, expected_events
from forecourt.infra.db import outbox_table
from forecourt.infra.probe import FAIL_MARKER
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.sales.api import parse_batch
from forecourt.sales.handlers import ingest_batch
from forecourt.settings import Settings
from tests.sales.conftest import make_sale, make_sale_v2

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

RUN_S = 150.0  # a quick run takes well under a minute on two cores; this is the hard stop


def chaos_command() -> list[str]:
    """``forecourt chaos`` as the operator types it, once the main CLI carries it."""
    from forecourt.cli import main

    if "chaos" in main.commands:
        return [sys.executable, "-m", "forecourt.cli", "chaos"]
    return [sys.executable, "-m", "forecourt.chaos.cli"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FORECOURT_")}


def processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is ``folder`` (every process of a run is)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(entry / "cwd")).resolve() == folder.resolve():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def run_chaos(args: list[str], workdir: Path) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [*chaos_command(), "delivery", "--quick", "--json", "--workdir", str(workdir), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_S,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output (status {done.returncode}):\n{done.stderr}\n{logs(workdir)}"
    return done.returncode, json.loads(lines[-1]), done.stderr


def logs(workdir: Path, lines: int = 15) -> str:
    out = []
    for log in sorted(workdir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(out)


def assert_guarantees_held(code: int, result: dict[str, Any], stderr: str, workdir: Path) -> None:
    context = f"{json.dumps(result, indent=1)}\n{stderr}\n{logs(workdir)}"
    assert code == 0, context
    assert result["lost"] == 0, context
    assert result["processed_twice"] == 0, context
    assert result["pending"] == 0, context
    assert result["unexpected"] == 0, context
    # 1500 sales and the conflicts of one of them, each event accounted for exactly once.
    assert result["sales"] == result["sales_uploaded"] == 1500, context
    assert result["conflicts"] == 3, context
    assert result["events"] == result["sales"] + result["conflicts"], context
    assert result["processed"] + result["dead_lettered"] == result["events"], context
    # Every event of a poison sale is dead-lettered; no ordinary one is (the outage does
    # not use up their budget).
    assert result["marked_to_fail"] >= 3, context
    assert result["dead_lettered"] >= result["marked_to_fail"], context
    assert result["dead_lettered_marked"] == result["marked_to_fail"], context
    assert result["dead_lettered_ordinary"] == 0, context
    assert set(EXPECTED_CRASHES) <= set(result["crashes"]), context
    assert result["restarts"]["relay"] >= 1, context
    assert result["restarts"]["worker"] >= 2, context
    assert result["parked"] == 1, context
    assert result["outage_s"] >= 3.5, context
    assert result["drained"] is True, context
    assert result["seconds"] < 90, context
    assert processes_in(workdir) == [], "the run left processes behind"


async def databases(pg_url: str, like: str) -> set[str]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", like)
        return {r["datname"] for r in rows}
    finally:
        await conn.close()


async def streams(nats_url: str) -> set[str]:
    nc = await nats.connect(nats_url)
    try:
        return {s.config.name for s in await nc.jetstream().streams_info() if s.config.name}
    finally:
        await nc.close()


# --- the whole run ------------------------------------------------------------------------


async def test_on_postgresql_and_nats_no_event_is_lost_doubled_or_left_pending(
    tmp_path: Path, pg_url: str, nats_url: str
) -> None:
    code, result, stderr = await asyncio.to_thread(
        run_chaos, ["--postgres-url", pg_url, "--nats-url", nats_url], tmp_path
    )
    assert result["backend"] == "postgresql+nats"
    assert_guarantees_held(code, result, stderr, tmp_path)
    # The relay came back after the stream's duplicate window: some events really were
    # stored twice on the bus, and the consumers' inbox absorbed them.
    assert result["republished"] >= 1
    run_id = result["run_id"]
    assert f"forecourt_chaos_{run_id}" not in await databases(pg_url, "forecourt_chaos_%")
    assert f"CHAOS_{run_id.upper()}" not in await streams(nats_url)


def test_on_sqlite_and_the_in_process_bus_no_event_is_lost_doubled_or_left_pending(
    tmp_path: Path,
) -> None:
    code, result, stderr = run_chaos(["--embedded"], tmp_path)
    assert result["backend"] == "sqlite+memory"
    assert_guarantees_held(code, result, stderr, tmp_path)
    assert result["republished"] is None  # the relay's publish and delete are one transaction
    # A work folder that was given keeps the logs and the database file.
    assert (tmp_path / f"chaos-{result['run_id']}.db").exists()
    assert {"hq.log", "relay.log", "worker.log"} <= {p.name for p in tmp_path.iterdir()}


async def test_an_interrupted_run_stops_its_processes_and_drops_its_database_and_stream(
    tmp_path: Path, pg_url: str, nats_url: str
) -> None:
    before_dbs = await databases(pg_url, "forecourt_chaos_%")
    before_streams = {s for s in await streams(nats_url) if s.startswith("CHAOS_")}
    command = [
        *chaos_command(),
        "delivery",
        "--quick",
        "--workdir",
        str(tmp_path),
        "--postgres-url",
        pg_url,
        "--nats-url",
        nats_url,
    ]
    err = tmp_path / "chaos.stderr"
    with err.open("wb") as out:
        proc = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while "ingest:" not in err.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            await asyncio.sleep(0.1)
        assert processes_in(tmp_path), "the run's processes are not running"
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.read_text()
    assert code == 130, text
    assert "Traceback" not in text, text
    assert "chaos run interrupted (SIGINT)" in text, text
    assert processes_in(tmp_path) == [], "the run left processes behind"
    assert await databases(pg_url, "forecourt_chaos_%") <= before_dbs
    assert {s for s in await streams(nats_url) if s.startswith("CHAOS_")} <= before_streams


def test_a_run_that_cannot_reach_its_services_fails_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *chaos_command(),
            "delivery",
            "--quick",
            "--workdir",
            str(tmp_path),
            "--postgres-url",
            "postgresql://postgres@127.0.0.1:1/postgres",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    assert "PostgreSQL" in errors[0]
    assert processes_in(tmp_path) == []


# --- what the run expects: derived from HQ's tables as ingest derives it ------------------


async def test_the_expected_events_are_exactly_the_events_ingest_emitted(tmp_path: Path) -> None:
    office = build_head_office(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}", log_json=False)
    )
    await office.start(relay=False)
    try:
        await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
        async with office.db.connection() as conn:
            before = set((await conn.execute(sa.select(outbox_table.c.event_id))).scalars())
        plain = make_sale()
        poison = make_sale(shift_id=FAIL_MARKER)
        mismatch = make_sale(amount_minor=1)  # an amount_mismatch event too
        quarantined = make_sale(nozzle=9)  # unknown nozzle
        collision = make_sale(  # the meter's identity of ``plain``: natural_key_collision
            device_txn=plain["device_txn"],
            totalizer_end_ml=plain["totalizer_end_ml"],
        )
        v2 = make_sale_v2(device_flags=["amount_recomputed"], device_raw={"amount": "302.00"})
        other = dict(plain, volume_ml=plain["volume_ml"] + 10)
        another = dict(plain, volume_ml=plain["volume_ml"] + 20)
        poison_other = dict(poison, volume_ml=poison["volume_ml"] + 10)
        uploads = (
            (1, [plain, poison, mismatch, quarantined, collision]),
            (2, [v2]),
            (1, [other, another, plain]),  # two conflicts in one batch, and a duplicate
            (1, [other, poison_other]),  # a known conflict again, and a new one
        )
        for version, sales in uploads:
            body = json.dumps({"schema_version": version, "sales": sales}).encode()
            await ingest_batch(office.db, office.directory, "S001", parse_batch(body))
        async with office.db.connection() as conn:
            rows = (
                await conn.execute(sa.select(outbox_table.c.event_id, outbox_table.c.type))
            ).all()
        emitted = {r.event_id for r in rows if r.event_id not in before}
        kinds = [r.type for r in rows if r.event_id not in before]
        expected = await expected_events(office.db)
    finally:
        await office.stop()
    assert expected.ids == emitted
    assert expected.sales == 6
    assert expected.conflicts == 3  # other, another, poison_other
    for kind in ("amount_mismatch", "natural_key_collision", "quarantined", "conflict"):
        assert any(k.endswith(f"sale.{kind}.v1") for k in kinds), kind
    # The poison sale's completed event and its conflict's are the ones meant to fail.
    assert len(expected.failing) == 2
    assert expected.failing <= expected.ids
