"""Helpers for every test package: waiting for a condition, with a deadline, never for a time."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

START = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai


class ManualClock:
    """A clock (``forecourt.kernel.clock.Clock``) that moves only when a test moves it."""

    def __init__(self, at: datetime = START) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at

    def advance(self, by: float | timedelta) -> None:
        """Move on ``by`` (seconds, or a timedelta)."""
        self.at += by if isinstance(by, timedelta) else timedelta(seconds=by)


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    timeout: float = 20.0,
    *,
    interval: float = 0.01,
    what: str = "the condition",
) -> T:
    """Poll ``check`` (plain or async) until it gives something truthy, and return that.

    Fails with ``AssertionError`` once ``timeout`` seconds have passed without it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def start_workers(
    tmp_path: Path, env: dict[str, str], workers: int = 2
) -> tuple[subprocess.Popen[bytes], int]:
    """``forecourt serve --workers N --port 0 --port-file``, its log in ``tmp_path/hq.log``:
    the supervisor and the port it names once every worker serves."""
    port_file = tmp_path / "hq.port"
    args = ["serve", "--workers", str(workers), "--port", "0", "--port-file", str(port_file)]
    with (tmp_path / "hq.log").open("wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "forecourt.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def announced() -> bool:
        assert supervisor.poll() is None, (tmp_path / "hq.log").read_text()
        return port_file.exists()

    try:
        await eventually(announced, 60, interval=0.05, what="the port file")
    except BaseException:
        supervisor.kill()
        supervisor.wait()
        raise
    return supervisor, int(port_file.read_text())
