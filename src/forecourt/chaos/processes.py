"""The processes of a chaos run, and what the runs share about watching them.

- :class:`ChildProcess`: one child process with its output in a log file, started in a
  session of its own (a Ctrl-C at the terminal reaches the run, which stops its processes in
  order, not every process at once), stopped with SIGTERM and, after a deadline, SIGKILL;
  every one still running is in a registry that :func:`kill_everything` empties when an
  interrupted run's cleanup takes too long.
- :class:`Service`: a ``forecourt`` command of the run, whose successive lives may each be
  armed with a crash point (``FORECOURT_CRASH_AT``); :func:`read_marker` says which process
  died at which point.
- :class:`SimulatorProcess`: a payment provider simulator (``python -m
  forecourt.sim.<module>``, :func:`simulator_command`) on a port it picks and writes to a
  file (:func:`read_port`), ready once ``GET /sim/health`` answers 200.
- :func:`first_failure`: wait for one task while others (a supervisor) may fail first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from forecourt.kernel.errors import ForecourtError

__all__ = [
    "STOP_S",
    "ChaosError",
    "ChildProcess",
    "Service",
    "SimulatorProcess",
    "first_failure",
    "kill_everything",
    "read_marker",
    "read_port",
    "reason",
    "simulator_command",
]

STOP_S = 15.0  # a stopped process ends within this, or it is killed

_LIVE: set[subprocess.Popen[bytes]] = set()  # every process of a run still running


class ChaosError(ForecourtError):
    """The chaos run could not be carried out (not: it found a problem)."""

    code = "chaos.failed"


def kill_everything() -> None:
    """SIGKILL every process a run started and that still runs (a stop that hangs)."""
    for process in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(Exception):
            process.wait(timeout=5)
        _LIVE.discard(process)


def reason(exc: BaseException) -> str:
    """The first line of an error, for a one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def first_failure(main: asyncio.Task[Any], *others: asyncio.Task[Any]) -> None:
    """Wait for ``main``; if one of ``others`` fails first, cancel ``main`` and raise that
    error."""
    while not main.done():
        await asyncio.wait({main, *others}, return_when=asyncio.FIRST_COMPLETED)
        for task in others:
            if task.done() and not task.cancelled() and task.exception() is not None:
                main.cancel()
                raise task.exception()  # type: ignore[misc]
        others = tuple(t for t in others if not t.done())
    main.result()


def read_marker(path: Path) -> dict[int, str]:
    """The crash marker: pid → the crash point that process died at."""
    found: dict[int, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return found
    for line in text.splitlines():
        name, _, rest = line.partition(" pid=")
        if rest.strip().isdigit():
            found[int(rest)] = name.strip()
    return found


class ChildProcess:
    """One child process of a run, its output (stdout and stderr) appended to ``log``."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def spawn(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        header: str | None = None,
        new_session: bool = True,
        truncate: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``command``; ``header`` is written to the log first. ``new_session``: in a
        session of its own, so that a signal to the caller's process group misses it."""
        with self.log.open("wb" if truncate else "ab") as out:
            if header is not None:
                out.write(f"{header}\n".encode())
                out.flush()
            self.process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
            )
        _LIVE.add(self.process)
        return self.process

    def poll(self) -> int | None:
        """Its exit status, None while it runs (or before it was started)."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is not None:
            _LIVE.discard(self.process)
        return code

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def last_lines(self, count: int = 3, separator: str = " | ") -> str:
        """The last ``count`` non-blank lines of its log, on one line by default."""
        lines = [line for line in self.text().splitlines() if line.strip()]
        return separator.join(lines[-count:])

    async def stop(self, timeout_s: float = STOP_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; reaped either way. Again is harmless."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.to_thread(process.wait)
        _LIVE.discard(process)

    def stop_now(self, timeout_s: float = STOP_S) -> None:
        """:meth:`stop` for a caller without an event loop (it blocks)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        _LIVE.discard(process)


class Service(ChildProcess):
    """A Forecourt process of the run (``python -m forecourt.cli ARGS`` in ``workdir``, its
    log ``workdir/NAME.log``): started, watched, restarted and stopped here.

    ``stages`` are the crash settings of its successive lives: life *i* runs with
    ``stages[i]`` (``FORECOURT_CRASH_AT`` ...), every later life without any. Each life
    starts with a ``--- NAME life N: CRASH POINT`` line in the log.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        workdir: Path,
        stages: Sequence[dict[str, str]] = (),
    ) -> None:
        super().__init__(name, workdir / f"{name}.log")
        self.args = args
        self.env = env
        self.workdir = workdir
        self.stages = list(stages)
        self.stage = 0
        self.lives = 0
        self.unexpected_exits: list[int] = []

    @property
    def armed(self) -> bool:
        return self.stage < len(self.stages)

    def start(self) -> None:
        env = {**self.env, **(self.stages[self.stage] if self.armed else {})}
        self.spawn(
            [sys.executable, "-m", "forecourt.cli", *self.args],
            env=env,
            cwd=self.workdir,
            header=(
                f"--- {self.name} life {self.lives + 1}: "
                f"{env.get('FORECOURT_CRASH_AT', 'no crash point')}"
            ),
        )
        self.lives += 1


def simulator_command(module: str, config_path: Path, port_file: Path) -> list[str]:
    """The command line of a simulator on 127.0.0.1, on a port it picks and writes to
    ``port_file``."""
    return [
        sys.executable,
        "-m",
        module,
        "--config",
        str(config_path),
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--port-file",
        str(port_file),
        "--log-level",
        "WARNING",
    ]


def read_port(port_file: Path) -> int | None:
    """The port a process wrote to ``port_file`` (None: not yet)."""
    with contextlib.suppress(FileNotFoundError):
        text = port_file.read_text().strip()
        if text:
            return int(text)
    return None


class SimulatorProcess(ChildProcess):
    """A payment provider simulator (``python -m MODULE``) as a child process: its config
    written to ``config_path`` as JSON, its port read from ``port_file``."""

    def __init__(
        self,
        name: str,
        module: str,
        config: Mapping[str, Any],
        *,
        config_path: Path,
        port_file: Path,
        log: Path,
    ) -> None:
        super().__init__(name, log)
        self.module = module
        self.config_path = config_path
        self.config_path.write_text(json.dumps(dict(config)), encoding="utf-8")
        self.port_file = port_file
        self.base_url = ""

    def command(self) -> list[str]:
        return simulator_command(self.module, self.config_path, self.port_file)

    def read_port(self) -> int | None:
        """The port it wrote (None: not yet); the base URL is set from it."""
        port = read_port(self.port_file)
        if port is not None:
            self.base_url = f"http://127.0.0.1:{port}"
        return port

    @property
    def health_url(self) -> str:
        return f"{self.base_url}/sim/health"

    async def start(self, timeout_s: float = 30.0, **spawn: Any) -> str:
        """Start it and wait (at most ``timeout_s``) until it serves; its base URL.
        ``spawn``: passed to :meth:`ChildProcess.spawn`."""
        self.port_file.unlink(missing_ok=True)
        self.spawn(self.command(), **spawn)
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                if self.poll() is not None:
                    raise ChaosError(f"the {self.name} simulator exited: {self.last_lines()}")
                if self.read_port() is not None:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(self.health_url)).status_code == 200:
                            return self.base_url
                if time.monotonic() > deadline:
                    raise ChaosError(f"the {self.name} simulator did not start in {timeout_s:g} s")
                await asyncio.sleep(0.05)
