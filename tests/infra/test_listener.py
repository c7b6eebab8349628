"""Listeners bound by the process that serves them: ``--port 0`` and the port file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from forecourt.infra.listener import (
    PortFileServer,
    bound_socket,
    listening_socket,
    port_of,
    write_port_file,
)
from tests.support import eventually


async def hello(scope: Scope, _receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def test_a_server_on_port_zero_names_its_port_once_it_serves_and_unnames_it_at_shutdown(
    tmp_path: Path,
) -> None:
    # Given a socket bound and listening on a port the kernel picked, and a stale port file
    port_file = tmp_path / "hq.port"
    port_file.write_text("1\n")
    sock = listening_socket("127.0.0.1", 0)
    port = port_of(sock)
    config = uvicorn.Config(hello, log_level="error", lifespan="off")
    server = PortFileServer(config, port_file)
    assert not port_file.exists()  # nobody reads the last process's port meanwhile
    # When the server runs on it
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(port_file.exists, 10, what="the port file")
        # Then the file names that port, and the server answers there
        assert port_file.read_text() == f"{port}\n"
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{port}/")
        assert (answer.status_code, answer.text) == (200, "hello")
        assert list(tmp_path.iterdir()) == [port_file]  # no temporary file left behind
    finally:
        server.should_exit = True
        await task
    # And an orderly shutdown removes the file
    assert not port_file.exists()


def test_workers_bind_one_port_with_reuse_port_and_others_are_refused() -> None:
    reserved = bound_socket("127.0.0.1", 0, reuse_port=True)  # the supervisor's, not listening
    port = port_of(reserved)
    workers = [listening_socket("127.0.0.1", port, reuse_port=True) for _ in range(2)]
    try:
        assert [port_of(w) for w in workers] == [port, port]
        with pytest.raises(OSError, match="in use"):
            listening_socket("127.0.0.1", port)  # without SO_REUSEPORT
    finally:
        for sock in (reserved, *workers):
            sock.close()


def test_a_port_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "edge.port"
    write_port_file(path, 8401)
    write_port_file(path, 37123)
    assert path.read_text() == "37123\n"
    assert list(tmp_path.iterdir()) == [path]
