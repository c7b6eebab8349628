"""The edge and the simulated PTS-2 controller as processes: a "listening on" line, an
orderly stop with status 0 on SIGINT and SIGTERM, and one log format — JSON lines with a
timestamp, level and event — with no per-request line from the HTTP client."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from forecourt.demo import DemoOptions, simulator_config
from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade
from forecourt.kernel.clock import SystemClock
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    build_snapshot,
    import_chain,
    issue_credential,
    load_chain_file,
)
from forecourt.sim.pts_controller import SimulatorProcess
from tests.cli.support import CLI, SIMULATOR, Running, clean_env, json_lines
from tests.sim.support import config_dict

CREDENTIAL = "a-real-station-credential-0123456789"
READER = "a-reader-token-of-the-test-0123456789"  # the edge's read-only credential
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])


def assert_clean(proc: Running, code: int) -> None:
    text = proc.stderr()
    assert code == 0, text
    for word in ("Traceback", "Aborted!", "KeyboardInterrupt"):
        assert word not in text, text


@dataclass
class Station:
    hq: Running
    hq_url: str
    simulator: SimulatorProcess
    credential: str


@pytest.fixture
async def station(tmp_path: Path) -> AsyncIterator[Station]:
    """HQ (``forecourt serve`` on SQLite, the sample chain imported) and a simulated
    controller for S001 with customers arriving."""
    url = f"sqlite:///{tmp_path / 'hq.db'}"
    db = Database(url)
    await db.connect()
    try:
        await upgrade(db)
        await import_chain(db, load_chain_file(SAMPLE_CHAIN))
        _, token = await issue_credential(db, "S001")
        now = SystemClock().now()
        snapshot = await build_snapshot(db, "S001", now)
    finally:
        await db.dispose()
    config = simulator_config(
        snapshot, now, {"92": 1, "95": 2, "98": 3, "0": 4}, DemoOptions(), seed=1
    )
    hq = Running(
        [*CLI, "serve", "--port", "0"], tmp_path, clean_env(FORECOURT_DATABASE_URL=url), "hq"
    )
    simulator = SimulatorProcess(config, tmp_path / "pts")
    try:
        hq_url = hq.wait_listening()
        simulator.start()
        yield Station(hq, hq_url, simulator, token)
    finally:
        simulator.stop()
        hq.kill()


async def test_an_edge_polling_its_controller_logs_json_lines_only_and_no_request_lines(
    tmp_path: Path, station: Station
) -> None:
    env = clean_env(
        FORECOURT_EDGE_CREDENTIAL=station.credential,
        FORECOURT_EDGE_CONTROLLER_PASSWORD="demo-controller",
        FORECOURT_EDGE_READER_TOKENS=f"test={READER}",
    )
    args = ["edge", "--station", "S001", "--hq-url", station.hq_url, "--port", "0"]
    args += ["--controller-url", station.simulator.base_url, "--journal", str(tmp_path / "e.db")]
    edge = Running([*CLI, *args], tmp_path, env, "edge")
    try:
        url = edge.wait_listening()
        deadline = time.monotonic() + 20
        polled = False
        while not polled and time.monotonic() < deadline:
            status = httpx.get(
                f"{url}/v1/status", headers={"authorization": f"Bearer {READER}"}, timeout=5
            ).json()
            polled = bool(status.get("device", {}).get("reachable"))
            time.sleep(0.1)
        assert polled, json.dumps(status)
        time.sleep(1.5)  # some 15 polls of the controller, and the uploads to HQ
    finally:
        code = edge.stop(signal.SIGINT)
    assert_clean(edge, code)
    records = json_lines(edge.stderr())
    assert any(r["event"].startswith("listening on http://") for r in records)
    json_lines(station.hq.stderr())  # HQ answered the edge: one format there too


@SIGNALS
def test_an_edge_waiting_for_its_first_snapshot_stops_with_status_zero(
    tmp_path: Path, sig: signal.Signals
) -> None:
    env = clean_env(FORECOURT_EDGE_CREDENTIAL=CREDENTIAL)
    args = ["edge", "--station", "S001", "--hq-url", "http://127.0.0.1:1", "--port", "0"]
    port_file = tmp_path / "edge.port"
    args += ["--journal", str(tmp_path / "e.db"), "--port-file", str(port_file)]
    edge = Running([*CLI, *args], tmp_path, env, "edge")
    try:
        edge.wait_listening()
        edge.wait_for(lambda t: "edge.waiting_for_first_snapshot" in t, 10, "snapshot wait")
    finally:
        code = edge.stop(sig)
    assert_clean(edge, code)
    assert not port_file.exists()
    json_lines(edge.stderr())


@SIGNALS
def test_the_simulator_logs_json_lines_and_stops_with_status_zero(
    tmp_path: Path, sig: signal.Signals
) -> None:
    config = tmp_path / "pts.json"
    config.write_text(json.dumps(config_dict()))
    command = [*SIMULATOR, "--config", str(config), "--port", "0"]
    simulator = Running(command, tmp_path, clean_env(), "pts")
    try:
        url = simulator.wait_listening()
        for _ in range(3):
            assert httpx.get(f"{url}/sim/health", timeout=5).status_code == 200
    finally:
        code = simulator.stop(sig)
    assert_clean(simulator, code)
    records = json_lines(simulator.stderr())
    assert any(r["event"] == f"PTS-2 simulator listening on {url}" for r in records)
