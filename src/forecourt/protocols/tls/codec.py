"""Veeder-Root TLS-3xx/4xx computer-format codec: requests, replies, checksum, floats, framing.

Everything here is pure (bytes in, messages out); the driver and the simulator both use it, so
what one writes the other reads with the same rules. Sources: the Serial Interface Manuals
576013-635 rev U (TLS-300/350, "the 3xx manual") and 577013-950 rev T (TLS4/TLS-450).

Wire format (3xx manual §5, §6.1):

- A request is ``SOH`` (0x01), an optional six-character RS-232 security code, then a
  six-character function code: a format letter (``i`` computer, ``I`` display, ``s``/``S``
  setup), a three-character function (``201``, ``20C``) and a two-digit device number (``00``
  = all tanks). Requests have no terminator; a trailing CR/LF is tolerated.
- A computer-format reply is ``SOH`` + the echoed function code + data + ``&&`` + four hex
  digits + ``ETX`` (0x03). The checksum is the 16-bit two's complement of the byte sum from
  ``SOH`` through ``&&``: ``(sum + checksum) & 0xFFFF == 0``.
- A function code the gauge does not know is answered ``SOH 9999FF1B ETX`` (``FF1B`` is the
  checksum of ``SOH 9999``); it decodes to :class:`UnknownCommandReply`.
- Data fields: ``YYMMDDHHmm`` gauge wall-clock time (years 2000-2099), decimal and hex
  counts, and ``FFFFFFFF``: eight hex digits of a big-endian IEEE-754 single (§6.3; manual
  examples ``3F800000`` = 1.0, ``B8D1B717`` = -0.0001, ``C2C7FAE1`` = -99.99, ``461C4000`` =
  10000). Hex digits are read in either letter case. An inactive device's numbers are filled
  with ``?`` (§7); a float of eight ``?`` reads as "no data" (``None``).

Replies decoded field by field: ``i101`` system status, ``i201`` inventory, ``i202`` delivery
report, ``i20C`` most recent delivery, ``i205`` in-tank status (alarms). Any other
computer-format reply with a good checksum decodes to :class:`RawReply` (its data as text).
Display-format replies carry no checksum and are refused.

Units: the gauge reports in the units it was set up with (litres or gallons, millimetres or
inches, °C or °F) and does not say which. Conversions to our integers (ml, µm, m°C) take the
units as parameters and round the exact value of the float half-even: gauge floats are
measurements, and rounding a measurement to a micrometre or a millilitre loses nothing real,
so no ``FLAG_INEXACT`` is set; the float's hex is always kept in ``raw``. A NaN or infinite
float becomes ``None`` with :data:`FLAG_NON_FINITE` (and its hex in ``raw``), so one bad probe
does not hide the other tanks.

Every failure raises :class:`TlsMalformed` (code ``tls.malformed``) with a stable ``reason``
(see :data:`REASONS`) and a one-line message.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from forecourt.kernel.errors import ForecourtError
from forecourt.protocols.model import (
    DeviceAlarm,
    LengthUnit,
    TankDelivery,
    TankMeasurement,
    TemperatureUnit,
    VolumeUnit,
)

SOH = 0x01
ETX = 0x03
CHECKSUM_TAG = b"&&"
#: The reply to a function code the gauge does not know (3xx manual §5).
UNKNOWN_COMMAND_FRAME = b"\x019999FF1B\x03"
#: The largest frame the reader accepts. A real i21B reply runs to 13,902 bytes (the capture in
#: tests); a full i202 of a 16-tank gauge with ten deliveries each is about 17 KB.
DEFAULT_MAX_FRAME = 64 * 1024
NO_DATA = "????????"
#: A flag on a measurement or delivery whose float was NaN or infinite (its hex is in ``raw``).
FLAG_NON_FINITE = "non_finite_device_value"

#: Stable ``reason`` values of :class:`TlsMalformed`.
REASONS = frozenset(
    {
        "bad_frame",  # not SOH ... ETX, or a display-format reply (no && checksum)
        "bad_checksum",  # the checksum does not match, or is not four hex digits
        "truncated",  # the frame or a record ends early
        "oversized",  # longer than the reader's maximum frame size
        "bad_float",  # a float field that is not eight hex digits
        "bad_field",  # any other field out of shape (date, count, code, character)
        "unknown_command",  # a request for a function this codec does not answer
        "unexpected_reply",  # a reply that does not answer the request sent
    }
)


class TlsMalformed(ForecourtError):
    """Bytes that are not a well-formed TLS computer-format message."""

    code = "tls.malformed"
    http_status = 400

    def __init__(self, reason: str, message: str, **details: Any) -> None:
        super().__init__(message, reason=reason, **details)
        self.reason = reason


# --------------------------------------------------------------------------- values


def checksum(data: bytes) -> int:
    """The 16-bit two's complement of the byte sum of ``data`` (SOH through ``&&``)."""
    return -sum(data) & 0xFFFF


_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_FUNCTION_CODE = re.compile(r"[A-Za-z][0-9A-Z]{3}[0-9]{2}")


def _is_hex(text: str) -> bool:
    return bool(text) and all(ord(c) in _HEX_DIGITS for c in text)


