"""Harness for edge tests: an HQ served over real HTTP that can go down and come back, and a
simulated PTS-2 controller process per station."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.demo import DemoOptions, serve_until_started, simulator_config
from forecourt.edge.node import EdgeNode, build_edge_node
from forecourt.infra.listener import listening_socket
from forecourt.kernel.clock import SimulatedClock
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    build_snapshot,
    import_chain,
    issue_credential,
    load_chain_file,
)
from forecourt.settings import EdgeSettings, Settings
from forecourt.sim.pts_controller import SimulatorProcess
from tests.support import staff_headers

SPEED = 120.0
# The read-only credential every edge node of these tests accepts (EdgeSettings.reader_tokens):
# its status, pumps, tanks, journal figures and /metrics need one.
READER_TOKEN = "edge-tests-reader-secret"
READER_HEADERS = {"authorization": f"Bearer {READER_TOKEN}"}


class HqServer:
    """HQ over HTTP on a port of its own; ``down()`` stops answering, ``up()`` answers again
    on the same port (a server keeps its address across a restart)."""

    def __init__(self, office: HeadOffice) -> None:
        self.office = office
        # Bound and listening from here on: the port is never free for another to take.
        self._socket: socket.socket | None = listening_socket("127.0.0.1", 0)
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def staff_headers(self) -> dict[str, str]:
        """A new HQ admin's Authorization header, for a test's own reads of HQ. Signed in at
        each call: the clock runs SPEED times faster than real time, so an access token
        (300 s) is over within seconds."""
        return await staff_headers(self.office.identity)

    async def up(self) -> None:
        # The socket bound at construction for the first start, a new one on the same port
        # after down() (uvicorn closes the sockets it served on).
        sock = self._socket or listening_socket("127.0.0.1", self.port)
        self._socket = None
        config = uvicorn.Config(
            self.office.app,
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._task = await serve_until_started(self._server, sock)

    async def down(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = None


class Station:
    def __init__(
        self, clock: SimulatedClock, hq: HqServer, token: str, sim: SimulatorProcess, journal: Path
    ) -> None:
        self.clock = clock
        self.hq = hq
        self.token = token
        self.sim = sim
        self.journal = journal

    def node(self, **overrides: object) -> EdgeNode:
        overrides.setdefault("reader_tokens", {"tests": READER_TOKEN})
        settings = EdgeSettings(
            station="S001",
            hq_url=self.hq.url,
            credential=self.token,
            journal_path=self.journal,
            controller_url=self.sim.base_url,
            controller_user="admin",
            controller_password="demo-controller",
            poll_interval_s=0.05,
            log_json=False,
            sync_backoff_initial_s=0.05,
            sync_backoff_max_s=0.5,
            snapshot_refresh_s=0.5,
            **overrides,
        )
        return build_edge_node(settings, self.clock)


@pytest.fixture
def clock() -> SimulatedClock:
    return SimulatedClock.ending_before_now(600, SPEED)


@pytest.fixture
async def hq(tmp_path: Path, clock: SimulatedClock) -> AsyncIterator[HqServer]:
    office = build_head_office(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}", log_json=False),
        clock=clock,
    )
    await office.start()
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    server = HqServer(office)
    await server.up()
    yield server
    await server.down()
    await office.stop()


@pytest.fixture
async def station(tmp_path: Path, clock: SimulatedClock, hq: HqServer) -> AsyncIterator[Station]:
    _, token = await issue_credential(hq.office.db, "S001")
    snapshot = await build_snapshot(hq.office.db, "S001", clock.now())
    grade_ids = {"92": 1, "95": 2, "98": 3, "0": 4}
    config = simulator_config(
        snapshot, clock.now(), grade_ids, DemoOptions(arrivals_per_hour=400), seed=3
    )
    sim = SimulatorProcess(config, tmp_path / "pts", env=clock.to_env())
    await asyncio.to_thread(sim.start)
    try:
        yield Station(clock, hq, token, sim, tmp_path / "edge.db")
    finally:
        sim.stop()
