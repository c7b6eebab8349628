"""A DART line end to end with real processes: a pump power-cycled in the middle of a filling
and an edge SIGKILLed twice lose no sale and double none.

Processes: the DART simulator (``forecourt simulate dart``: two pumps, its JSON-lines control
port, a record file of every completed filling) and ``forecourt edge`` with its one device
line from ``FORECOURT_EDGE_DEVICES``; HQ runs in the test's process over real HTTP. Customers
are played through the control port. Pump 1 is power-cycled while it pumps (the simulator's
``reboot`` fault: not programmed again, its line state gone, the partial filling on its
display); the edge is SIGKILLed once while pump 2 pumps and once, in its next life, right
after journaling the filling it found (``edge.after_journal_commit``), before closing it. The
DART driver numbers fillings itself and keeps the numbers in a store beside the journal
(``<journal>.drivers/<line>/``), so a restarted edge must find the same number for the same
filling. At the end the record file, the edge journal and HQ hold the same fillings, each
once, and the edge shows the new epoch of the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from forecourt.bootstrap import build_head_office
from forecourt.edge.node import build_edge_node
from forecourt.kernel.clock import SystemClock
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    import_chain,
    issue_credential,
    load_chain_file,
)
from forecourt.settings import DeviceLine, EdgeSettings, Settings
from tests.cli.support import CLI, clean_env
from tests.edge.conftest import HqServer
from tests.support import staff_headers

STATION = "S001"
LINE = "dart1"
PUMPS = {1: 0x50, 2: 0x51}  # station fuelling point -> DART address
SPEED = 30.0  # simulated seconds per wall second: 40 L/min becomes 20 L/s
START_S = 60.0  # a process announces its port within this
FILLING = (2, 4, 6, 8)  # DART statuses with a filling running (authorised, filling, max, susp.)
READER = "a-reader-token-of-the-test-0123456789"  # the edge's read-only credential

# A filling as the dispenser measured it: (pump, nozzle, volume_ml, amount_minor, totalizer_ml).
Filling = tuple[int, int, int, int, int]


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """What ``check`` (plain or async) gives once it is truthy; fails after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = check()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


class Process:
    """A Forecourt process we start and kill; stdout and stderr go to its log file, and it
    names its port(s) in port files once it serves."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra_args: str, **extra_env: str) -> Process:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*CLI, *self.args, *extra_args],
                cwd=self.workdir,
                env={**self.env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def port(self, port_file: Path) -> int:
        def announced() -> int | None:
            text = port_file.read_text().strip() if port_file.exists() else ""
            if text:
                return int(text)
            assert self.alive(), f"{self.name} exited before listening:\n{self.tail()}"
            return None

        port: int = await until(announced, START_S, f"{self.name} to write {port_file.name}")
        return port

    async def died(self, timeout: float) -> int:
        assert self.process is not None
        process = self.process
        code: int = await until(process.poll, timeout, f"{self.name} to die")
        return code

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class DartControl:
    """The simulator's JSON-lines control port: one command, one answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def command(self, **command: Any) -> dict[str, Any]:
        self.writer.write(json.dumps(command).encode() + b"\n")
        await self.writer.drain()
        answer = json.loads(await asyncio.wait_for(self.reader.readline(), 5.0))
        assert answer["ok"], (command, answer)
        return dict(answer)

    async def pump(self, fp: int) -> dict[str, Any]:
        state = await self.command(cmd="state")
        address = f"0x{PUMPS[fp]:02X}"
        return next(p for p in state["pumps"] if p["address"] == address)

    async def sell(self, fp: int, nozzle: int, litres: float) -> None:
        """A customer lifts the nozzle, fills ``litres`` and hangs up."""
        await self.command(
            cmd="lift", pump=fp, nozzle=nozzle, target_ml=int(litres * 1000), hang=True
        )


