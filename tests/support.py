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


# --- staff access tokens ----------------------------------------------------------------------

Assignment = tuple[str, str]  # (role, scope text: "chain", "region:NORTH", "station:S001")
ADMIN: tuple[Assignment, ...] = (("hq_admin", "chain"),)


async def staff_headers(
    identity: object, *grants: Assignment, name: str | None = None
) -> dict[str, str]:
    """The Authorization header of a new staff member holding ``grants`` (HQ admin over
    the chain when none are given), signed in through ``identity`` (an IdentityService:
    ``hq.identity``) as any user would be."""
    from uuid import uuid4

    from forecourt.identity.handlers import IdentityService
    from forecourt.kernel.access import Scope

    assert isinstance(identity, IdentityService)
    username = name or f"t-{uuid4().hex[:12]}"
    password = f"pw-{uuid4().hex}"
    await identity.create_user(username, password=password, actor="test")
    for role, scope in grants or ADMIN:
        await identity.grant(username, role, Scope.parse(scope), actor="test")
    tokens = await identity.sign_in(username, password, source="127.0.0.1")
    return {"authorization": f"Bearer {tokens.access_token}"}


async def staff_headers_at(database_url: str, *grants: Assignment) -> dict[str, str]:
    """:func:`staff_headers` for an HQ running in another process on ``database_url``
    (tokens are signed with keys kept in its database, so every HQ process takes them)."""
    from forecourt.identity.handlers import IdentityConfig, IdentityService
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.settings import Settings

    db = Database(database_url)
    await db.connect()
    try:
        await upgrade(db)
        config = IdentityConfig.from_settings(Settings(database_url=database_url))
        return await staff_headers(IdentityService(db, config), *grants)
    finally:
        await db.dispose()
