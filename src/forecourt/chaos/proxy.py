"""A fault-injecting TCP proxy: one process's connections to a server (PostgreSQL, say) go
through it, so that they can be cut or stalled at will while other processes keep their
direct connections.

In a test or a chaos driver::

    async with FaultProxy("127.0.0.1", 5432) as proxy:
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/forecourt"
        ...                          # the process under test connects to ``dsn``
        async with proxy.outage(2.0):
            ...                      # every connection cut, new ones refused, for >= 2 s
        ...                          # forwarding again

Modes, switched at any time:

- ``pass``: bytes flow both ways untouched.
- ``cut``: every live connection is closed at once, both halves, with a TCP RST (SO_LINGER 0),
  and new connections are accepted and reset straight away, so clients fail fast instead of
  waiting for a timeout.
- ``blackhole``: connections stay open (new ones are accepted too) but nothing is forwarded;
  clients wait until their own timeouts. Bytes that arrive meanwhile stay queued (in the
  kernel or in the proxy), so going back to ``pass`` delivers them in order and the
  connections carry on intact.

Forwarding uses asyncio protocols: each chunk the event loop reads (up to its read size,
256 KiB on the standard loop) is handed to the peer's transport as it is, with flow control
(reading from one side pauses while more than 1 MiB waits to be written to the other).

As its own process::

    python -m forecourt.chaos.proxy --upstream 127.0.0.1:5432 --port-file PATH \\
        [--control-file PATH] [--listen-host 127.0.0.1] [--listen-port 0]

The bound port is written to ``--port-file`` (to a temporary file, then renamed) once the proxy
listens. ``--control-file`` is read every 50 ms; its content, ``pass``, ``cut`` or
``blackhole``, is the mode (a missing or empty file changes nothing; other content is reported
on stderr and ignored). It is read once before the port file is written, so a proxy can start
cut. SIGTERM or SIGINT stops the proxy (exit 0). A bad command line or a port that cannot be
had gives one ``Error: ...`` line on stderr (exit 2 and 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, cast

__all__ = ["FaultProxy", "Mode", "ProxyStats", "main"]

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST
_WRITE_HIGH_WATER = 1 << 20  # bytes queued for one side before reading from the other pauses
_BACKLOG = 1024
CONTROL_POLL_S = 0.05  # how often the standalone proxy reads its control file


class Mode(enum.Enum):
    """What the proxy does with the connections through it."""

    PASS = "pass"
    CUT = "cut"
    BLACKHOLE = "blackhole"


@dataclass
class ProxyStats:
    """Counters since the proxy was made.

    ``accepted`` counts every connection the listener took, including the ``refused`` ones
    (reset on arrival because the proxy was cut); ``cut`` counts live connections closed by
    switching to ``cut``; ``bytes_upstream`` / ``bytes_downstream`` count bytes forwarded
    from clients to the server and from the server to clients.
    """

    accepted: int = 0
    refused: int = 0
    cut: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0


def _reset(transport: asyncio.Transport) -> None:
    """Close ``transport`` at once with a TCP RST, dropping whatever it had not sent yet."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Flow:
    """One direction of a link: what is read from ``src`` is written to ``dst``.

    Bytes are held back (and reading from ``src`` paused) while ``dst`` is not connected yet,
    while the proxy is not passing traffic, and while ``dst`` has too much left to write.
    """

    __slots__ = ("dst", "dst_full", "eof", "eof_sent", "held", "link", "src", "src_paused", "up")

    def __init__(self, link: _Link, *, up: bool) -> None:
        self.link = link
        self.up = up  # client -> server
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.held = bytearray()
        self.eof = False  # src has sent its FIN
        self.eof_sent = False  # ... and it was passed on to dst
        self.dst_full = False
        self.src_paused = False

    def _open(self) -> bool:
        return self.dst is not None and not self.link.closed and self.link.proxy.mode is Mode.PASS

    def _send(self, data: bytes) -> None:
        assert self.dst is not None
        self.dst.write(data)
        if self.up:
            self.link.proxy.stats.bytes_upstream += len(data)
        else:
            self.link.proxy.stats.bytes_downstream += len(data)

    def receive(self, data: bytes) -> None:
        """Bytes read from ``src``: forward them now, or hold them and stop reading."""
        if not self.held and self._open():
            self._send(data)
        else:
            self.held += data
            self.update()

    def update(self) -> None:
        """Pass on what is held if the flow is open, and read from ``src`` only while open."""
        if self.link.closed or self.src is None:
            return
        if self._open():
            if self.held:
                data = bytes(self.held)
                self.held.clear()
                self._send(data)
            if self.eof and not self.eof_sent:
                assert self.dst is not None
                self.eof_sent = True
                self.dst.write_eof()
                self.link.check_finished()
                return
        if self.eof:
            return  # src reads nothing more anyway
        reading = self._open() and not self.dst_full
        if reading and self.src_paused:
            self.src_paused = False
            self.src.resume_reading()
        elif not reading and not self.src_paused:
            self.src_paused = True
            self.src.pause_reading()