@contextlib.asynccontextmanager
async def control_port(port: int) -> AsyncIterator[DartControl]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield DartControl(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def recorded(record: Path) -> list[Filling]:
    """Every completed filling in the simulator's record file."""
    if not record.exists():
        return []
    out = []
    for line in record.read_text().splitlines():
        d = json.loads(line)
        out.append(
            (d["pump"], d["nozzle"], d["volume_ml"], d["amount_minor"], d["totals"]["volume_ml"])
        )
    return out


def journaled(journal: Path) -> list[tuple[Filling, int, int]]:
    """Every journal row, doubles included: (filling, device transaction, device epoch)."""
    if not journal.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as conn:
        try:
            rows = conn.execute(
                "SELECT fuelling_point, nozzle, volume_ml, amount_minor, totalizer_end_ml,"
                " device_txn, device_epoch FROM journal"
            ).fetchall()
        except sqlite3.OperationalError:
            return []  # not migrated yet
    return [((fp, n, v, a, t), txn, epoch) for fp, n, v, a, t, txn, epoch in rows]


def settled(record: Path, journal: Path) -> bool:
    """The journal holds exactly the fillings the dispensers recorded, each once."""
    fillings = recorded(record)
    return bool(fillings) and Counter(fillings) == Counter(f for f, _, _ in journaled(journal))


def stored_numbers(store: Path) -> dict[tuple[int, int], int]:
    """(fuelling point, number) -> volume of every filling the DART driver's store holds, each
    closed at the pump; one file per pump, named after its address."""
    fp_of = {address: fp for fp, address in PUMPS.items()}
    found: dict[tuple[int, int], int] = {}
    files = sorted(store.glob("*.json"))
    assert len(files) == len(PUMPS), files
    for path in files:
        fp = fp_of[int(path.stem.rsplit("-", 1)[1], 16)]
        for filling in json.loads(path.read_text())["fillings"]:
            assert filling["closed"], (path.name, filling)
            found[(fp, int(filling["number"]))] = int(filling["volume_ml"])
    return found


async def hq_sales(hq_url: str, headers: dict[str, str]) -> list[Filling]:
    rows: list[dict[str, Any]] = []
    after = None
    async with httpx.AsyncClient(base_url=hq_url, timeout=10, headers=headers) as client:
        while True:
            params: dict[str, Any] = {"station": STATION, "limit": 5000}
            if after:
                params["after"] = after
            page = (await client.get("/v1/sales", params=params)).json()
            rows += page["items"]
            after = page["next_after"]
            if not after:
                break
    return [
        (r["fuelling_point"], r["nozzle"], r["volume_ml"], r["amount_minor"], r["totalizer_end_ml"])
        for r in rows
    ]


async def edge_status(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as client:
        answer = await client.get(f"{url}/v1/status", headers={"authorization": f"Bearer {READER}"})
        return dict(answer.json())


@pytest.mark.e2e
async def test_a_pump_rebooted_mid_filling_and_a_killed_edge_lose_and_double_no_sale(
    tmp_path: Path,
) -> None:
    # --- HQ (in this process, over HTTP) with the sample chain and a station credential
    office = build_head_office(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}", log_json=False),
        clock=SystemClock(),
    )
    await office.start()
    hq: HqServer | None = None
    started: list[Process] = []
    try:
        await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
        _, credential = await issue_credential(office.db, STATION)
        staff = await staff_headers(office.identity)
        hq = HqServer(office)
        await hq.up()

        # --- the DART line: two pumps of two nozzles, a control port, the record file
        record = tmp_path / "fillings.jsonl"
        line_port, control_port_file = tmp_path / "dart.port", tmp_path / "dart-control.port"
        dart = Process("dart", ["simulate", "dart"], clean_env(), tmp_path)
        started.append(dart)
        dart.start(
            *("--listen", "127.0.0.1:0", "--pumps", "2", "--nozzles", "2"),
            *("--control", "127.0.0.1:0", "--record", str(record), "--speed", str(SPEED)),
            *("--port-file", str(line_port), "--control-port-file", str(control_port_file)),
        )
        dart_port = await dart.port(line_port)
        control_at = await dart.port(control_port_file)

        # --- the edge: its one device line is that DART line
        journal = tmp_path / "edge.db"
        devices = [
            {
                "name": LINE,
                "protocol": "dart",
                "transport": f"tcp://127.0.0.1:{dart_port}",
                "pumps": {str(fp): address for fp, address in PUMPS.items()},
                "options": {"timeout_s": 0.2, "offline_retry_s": 0.5, "status_refresh_s": 0.5},
            }
        ]
        edge_env = clean_env(
            FORECOURT_EDGE_CREDENTIAL=credential,
            FORECOURT_EDGE_DEVICES=json.dumps(devices),
            FORECOURT_EDGE_POLL_INTERVAL_S="0.05",
            FORECOURT_EDGE_SYNC_BACKOFF_INITIAL_S="0.05",
            FORECOURT_EDGE_SYNC_BACKOFF_MAX_S="0.5",
            FORECOURT_EDGE_MIN_FREE_DISK_BYTES="0",
            FORECOURT_EDGE_LOG_JSON="true",
            FORECOURT_EDGE_READER_TOKENS=f"test={READER}",
        )
        edge_port = tmp_path / "edge.port"
        edge_args = ["edge", "--station", STATION, "--hq-url", hq.url, "--journal", str(journal)]
        edge = Process("edge", edge_args, edge_env, tmp_path)
        started.append(edge)

        async def edge_life() -> str:
            edge_port.unlink(missing_ok=True)  # a SIGKILLed life leaves its file behind
            edge.start("--port", "0", "--port-file", str(edge_port))
            url = f"http://127.0.0.1:{await edge.port(edge_port)}"
            status = await edge_status(url)
            lines = [(d["name"], d["protocol"]) for d in status["devices"]]
            assert lines == [(LINE, "dart")], (
                f"forecourt edge does not drive the device line of FORECOURT_EDGE_DEVICES: "
                f"its lines are {lines}"
            )
            return url

        async def line_reachable(url: str) -> dict[str, Any] | None:
            device = (await edge_status(url))["devices"][0]
            return dict(device) if device["reachable"] else None

        async with control_port(control_at) as control:
            # 1. The edge sells on both pumps
            url = await edge_life()
            before = await until(lambda: line_reachable(url), 30, "the DART line reachable")
            assert before["boot_marker"] == "50:0,51:0"
            await control.sell(1, 1, 8)
            await control.sell(2, 2, 11)
            await until(lambda: len(recorded(record)) == 2, 30, "two fillings")
            await until(lambda: settled(record, journal), 30, "two sales journaled")

            # 2. Pump 1 loses power in the middle of a filling; the customer hangs up after
            await control.command(cmd="lift", pump=1, nozzle=1)  # no target: it flows on

            async def pumping() -> bool:
                pump = await control.pump(1)
                filling = pump["filling"]
                return pump["status"] == 4 and filling is not None and filling["volume"] >= 300

            await until(pumping, 30, "pump 1 pumping 3 L")
            answer = await control.command(cmd="fault", name="reboot", value="1")
            rebooted = next(p for p in answer["pumps"] if p["address"] == "0x50")
            assert rebooted["status"] == 0  # not programmed: prices and state are gone
            partial_ml = int(rebooted["filling"]["volume"]) * 10  # on the display, 2 decimals
            await control.command(cmd="hang", pump=1)
            await until(lambda: len(recorded(record)) == 3, 30, "the partial filling recorded")
            assert recorded(record)[2][:3] == (1, 1, partial_ml)
            await until(lambda: settled(record, journal), 30, "the partial filling journaled")

            # Then the edge shows the line's new epoch, and an alarm says why
            async def new_epoch() -> dict[str, Any] | None:
                status = await edge_status(url)
                device = status["devices"][0]
                names = {a["name"] for a in status["alarms"]}
                if device["boot_marker"] == "50:1,51:0" and names & {
                    "controller_restarted",
                    "device_epoch_change",
                }:
                    return dict(device)
                return None

            after = await until(new_epoch, 30, "the new epoch of the line")
            assert after["epoch"] > before["epoch"]
            epoch = int(after["epoch"])

            # And the reprogrammed pump sells again, the other one never stopped
            await control.sell(1, 2, 6)
            await control.sell(2, 1, 9)
            await until(lambda: len(recorded(record)) == 5, 30, "two more fillings")
            await until(lambda: settled(record, journal), 30, "them journaled")

            # 3. The edge is SIGKILLed while pump 2 pumps; the filling ends while it is away
            await control.sell(2, 1, 25)

            async def pump_2_pumping() -> bool:
                pump = await control.pump(2)
                filling = pump["filling"]
                return pump["status"] == 4 and filling is not None and filling["volume"] >= 200

            await until(pump_2_pumping, 30, "pump 2 pumping")
            edge.kill()
            await until(lambda: len(recorded(record)) == 6, 30, "the filling to end unattended")

            # 4. Its next life journals that filling and dies before closing it at the pump
            marker = tmp_path / "crashes.txt"
            edge.start(
                *("--port", "0"),
                FORECOURT_CRASH_AT="edge.after_journal_commit",
                FORECOURT_CRASH_MARKER=str(marker),
            )
            assert await edge.died(60) == -signal.SIGKILL, edge.tail()
            assert "edge.after_journal_commit" in marker.read_text()
            assert settled(record, journal)  # journaled once, not yet closed

            # 5. The third life closes it without a second sale, and sells on
            url = await edge_life()
            await until(lambda: line_reachable(url), 30, "the DART line reachable again")
            await control.sell(2, 2, 7)
            await control.sell(1, 1, 5)
            await until(lambda: len(recorded(record)) == 8, 30, "the last fillings")

            async def quiet() -> bool:
                state = await control.command(cmd="state")
                return all(
                    p["status"] not in FILLING and p["nozzle_out"] is None for p in state["pumps"]
                )

            await until(quiet, 30, "both pumps at rest")
            await until(lambda: settled(record, journal), 30, "every filling journaled")

            async def drained() -> bool:
                status = await edge_status(url)
                return bool(status["outbox"]["pending"] == 0) and len(
                    await hq_sales(hq.url, staff)
                ) >= len(recorded(record))

            await until(drained, 30, "every sale at HQ")
            status = await edge_status(url)

        # Then the dispensers, the edge journal and HQ hold the same fillings, each once
        fillings = recorded(record)
        assert len(fillings) == 8
        rows = journaled(journal)
        assert Counter(f[0] for f, _, _ in rows) == Counter(f[0] for f in fillings) == {1: 4, 2: 4}
        assert Counter(f for f, _, _ in rows) == Counter(fillings)  # none lost, none doubled
        numbers = [(f[0], txn) for f, txn, _ in rows]
        assert len(numbers) == len(set(numbers)), numbers  # one DART number per filling
        assert sum(1 for f, _, _ in rows if f == fillings[2]) == 1  # the partial one, once
        by_filling = {f: e for f, _, e in rows}
        assert {by_filling[f] for f in fillings[:2]} == {before["epoch"]}
        assert {by_filling[f] for f in fillings[3:]} == {epoch}  # sold after the reboot
        # The numbers the driver gave are the ones its store beside the journal keeps
        assert stored_numbers(tmp_path / f"{journal.name}.drivers" / LINE) == {
            (f[0], txn): f[2] for f, txn, _ in rows
        }
        at_hq = await hq_sales(hq.url, staff)
        assert Counter(at_hq) == Counter(fillings)
        async with httpx.AsyncClient(base_url=hq.url, timeout=10, headers=staff) as client:
            summary = (await client.get("/v1/sales/summary", params={"station": STATION})).json()
        assert sum(int(g["sales"]) for g in summary["groups"]) == len(fillings)
        assert summary["natural_key_duplicates"] == 0
        # The third life re-read the filling the second had journaled, and kept the epoch
        assert "edge.recovered_transactions" in edge.log.read_text()
        device = status["devices"][0]
        assert (device["epoch"], device["boot_marker"]) == (epoch, "50:1,51:0")
    finally:
        for process in reversed(started):
            process.stop()
        if hq is not None:
            await hq.down()
        await office.stop()


def test_a_station_with_one_dart_line_drives_only_the_pumps_the_line_names(tmp_path: Path) -> None:
    """One device line that names its pumps is the forecourt of those pumps only: the other
    fuelling points of the station are not polled on it (they are on no line here)."""
    settings = EdgeSettings(
        station=STATION,
        credential=SecretStr("a-real-station-credential-0123456789"),
        journal_path=tmp_path / "edge.db",
        devices=[
            DeviceLine(name=LINE, protocol="dart", transport="tcp://127.0.0.1:1", pumps=dict(PUMPS))
        ],
        log_json=False,
    )
    node = build_edge_node(settings, SystemClock())
    (line,) = node.lines
    assert line.name == LINE
    assert line.controller.serves == frozenset(PUMPS)
