"""``forecourt serve --workers N --port 0 --port-file``: N worker processes listen on one port
the supervisor chose, and the port file names it once all of them serve."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.support import start_workers

pytestmark = pytest.mark.e2e

LISTEN = "0A"  # the TCP state in /proc/net/tcp


def listeners_on(port: int) -> int:
    """Sockets listening on ``port`` (IPv4), as the kernel lists them."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    fields = [line.split() for line in lines]
    return sum(int(f[1].split(":")[1], 16) == port and f[3] == LISTEN for f in fields)


async def test_workers_on_port_zero_share_the_port_the_file_names_once_all_serve(
    tmp_path: Path, pg_url: str
) -> None:
    port_file = tmp_path / "hq.port"
    env = {**os.environ, "FORECOURT_DATABASE_URL": pg_url, "FORECOURT_LOG_LEVEL": "WARNING"}
    supervisor, port = await start_workers(tmp_path, env)
    try:
        # Both workers listen on it (the supervisor's own socket only holds the number).
        assert listeners_on(port) == 2
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answers = [(await client.get("/ready")).status_code for _ in range(4)]
        assert answers == [200] * 4
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
    assert not port_file.exists()  # stopped: the port is named no more
    assert listeners_on(port) == 0