@dataclass(frozen=True, slots=True)
class GaugeFloat:
    """One 8-hex-digit float field as the gauge sent it (``NO_DATA`` for ``????????``)."""

    hex: str

    def __post_init__(self) -> None:
        if self.hex != NO_DATA and (len(self.hex) != 8 or not _is_hex(self.hex)):
            raise TlsMalformed("bad_float", f"not an 8-hex-digit float: {self.hex!r}")
        object.__setattr__(self, "hex", self.hex.upper())

    @classmethod
    def of(cls, value: float) -> GaugeFloat:
        """The single-precision float nearest ``value`` (as the gauge would store it)."""
        try:
            packed = struct.pack(">f", value)
        except OverflowError:
            packed = struct.pack(">f", float("inf") if value > 0 else float("-inf"))
        return cls(packed.hex().upper())

    @classmethod
    def no_data(cls) -> GaugeFloat:
        return cls(NO_DATA)

    @property
    def value(self) -> float | None:
        """The float's value (possibly NaN or infinite), or None for no data."""
        if self.hex == NO_DATA:
            return None
        return float(struct.unpack(">f", bytes.fromhex(self.hex))[0])

    @property
    def finite(self) -> bool:
        value = self.value
        return value is not None and value == value and value not in (_INF, -_INF)


_INF = float("inf")


@dataclass(frozen=True, slots=True, order=True)
class WallClock:
    """A gauge date-time: local wall-clock time to the minute, years 2000-2099."""

    year: int
    month: int
    day: int
    hour: int
    minute: int

    def __post_init__(self) -> None:
        if not 2000 <= self.year <= 2099:
            raise TlsMalformed("bad_field", f"gauge year {self.year} outside 2000-2099")
        try:
            datetime(self.year, self.month, self.day, self.hour, self.minute)  # noqa: DTZ001
        except ValueError:
            raise TlsMalformed("bad_field", f"not a date-time: {self.text!r}") from None

    @property
    def text(self) -> str:
        return (
            f"{self.year % 100:02d}{self.month:02d}{self.day:02d}{self.hour:02d}{self.minute:02d}"
        )

    @classmethod
    def parse(cls, text: str) -> WallClock:
        if len(text) != 10 or not text.isascii() or not text.isdigit():
            raise TlsMalformed("bad_field", f"not a YYMMDDHHmm date-time: {text!r}")
        parts = [int(text[i : i + 2]) for i in range(0, 10, 2)]
        return cls(2000 + parts[0], parts[1], parts[2], parts[3], parts[4])

    def to_datetime(self, tz: ZoneInfo) -> datetime:
        """The aware instant in ``tz``. A wall time repeated by a DST fall-back reads as its
        first occurrence (fold=0): the gauge gives nothing to tell them apart."""
        return datetime(self.year, self.month, self.day, self.hour, self.minute, tzinfo=tz)

    @classmethod
    def from_datetime(cls, instant: datetime, tz: ZoneInfo) -> WallClock:
        if instant.tzinfo is None or instant.utcoffset() is None:
            raise TlsMalformed("bad_field", f"naive datetime not allowed: {instant!r}")
        local = instant.astimezone(tz)
        return cls(local.year, local.month, local.day, local.hour, local.minute)


# --------------------------------------------------------------------------- requests

#: Computer-format functions this codec decodes, with what they report.
FUNCTIONS: Mapping[str, str] = {
    "i101": "system status report",
    "i201": "in-tank inventory report",
    "i202": "in-tank delivery report",
    "i205": "in-tank status report (active alarms)",
    "i20C": "in-tank most recent delivery report",
    "i902": "system revision level report",
}


@dataclass(frozen=True, slots=True)
class Request:
    """``SOH [security code] function TT``; ``tank`` 0 asks for every tank."""

    function: str  # "i201": format letter + three-character function
    tank: int = 0
    security_code: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.tank <= 99:
            raise TlsMalformed("bad_field", f"device number {self.tank} outside 00-99")
        if not _FUNCTION_CODE.fullmatch(f"{self.function}00"):
            raise TlsMalformed("bad_field", f"not a function code: {self.function!r}")
        if self.security_code is not None and not _printable(self.security_code, 6):
            raise TlsMalformed("bad_field", "a security code is six printable characters")

    @property
    def code(self) -> str:
        """The six-character function code the gauge echoes, e.g. ``i20100``."""
        return f"{self.function}{self.tank:02d}"

    @property
    def known(self) -> bool:
        return self.function in FUNCTIONS


def _printable(text: str, length: int) -> bool:
    return len(text) == length and all(0x20 <= ord(c) <= 0x7E for c in text)


def encode_request(request: Request) -> bytes:
    return b"\x01" + (request.security_code or "").encode("ascii") + request.code.encode("ascii")


def decode_request(frame: bytes, *, known_only: bool = False) -> Request:
    """``SOH`` + six (function code) or twelve (security code + function code) characters,
    optionally followed by CR/LF. ``known_only`` refuses a function outside
    :data:`FUNCTIONS` with reason ``unknown_command``."""
    body = bytes(frame).rstrip(b"\r\n")
    if not body.startswith(b"\x01"):
        raise TlsMalformed("bad_frame", "a request starts with SOH (0x01)")
    text = _ascii(body[1:])
    if len(text) not in (6, 12) or not _printable(text, len(text)):
        raise TlsMalformed(
            "bad_field" if len(text) > 12 else "truncated",
            f"a request is SOH + 6 or 12 printable characters, got {len(text)}",
        )
    security = text[:6] if len(text) == 12 else None
    code = text[-6:]
    if not _FUNCTION_CODE.fullmatch(code):
        raise TlsMalformed("bad_field", f"not a function code: {code!r}")
    request = Request(code[:4], int(code[4:]), security)
    if known_only and not request.known:
        raise TlsMalformed("unknown_command", f"function {request.function} is not answered")
    return request


# --------------------------------------------------------------------------- replies

TANK_STATUS_BITS: tuple[tuple[int, str], ...] = (
    (0x0001, "delivery_in_progress"),
    (0x0002, "leak_test_in_progress"),
    (0x0004, "invalid_height"),
)

