"""A strict Veeder-Root TLS gauge simulator on TCP (port 10001 by convention) or a pty.

Strict like the console: it answers only well-formed computer-format requests it knows
(``codec.FUNCTIONS``); any other function code gets ``SOH 9999FF1B ETX``. With a security
code configured, a request without the right code gets no answer at all (3xx manual §5: "the
system will not respond to a command without the proper security code"). Without one, a
request is complete after six characters, so a client that sends a code anyway has its first
six characters read as the function code (and gets 9999FF1B) [I: the manual does not say].
Display-format requests (``I20100``) are answered 9999FF1B too: the simulator speaks only the
computer format.

The device model is :mod:`~forecourt.protocols.tls.sim_gauge`, fault injection is
:mod:`~forecourt.protocols.tls.sim_faults`; this module puts them on a line::

    server = await serve("127.0.0.1", 0, GaugeConfig.default(3), {"split": "4"})
    server.port                      # the bound port
    server.simulator.faults.set("corrupt_checksum", "1")
    await server.close()

    gauge = await open_pty(GaugeConfig.default(2))
    gauge.path                       # open it as serial://<path>
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import termios
import tty
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from forecourt.kernel.clock import Clock
from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.tls.codec import (
    UNKNOWN_COMMAND_FRAME,
    RequestReader,
    TlsMalformed,
    decode_request,
    encode_reply,
)
from forecourt.protocols.tls.sim_faults import FAULTS, FaultPlan, parse_fault_specs
from forecourt.protocols.tls.sim_gauge import GaugeConfig, GaugeModel
from forecourt.protocols.transport import parse_endpoint

__all__ = [
    "FAULTS",
    "DEFAULT_PORT",
    "FaultPlan",
    "GaugeConfig",
    "GaugeServer",
    "PtyGauge",
    "TlsGaugeSimulator",
    "load_config",
    "open_pty",
    "parse_fault_specs",
    "run",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 10001
_SPLIT_PAUSE_S = 0.005  # between the pieces of a split reply, so they leave as separate writes


class _Line(Protocol):
    """One byte stream the gauge answers on."""

    async def read(self) -> bytes: ...  # b"" at end of stream

    async def write(self, data: bytes) -> None: ...

    def drop(self) -> None: ...

    @property
    def closed(self) -> bool: ...


@dataclass
class SimulatorStats:
    requests: int = 0
    answered: int = 0
    unknown: int = 0
    wrong_security_code: int = 0
    garbage_bytes: int = 0
    connections: int = 0


class TlsGaugeSimulator:
    """The gauge: its model, its faults, and the loop that answers one line."""

    def __init__(
        self,
        config: GaugeConfig | None = None,
        faults: FaultPlan | Mapping[str, str] | None = None,
        *,
        clock: Clock | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = config or GaugeConfig.default()
        self.model = GaugeModel(self.config, clock)
        self.faults = faults if isinstance(faults, FaultPlan) else FaultPlan(faults)
        self.stats = SimulatorStats()
        self._random = random.Random(seed)

    async def serve_line(self, line: _Line) -> None:
        """Answer requests on ``line`` until it closes or is dropped."""
        reader = RequestReader(security_code=self.config.security_code is not None)
        while True:
            chunk = await line.read()
            if not chunk:
                return
            garbage_before = reader.garbage_bytes
            for raw in reader.feed(chunk):
                if not await self._answer(raw, line):
                    if line.closed:
                        return
                    # A restart forgets what it had read.
                    reader = RequestReader(security_code=self.config.security_code is not None)
                    break
            self.stats.garbage_bytes += max(0, reader.garbage_bytes - garbage_before)

    async def _answer(self, raw: bytes, line: _Line) -> bool:
        """Answer one request; False when the console "restarted" (the line was dropped)."""
        self.stats.requests += 1
        frame: bytes
        try:
            request = decode_request(raw, known_only=True)
        except TlsMalformed:
            if self.config.security_code is not None:
                self.stats.wrong_security_code += 1
                return True
            self.stats.unknown += 1
            frame = UNKNOWN_COMMAND_FRAME
        else:
            if request.security_code != self.config.security_code:
                self.stats.wrong_security_code += 1
                return True
            if request.function in self.config.unsupported:
                self.stats.unknown += 1
                return await self._send(UNKNOWN_COMMAND_FRAME, line)
            frame = encode_reply(self.model.reply(request), lowercase=self.faults.take("lowercase"))
        return await self._send(frame, line)

    async def _send(self, frame: bytes, line: _Line) -> bool:
        faults = self.faults
        if faults.take("reboot"):
            line.drop()
            return False
        if faults.take("no_answer"):
            return True
        if faults.take("corrupt_checksum"):
            frame = _corrupt_checksum(frame)
        delay = faults.size("delay")
        if delay:
            await asyncio.sleep(delay)
        garbage = faults.size("garbage")
        if garbage:
            junk = bytes(self._random.choice(_JUNK) for _ in range(int(garbage)))
            frame = junk + frame
        if faults.take("merge"):
            frame = frame + frame
        pieces = faults.size("split")
        if pieces:
            for piece in _split(frame, int(pieces), self._random):
                await line.write(piece)
                await asyncio.sleep(_SPLIT_PAUSE_S)
        else:
            await line.write(frame)
        self.stats.answered += 1
        return True


# Junk that is neither SOH nor line filler (CR, LF, NUL), so a reader counts every byte.
_JUNK = bytes(b for b in range(256) if b not in (0x00, 0x01, 0x0A, 0x0D))


def _corrupt_checksum(frame: bytes) -> bytes:
    """The same frame with the last digit before ETX changed (still hex, now wrong)."""
    replacement = b"1" if frame[-2:-1] == b"0" else b"0"
    return frame[:-2] + replacement + frame[-1:]


def _split(frame: bytes, pieces: int, rng: random.Random) -> list[bytes]:
    pieces = max(1, min(pieces, len(frame)))
    cuts = sorted(rng.sample(range(1, len(frame)), pieces - 1)) if pieces > 1 else []
    bounds = [0, *cuts, len(frame)]
    return [frame[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# --------------------------------------------------------------------------- TCP


class _TcpLine:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def read(self) -> bytes:
        try:
            return await self.reader.read(4096)
        except ConnectionError:
            return b""

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError):
            self.writer.write(data)
            await self.writer.drain()

    def drop(self) -> None:
        self._closed = True
        self.writer.transport.abort()


class GaugeServer:
    """A simulated gauge listening on TCP; close it with :meth:`close` (or ``async with``)."""

    def __init__(self, simulator: TlsGaugeSimulator) -> None:
        self.simulator = simulator
        self._server: asyncio.Server | None = None
        self._address = ("", 0)
        self._lines: set[_TcpLine] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connected, host, port)
        name = self._server.sockets[0].getsockname()
        self._address = (str(name[0]), int(name[1]))

    @property
    def host(self) -> str:
        return self._address[0]

    @property
    def port(self) -> int:
        """The bound port (the one the system chose when asked for port 0)."""
        return self._address[1]

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def drop_connections(self) -> None:
        """Close every open connection, as a console that restarts."""
        for line in list(self._lines):
            line.drop()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        line = _TcpLine(reader, writer)
        self._lines.add(line)
        self.simulator.stats.connections += 1
        try:
            await self.simulator.serve_line(line)
        finally:
            self._lines.discard(line)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        # Dropped connections end their handlers (they read end-of-stream); cancel only one
        # that does not, so no handler is left behind.
        pending = set(self._tasks)
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=2.0)
            for task in stuck:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> GaugeServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    config: GaugeConfig | None = None,
    faults: FaultPlan | Mapping[str, str] | None = None,
    *,
    clock: Clock | None = None,
) -> GaugeServer:
    """Start a simulated gauge on ``host:port`` (port 0: any free port, see ``.port``)."""
    server = GaugeServer(TlsGaugeSimulator(config, faults, clock=clock))
    await server.start(host, port)
    return server


# --------------------------------------------------------------------------- pty


class _PtyLine:
    """The master side of a pty: non-blocking reads and buffered writes on the event loop."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader()
        self._out = bytearray()
        self._written: asyncio.Event = asyncio.Event()
        self._written.set()
        self.silent_until = 0.0
        os.set_blocking(master, False)
        self.loop.add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # EIO: no process holds the slave open just now; wait for the next writer.
            return
        if self.loop.time() < self.silent_until:
            return
        self.reader.feed_data(data)

    async def read(self) -> bytes:
        return await self.reader.read(4096)

    async def write(self, data: bytes) -> None:
        self._out += data
        self._flush()
        await self._written.wait()

    def _flush(self) -> None:
        while self._out:
            try:
                sent = os.write(self.master, self._out)
            except BlockingIOError:
                break
            except OSError:
                self._out.clear()  # nobody reads the slave: the bytes are lost, like a line
                break
            del self._out[:sent]
        if self._out:
            if self._written.is_set():
                self._written.clear()
                self.loop.add_writer(self.master, self._flush)
        else:
            if not self._written.is_set():
                self.loop.remove_writer(self.master)
            self._written.set()

    @property
    def closed(self) -> bool:
        return False

    def drop(self) -> None:
        # A serial line cannot be dropped: the console goes deaf for a moment and forgets
        # whatever it had half-read, as after a restart.
        self.silent_until = self.loop.time() + 0.2
        with contextlib.suppress(termios.error):
            termios.tcflush(self.master, termios.TCIOFLUSH)

    def close(self) -> None:
        self.loop.remove_reader(self.master)
        self.loop.remove_writer(self.master)
        self.reader.feed_eof()
        self._written.set()


