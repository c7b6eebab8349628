"""The fault-injecting proxy with real PostgreSQL behind it: queries pass through; ``cut``
fails live connections at once and refuses new ones fast; ``blackhole`` stalls queries (and
``pass`` releases them intact); the standalone process obeys its control file and SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import pytest

from forecourt.chaos.proxy import FaultProxy, Mode
from tests.support import eventually

# What asyncpg raises on a connection that the proxy reset: mid-query, afterwards, on connect.
CONNECTION_ERRORS = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    ConnectionError,
)
FAIL_FAST_S = 2.0  # a cut connection fails within this (a hang would take far longer)
STALL_S = 0.5  # a blackholed query is still waiting after this


@pytest.fixture
def upstream(pg_url: str) -> dict[str, Any]:
    """Where the test database is, and how asyncpg connects to it (less host and port)."""
    parsed = urlparse(pg_url)
    return {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": parsed.username or "postgres",
        "database": parsed.path.lstrip("/"),
    }


@pytest.fixture
async def proxy(upstream: dict[str, Any]) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream["host"], upstream["port"]) as running:
        yield running


async def connect(upstream: dict[str, Any], port: int) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=upstream["user"],
        database=upstream["database"],
        timeout=FAIL_FAST_S,
    )


@pytest.mark.integration
async def test_queries_pass_through_and_are_counted(
    proxy: FaultProxy, upstream: dict[str, Any]
) -> None:
    assert proxy.port not in (0, upstream["port"])
    conn = await connect(upstream, proxy.port)
    try:
        for n in range(200):
            assert await conn.fetchval("SELECT $1::int + 1", n) == n + 1
        rows = await conn.fetch("SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g")
        assert len(rows) == 2000
        assert proxy.active == 1
    finally:
        await conn.close()
    await eventually(lambda: proxy.active == 0, timeout=5, what="the link to close")
    assert proxy.stats.accepted == 1
    assert proxy.stats.refused == proxy.stats.cut == 0
    assert proxy.stats.bytes_downstream > 2000 * 1000
    assert proxy.stats.bytes_upstream > 200 * 20


@pytest.mark.integration
async def test_cut_fails_live_connections_at_once_and_refuses_new_ones(
    proxy: FaultProxy, upstream: dict[str, Any]
) -> None:
    idle = await connect(upstream, proxy.port)
    busy = await connect(upstream, proxy.port)
    sent = proxy.stats.bytes_upstream
    query = asyncio.create_task(busy.fetchval("SELECT pg_sleep(3)"))
    await eventually(lambda: proxy.stats.bytes_upstream > sent, timeout=5, what="the query")

    proxy.cut()
    assert proxy.mode is Mode.CUT
    assert proxy.stats.cut == 2
    assert proxy.active == 0
    with pytest.raises(CONNECTION_ERRORS):
        await asyncio.wait_for(query, FAIL_FAST_S)
    with pytest.raises(CONNECTION_ERRORS):
        await asyncio.wait_for(idle.fetchval("SELECT 1"), FAIL_FAST_S)

    started = time.monotonic()
    with pytest.raises(CONNECTION_ERRORS):
        await connect(upstream, proxy.port)
    assert time.monotonic() - started < 1.0, "a refused connection must fail fast"
    assert proxy.stats.refused >= 1

    proxy.pass_through()
    fresh = await connect(upstream, proxy.port)
    try:
        assert await fresh.fetchval("SELECT 42") == 42
    finally:
        await fresh.close()
    for conn in (idle, busy):
        conn.terminate()


@pytest.mark.integration
async def test_blackhole_stalls_a_query_until_cut(
    proxy: FaultProxy, upstream: dict[str, Any]
) -> None:
    conn = await connect(upstream, proxy.port)
    proxy.blackhole()
    query = asyncio.create_task(conn.fetchval("SELECT 1"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(query), STALL_S)
    assert proxy.active == 1

    proxy.cut()
    with pytest.raises(CONNECTION_ERRORS):
        await asyncio.wait_for(query, FAIL_FAST_S)
    conn.terminate()


@pytest.mark.integration
async def test_pass_after_blackhole_delivers_the_held_query(
    proxy: FaultProxy, upstream: dict[str, Any]
) -> None:
    conn = await connect(upstream, proxy.port)
    try:
        proxy.blackhole()
        query = asyncio.create_task(conn.fetchval("SELECT 7"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(query), 0.2)
        proxy.pass_through()
        assert await asyncio.wait_for(query, FAIL_FAST_S) == 7
        assert await conn.fetchval("SELECT 8") == 8
    finally:
        await conn.close()
    assert proxy.stats.cut == 0


@pytest.mark.integration
async def test_outage_and_cut_for_restore_pass_through(
    proxy: FaultProxy, upstream: dict[str, Any]
) -> None:
    conn = await connect(upstream, proxy.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with proxy.outage(0.2):
        assert proxy.mode is Mode.CUT
        with pytest.raises(CONNECTION_ERRORS):
            await conn.fetchval("SELECT 1")
        with pytest.raises(CONNECTION_ERRORS):
            await connect(upstream, proxy.port)
    assert loop.time() - started >= 0.2
    assert proxy.mode is Mode.PASS
    conn.terminate()

    started = loop.time()
    await proxy.cut_for(0.1)
    assert loop.time() - started >= 0.1
    assert proxy.mode is Mode.PASS
    conn = await connect(upstream, proxy.port)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert proxy.stats.cut == 1


def proxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "forecourt.chaos.proxy", *args]


@pytest.mark.integration
@pytest.mark.e2e
async def test_standalone_process_follows_its_control_file(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    port_file = tmp_path / "port"
    control = tmp_path / "control"
    control.write_text("pass\n")
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            proxy_command(
                "--upstream",
                f"{upstream['host']}:{upstream['port']}",
                "--port-file",
                str(port_file),
                "--control-file",
                str(control),
            ),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:

        def announced() -> int:
            assert process.poll() is None, stderr_path.read_text()
            return int(port_file.read_text()) if port_file.exists() else 0

        port = await eventually(announced, timeout=10, what="the port file")
        conn = await connect(upstream, port)
        assert await conn.fetchval("SELECT 1") == 1

        control.write_text("cut\n")
        await eventually(conn.is_closed, timeout=5, what="the cut")
        with pytest.raises(CONNECTION_ERRORS):
            await conn.fetchval("SELECT 1")
        with pytest.raises(CONNECTION_ERRORS):
            await connect(upstream, port)

        control.write_text("pass\n")

        async def reconnected() -> asyncpg.Connection | None:
            try:
                return await connect(upstream, port)
            except CONNECTION_ERRORS:
                return None

        conn = await eventually(reconnected, timeout=5, what="pass-through again")
        try:
            assert await conn.fetchval("SELECT 2") == 2
        finally:
            await conn.close()

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 10) == 0
        assert "Traceback" not in stderr_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_bad_command_line_is_one_error_line(tmp_path: Path) -> None:
    done = subprocess.run(
        proxy_command("--upstream", "no-port-here", "--port-file", str(tmp_path / "port")),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("Error: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "port").exists()
