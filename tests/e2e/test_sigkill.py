"""Crash test: HQ and two edge nodes as real processes on PostgreSQL + NATS JetStream.

Each process is SIGKILLed at a named crash point (the process kills itself there and leaves a
marker, so the test knows it died exactly there): edge B after HQ answered an upload but
before B recorded the answers (``edge.mid_upload``); HQ in the middle of ingesting a batch
(``hq.mid_batch``); edge A right after a journal commit, before closing the transaction at
the device (``edge.after_journal_commit``). Both edges restart while HQ is still down and
keep selling, then HQ restarts. After the drain, the dispensers' transaction memory, the edge
journals, HQ and the bus agree exactly: nothing lost, nothing doubled.

Every process starts with ``--port 0 --port-file``: it binds a port itself and names it in its
port file once it serves requests; a restart asks for the port number it had (a server keeps
its address).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from forecourt.demo import DemoOptions, simulator_config
from forecourt.identity.handlers import IdentityConfig, IdentityService
from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade
from forecourt.kernel.clock import SimulatedClock
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    build_snapshot,
    import_chain,
    issue_credential,
    load_chain_file,
)
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.settings import Settings
from forecourt.sim.pts_controller import SimulatorProcess
from tests.support import eventually, staff_headers

pytestmark = pytest.mark.e2e

SPEED = 120.0
BUDGET_S = 900  # wall seconds the simulated clock runs before it reaches real time
PASSWORD = "demo-controller"
READER = "a-reader-token-of-the-test-0123456789"  # the edges' read-only credential


class Proc:
    """A Forecourt process we start, watch and kill; its output goes to a log file.

    The first start asks for ``--port 0`` and learns the port from the port file; every
    restart asks for that same port again.
    """

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = workdir / f"{name}.log"
        self.port_file = workdir / f"{name}.port"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port, f"{self.name} has not announced its port yet"
        return f"http://127.0.0.1:{self.port}"

    def start(self, **extra_env: str) -> Proc:
        self.port_file.unlink(missing_ok=True)  # a SIGKILLed life leaves its file behind
        port_args = ["--port", str(self.port), "--port-file", str(self.port_file)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "forecourt.cli", *self.args, *port_args],
                env={**os.environ, **self.env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def listening(self, timeout: float = 30.0) -> str:
        """Wait (with a deadline) until the process names its port; its base URL."""

        def announced() -> int:
            if self.port_file.exists():
                return int(self.port_file.read_text())
            assert self.alive(), f"{self.name} exited before listening:\n{self.tail()}"
            return 0

        port = await eventually(announced, timeout, interval=0.05, what=f"{self.name} to listen")
        assert self.port in (0, port), f"{self.name} came back on {port}, not {self.port}"
        self.port = port
        return self.url

    def wait_dead(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not die in {timeout}s:\n{self.tail()}") from None

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for p in started:
        p.stop()


async def test_sigkilled_edges_and_hq_lose_nothing_and_double_nothing(
    tmp_path: Path, pg_url: str, nats_url: str, unique_stream: str, procs: list[Any]
) -> None:
    clock = SimulatedClock.ending_before_now(BUDGET_S, SPEED)
    db = Database(pg_url, clock=clock)
    await db.connect()
    await upgrade(db)
    await import_chain(db, load_chain_file(SAMPLE_CHAIN))
    tokens = {code: (await issue_credential(db, code))[1] for code in ("S001", "S002")}
    snapshots = {code: await build_snapshot(db, code, clock.now()) for code in tokens}
    # An HQ admin's token, issued on HQ's (simulated) clock and valid for the clock's budget
    identity = dataclasses.replace(
        IdentityConfig.from_settings(Settings(database_url=pg_url)),
        access_ttl=timedelta(seconds=BUDGET_S * SPEED),
    )
    staff = await staff_headers(IdentityService(db, identity))
    await db.dispose()

    grade_ids = {"92": 1, "95": 2, "98": 3, "0": 4}
    sims: dict[str, SimulatorProcess] = {}
    for i, code in enumerate(tokens):
        config = simulator_config(
            snapshots[code], clock.now(), grade_ids, DemoOptions(arrivals_per_hour=300), seed=i + 1
        )
        sims[code] = SimulatorProcess(config, tmp_path / f"pts-{code}", env=clock.to_env())
        procs.append(sims[code])
        await asyncio.to_thread(sims[code].start)

    common = {**clock.to_env(), "FORECOURT_LOG_JSON": "true", "FORECOURT_LOG_LEVEL": "INFO"}
    hq_env = {
        **common,
        "FORECOURT_DATABASE_URL": pg_url,
        "FORECOURT_BUS_URL": nats_url,
        "FORECOURT_NATS_STREAM": unique_stream,
        "FORECOURT_NATS_SUBJECT_PREFIX": unique_stream.lower(),
    }
    marker = tmp_path / "crashes.txt"
    hq = Proc("hq", ["serve"], {**hq_env, "FORECOURT_CRASH_MARKER": str(marker)}, tmp_path)
    procs.append(hq)

    def edge(code: str) -> Proc:
        env = {
            **common,
            "FORECOURT_EDGE_CREDENTIAL": tokens[code],
            "FORECOURT_EDGE_CONTROLLER_PASSWORD": PASSWORD,
            "FORECOURT_EDGE_POLL_INTERVAL_S": "0.05",
            "FORECOURT_EDGE_SYNC_BACKOFF_MAX_S": "1.0",
            "FORECOURT_CRASH_MARKER": str(marker),
            "FORECOURT_EDGE_READER_TOKENS": f"test={READER}",
        }
        args = [
            "edge",
            "--station",
            code,
            "--hq-url",
            hq.url,
            "--controller-url",
            sims[code].base_url,
            "--journal",
            str(tmp_path / f"{code}.db"),
        ]
        return Proc(f"edge-{code}", args, env, tmp_path)

    async def hq_ready() -> bool:
        try:
            async with httpx.AsyncClient() as c:
                return (await c.get(f"{hq.url}/ready", timeout=1)).status_code == 200
        except httpx.HTTPError:
            return False

    async def sold_in_this_life(edge: Proc) -> bool:
        async with httpx.AsyncClient() as c:
            reader = {"authorization": f"Bearer {READER}"}
            status = (await c.get(f"{edge.url}/v1/status", headers=reader, timeout=5)).json()
        return bool(status["controller"]["journaled"] >= 1)

    # 1. HQ will die in the middle of its 3rd batch; edge B after its 2nd answered upload.
    hq.start(FORECOURT_CRASH_AT="hq.mid_batch:3")
    hq_url = await hq.listening()
    assert await hq_ready()  # the port file appears once HQ serves requests
    a, b = edge("S001"), edge("S002")
    procs.extend([a, b])
    b.start(FORECOURT_CRASH_AT="edge.mid_upload:2")
    await b.listening()
    assert b.wait_dead(60) == -signal.SIGKILL, b.tail()
    assert "edge.mid_upload" in marker.read_text()
    assert hq.alive()

    # 2. Edge A uploads its first sale (HQ's 3rd batch kills HQ mid-batch); A itself dies right
    #    after its 5th journal commit, before closing that transaction at the device.
    a.start(FORECOURT_CRASH_AT="edge.after_journal_commit:5")
    await a.listening()
    assert hq.wait_dead(60) == -signal.SIGKILL, hq.tail()
    assert a.wait_dead(60) == -signal.SIGKILL, a.tail()
    crashes = marker.read_text()
    assert "hq.mid_batch" in crashes
    assert "edge.after_journal_commit" in crashes

    # 3. Both edges restart (on their ports) while HQ is still down, and keep selling.
    for restarted in (a, b):
        restarted.start()
        await restarted.listening()
    for restarted in (a, b):
        await eventually(
            lambda e=restarted: sold_in_this_life(e),
            30,
            interval=0.2,
            what=f"{restarted.name} to sell again without HQ",
        )
    assert a.alive()
    assert b.alive()
    assert not await hq_ready()

    # 4. HQ comes back on its port; customers stop; everything drains.
    hq.start()
    assert await hq.listening() == hq_url
    await eventually(hq_ready, 30, interval=0.2, what="HQ ready again")
    async with httpx.AsyncClient() as c:
        for sim in sims.values():
            await c.post(f"{sim.base_url}/sim/control", json={"arrivals": False})

        async def forecourts_quiet() -> bool:
            # Nobody left on a forecourt (not even walking up to an idle pump) and every
            # pump idle: with arrivals off that stays so.
            for sim in sims.values():
                health = (await c.get(f"{sim.base_url}/sim/health")).json()
                if health["customers"] or any(p != "idle" for p in health["pumps"].values()):
                    return False
            return True

        await eventually(forecourts_quiet, 60, interval=0.2, what="forecourts quiet")

    # 5. Compare the dispensers, the journals, HQ and the bus.
    async def drained() -> bool:
        dispensed = 0
        for code in tokens:
            dispensed += len(await _device_txns(sims[code], snapshots[code], clock))
        held = await _hq_sales(hq_url, list(tokens), staff)
        return sum(len(v) for v in held.values()) == dispensed

    await eventually(drained, 60, interval=0.2, what="HQ to hold every dispensed sale")
    at_hq = await _hq_sales(hq_url, list(tokens), staff)
    a.stop()
    b.stop()
    for code in tokens:
        device = await _device_txns(sims[code], snapshots[code], clock)
        journal = _journal_rows(tmp_path / f"{code}.db")
        journaled = [key for key, _ in journal]
        hq_rows = at_hq[code]  # _hq_sales fails on a sale HQ lists twice
        assert len(device) > 5
        assert set(device) == set(journaled) == set(hq_rows), code  # nothing lost
        assert len(journaled) == len(set(journaled)), code  # nothing doubled at the edge
        assert await _hq_count(hq_url, code, staff) == len(device), code  # nothing doubled at HQ
        assert sorted(seq for _, seq in journal) == list(range(1, len(journal) + 1))  # gap-free
        for key, (volume, amount) in device.items():
            assert hq_rows[key] == (volume, amount), (code, key)

    async with httpx.AsyncClient(headers=staff) as c:
        summary = (await c.get(f"{hq_url}/v1/sales/summary")).json()
    assert summary["natural_key_duplicates"] == 0
    # The crashes did what they were meant to: A's second life re-read the transaction it had
    # journaled but not closed, and B re-sent sales HQ had already stored (answered duplicate).
    assert "edge.recovered_transactions" in a.log.read_text()
    assert _answers(tmp_path / "S002.db").get("duplicate", 0) >= 1
    total = sum(len(v) for v in at_hq.values())
    await eventually(
        lambda: _stream_count(nats_url, unique_stream, unique_stream.lower(), total),
        30,
        interval=0.2,
        what="every sale.completed event on the bus exactly once",
    )


async def _hq_count(hq_url: str, station: str, headers: dict[str, str]) -> int:
    """Sales HQ holds for ``station``, by its own count (not the listing)."""
    async with httpx.AsyncClient(base_url=hq_url, timeout=10, headers=headers) as c:
        summary = (await c.get("/v1/sales/summary", params={"station": station})).json()
    return sum(int(g["sales"]) for g in summary["groups"])


async def _hq_sales(
    hq_url: str, stations: list[str], headers: dict[str, str]
) -> dict[str, dict[tuple[int, int], tuple[int, int]]]:
    out: dict[str, dict[tuple[int, int], tuple[int, int]]] = {}
    async with httpx.AsyncClient(base_url=hq_url, timeout=10, headers=headers) as c:
        for code in stations:
            rows: list[dict[str, Any]] = []
            after = None
            while True:
                params: dict[str, Any] = {"station": code, "limit": 5000}
                if after:
                    params["after"] = after
                page = (await c.get("/v1/sales", params=params)).json()
                rows += page["items"]
                after = page["next_after"]
                if not after:
                    break
            keyed: dict[tuple[int, int], tuple[int, int]] = {}
            for r in rows:
                key = (r["fuelling_point"], r["device_txn"])
                assert key not in keyed, f"HQ holds {key} twice"
                keyed[key] = (r["volume_ml"], r["amount_minor"])
            out[code] = keyed
    return out


async def _device_txns(
    sim: SimulatorProcess, snapshot: Any, clock: SimulatedClock
) -> dict[tuple[int, int], tuple[int, int]]:
    driver = JsonPtsDriver(sim.base_url, "admin", PASSWORD, timezone=snapshot.station.timezone)
    await driver.open()
    try:
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for fp in snapshot.fuelling_points:
            for t in await driver.transactions(
                fp.number, clock.sim_epoch - timedelta(hours=1), clock.now() + timedelta(hours=1)
            ):
                out[(t.pump, t.transaction)] = (t.volume_ml, t.amount_minor)
        return out
    finally:
        await driver.close()


def _answers(path: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT hq_status, count(*) FROM journal GROUP BY hq_status"))


def _journal_rows(path: Path) -> list[tuple[tuple[int, int], int]]:
    """((fuelling point, device transaction), seq) of every journal row, doubles included."""
    import sqlite3

    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT fuelling_point, device_txn, seq FROM journal").fetchall()
    return [((fp, txn), seq) for fp, txn, seq in rows]


async def _stream_count(url: str, stream: str, prefix: str, expected: int) -> bool:
    subject = f"{prefix}.forecourt.sales.sale.completed.v1"
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream, subjects_filter=subject)
        count = (info.state.subjects or {}).get(subject, 0)
        assert count <= expected, f"{count} sale.completed events for {expected} sales"
        return count == expected
    finally:
        await nc.close()