class PtyGauge:
    """A simulated gauge on a pty pair; a driver opens :attr:`path` as ``serial://PATH``."""

    def __init__(self, simulator: TlsGaugeSimulator) -> None:
        self.simulator = simulator
        master, slave = os.openpty()
        # Raw mode on our side of the slave, so no echo or CR/LF translation touches the bytes
        # before the driver opens it (pyserial sets raw mode again when it does).
        tty.setraw(slave)
        self._master = master
        self._slave = slave  # kept open: the master reads EIO whenever no slave is open
        self.path = os.ttyname(slave)
        self._line: _PtyLine | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"serial://{self.path}"

    def start(self) -> None:
        self._line = _PtyLine(self._master)
        self._task = asyncio.get_running_loop().create_task(
            self.simulator.serve_line(self._line), name=f"tls-pty-{self.path}"
        )

    async def close(self) -> None:
        if self._line is not None:
            self._line.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    async def __aenter__(self) -> PtyGauge:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_pty(
    config: GaugeConfig | None = None,
    faults: FaultPlan | Mapping[str, str] | None = None,
    *,
    clock: Clock | None = None,
) -> PtyGauge:
    """Open a pty pair and serve a simulated gauge on its master side."""
    gauge = PtyGauge(TlsGaugeSimulator(config, faults, clock=clock))
    gauge.start()
    return gauge


