"""HTTP listeners bound by the process that serves them, and the port file that names them.

A process asked for ``--port 0`` binds and listens itself, so the port the kernel picked is
never free for someone else to take between being chosen and being used; it then tells the
world which port that is by writing it to a port file, atomically, once it answers HTTP.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import uvicorn

BACKLOG = 2048  # uvicorn's own default; asyncio listens again with the config's backlog


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bound_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``0``: a port the kernel picks), not listening.

    With ``reuse_port`` (SO_REUSEPORT) other sockets of this user may bind the same port: each
    worker process listens on its own and the kernel spreads connections over them.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound and listening before anyone learns its port: nobody can take it."""
    sock = bound_socket(host, port, reuse_port=reuse_port)
    sock.listen(BACKLOG)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically: a reader sees no file or the whole number."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def remove_port_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class PortFileServer(uvicorn.Server):
    """uvicorn on sockets the caller bound; the port file appears once it serves requests
    and goes away when it shuts down (a SIGKILL leaves it: a restart overwrites it)."""

    def __init__(self, config: uvicorn.Config, port_file: Path | None = None) -> None:
        super().__init__(config)
        self.port_file = port_file
        if port_file is not None:
            remove_port_file(port_file)  # nobody may read a dead process's port meanwhile

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Written here rather than by a task watching ``started``: no polling, and a failed
        # startup (lifespan error, exit) never publishes a port.
        if self.started and self.port_file is not None and sockets:
            write_port_file(self.port_file, port_of(sockets[0]))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.port_file is not None:
            remove_port_file(self.port_file)
        await super().shutdown(sockets)
