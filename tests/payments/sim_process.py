"""What the payment tests share about simulators and servers: a simulator
(``python -m forecourt.sim.<module>``) run as a child process on a port it picks itself, and an
HTTP app served in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn
from starlette.types import ASGIApp

from forecourt.chaos.processes import ChildProcess, read_port, simulator_command


class SimProcess:
    """``python -m forecourt.sim.<module>`` as a child process (always ``stop()`` it): its config
    written to ``<workdir>/<name>_config.json``, its port read from ``<workdir>/<name>_port``,
    its output in ``<workdir>/<name>.log``; ready once ``GET /sim/health`` answers 200."""

    def __init__(self, module: str, name: str, config: Mapping[str, Any], workdir: Path) -> None:
        self.module = module
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"{name}_config.json"
        self.config_path.write_text(json.dumps(dict(config)), encoding="utf-8")
        self.port_file = self.workdir / f"{name}_port"
        self.log_path = self.workdir / f"{name}.log"
        self._child = ChildProcess(name, self.log_path)
        self.base_url = ""

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._child.process

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the simulator and wait (at most ``timeout_s``) until it serves; its base URL."""
        self.port_file.unlink(missing_ok=True)
        # In the test run's process group: an interrupted test run takes it along.
        self._child.spawn(
            simulator_command(self.module, self.config_path, self.port_file),
            env=os.environ,
            new_session=False,
            truncate=True,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self._child.poll() is not None:
                    raise RuntimeError(f"simulator exited early:\n{self.log_tail()}")
                port = read_port(self.port_file)
                if port is not None:
                    self.base_url = f"http://127.0.0.1:{port}"
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{self.base_url}/sim/health", timeout=1).status_code == 200:
                            return self.base_url
                time.sleep(0.02)
            raise TimeoutError(f"simulator not ready in {timeout_s} s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the simulator (killed if it has not exited in 5 s); again is harmless."""
        self._child.stop_now(timeout_s=5)

    def get(self, path: str) -> Any:
        """``GET`` a simulator endpoint; its JSON."""
        return httpx.get(f"{self.base_url}{path}", timeout=5).json()

    def control(self, **payload: Any) -> dict[str, Any]:
        """``POST /sim/control`` with ``payload``; the simulator's health after it."""
        response = httpx.post(f"{self.base_url}/sim/control", json=payload, timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def faults(self, **faults: Any) -> dict[str, Any]:
        """Merge ``faults`` into the simulator's (``None``: back to its default)."""
        return self.control(faults=faults)

    def current_faults(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/sim/health")["faults"]
        return result

    def trades(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/sim/trades")
        return result

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave the test runner's signals alone
        yield


class LoopServer:
    """An ASGI app served by uvicorn in the running event loop on a free 127.0.0.1 port."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 10.0) -> str:
        """Serve and wait until uvicorn has started; the base URL."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        server = _InLoopServer(
            uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        )
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        await wait_until(lambda: server.started, timeout_s, "the server did not start")
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        assert self._task is not None
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 10)


async def wait_until(
    predicate: Callable[[], object],
    timeout_s: float = 5.0,
    message: str | Callable[[], str] = "condition not met in time",
) -> None:
    """Poll ``predicate`` until true, failing with ``message`` after ``timeout_s`` (no fixed
    sleeps)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(message if isinstance(message, str) else message())
        await asyncio.sleep(0.02)