# --------------------------------------------------------------------------- command line


def load_config(path: str | None = None, tanks: int | None = None) -> GaugeConfig:
    """The gauge configuration from a JSON file, else ``tanks`` default tanks (3)."""
    if path is not None:
        config = GaugeConfig.load(path)
        if tanks is not None and tanks != len(config.tanks):
            raise InvalidValue("give either a configuration file or a number of tanks")
        return config
    return GaugeConfig.default(tanks or 3, drift_per_minute=0.5)


async def run(
    listen: str = f"127.0.0.1:{DEFAULT_PORT}",
    fault_specs: Sequence[str] = (),
    *,
    tanks: int | None = None,
    config_path: str | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve a simulated gauge until cancelled (``forecourt simulate tls``).

    ``listen`` is ``HOST:PORT`` (TCP) or ``pty`` (a new pty pair, its path announced);
    ``fault_specs`` are ``NAME[=VALUE]`` (see :data:`FAULTS`)."""
    config = load_config(config_path, tanks)
    faults = parse_fault_specs(fault_specs)
    say = announce or (lambda text: log.info("%s", text))
    if listen == "pty":
        gauge = await open_pty(config, faults)
        say(f"TLS gauge simulator on {gauge.endpoint} ({len(config.tanks)} tanks)")
        try:
            await asyncio.Event().wait()
        finally:
            await gauge.close()
        return
    endpoint = parse_endpoint(listen)
    server = await serve(endpoint.host, endpoint.port, config, faults)
    say(f"TLS gauge simulator on {server.endpoint} ({len(config.tanks)} tanks)")
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