INVENTORY_FIELDS = (
    "volume",
    "tc_volume",
    "ullage",
    "height",
    "water",
    "temperature",
    "water_volume",
)
DELIVERY_FIELDS = (
    "start_volume",
    "start_tc_volume",
    "start_water",
    "start_temperature",
    "end_volume",
    "end_tc_volume",
    "end_water",
    "end_temperature",
    "start_height",
    "end_height",
)

#: Tank alarm type numbers (3xx manual, i101 notes, category 02; TLS4 manual adds 31-38).
TANK_ALARMS: Mapping[str, str] = {
    "01": "setup_data_warning",
    "02": "leak",
    "03": "high_water",
    "04": "overfill",
    "05": "low_product",
    "06": "sudden_loss",
    "07": "high_product",
    "08": "invalid_fuel_level",
    "09": "probe_out",
    "10": "high_water_warning",
    "11": "delivery_needed",
    "12": "max_product",
    "13": "gross_leak_test_fail",
    "14": "periodic_leak_test_fail",
    "15": "annual_leak_test_fail",
    "16": "periodic_test_needed_warning",
    "17": "annual_test_needed_warning",
    "18": "periodic_test_needed_alarm",
    "19": "annual_test_needed_alarm",
    "20": "leak_test_active",
    "21": "no_csld_idle_time_warning",
    "22": "siphon_break_active_warning",
    "23": "csld_rate_increase_warning",
    "24": "accuchart_calibration_warning",
    "25": "hrm_reconciliation_warning",
    "26": "hrm_reconciliation_alarm",
    "27": "cold_temperature_warning",
    "28": "missing_delivery_ticket_warning",
    "29": "tank_line_gross_leak",
    "30": "delivery_density_warning",
    "31": "density_warning",
    "32": "fuel_quality_alarm",
    "33": "high_temperature_warning",
    "34": "low_temperature_warning",
    "38": "density_offset_warning",
}


def tank_alarm_name(device_code: str) -> str:
    """The standard name of a tank alarm type number (``unknown_NN`` when not listed)."""
    return TANK_ALARMS.get(device_code, f"unknown_{device_code}")


def status_names(bits: int) -> tuple[str, ...]:
    return tuple(name for bit, name in TANK_STATUS_BITS if bits & bit)


def _pick(fields: tuple[GaugeFloat, ...], index: int) -> GaugeFloat | None:
    return fields[index] if index < len(fields) else None


@dataclass(frozen=True, slots=True)
class TankInventory:
    """One tank of an i201 reply: ``TT p ssss NN`` + NN floats (all kept, even past 7)."""

    tank: int
    product: str
    status: int
    fields: tuple[GaugeFloat, ...]

    def field(self, name: str) -> GaugeFloat | None:
        """A named float (see :data:`INVENTORY_FIELDS`); None when the gauge sent fewer."""
        return _pick(self.fields, INVENTORY_FIELDS.index(name))

    @property
    def status_names(self) -> tuple[str, ...]:
        return status_names(self.status)


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery of an i202/i20C reply: start and end time, then NN floats."""

    started: WallClock
    ended: WallClock
    fields: tuple[GaugeFloat, ...]

    def field(self, name: str) -> GaugeFloat | None:
        return _pick(self.fields, DELIVERY_FIELDS.index(name))


@dataclass(frozen=True, slots=True)
class TankDeliveries:
    tank: int
    product: str
    deliveries: tuple[DeliveryRecord, ...]


@dataclass(frozen=True, slots=True)
class TankAlarms:
    """One tank of an i205 reply: the alarm type numbers active for it."""

    tank: int
    codes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SystemAlarm:
    """One ``AANNTT`` of an i101 reply: category, type number, device number."""

    category: str
    type: str
    device: int


@dataclass(frozen=True, slots=True)
class InventoryReply:
    code: str  # "i20100"
    at: WallClock
    tanks: tuple[TankInventory, ...]


@dataclass(frozen=True, slots=True)
class DeliveryReply:
    code: str  # "i20200" or "i20C00"
    at: WallClock
    tanks: tuple[TankDeliveries, ...]


@dataclass(frozen=True, slots=True)
class TankStatusReply:
    code: str  # "i20500"
    at: WallClock
    tanks: tuple[TankAlarms, ...]


@dataclass(frozen=True, slots=True)
class SystemStatusReply:
    code: str  # "i10100"
    at: WallClock
    alarms: tuple[SystemAlarm, ...]


@dataclass(frozen=True, slots=True)
class RawReply:
    """A checksummed computer-format reply this codec does not decode field by field."""

    code: str
    data: str  # everything between the function code and ``&&``


@dataclass(frozen=True, slots=True)
class UnknownCommandReply:
    """``SOH 9999FF1B ETX``: the gauge did not understand the function code."""

    code: str = field(default="9999", init=False)


Reply = (
    InventoryReply
    | DeliveryReply
    | TankStatusReply
    | SystemStatusReply
    | RawReply
    | UnknownCommandReply
)


def _ascii(data: bytes) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise TlsMalformed("bad_field", "a TLS message is 7-bit ASCII") from None


class _Cursor:
    """Reads fixed-width fields off a reply's data, naming each in its errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.text)

    def take(self, width: int, what: str) -> str:
        end = self.pos + width
        if end > len(self.text):
            raise TlsMalformed(
                "truncated", f"data ends inside {what} at offset {self.pos}", field=what
            )
        chunk = self.text[self.pos : end]
        self.pos = end
        return chunk

    def decimal(self, width: int, what: str) -> int:
        chunk = self.take(width, what)
        if not chunk.isascii() or not chunk.isdigit():
            raise TlsMalformed("bad_field", f"{what} is not decimal: {chunk!r}", field=what)
        return int(chunk)

    def hexadecimal(self, width: int, what: str) -> int:
        chunk = self.take(width, what)
        if not _is_hex(chunk):
            raise TlsMalformed("bad_field", f"{what} is not hex: {chunk!r}", field=what)
        return int(chunk, 16)

    def character(self, what: str) -> str:
        chunk = self.take(1, what)
        if not 0x20 <= ord(chunk) <= 0x7E:
            raise TlsMalformed("bad_field", f"{what} is not printable: {chunk!r}", field=what)
        return chunk

    def gauge_float(self, what: str) -> GaugeFloat:
        chunk = self.take(8, what)
        if chunk != NO_DATA and not _is_hex(chunk):
            raise TlsMalformed("bad_float", f"{what} is not an 8-hex-digit float: {chunk!r}")
        return GaugeFloat(chunk)

    def floats(self, count: int, what: str) -> tuple[GaugeFloat, ...]:
        return tuple(self.gauge_float(f"{what} float {i + 1}") for i in range(count))

    def wall_clock(self, what: str) -> WallClock:
        chunk = self.take(10, what)
        try:
            return WallClock.parse(chunk)
        except TlsMalformed as exc:
            raise TlsMalformed("bad_field", f"{what}: {exc.message}", field=what) from None


