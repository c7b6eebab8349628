"""DART line level (pure): frames, CRC-16/ARC, DLE escaping and a stream deframer.

The line is RS-485, 9600 baud 8O1, half duplex: the site controller (master) addresses one
pump (slave) at a time, ``ADR`` 0x50-0x6F. Every frame ends with the stop flag ``SF`` 0xFA.

- Short frames, three bytes ``ADR CTRL SF``: ``POLL`` 0x20, ``ACK`` 0xC0|tx#, ``NAK``
  0x50|tx#, ``EOT`` 0x70|tx#, ``ACKPOLL`` 0xE0|tx#.
- Data frames ``ADR CTRL data… CRC-1 CRC-2 ETX SF`` with ``CTRL`` = ``DATA`` 0x30|tx# and the
  data one or more application transactions ``TRANS LNG …`` (see :mod:`.application`).

The CRC is **CRC-16/ARC** (reflected polynomial 0xA001, initial value 0, no final XOR) over
``ADR`` through the last data byte, sent low byte first. The vendor text calls it "CCITT", but
only ARC matches real traffic: 2098 of 2098 captured data frames in
``moduslightstech-lgtm/intelipump:docs/protocol-notes/capture-validation-report.md`` (the
tests prove it on captured frames and show the CCITT variants failing on them).

Escaping: an ``SF`` byte inside the data or the CRC is sent as ``DLE SF`` (DLE = 0x10). A
``DLE`` on its own is sent as is (the captures hold hundreds of literal 0x10 bytes not followed
by 0xFA), so the receiver turns ``DLE SF`` back into ``SF`` and keeps every other byte. This is
unambiguous: the byte before the closing ``SF`` is always ``ETX`` or a ``CTRL``, never a DLE.

The transaction number ``tx#`` (0-15) is kept by each side for the data frames it sends; an
``ACK``/``NAK`` carries the number of the data frame it answers. Pumps answer ``EOT`` with
number 0 in all the captured traffic.

Every failure to read a frame raises :class:`DartMalformed` (code ``dart.malformed``) with a
stable ``reason``; nothing else is ever raised for any input bytes.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from forecourt.kernel.errors import ForecourtError

ETX = 0x03
DLE = 0x10
SF = 0xFA
ADDRESS_MIN = 0x50
ADDRESS_MAX = 0x6F

#: Longest frame accepted on the wire (escaped bytes, ``ADR`` to ``SF``). A pump's data frame
#: holds a few transactions (the longest, DC7, carries 50 bytes); nothing real comes near.
MAX_FRAME_BYTES = 512
#: Longest data (unescaped transactions) we put into one frame.
MAX_DATA_BYTES = 250

# Stable reasons of DartMalformed (also the keys FrameRefused events and health counters use).
BAD_CRC = "bad_crc"
TRUNCATED = "truncated"
BAD_ADDRESS = "bad_address"
BAD_CONTROL = "bad_control"
OVERSIZED = "oversized"
BAD_LENGTH = "bad_length"
BAD_ETX = "bad_etx"
BAD_ESCAPE = "bad_escape"
GARBAGE = "garbage"
BAD_BCD = "bad_bcd"
BAD_VALUE = "bad_value"
BAD_HEX = "bad_hex"


class DartMalformed(ForecourtError):
    """Bytes that are not a well-formed DART frame or transaction; ``reason`` says why."""

    code = "dart.malformed"
    http_status = 400

    def __init__(self, reason: str, message: str, *, frame: bytes = b"") -> None:
        super().__init__(message, reason=reason, frame_hex=frame.hex())
        self.reason = reason
        self.frame = bytes(frame)


class FrameKind(enum.StrEnum):
    POLL = "poll"
    DATA = "data"
    ACK = "ack"
    NAK = "nak"
    EOT = "eot"
    ACKPOLL = "ackpoll"


_CONTROL_BASE: dict[FrameKind, int] = {
    FrameKind.POLL: 0x20,
    FrameKind.DATA: 0x30,
    FrameKind.NAK: 0x50,
    FrameKind.EOT: 0x70,
    FrameKind.ACK: 0xC0,
    FrameKind.ACKPOLL: 0xE0,
}
_KIND_BY_HIGH_NIBBLE: dict[int, FrameKind] = {base: kind for kind, base in _CONTROL_BASE.items()}


def control_byte(kind: FrameKind, tx: int = 0) -> int:
    """The ``CTRL`` byte of a frame kind and transaction number (``POLL`` has none)."""
    if not 0 <= tx <= 0x0F or (kind is FrameKind.POLL and tx):
        raise ValueError(f"transaction number {tx} out of range for {kind.value}")
    return _CONTROL_BASE[kind] | tx


def parse_control(value: int) -> tuple[FrameKind, int]:
    """``CTRL`` byte -> (kind, tx#); :class:`DartMalformed` (``bad_control``) if unknown."""
    kind = _KIND_BY_HIGH_NIBBLE.get(value & 0xF0)
    if kind is None or (kind is FrameKind.POLL and value & 0x0F):
        raise DartMalformed(BAD_CONTROL, f"control byte 0x{value:02X} is not a DART control")
    return kind, value & 0x0F


# --------------------------------------------------------------------------- CRC


def _arc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_ARC_TABLE = _arc_table()


def crc16_arc(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/ARC: reflected polynomial 0xA001 (0x8005 reversed), init 0, no final XOR."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _ARC_TABLE[(crc ^ byte) & 0xFF]
    return crc


# --------------------------------------------------------------------------- escaping


def escape(data: bytes | bytearray) -> bytes:
    """Precede every ``SF`` with ``DLE`` (a lone DLE stays as it is)."""
    return bytes(data).replace(bytes((SF,)), bytes((DLE, SF)))


def unescape(data: bytes | bytearray) -> bytes:
    """``DLE SF`` -> ``SF``; an ``SF`` not preceded by ``DLE`` is refused (``bad_escape``)."""
    out = bytearray()
    index = 0
    size = len(data)
    while index < size:
        byte = data[index]
        if byte == DLE and index + 1 < size and data[index + 1] == SF:
            out.append(SF)
            index += 2
            continue
        if byte == SF:
            raise DartMalformed(BAD_ESCAPE, f"unescaped stop flag at byte {index} inside a frame")
        out.append(byte)
        index += 1
    return bytes(out)


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One DART frame; ``data`` is the unescaped transactions of a data frame (else empty)."""

    address: int
    kind: FrameKind
    tx: int = 0
    data: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not ADDRESS_MIN <= self.address <= ADDRESS_MAX:
            raise ValueError(f"DART address 0x{self.address:02X} outside 0x50-0x6F")
        control_byte(self.kind, self.tx)  # validates tx#
        if self.kind is FrameKind.DATA:
            if not self.data:
                raise ValueError("a data frame carries at least one transaction")
            if len(self.data) > MAX_DATA_BYTES:
                raise ValueError(f"data frame longer than {MAX_DATA_BYTES} bytes")
        elif self.data:
            raise ValueError(f"a {self.kind.value} frame carries no data")

    @property
    def control(self) -> int:
        return control_byte(self.kind, self.tx)

    def crc(self) -> int:
        """The CRC of a data frame (over ``ADR CTRL data``)."""
        return crc16_arc(bytes((self.address, self.control)) + self.data)

    def encode(self) -> bytes:
        head = bytes((self.address, self.control))
        if self.kind is not FrameKind.DATA:
            return head + bytes((SF,))
        crc = crc16_arc(head + self.data)
        body = escape(self.data + bytes((crc & 0xFF, crc >> 8)))
        return head + body + bytes((ETX, SF))


def poll(address: int) -> Frame:
    return Frame(address, FrameKind.POLL)


def ack(address: int, tx: int) -> Frame:
    return Frame(address, FrameKind.ACK, tx)


def nak(address: int, tx: int) -> Frame:
    return Frame(address, FrameKind.NAK, tx)


def eot(address: int, tx: int = 0) -> Frame:
    return Frame(address, FrameKind.EOT, tx)


def ackpoll(address: int, tx: int) -> Frame:
    return Frame(address, FrameKind.ACKPOLL, tx)


def data_frame(address: int, tx: int, data: bytes) -> Frame:
    return Frame(address, FrameKind.DATA, tx, bytes(data))


def next_tx(tx: int, *, wrap_to: int = 0) -> int:
    """The transaction number after ``tx``: +1, and from 0xF back to ``wrap_to`` (0 or 1;
    both are seen in captured traffic, so a receiver accepts either)."""
    return wrap_to if tx >= 0x0F else tx + 1


def decode_frame(wire: bytes | bytearray) -> Frame:
    """One complete wire frame (``ADR`` to ``SF``) -> :class:`Frame`, or :class:`DartMalformed`."""
    wire = bytes(wire)
    if len(wire) > MAX_FRAME_BYTES:
        raise DartMalformed(OVERSIZED, f"frame of {len(wire)} bytes is oversized", frame=wire)
    if len(wire) < 3 or wire[-1] != SF:
        raise DartMalformed(TRUNCATED, f"frame of {len(wire)} bytes has no stop flag", frame=wire)
    address = wire[0]
    if not ADDRESS_MIN <= address <= ADDRESS_MAX:
        raise DartMalformed(BAD_ADDRESS, f"address 0x{address:02X} outside 0x50-0x6F", frame=wire)
    try:
        kind, tx = parse_control(wire[1])
    except DartMalformed as exc:
        raise DartMalformed(exc.reason, exc.message, frame=wire) from None
    if kind is not FrameKind.DATA:
        if len(wire) != 3:
            raise DartMalformed(
                BAD_LENGTH, f"{kind.value} frame of {len(wire)} bytes (3 expected)", frame=wire
            )
        return Frame(address, kind, tx)
    try:
        body = unescape(wire[2:-1])
    except DartMalformed as exc:
        raise DartMalformed(exc.reason, exc.message, frame=wire) from None
    if len(body) < 4:  # at least one data byte, CRC-1, CRC-2, ETX
        raise DartMalformed(TRUNCATED, "data frame too short for data, CRC and ETX", frame=wire)
    if body[-1] != ETX:
        raise DartMalformed(BAD_ETX, f"data frame ends 0x{body[-1]:02X}, not ETX", frame=wire)
    data = body[:-3]
    if len(data) > MAX_DATA_BYTES:
        raise DartMalformed(OVERSIZED, f"data of {len(data)} bytes is oversized", frame=wire)
    received = body[-3] | body[-2] << 8
    computed = crc16_arc(wire[:2] + data)
    if received != computed:
        raise DartMalformed(
            BAD_CRC, f"bad CRC: 0x{received:04X} received, 0x{computed:04X} computed", frame=wire
        )
    return Frame(address, kind, tx, data)


# --------------------------------------------------------------------------- deframer

DeframedItem = Frame | DartMalformed


class Deframer:
    """Cuts a byte stream (chunks of any size) into frames.

    :meth:`feed` returns, in stream order, each decoded :class:`Frame` and each refusal as a
    :class:`DartMalformed` (not raised). Bytes before a frame that is valid on its own are
    refused as ``garbage``; a run of bytes with no stop flag longer than ``max_frame`` is
    refused as ``oversized`` and skipped up to the next stop flag. ``refused`` counts the
    refusals by reason.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self.refused: collections.Counter[str] = collections.Counter()
        self._buffer = bytearray()
        self._skipping = False  # inside an oversized run: drop up to the next stop flag
        self._last = -1  # the byte before the buffer (a DLE there escapes an SF at its start)

    @property
    def pending(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buffer)

    def reset(self) -> None:
        self._buffer.clear()
        self._skipping = False
        self._last = -1

    def feed(self, chunk: bytes | bytearray) -> list[DeframedItem]:
        items: list[DeframedItem] = []
        for byte in chunk:
            escaped = (self._buffer[-1] if self._buffer else self._last) == DLE
            if self._skipping:
                self._last = byte
                if byte == SF and not escaped:
                    self._skipping = False
                    self._last = -1
                continue
            self._buffer.append(byte)
            if byte == SF and not escaped:
                candidate = bytes(self._buffer)
                self._buffer.clear()
                self._last = -1
                items.extend(self._candidate(candidate))
            elif len(self._buffer) >= self.max_frame:  # with its stop flag it would be longer
                self._refuse(
                    items,
                    DartMalformed(
                        OVERSIZED,
                        f"a frame longer than {self.max_frame} bytes (no stop flag in time)",
                        frame=bytes(self._buffer[:64]),
                    ),
                )
                self._last = self._buffer[-1]
                self._buffer.clear()
                self._skipping = True
        return items

    def _refuse(self, items: list[DeframedItem], error: DartMalformed) -> None:
        self.refused[error.reason] += 1
        items.append(error)

    def _candidate(self, candidate: bytes) -> Iterable[DeframedItem]:
        items: list[DeframedItem] = []
        try:
            items.append(decode_frame(candidate))
            return items
        except DartMalformed as first:
            error = first
        start = _frame_start(candidate)
        if start is None:
            if not ADDRESS_MIN <= candidate[0] <= ADDRESS_MAX:
                error = DartMalformed(
                    GARBAGE, f"{len(candidate)} bytes that are no frame", frame=candidate
                )
            self._refuse(items, error)
            return items
        self._refuse(
            items,
            DartMalformed(GARBAGE, f"{start} bytes before a frame", frame=candidate[:start]),
        )
        items.append(decode_frame(candidate[start:]))
        return items


def _frame_start(candidate: bytes) -> int | None:
    """The first offset > 0 at which the rest of ``candidate`` is a valid frame, if any."""
    size = len(candidate)
    for start in range(1, size - 2):
        if not ADDRESS_MIN <= candidate[start] <= ADDRESS_MAX:
            continue
        control = candidate[start + 1]
        # A short frame is exactly three bytes; a data frame needs a DATA control byte.
        if start != size - 3 and control & 0xF0 != 0x30:
            continue
        try:
            decode_frame(candidate[start:])
        except DartMalformed:
            continue
        return start
    return None
