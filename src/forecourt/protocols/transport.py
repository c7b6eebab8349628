"""Byte-stream transports for line protocols: TCP and serial (a real port or a pty in tests).

``tcp://HOST:PORT`` opens a TCP connection (a serial-to-Ethernet converter, a TLS gauge on
port 10001, a simulator). ``serial:///dev/ttyUSB0?baudrate=9600&parity=O&bytesize=8&
stopbits=1`` opens a serial port with pyserial's asyncio transport (DART is 9600 8O1 by
default; a pty pair stands in for the port in tests). Every open has a deadline.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.model import DriverUnavailable

_PARITY = {"N": "N", "E": "E", "O": "O", "M": "M", "S": "S"}


class TransportError(InvalidValue):
    code = "protocols.transport"


@dataclass(frozen=True)
class Endpoint:
    """A parsed transport address."""

    scheme: str  # "tcp" or "serial"
    host: str = ""
    port: int = 0
    path: str = ""
    baudrate: int = 9600
    parity: str = "N"
    bytesize: int = 8
    stopbits: float = 1

    def __str__(self) -> str:
        if self.scheme == "tcp":
            return f"tcp://{self.host}:{self.port}"
        return f"serial://{self.path}?baudrate={self.baudrate}&parity={self.parity}"


def parse_endpoint(
    text: str, *, baudrate: int = 9600, parity: str = "N", bytesize: int = 8, stopbits: float = 1
) -> Endpoint:
    """Parse ``tcp://HOST:PORT``, ``HOST:PORT`` or ``serial://PATH?…``; the keywords are the
    protocol's serial defaults, overridden by the query."""
    if "://" not in text:
        text = f"tcp://{text}"
    parts = urlsplit(text)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise TransportError(f"bad port in {text!r}", hint="tcp://HOST:PORT") from exc
        if not parts.hostname or port is None:
            raise TransportError(f"no host or port in {text!r}", hint="tcp://HOST:PORT")
        return Endpoint("tcp", host=parts.hostname, port=port)
    if parts.scheme == "serial":
        path = parts.path or parts.netloc
        if not path:
            raise TransportError(f"no device path in {text!r}", hint="serial:///dev/ttyUSB0")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            baud = int(query.get("baudrate", baudrate))
            size = int(query.get("bytesize", bytesize))
            stop = float(query.get("stopbits", stopbits))
        except ValueError as exc:
            raise TransportError(f"bad serial setting in {text!r}") from exc
        par = query.get("parity", parity).upper()
        if par not in _PARITY or size not in (5, 6, 7, 8) or stop not in (1, 1.5, 2):
            raise TransportError(
                f"bad serial setting in {text!r}", hint="parity N|E|O, bytesize 5-8, stopbits 1|2"
            )
        return Endpoint(
            "serial", path=path, baudrate=baud, parity=par, bytesize=size, stopbits=stop
        )
    raise TransportError(
        f"unknown transport {parts.scheme!r} in {text!r}", hint="tcp://HOST:PORT or serial://PATH"
    )


async def open_stream(
    endpoint: Endpoint, *, timeout_s: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open the byte stream; :class:`DriverUnavailable` when it cannot be opened in time."""
    try:
        if endpoint.scheme == "tcp":
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port), timeout_s
            )
            sock = writer.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return reader, writer
        import serial_asyncio_fast

        return await asyncio.wait_for(
            serial_asyncio_fast.open_serial_connection(
                url=endpoint.path,
                baudrate=endpoint.baudrate,
                parity=endpoint.parity,
                bytesize=endpoint.bytesize,
                stopbits=endpoint.stopbits,
            ),
            timeout_s,
        )
    except (OSError, TimeoutError) as exc:
        raise DriverUnavailable(f"cannot open {endpoint}: {exc or type(exc).__name__}") from exc
    except Exception as exc:  # pyserial raises SerialException (an OSError subclass mostly)
        raise DriverUnavailable(f"cannot open {endpoint}: {exc}") from exc