def split_frame(frame: bytes) -> tuple[str, str]:
    """Check a reply frame's envelope and checksum; return (function code, data text)."""
    frame = bytes(frame)
    if len(frame) < 2 or frame[0] != SOH:
        raise TlsMalformed("bad_frame", "a reply starts with SOH (0x01)")
    if frame[-1] != ETX:
        raise TlsMalformed("truncated", "a reply ends with ETX (0x03)")
    inner = frame[1:-1]
    if SOH in inner or ETX in inner:
        raise TlsMalformed("bad_frame", "SOH or ETX inside a reply")
    if len(frame) < 7 or frame[-7:-5] != CHECKSUM_TAG:
        if inner.upper() == UNKNOWN_COMMAND_FRAME[1:-1]:
            return "9999", ""
        raise TlsMalformed("bad_frame", "no && checksum tag (a display-format reply?)")
    sent_text = frame[-5:-1].decode("ascii", "replace")
    if not _is_hex(sent_text):
        raise TlsMalformed("bad_checksum", f"checksum is not four hex digits: {sent_text!r}")
    covered = frame[:-5]
    expected = checksum(covered)
    if int(sent_text, 16) != expected:
        raise TlsMalformed(
            "bad_checksum",
            f"checksum {sent_text.upper()} does not match the frame ({expected:04X})",
        )
    text = _ascii(covered[1:-2])
    if len(text) < 6:
        raise TlsMalformed("truncated", "a reply carries a six-character function code")
    code, data = text[:6], text[6:]
    if not _FUNCTION_CODE.fullmatch(code):
        raise TlsMalformed("bad_field", f"not a function code: {code!r}")
    return code, data


def decode_reply(frame: bytes) -> Reply:
    """One complete reply frame (``SOH`` ... ``ETX``) -> a reply message."""
    code, data = split_frame(frame)
    if code == "9999":
        return UnknownCommandReply()
    function = code[:4]
    decoder = _DECODERS.get(function)
    if decoder is None:
        return RawReply(code, data)
    cursor = _Cursor(data)
    return decoder(code, cursor.wall_clock("reply date-time"), cursor)


def _decode_inventory(code: str, at: WallClock, cursor: _Cursor) -> InventoryReply:
    tanks: list[TankInventory] = []
    while not cursor.done:
        tank = cursor.decimal(2, "tank number")
        product = cursor.character(f"tank {tank} product code")
        status = cursor.hexadecimal(4, f"tank {tank} status")
        count = cursor.hexadecimal(2, f"tank {tank} field count")
        tanks.append(TankInventory(tank, product, status, cursor.floats(count, f"tank {tank}")))
    return InventoryReply(code, at, tuple(tanks))


def _decode_deliveries(code: str, at: WallClock, cursor: _Cursor) -> DeliveryReply:
    tanks: list[TankDeliveries] = []
    while not cursor.done:
        tank = cursor.decimal(2, "tank number")
        product = cursor.character(f"tank {tank} product code")
        count = cursor.decimal(2, f"tank {tank} delivery count")
        records: list[DeliveryRecord] = []
        for index in range(count):
            what = f"tank {tank} delivery {index + 1}"
            started = cursor.wall_clock(f"{what} start")
            ended = cursor.wall_clock(f"{what} end")
            fields = cursor.floats(cursor.hexadecimal(2, f"{what} field count"), what)
            records.append(DeliveryRecord(started, ended, fields))
        tanks.append(TankDeliveries(tank, product, tuple(records)))
    return DeliveryReply(code, at, tuple(tanks))


def _decode_tank_status(code: str, at: WallClock, cursor: _Cursor) -> TankStatusReply:
    tanks: list[TankAlarms] = []
    while not cursor.done:
        tank = cursor.decimal(2, "tank number")
        count = cursor.hexadecimal(2, f"tank {tank} alarm count")
        codes = tuple(f"{cursor.decimal(2, f'tank {tank} alarm type'):02d}" for _ in range(count))
        tanks.append(TankAlarms(tank, codes))
    return TankStatusReply(code, at, tuple(tanks))


def _decode_system_status(code: str, at: WallClock, cursor: _Cursor) -> SystemStatusReply:
    alarms: list[SystemAlarm] = []
    while not cursor.done:
        category = f"{cursor.decimal(2, 'alarm category'):02d}"
        kind = f"{cursor.decimal(2, 'alarm type'):02d}"
        alarms.append(SystemAlarm(category, kind, cursor.decimal(2, "alarm device number")))
    return SystemStatusReply(code, at, tuple(alarms))