class _Side(asyncio.Protocol):
    """The protocol of one of a link's two sockets (the client's or the server's)."""

    def __init__(self, link: _Link, *, upstream: bool) -> None:
        self.link = link
        self.upstream = upstream
        self.inbound = link.to_client if upstream else link.to_upstream  # read from this side
        self.outbound = link.to_upstream if upstream else link.to_client  # written to it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        stream.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        if self.upstream:
            self.link.upstream_made(stream)
        else:
            self.link.client_made(stream)

    def data_received(self, data: bytes) -> None:
        self.inbound.receive(data)

    def eof_received(self) -> bool:
        self.inbound.eof = True
        self.inbound.update()
        return True  # keep the other half open; the link closes once both halves are done

    def pause_writing(self) -> None:
        self.outbound.dst_full = True
        self.outbound.update()

    def resume_writing(self) -> None:
        self.outbound.dst_full = False
        self.outbound.update()

    def connection_lost(self, exc: Exception | None) -> None:
        # Lost on an error (a reset, say): the other side is reset too.
        self.link.close(reset=exc is not None)


class _Link:
    """A client's connection to the proxy and the proxy's connection to the server for it."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.to_upstream = _Flow(self, up=True)
        self.to_client = _Flow(self, up=False)
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.closed = False
        self.client_side = _Side(self, upstream=False)

    def client_made(self, transport: asyncio.Transport) -> None:
        self.client = transport
        self.to_upstream.src = transport
        self.to_client.dst = transport
        self.proxy._admit(self)

    def upstream_made(self, transport: asyncio.Transport) -> None:
        if self.closed:  # cut while connecting
            _reset(transport)
            return
        self.upstream = transport
        self.to_upstream.dst = transport
        self.to_client.src = transport
        self.refresh()

    def refresh(self) -> None:
        """Apply the proxy's mode to both directions."""
        self.to_upstream.update()
        self.to_client.update()

    def check_finished(self) -> None:
        if self.to_upstream.eof_sent and self.to_client.eof_sent:
            self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        """Close both sockets: with an RST if ``reset``, else after what is queued is sent."""
        if self.closed:
            return
        self.closed = True
        self.proxy._links.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                if reset:
                    _reset(transport)
                else:
                    transport.close()


class FaultProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` that can cut or stall its connections.

    ``start()`` binds ``listen_host:listen_port`` itself (port 0: the kernel picks one, then
    read :attr:`port`). It starts in ``pass`` mode; :meth:`cut`, :meth:`blackhole` and
    :meth:`pass_through` switch modes at any time (see the module's description).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.stats = ProxyStats()
        self._mode = Mode.PASS
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._port: int | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Bind and listen; connections are served from now on. Raises ``OSError`` if the
        address cannot be had."""
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Link(self).client_side,
            self.listen_host,
            self.listen_port,
            backlog=_BACKLOG,
            reuse_address=True,
        )
        self._server = server
        # A name with several addresses gives several sockets (on different ports if 0).
        self._port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and reset every connection. Stopping twice is harmless."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for link in list(self._links):
            link.close(reset=True)
        await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def active(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    # -- modes

    def set_mode(self, mode: Mode) -> None:
        """Switch to ``mode``; switching to ``cut`` resets every live connection at once."""
        self._mode = mode
        if mode is Mode.CUT:
            links = list(self._links)
            self.stats.cut += len(links)
            for link in links:
                link.close(reset=True)
        else:
            for link in list(self._links):
                link.refresh()

    def pass_through(self) -> None:
        """Forward bytes both ways (and deliver what a blackhole held back)."""
        self.set_mode(Mode.PASS)

    def cut(self) -> None:
        """Reset every live connection now and every new one on arrival."""
        self.set_mode(Mode.CUT)

    def blackhole(self) -> None:
        """Keep connections open (accept new ones) but forward nothing."""
        self.set_mode(Mode.BLACKHOLE)

    @contextlib.asynccontextmanager
    async def outage(self, seconds: float = 0.0, *, mode: Mode = Mode.CUT) -> AsyncIterator[None]:
        """Be in ``mode`` (``cut`` or ``blackhole``) for the block and at least ``seconds``
        from entering it, then pass traffic again. Leaving the block by an exception ends
        the outage at once."""
        if mode is Mode.PASS:
            raise ValueError("an outage is cut or blackhole")
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        self.set_mode(mode)
        try:
            yield
            remaining = until - loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)
        finally:
            self.pass_through()

    async def cut_for(self, seconds: float, *, mode: Mode = Mode.CUT) -> None:
        """Cut (or blackhole) for ``seconds``, then pass traffic again."""
        async with self.outage(seconds, mode=mode):
            pass

    # -- connections

    def _admit(self, link: _Link) -> None:
        assert link.client is not None
        self.stats.accepted += 1
        if self._mode is Mode.CUT or self._server is None:
            self.stats.refused += 1
            link.closed = True
            _reset(link.client)
            return
        self._links.add(link)
        link.connecting = asyncio.get_running_loop().create_task(self._connect(link))

    async def _connect(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: _Side(link, upstream=True), self.upstream_host, self.upstream_port
            )
        except OSError:
            link.close(reset=True)  # the server is down: so is the client's connection
        finally:
            link.connecting = None


# --------------------------------------------------------------------------- process


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes in one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {message}\n")


def _address(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


def _port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return int(text)


def _write_port_file(path: Path, port: int) -> None:
    # Write then rename, so a reader never sees a half-written number.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{port}\n")
    os.replace(temporary, path)


def _reason(exc: OSError) -> str:
    """The system's words for ``exc``, without the address asyncio repeats in its message."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return str(exc.strerror or exc)
    return os.strerror(exc.errno)


def _say(message: str) -> None:
    print(f"forecourt chaos proxy: {message}", file=sys.stderr, flush=True)


class _Control:
    """The control file: its content is the mode to be in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reported: str | None = None

    def wanted(self) -> Mode | None:
        """The mode the file asks for; None if it is missing, empty or not understood."""
        try:
            text = self.path.read_text().strip().lower()
        except (OSError, UnicodeDecodeError):
            return None
        if not text:
            return None
        try:
            return Mode(text)
        except ValueError:
            if text != self.reported:
                self.reported = text
                _say(f"ignoring control {text!r} (expected pass, cut or blackhole)")
            return None

    def apply(self, proxy: FaultProxy) -> None:
        mode = self.wanted()
        if mode is not None and mode is not proxy.mode:
            proxy.set_mode(mode)
            _say(f"mode {mode.value}")


async def _serve(args: argparse.Namespace) -> int:
    upstream_host, upstream_port = args.upstream
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    proxy = FaultProxy(
        upstream_host, upstream_port, listen_host=args.listen_host, listen_port=args.listen_port
    )
    control = _Control(Path(args.control_file)) if args.control_file else None
    if control is not None:
        control.apply(proxy)
    try:
        await proxy.start()
    except OSError as exc:
        print(
            f"Error: cannot listen on {args.listen_host}:{args.listen_port}: {_reason(exc)}",
            file=sys.stderr,
        )
        return 1
    try:
        try:
            _write_port_file(Path(args.port_file), proxy.port)
        except OSError as exc:
            print(
                f"Error: cannot write the port file {args.port_file}: {_reason(exc)}",
                file=sys.stderr,
            )
            return 1
        _say(
            f"listening on {args.listen_host}:{proxy.port}, forwarding to "
            f"{upstream_host}:{upstream_port} ({proxy.mode.value})"
        )
        while not stop.is_set():
            if control is not None:
                control.apply(proxy)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CONTROL_POLL_S)
    finally:
        await proxy.stop()
    _say("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT (0); 2: a bad command line, 1: cannot listen."""
    parser = _Parser(
        prog="python -m forecourt.chaos.proxy",
        description="Fault-injecting TCP proxy: pass, cut or blackhole, set by a control file.",
    )
    parser.add_argument("--upstream", required=True, type=_address, help="HOST:PORT to forward to")
    parser.add_argument(
        "--port-file", required=True, help="the bound port is written here once listening"
    )
    parser.add_argument(
        "--control-file", help="holds the mode: pass, cut or blackhole (read every 50 ms)"
    )
    parser.add_argument("--listen-host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--listen-port", default=0, type=_port_number, help="port to listen on; 0 picks one"
    )
    args = parser.parse_args(argv)

    import uvloop

    return uvloop.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