_DECODERS: dict[str, Callable[[str, WallClock, _Cursor], Reply]] = {
    "i101": _decode_system_status,
    "i201": _decode_inventory,
    "i202": _decode_deliveries,
    "i20C": _decode_deliveries,
    "i205": _decode_tank_status,
}


def _float_text(value: GaugeFloat, lowercase: bool) -> str:
    return value.hex.lower() if lowercase else value.hex


def _count(value: int, width: int, what: str, *, hexadecimal: bool) -> str:
    limit = 16**width if hexadecimal else 10**width
    if not 0 <= value < limit:
        raise TlsMalformed("bad_field", f"{what} {value} does not fit {width} digits")
    return f"{value:0{width}X}" if hexadecimal else f"{value:0{width}d}"


def _tank_number(value: int) -> str:
    return _count(value, 2, "tank number", hexadecimal=False)


def _product(value: str) -> str:
    if not _printable(value, 1):
        raise TlsMalformed("bad_field", f"a product code is one printable character: {value!r}")
    return value


def _reply_data(reply: Reply, lowercase: bool) -> str:
    parts: list[str] = []
    if isinstance(reply, InventoryReply):
        parts.append(reply.at.text)
        for tank in reply.tanks:
            parts += [
                _tank_number(tank.tank),
                _product(tank.product),
                _count(tank.status, 4, "status", hexadecimal=True),
                _count(len(tank.fields), 2, "field count", hexadecimal=True),
            ]
            parts += [_float_text(f, lowercase) for f in tank.fields]
    elif isinstance(reply, DeliveryReply):
        parts.append(reply.at.text)
        for tank_deliveries in reply.tanks:
            parts += [
                _tank_number(tank_deliveries.tank),
                _product(tank_deliveries.product),
                _count(len(tank_deliveries.deliveries), 2, "delivery count", hexadecimal=False),
            ]
            for record in tank_deliveries.deliveries:
                parts += [record.started.text, record.ended.text]
                parts.append(_count(len(record.fields), 2, "field count", hexadecimal=True))
                parts += [_float_text(f, lowercase) for f in record.fields]
    elif isinstance(reply, TankStatusReply):
        parts.append(reply.at.text)
        for tank_alarms in reply.tanks:
            parts.append(_tank_number(tank_alarms.tank))
            parts.append(_count(len(tank_alarms.codes), 2, "alarm count", hexadecimal=True))
            for alarm_code in tank_alarms.codes:
                if len(alarm_code) != 2 or not alarm_code.isdigit():
                    raise TlsMalformed("bad_field", f"alarm type {alarm_code!r} is two digits")
                parts.append(alarm_code)
    elif isinstance(reply, SystemStatusReply):
        parts.append(reply.at.text)
        for alarm in reply.alarms:
            for two in (alarm.category, alarm.type):
                if len(two) != 2 or not two.isdigit():
                    raise TlsMalformed("bad_field", f"alarm field {two!r} is two digits")
            parts += [alarm.category, alarm.type, _tank_number(alarm.device)]
    elif isinstance(reply, RawReply):
        if any(not 0x20 <= ord(c) <= 0x7E for c in reply.data):
            raise TlsMalformed("bad_field", "reply data is printable ASCII")
        parts.append(reply.data)
    return "".join(parts)


def encode_reply(reply: Reply, *, lowercase: bool = False) -> bytes:
    """A reply frame; ``lowercase`` writes hex digits of floats and checksum in lower case."""
    if isinstance(reply, UnknownCommandReply):
        return UNKNOWN_COMMAND_FRAME
    if not _FUNCTION_CODE.fullmatch(reply.code):
        raise TlsMalformed("bad_field", f"not a function code: {reply.code!r}")
    covered = b"\x01" + (reply.code + _reply_data(reply, lowercase)).encode("ascii") + b"&&"
    text = f"{checksum(covered):04X}"
    return covered + (text.lower() if lowercase else text).encode("ascii") + b"\x03"


def software_revision(reply: RawReply) -> str | None:
    """The ``SOFTWARE# nnnnnn-vvv-rrr`` text of an i902 reply (3xx manual §7.4.1)."""
    text = reply.data[10:]
    match = re.search(r"SOFTWARE#\s*(\S+?)(?:CREATED|$)", text)
    if match:
        return match.group(1).strip()
    return text.strip() or None


# --------------------------------------------------------------------------- framing

_IDLE_BYTES = frozenset(b"\r\n\x00")


class FrameReader:
    """Reassembles reply frames (``SOH`` ... ``ETX``) from arbitrary chunks of a byte stream.

    :meth:`feed` returns the frames completed by a chunk, in order, and a :class:`TlsMalformed`
    in their place for a frame cut short by a new ``SOH`` (``truncated``) or longer than
    ``max_frame`` (``oversized``; the reader then skips to the next ``SOH``). Bytes outside a
    frame are skipped: CR, LF and NUL silently (line filler), anything else counted in
    :attr:`garbage_bytes`.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 8:
            raise ValueError("max_frame must allow at least an 8-byte frame")
        self.max_frame = max_frame
        self.garbage_bytes = 0
        self._frame = bytearray()
        self._in_frame = False
        self._skipping = False  # inside an oversized frame: drop up to the next SOH

    @property
    def pending(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._frame)

    def reset(self) -> None:
        self._frame.clear()
        self._in_frame = False
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | TlsMalformed]:
        out: list[bytes | TlsMalformed] = []
        view = bytes(data)
        pos = 0
        while pos < len(view):
            if not self._in_frame:
                start = view.find(b"\x01", pos)
                end = len(view) if start < 0 else start
                if not self._skipping:
                    self.garbage_bytes += sum(1 for b in view[pos:end] if b not in _IDLE_BYTES)
                if start < 0:
                    return out
                self._skipping = False
                self._in_frame = True
                self._frame = bytearray(b"\x01")
                pos = start + 1
                continue
            next_soh = view.find(b"\x01", pos)
            next_etx = view.find(b"\x03", pos)
            if next_etx >= 0 and (next_soh < 0 or next_etx < next_soh):
                self._frame += view[pos : next_etx + 1]
                pos = next_etx + 1
                self._in_frame = False
                if len(self._frame) > self.max_frame:
                    out.append(self._oversized())
                else:
                    out.append(bytes(self._frame))
                self._frame = bytearray()
                continue
            stop = len(view) if next_soh < 0 else next_soh
            self._frame += view[pos:stop]
            pos = stop
            if len(self._frame) > self.max_frame:
                out.append(self._oversized())
                self._in_frame = False
                self._skipping = True
                self._frame = bytearray()
                continue
            if next_soh >= 0:
                out.append(
                    TlsMalformed(
                        "truncated",
                        f"frame cut short after {len(self._frame)} bytes by a new SOH",
                        frame_hex=bytes(self._frame[:64]).hex(),
                    )
                )
                self._in_frame = False
                self._frame = bytearray()
        return out

    def _oversized(self) -> TlsMalformed:
        return TlsMalformed(
            "oversized",
            f"frame longer than {self.max_frame} bytes",
            frame_hex=bytes(self._frame[:64]).hex(),
        )


class RequestReader:
    """Splits a gauge's input stream into request frames (the simulator's side of the line).

    A request is complete after ``SOH`` + 6 characters, or 12 when the gauge expects a
    security code; a CR or LF ends one early (it then fails to decode), a new ``SOH``
    abandons an incomplete one. Bytes outside a request are counted in :attr:`garbage_bytes`.
    """

    def __init__(self, *, security_code: bool = False) -> None:
        self.length = 12 if security_code else 6
        self.garbage_bytes = 0
        self._request: bytearray | None = None

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        for byte in bytes(data):
            if byte == SOH:
                self._request = bytearray(b"\x01")
            elif self._request is None:
                if byte not in _IDLE_BYTES:
                    self.garbage_bytes += 1
            elif byte in (0x0D, 0x0A):
                out.append(bytes(self._request))
                self._request = None
            else:
                self._request.append(byte)
                if len(self._request) == self.length + 1:
                    out.append(bytes(self._request))
                    self._request = None
        return out


# --------------------------------------------------------------------------- units


@dataclass(frozen=True, slots=True)
class GaugeUnits:
    """The units a gauge was set up with; ``None`` where unknown."""

    volume: VolumeUnit | None = None
    length: LengthUnit | None = None
    temperature: TemperatureUnit | None = None

    @property
    def known(self) -> bool:
        return None not in (self.volume, self.length, self.temperature)


METRIC = GaugeUnits(VolumeUnit.LITRES, LengthUnit.MILLIMETRES, TemperatureUnit.CELSIUS)

_ML_PER_UNIT = {
    VolumeUnit.LITRES: Fraction(1000),
    VolumeUnit.US_GALLONS: Fraction("3785.411784"),  # 231 cubic inches, exactly
    VolumeUnit.IMPERIAL_GALLONS: Fraction("4546.09"),
}
_UM_PER_UNIT = {LengthUnit.MILLIMETRES: Fraction(1000), LengthUnit.INCHES: Fraction(25400)}


def _scaled(value: GaugeFloat | None, convert: Any) -> int | None:
    if value is None or not value.finite:
        return None
    number = value.value
    assert number is not None  # finite above
    result: int = round(convert(Fraction(number)))  # Fraction rounds half to even
    return result


def to_ml(value: GaugeFloat | None, unit: VolumeUnit) -> int | None:
    return _scaled(value, lambda v: v * _ML_PER_UNIT[unit])


def to_um(value: GaugeFloat | None, unit: LengthUnit) -> int | None:
    return _scaled(value, lambda v: v * _UM_PER_UNIT[unit])


def to_mdegc(value: GaugeFloat | None, unit: TemperatureUnit) -> int | None:
    if unit is TemperatureUnit.CELSIUS:
        return _scaled(value, lambda v: v * 1000)
    return _scaled(value, lambda v: (v - 32) * Fraction(5000, 9))


def from_ml(volume_ml: int, unit: VolumeUnit) -> GaugeFloat:
    return GaugeFloat.of(float(Fraction(volume_ml) / _ML_PER_UNIT[unit]))


def from_um(height_um: int, unit: LengthUnit) -> GaugeFloat:
    return GaugeFloat.of(float(Fraction(height_um) / _UM_PER_UNIT[unit]))


def from_mdegc(temperature_mdegc: int, unit: TemperatureUnit) -> GaugeFloat:
    celsius = Fraction(temperature_mdegc, 1000)
    if unit is TemperatureUnit.CELSIUS:
        return GaugeFloat.of(float(celsius))
    return GaugeFloat.of(float(celsius * Fraction(9, 5) + 32))


def _units(units: GaugeUnits) -> tuple[VolumeUnit, LengthUnit, TemperatureUnit]:
    if units.volume is None or units.length is None or units.temperature is None:
        raise TlsMalformed("bad_field", "converting gauge floats needs the gauge's units")
    return units.volume, units.length, units.temperature


def _raw(named: Iterable[tuple[str, GaugeFloat | None]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value.hex) for name, value in named if value is not None)


def _non_finite(values: Iterable[GaugeFloat | None]) -> tuple[str, ...]:
    bad = any(v is not None and v.value is not None and not v.finite for v in values)
    return (FLAG_NON_FINITE,) if bad else ()


def measurement_from(
    record: TankInventory, *, tank: int, measured_at: datetime, units: GaugeUnits = METRIC
) -> TankMeasurement:
    """An i201 tank record in the standard model (``tank`` is the station's number)."""
    volume, length, temperature = _units(units)
    named = [(name, record.field(name)) for name in INVENTORY_FIELDS]
    values = dict(named)
    return TankMeasurement(
        tank=tank,
        measured_at=measured_at,
        volume_ml=to_ml(values["volume"], volume),
        tc_volume_ml=to_ml(values["tc_volume"], volume),
        ullage_ml=to_ml(values["ullage"], volume),
        product_height_um=to_um(values["height"], length),
        water_height_um=to_um(values["water"], length),
        temperature_mdegc=to_mdegc(values["temperature"], temperature),
        water_volume_ml=to_ml(values["water_volume"], volume),
        product_code=record.product,
        status=record.status_names,
        flags=_non_finite(values.values()),
        raw=(("status", f"{record.status:04X}"), *_raw(named)),
    )


def delivery_from(
    record: DeliveryRecord,
    *,
    tank: int,
    product: str | None,
    tz: ZoneInfo,
    units: GaugeUnits = METRIC,
) -> TankDelivery:
    """An i202/i20C delivery in the standard model (``tank`` is the station's number)."""
    volume, length, temperature = _units(units)
    named = [(name, record.field(name)) for name in DELIVERY_FIELDS]
    v = dict(named)
    return TankDelivery(
        tank=tank,
        started_at=record.started.to_datetime(tz),
        ended_at=record.ended.to_datetime(tz),
        start_volume_ml=to_ml(v["start_volume"], volume),
        end_volume_ml=to_ml(v["end_volume"], volume),
        start_tc_volume_ml=to_ml(v["start_tc_volume"], volume),
        end_tc_volume_ml=to_ml(v["end_tc_volume"], volume),
        start_water_height_um=to_um(v["start_water"], length),
        end_water_height_um=to_um(v["end_water"], length),
        start_temperature_mdegc=to_mdegc(v["start_temperature"], temperature),
        end_temperature_mdegc=to_mdegc(v["end_temperature"], temperature),
        start_product_height_um=to_um(v["start_height"], length),
        end_product_height_um=to_um(v["end_height"], length),
        product_code=product,
        flags=_non_finite(v.values()),
        raw=_raw(named),
    )


def alarm_from(device_code: str, *, tank: int) -> DeviceAlarm:
    """One active i205 alarm type number of a tank (``tank`` is the station's number)."""
    return DeviceAlarm(
        source="tank", number=tank, code=tank_alarm_name(device_code), device_code=device_code
    )


# --------------------------------------------------------------------------- describe

_TOKENS = {
    "NUL": 0x00,
    "SOH": 0x01,
    "STX": 0x02,
    "ETX": 0x03,
    "EOT": 0x04,
    "ACK": 0x06,
    "LF": 0x0A,
    "CR": 0x0D,
    "NAK": 0x15,
    "ESC": 0x1B,
}
_ESCAPES = {"\\": 0x5C, "r": 0x0D, "n": 0x0A, "t": 0x09, "0": 0x00, "'": 0x27, '"': 0x22}
_TOKEN = re.compile(r"<([A-Za-z]{2,3})>")


def parse_text(text: str) -> bytes:
    """Operator text -> bytes: Python-style escapes (``\\x01``, ``\\r``), ``<SOH>``/``<ETX>``
    tokens, caret notation (``^A`` = 0x01, ``^C`` = 0x03) and plain ASCII."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text):
                raise TlsMalformed("bad_field", "a lone backslash ends the text")
            nxt = text[i + 1]
            if nxt == "x":
                digits = text[i + 2 : i + 4]
                if len(digits) != 2 or not _is_hex(digits):
                    raise TlsMalformed("bad_field", f"bad \\x escape at {i}: {text[i : i + 4]!r}")
                out.append(int(digits, 16))
                i += 4
                continue
            if nxt not in _ESCAPES:
                raise TlsMalformed("bad_field", f"unknown escape \\{nxt} at {i}")
            out.append(_ESCAPES[nxt])
            i += 2
            continue
        if char == "<":
            match = _TOKEN.match(text, i)
            if match and match.group(1).upper() in _TOKENS:
                out.append(_TOKENS[match.group(1).upper()])
                i = match.end()
                continue
        if char == "^" and i + 1 < len(text) and "@" <= text[i + 1].upper() <= "_":
            out.append(ord(text[i + 1].upper()) - 0x40)
            i += 2
            continue
        if ord(char) > 0x7F:
            raise TlsMalformed("bad_field", f"non-ASCII character {char!r} at {i}")
        out.append(ord(char))
        i += 1
    return bytes(out)


def _float_json(value: GaugeFloat | None) -> dict[str, Any] | None:
    if value is None:
        return None
    number = value.value
    body: dict[str, Any] = {"hex": value.hex}
    if number is None:
        body["value"] = None
        body["note"] = "no data (?)"
    elif value.finite:
        body["value"] = number
    else:
        body["value"] = None
        body["non_finite"] = repr(number)
    return body


def _units_json(units: GaugeUnits) -> Any:
    if not units.known:
        return "gauge units (unknown: pass the gauge's units to get scaled integers)"
    volume, length, temperature = _units(units)
    return {"volume": volume.value, "length": length.value, "temperature": temperature.value}


def _time_json(at: WallClock, tz: ZoneInfo | None) -> dict[str, Any]:
    body: dict[str, Any] = {"wall_clock": at.text}
    if tz is not None:
        body["at"] = at.to_datetime(tz).isoformat()
    return body


def _describe_reply(reply: Reply, units: GaugeUnits, tz: ZoneInfo | None) -> dict[str, Any]:
    if isinstance(reply, UnknownCommandReply):
        return {"kind": "unknown_command", "meaning": "the gauge did not understand the request"}
    body: dict[str, Any] = {"code": reply.code, "function": reply.code[:4]}
    if isinstance(reply, RawReply):
        body.update(kind="raw", data=reply.data)
        return body
    body["meaning"] = FUNCTIONS.get(reply.code[:4], "")
    body["tank"] = int(reply.code[4:])
    body["gauge_time"] = _time_json(reply.at, tz)
    body["units"] = _units_json(units)
    if isinstance(reply, InventoryReply):
        body["kind"] = "inventory"
        body["tanks"] = [_describe_inventory(tank, units) for tank in reply.tanks]
    elif isinstance(reply, DeliveryReply):
        body["kind"] = "deliveries"
        body["tanks"] = [
            {
                "tank": t.tank,
                "product": t.product,
                "deliveries": [_describe_delivery(d, units, tz) for d in t.deliveries],
            }
            for t in reply.tanks
        ]
    elif isinstance(reply, TankStatusReply):
        body["kind"] = "tank_status"
        body["tanks"] = [
            {
                "tank": t.tank,
                "alarms": [{"device_code": c, "code": tank_alarm_name(c)} for c in t.codes],
            }
            for t in reply.tanks
        ]
    else:
        body["kind"] = "system_status"
        body["alarms"] = [
            {
                "category": a.category,
                "type": a.type,
                "device": a.device,
                "code": tank_alarm_name(a.type) if a.category == "02" else None,
            }
            for a in reply.alarms
        ]
    return body


def _describe_inventory(tank: TankInventory, units: GaugeUnits) -> dict[str, Any]:
    body: dict[str, Any] = {
        "tank": tank.tank,
        "product": tank.product,
        "status": {"bits": f"{tank.status:04X}", "names": list(tank.status_names)},
        "fields": {name: _float_json(tank.field(name)) for name in INVENTORY_FIELDS},
    }
    if len(tank.fields) > len(INVENTORY_FIELDS):
        body["extra_fields"] = [f.hex for f in tank.fields[len(INVENTORY_FIELDS) :]]
    if units.known:
        m = measurement_from(tank, tank=tank.tank, measured_at=_EPOCH, units=units)
        body["scaled"] = {
            "volume_ml": m.volume_ml,
            "tc_volume_ml": m.tc_volume_ml,
            "ullage_ml": m.ullage_ml,
            "product_height_um": m.product_height_um,
            "water_height_um": m.water_height_um,
            "temperature_mdegc": m.temperature_mdegc,
            "water_volume_ml": m.water_volume_ml,
        }
    return body


def _describe_delivery(
    record: DeliveryRecord, units: GaugeUnits, tz: ZoneInfo | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "started": _time_json(record.started, tz),
        "ended": _time_json(record.ended, tz),
        "fields": {name: _float_json(record.field(name)) for name in DELIVERY_FIELDS},
    }
    if len(record.fields) > len(DELIVERY_FIELDS):
        body["extra_fields"] = [f.hex for f in record.fields[len(DELIVERY_FIELDS) :]]
    if units.known:
        d = delivery_from(record, tank=0, product=None, tz=tz or _UTC, units=units)
        body["scaled"] = {
            "start_volume_ml": d.start_volume_ml,
            "end_volume_ml": d.end_volume_ml,
            "delivered_ml": d.volume_ml,
            "start_tc_volume_ml": d.start_tc_volume_ml,
            "end_tc_volume_ml": d.end_tc_volume_ml,
            "start_water_height_um": d.start_water_height_um,
            "end_water_height_um": d.end_water_height_um,
            "start_temperature_mdegc": d.start_temperature_mdegc,
            "end_temperature_mdegc": d.end_temperature_mdegc,
            "start_product_height_um": d.start_product_height_um,
            "end_product_height_um": d.end_product_height_um,
        }
    return body


_UTC = ZoneInfo("UTC")
_EPOCH = datetime(2000, 1, 1, tzinfo=_UTC)


def describe(
    frame: bytes,
    direction: str | None = None,
    *,
    units: GaugeUnits | None = None,
    timezone: str | None = None,
) -> dict[str, Any]:
    """A JSON-able account of one frame in the standard model's terms; :class:`TlsMalformed`
    (its message says why in one line) when the frame does not decode.

    ``direction`` is ``"to-device"``, ``"from-device"`` or None to tell from the frame (one
    ending in ETX comes from the gauge). ``units`` default to unknown: the gauge's floats are
    shown as they are, in "gauge units"; with units, scaled integers are added. ``timezone``
    adds the gauge's wall-clock times as aware instants."""
    if direction not in (None, "to-device", "from-device"):
        raise ValueError(f"direction must be 'to-device' or 'from-device', not {direction!r}")
    frame = bytes(frame)
    if direction is None:
        direction = "from-device" if frame.rstrip(b"\r\n\x00").endswith(b"\x03") else "to-device"
    body: dict[str, Any] = {"protocol": "tls", "direction": direction, "hex": frame.hex(" ")}
    tz = ZoneInfo(timezone) if timezone else None
    if direction == "to-device":
        request = decode_request(frame)
        body.update(
            kind="request",
            code=request.code,
            function=request.function,
            tank=request.tank,
            all_tanks=request.tank == 0,
            security_code="present" if request.security_code else "absent",
            known=request.known,
            meaning=FUNCTIONS.get(request.function, "not decoded by this codec"),
        )
        return body
    reply = decode_reply(frame.rstrip(b"\r\n\x00"))
    body.update(_describe_reply(reply, units or _NONE, tz))
    return body


_NONE = GaugeUnits()
