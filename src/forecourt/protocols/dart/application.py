"""DART application level (pure): transactions to and from a pump, packed BCD, exact scaling.

A data frame carries one or more transactions ``TRANS LNG data``. The same ``TRANS`` number
means one thing towards the pump (CD, site controller -> pump) and another from it (DC), so
decoding needs the direction. Layouts (Dart Pump Interface rev 2.11, as implemented in
``moduslightstech-lgtm/intelipump:src/intelipump_fdc/protocol/dart/application/`` and checked
against its captures; DC7/DC9 from a TypeScript decoder of the same specification, stored
file 22975032579):

To the pump:
- CD1 ``01 01 DCC`` command: 00 return status, 02 return pump parameters, 03 return pump
  identity, 04 return filling information, 05 reset, 06 authorize, 08 stop, 0A switch off,
  0D suspend, 0E resume, 0F return prices of all current grades.
- CD2 ``02 n NOZ…`` allowed nozzle numbers (1-15). CD3 ``03 04 VOL`` preset volume, CD4
  ``04 04 AMO`` preset amount (4-byte packed BCD). CD5 ``05 3n PRI…`` prices, 3-byte packed
  BCD per logical nozzle (PRI1 nozzle 1, …). CD101 ``65 01 COUN`` request total counters:
  COUN 0x01-0x0F volume counters of nozzle n, 0x11-0x1F amount counters of nozzle n.

From the pump:
- DC1 ``01 01 STATUS``: 0 not programmed, 1 reset, 2 authorized, 4 filling, 5 filling
  completed, 6 max amount/volume reached, 7 switched off, 8 suspended.
- DC2 ``02 08 VOL AMO`` filled volume and amount (4-byte packed BCD each).
- DC3 ``03 04 PRI NOZIO``: filling price (3 BCD); NOZIO low nibble = the selected nozzle,
  bit 0x10 = that nozzle is out of its holster.
- DC5 ``05 01 ALARM``. DC7 ``07 32 …`` pump parameters: 22 reserved bytes, DPVOL, DPAMO,
  DPUNP (the pump's own decimals of volume, amount and unit price), 4 reserved, MAMO (max
  amount, 4 BCD), 2 reserved, 15 grade bytes (one per nozzle). [I] the offsets come from the
  decoder named above, not from captured DC7 traffic.
- DC9 ``09 05 ID`` pump identity, 10 digits of packed BCD. [I]
- DC101 ``65 10 COUN TOTVAL TOTM1 TOTM2`` (5-byte BCD each): for a volume counter the total
  and the meter totals; captured: ``65 10 01 13 36 38 49 66 13 36 38 49 66 00 00 00 00 00``
  (nozzle 1, one meter). For an amount counter TOTM1 is read as the number of fillings [I].
- DC103 ``67 3n PRI…`` the pump's unit prices (reply to command 0F).

A transaction code we do not know is decoded as :class:`UnknownTransaction` with its bytes;
a known code with the wrong length, or BCD with a nibble above 9, is :class:`DartMalformed`.

Quantities leave this module as our integers (:class:`Decimals`): volume in ml, amounts in
minor units, unit prices in milli-minor units per litre, scaled by the pump's decimals (DC7)
or configured ones. A value finer than our unit becomes the nearest integer, half to even,
and says it is not exact (:class:`Scaled`), so a finished transaction keeps its raw text.
"""

from __future__ import annotations

import enum
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.money import currency_exponent
from forecourt.protocols.dart.line import (
    BAD_BCD,
    BAD_HEX,
    BAD_LENGTH,
    BAD_VALUE,
    DartMalformed,
    Frame,
    FrameKind,
    decode_frame,
)


class Direction(enum.StrEnum):
    TO_DEVICE = "to-device"  # site controller -> pump (CD transactions)
    FROM_DEVICE = "from-device"  # pump -> site controller (DC transactions)


class PumpCommand(enum.IntEnum):
    """CD1 command codes (DCC)."""

    RETURN_STATUS = 0x00
    RETURN_PUMP_PARAMETERS = 0x02
    RETURN_PUMP_IDENTITY = 0x03
    RETURN_FILLING_INFORMATION = 0x04
    RESET = 0x05
    AUTHORIZE = 0x06
    STOP = 0x08
    SWITCH_OFF = 0x0A
    SUSPEND = 0x0D
    RESUME = 0x0E
    RETURN_PRICES = 0x0F


class PumpStatusCode(enum.IntEnum):
    """DC1 pump status."""

    NOT_PROGRAMMED = 0
    RESET = 1
    AUTHORIZED = 2
    FILLING = 4
    FILLING_COMPLETED = 5
    MAX_REACHED = 6
    SWITCHED_OFF = 7
    SUSPENDED = 8


class AlarmCode(enum.IntEnum):
    """DC5 alarm codes (the ones a simulator raises, and the common ones)."""

    CPU_RESET = 0x01
    RAM_ERROR = 0x03
    PROM_CHECKSUM_ERROR = 0x04
    PULSER_ERROR = 0x06
    PULSER_CURRENT_ERROR = 0x07
    EMERGENCY_STOP = 0x09
    POWER_FAILURE = 0x0A
    PRESSURE_LOST = 0x0B


# Transaction codes.
CD1, CD2, CD3, CD4, CD5, CD101 = 0x01, 0x02, 0x03, 0x04, 0x05, 0x65
DC1, DC2, DC3, DC5, DC7, DC9, DC101, DC103 = 0x01, 0x02, 0x03, 0x05, 0x07, 0x09, 0x65, 0x67

VOLUME_COUNTER_BASE = 0x00  # COUN = nozzle (1-15): the nozzle's volume counters
AMOUNT_COUNTER_BASE = 0x10  # COUN = 0x10 + nozzle: the nozzle's amount counters
DC7_LENGTH = 50
MAX_NOZZLES = 15


# --------------------------------------------------------------------------- packed BCD


def bcd_decode(data: bytes) -> int:
    """Packed BCD, most significant digit first -> int; a nibble above 9 is ``bad_bcd``."""
    value = 0
    for byte in data:
        high, low = byte >> 4, byte & 0x0F
        if high > 9 or low > 9:
            raise DartMalformed(BAD_BCD, f"byte 0x{byte:02X} is not packed BCD", frame=data)
        value = value * 100 + high * 10 + low
    return value


def bcd_encode(value: int, size: int) -> bytes:
    """int -> packed BCD of ``size`` bytes; refuses negatives and values that do not fit."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidValue(f"packed BCD needs a non-negative integer, got {value!r}")
    digits = f"{value:0{size * 2}d}"
    if len(digits) > size * 2:
        raise InvalidValue(f"{value} does not fit in {size} bytes of packed BCD")
    return bytes(int(digits[i : i + 2], 16) for i in range(0, len(digits), 2))


# --------------------------------------------------------------------------- transactions


@dataclass(frozen=True, slots=True)
class Command:
    """CD1: a command (``command`` keeps an unknown DCC as its number)."""

    command: int
    code = CD1

    def data(self) -> bytes:
        return bytes((self.command,))


@dataclass(frozen=True, slots=True)
class AllowedNozzles:
    """CD2: the nozzles the next authorisation releases."""

    nozzles: tuple[int, ...]
    code = CD2

    def data(self) -> bytes:
        if not self.nozzles or any(not 1 <= n <= MAX_NOZZLES for n in self.nozzles):
            raise InvalidValue(f"allowed nozzles must be 1-15, got {self.nozzles}")
        return bytes(self.nozzles)


@dataclass(frozen=True, slots=True)
class PresetVolume:
    """CD3: stop the next filling at this volume (raw, in the pump's volume decimals)."""

    volume: int
    code = CD3

    def data(self) -> bytes:
        return bcd_encode(self.volume, 4)


@dataclass(frozen=True, slots=True)
class PresetAmount:
    """CD4: stop the next filling at this amount (raw, in the pump's amount decimals)."""

    amount: int
    code = CD4

    def data(self) -> bytes:
        return bcd_encode(self.amount, 4)


@dataclass(frozen=True, slots=True)
class PriceUpdate:
    """CD5: unit prices, index 0 = logical nozzle 1 (raw, in the pump's price decimals)."""

    prices: tuple[int, ...]
    code = CD5

    def data(self) -> bytes:
        if not 1 <= len(self.prices) <= MAX_NOZZLES:
            raise InvalidValue("a price update carries 1-15 prices")
        return b"".join(bcd_encode(price, 3) for price in self.prices)


@dataclass(frozen=True, slots=True)
class RequestTotals:
    """CD101: ask for a total counter (see ``VOLUME_COUNTER_BASE``/``AMOUNT_COUNTER_BASE``)."""

    counter: int
    code = CD101

    def data(self) -> bytes:
        return bytes((self.counter,))


@dataclass(frozen=True, slots=True)
class PumpStatusReply:
    """DC1: the pump's status (a :class:`PumpStatusCode` value, or another number)."""

    status: int
    code = DC1

    def data(self) -> bytes:
        return bytes((self.status,))


@dataclass(frozen=True, slots=True)
class FilledValues:
    """DC2: volume and amount of the current (or last) filling, raw."""

    volume: int
    amount: int
    code = DC2

    def data(self) -> bytes:
        return bcd_encode(self.volume, 4) + bcd_encode(self.amount, 4)


@dataclass(frozen=True, slots=True)
class NozzleStatus:
    """DC3: the filling's unit price (raw) and the selected nozzle, out or in."""

    price: int
    nozzle: int
    nozzle_out: bool
    code = DC3

    def data(self) -> bytes:
        if not 0 <= self.nozzle <= MAX_NOZZLES:
            raise InvalidValue(f"nozzle {self.nozzle} out of 0-15")
        return bcd_encode(self.price, 3) + bytes((self.nozzle | (0x10 if self.nozzle_out else 0),))


@dataclass(frozen=True, slots=True)
class Alarm:
    """DC5: an alarm code (see :class:`AlarmCode`)."""

    alarm: int
    code = DC5

    def data(self) -> bytes:
        return bytes((self.alarm,))


@dataclass(frozen=True, slots=True)
class PumpParameters:
    """DC7: the pump's own decimals, maximum amount and a grade per nozzle."""

    volume_decimals: int
    amount_decimals: int
    price_decimals: int
    max_amount: int = 0
    grades: tuple[int, ...] = ()
    code = DC7

    def data(self) -> bytes:
        grades = bytes(self.grades[:MAX_NOZZLES]).ljust(MAX_NOZZLES, b"\x00")
        return (
            bytes(22)
            + bytes((self.volume_decimals, self.amount_decimals, self.price_decimals))
            + bytes(4)
            + bcd_encode(self.max_amount, 4)
            + bytes(2)
            + grades
        )

    @property
    def nozzles(self) -> int:
        """Nozzles with a grade (the grade bytes are filled from nozzle 1 upwards)."""
        return sum(1 for grade in self.grades if grade)


@dataclass(frozen=True, slots=True)
class PumpIdentity:
    """DC9: the pump's identity, ten decimal digits."""

    identity: str
    code = DC9

    def data(self) -> bytes:
        if len(self.identity) != 10 or not self.identity.isdigit():
            raise InvalidValue(f"a DART pump identity is 10 digits, got {self.identity!r}")
        return bcd_encode(int(self.identity), 5)


@dataclass(frozen=True, slots=True)
class TotalCounters:
    """DC101: one total counter: its total and meter totals, raw."""

    counter: int
    total: int
    meter1: int
    meter2: int = 0
    code = DC101

    def data(self) -> bytes:
        return (
            bytes((self.counter,))
            + bcd_encode(self.total, 5)
            + bcd_encode(self.meter1, 5)
            + bcd_encode(self.meter2, 5)
        )

    @property
    def nozzle(self) -> int:
        return self.counter & 0x0F

    @property
    def is_amount(self) -> bool:
        return self.counter & 0xF0 == AMOUNT_COUNTER_BASE


@dataclass(frozen=True, slots=True)
class PumpPrices:
    """DC103: the pump's unit prices per nozzle, raw."""

    prices: tuple[int, ...]
    code = DC103

    def data(self) -> bytes:
        return b"".join(bcd_encode(price, 3) for price in self.prices)


@dataclass(frozen=True, slots=True)
class UnknownTransaction:
    """A transaction whose code we do not know; kept as it came."""

    code: int
    raw: bytes

    def data(self) -> bytes:
        return self.raw


ToDevice = Command | AllowedNozzles | PresetVolume | PresetAmount | PriceUpdate | RequestTotals
FromDevice = (
    PumpStatusReply
    | FilledValues
    | NozzleStatus
    | Alarm
    | PumpParameters
    | PumpIdentity
    | TotalCounters
    | PumpPrices
)
Transaction = ToDevice | FromDevice | UnknownTransaction


def encode_transaction(item: Transaction) -> bytes:
    data = item.data()
    if len(data) > 255:
        raise InvalidValue("a transaction carries at most 255 bytes")
    return bytes((item.code, len(data))) + data


def encode_transactions(items: Iterable[Transaction]) -> bytes:
    return b"".join(encode_transaction(item) for item in items)


def split_transactions(data: bytes) -> list[tuple[int, bytes]]:
    """``TRANS LNG data…`` units; :class:`DartMalformed` when a length overruns the data."""
    units: list[tuple[int, bytes]] = []
    index = 0
    while index < len(data):
        if index + 2 > len(data):
            raise DartMalformed(BAD_LENGTH, "a transaction header is cut short", frame=data)
        code, size = data[index], data[index + 1]
        body = data[index + 2 : index + 2 + size]
        if len(body) != size:
            raise DartMalformed(
                BAD_LENGTH,
                f"transaction 0x{code:02X} says {size} bytes, {len(body)} follow",
                frame=data,
            )
        units.append((code, body))
        index += 2 + size
    return units


def _need(code: int, body: bytes, *sizes: int) -> None:
    if len(body) not in sizes:
        wanted = " or ".join(str(s) for s in sizes)
        raise DartMalformed(
            BAD_LENGTH, f"transaction 0x{code:02X} has {len(body)} bytes, not {wanted}", frame=body
        )


def _decode_to_device(code: int, body: bytes) -> Transaction:
    if code == CD1:
        _need(code, body, 1)
        return Command(body[0])
    if code == CD2:
        if not 1 <= len(body) <= MAX_NOZZLES or any(not 1 <= n <= MAX_NOZZLES for n in body):
            raise DartMalformed(BAD_VALUE, "allowed nozzles must be 1-15 numbers 1-15", frame=body)
        return AllowedNozzles(tuple(body))
    if code == CD3:
        _need(code, body, 4)
        return PresetVolume(bcd_decode(body))
    if code == CD4:
        _need(code, body, 4)
        return PresetAmount(bcd_decode(body))
    if code == CD5:
        if not body or len(body) % 3 or len(body) > 3 * MAX_NOZZLES:
            raise DartMalformed(BAD_LENGTH, f"price update of {len(body)} bytes", frame=body)
        return PriceUpdate(tuple(bcd_decode(body[i : i + 3]) for i in range(0, len(body), 3)))
    if code == CD101:
        _need(code, body, 1)
        return RequestTotals(body[0])
    return UnknownTransaction(code, body)


def _decode_from_device(code: int, body: bytes) -> Transaction:
    if code == DC1:
        _need(code, body, 1)
        return PumpStatusReply(body[0])
    if code == DC2:
        _need(code, body, 8)
        return FilledValues(bcd_decode(body[:4]), bcd_decode(body[4:]))
    if code == DC3:
        _need(code, body, 4)
        return NozzleStatus(bcd_decode(body[:3]), body[3] & 0x0F, bool(body[3] & 0x10))
    if code == DC5:
        _need(code, body, 1)
        return Alarm(body[0])
    if code == DC7:
        _need(code, body, DC7_LENGTH)
        volume, amount, price = body[22], body[23], body[24]
        if volume > 8 or amount > 8 or price > 8:
            raise DartMalformed(
                BAD_VALUE, f"pump decimals {volume}/{amount}/{price} out of 0-8", frame=body
            )
        return PumpParameters(volume, amount, price, bcd_decode(body[29:33]), tuple(body[35:50]))
    if code == DC9:
        _need(code, body, 5)
        return PumpIdentity(f"{bcd_decode(body):010d}")
    if code == DC101:
        _need(code, body, 16)
        return TotalCounters(
            body[0], bcd_decode(body[1:6]), bcd_decode(body[6:11]), bcd_decode(body[11:16])
        )
    if code == DC103:
        if not body or len(body) % 3:
            raise DartMalformed(BAD_LENGTH, f"unit prices of {len(body)} bytes", frame=body)
        return PumpPrices(tuple(bcd_decode(body[i : i + 3]) for i in range(0, len(body), 3)))
    return UnknownTransaction(code, body)


def decode_transaction(code: int, body: bytes, direction: Direction) -> Transaction:
    if direction is Direction.TO_DEVICE:
        return _decode_to_device(code, body)
    return _decode_from_device(code, body)


def decode_transactions(data: bytes, direction: Direction) -> list[Transaction]:
    """Every transaction of a data frame's data; :class:`DartMalformed` if one is broken."""
    return [decode_transaction(code, body, direction) for code, body in split_transactions(data)]


# --------------------------------------------------------------------------- scaling


@dataclass(frozen=True, slots=True)
class Scaled:
    """A raw pump number in our units: nearest integer (half even) when not ``exact``."""

    units: int
    exact: bool
    text: str  # the number as the pump means it, e.g. "12.34"


def pow10(exponent: int) -> int:
    """10 ** ``exponent`` for a non-negative exponent, as an int."""
    return int("1" + "0" * exponent)


def _decimal_text(raw: int, decimals: int) -> str:
    digits = f"{raw:0{decimals + 1}d}"
    return f"{digits[:-decimals]}.{digits[-decimals:]}" if decimals else digits


def raw_to_units(raw: int, decimals: int, unit_exponent: int) -> Scaled:
    """``raw / 10**decimals`` in units of ``10**-unit_exponent``."""
    text = _decimal_text(raw, decimals)
    shift = unit_exponent - decimals
    if shift >= 0:
        return Scaled(raw * pow10(shift), True, text)
    step = pow10(-shift)
    quotient, remainder = divmod(raw, step)
    twice = 2 * remainder
    if twice > step or (twice == step and quotient % 2):
        quotient += 1
    return Scaled(quotient, remainder == 0, text)


class DartPrecision(InvalidValue):
    """An integer quantity the pump's decimals cannot express exactly."""

    code = "dart.precision"


def units_to_raw(units: int, decimals: int, unit_exponent: int, *, what: str) -> int:
    """Our integer -> the pump's raw number, exactly, or :class:`DartPrecision`."""
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise DartPrecision(f"{what} must be a non-negative integer, got {units!r}")
    shift = unit_exponent - decimals
    if shift <= 0:
        return units * pow10(-shift)
    raw, rest = divmod(units, pow10(shift))
    if rest:
        raise DartPrecision(f"{what} {units} needs more than the pump's {decimals} decimals")
    return raw


@dataclass(frozen=True, slots=True)
class Decimals:
    """How one pump writes numbers: decimals of volume (L), amount, unit price (per L)."""

    volume: int = 2
    amount: int = 2
    price: int = 2
    currency: str = "CNY"
    total_volume: int | None = None  # None: as ``volume``
    total_amount: int | None = None  # None: as ``amount``

    def __post_init__(self) -> None:
        for name in ("volume", "amount", "price"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 8:
                raise InvalidValue(f"{name} decimals must be 0-8, got {value!r}")
        currency_exponent(self.currency)

    @property
    def amount_exponent(self) -> int:
        return currency_exponent(self.currency)

    @property
    def price_exponent(self) -> int:
        return currency_exponent(self.currency) + 3

    @property
    def totals_volume(self) -> int:
        return self.volume if self.total_volume is None else self.total_volume

    @property
    def totals_amount(self) -> int:
        return self.amount if self.total_amount is None else self.total_amount

    def with_pump(self, parameters: PumpParameters) -> Decimals:
        """These decimals with the pump's own (DC7); totals follow the pump's unless set."""
        return Decimals(
            parameters.volume_decimals,
            parameters.amount_decimals,
            parameters.price_decimals,
            self.currency,
            self.total_volume,
            self.total_amount,
        )

    def volume_ml(self, raw: int) -> Scaled:
        return raw_to_units(raw, self.volume, 3)

    def amount_minor(self, raw: int) -> Scaled:
        return raw_to_units(raw, self.amount, self.amount_exponent)

    def price_mmu(self, raw: int) -> Scaled:
        return raw_to_units(raw, self.price, self.price_exponent)

    def total_volume_ml(self, raw: int) -> Scaled:
        return raw_to_units(raw, self.totals_volume, 3)

    def total_amount_minor(self, raw: int) -> Scaled:
        return raw_to_units(raw, self.totals_amount, self.amount_exponent)

    def raw_volume(self, volume_ml: int) -> int:
        return units_to_raw(volume_ml, self.volume, 3, what="volume (ml)")

    def raw_amount(self, amount_minor: int) -> int:
        return units_to_raw(amount_minor, self.amount, self.amount_exponent, what="amount")

    def raw_price(self, unit_price_mmu: int) -> int:
        return units_to_raw(unit_price_mmu, self.price, self.price_exponent, what="unit price")

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": self.volume,
            "amount": self.amount,
            "price": self.price,
            "total_volume": self.totals_volume,
            "total_amount": self.totals_amount,
            "currency": self.currency,
        }


# --------------------------------------------------------------------------- describe

_NAMES_TO: dict[int, str] = {
    CD1: "CD1 command",
    CD2: "CD2 allowed nozzles",
    CD3: "CD3 preset volume",
    CD4: "CD4 preset amount",
    CD5: "CD5 price update",
    CD101: "CD101 request total counters",
}
_NAMES_FROM: dict[int, str] = {
    DC1: "DC1 pump status",
    DC2: "DC2 filled volume and amount",
    DC3: "DC3 nozzle status and filling price",
    DC5: "DC5 alarm code",
    DC7: "DC7 pump parameters",
    DC9: "DC9 pump identity",
    DC101: "DC101 total counters",
    DC103: "DC103 pump unit prices",
}
_STATUS_MEANING: dict[int, str] = {
    PumpStatusCode.NOT_PROGRAMMED: "not programmed (no prices since power-up)",
    PumpStatusCode.RESET: "reset (ready to be authorised)",
    PumpStatusCode.AUTHORIZED: "authorised",
    PumpStatusCode.FILLING: "filling",
    PumpStatusCode.FILLING_COMPLETED: "filling completed",
    PumpStatusCode.MAX_REACHED: "max amount/volume reached",
    PumpStatusCode.SWITCHED_OFF: "switched off",
    PumpStatusCode.SUSPENDED: "suspended",
}


def _enum_name(enum_type: type[enum.IntEnum], value: int) -> str | None:
    try:
        return enum_type(value).name.lower()
    except ValueError:
        return None


def _scaled(value: Scaled, unit: str) -> dict[str, Any]:
    return {"text": value.text, unit: value.units, "exact": value.exact}


def describe_transaction(item: Transaction, decimals: Decimals | None) -> dict[str, Any]:
    """One decoded transaction as JSON-able fields (raw integers, scaled when known)."""
    fields: dict[str, Any] = {}
    scaled: dict[str, Any] = {}
    if isinstance(item, Command):
        fields = {"command": item.command, "meaning": _enum_name(PumpCommand, item.command)}
    elif isinstance(item, AllowedNozzles):
        fields = {"nozzles": list(item.nozzles)}
    elif isinstance(item, PresetVolume):
        fields = {"volume_raw": item.volume}
        if decimals:
            scaled = {"volume": _scaled(decimals.volume_ml(item.volume), "volume_ml")}
    elif isinstance(item, PresetAmount):
        fields = {"amount_raw": item.amount}
        if decimals:
            scaled = {"amount": _scaled(decimals.amount_minor(item.amount), "amount_minor")}
    elif isinstance(item, PriceUpdate | PumpPrices):
        fields = {"prices_raw": list(item.prices)}
        if decimals:
            scaled = {
                "prices": [_scaled(decimals.price_mmu(p), "unit_price_mmu") for p in item.prices]
            }
    elif isinstance(item, RequestTotals):
        kind = "amount" if item.counter & 0xF0 == AMOUNT_COUNTER_BASE else "volume"
        fields = {"counter": item.counter, "nozzle": item.counter & 0x0F, "counts": kind}
    elif isinstance(item, PumpStatusReply):
        fields = {"status": item.status, "meaning": _STATUS_MEANING.get(item.status, "unknown")}
    elif isinstance(item, FilledValues):
        fields = {"volume_raw": item.volume, "amount_raw": item.amount}
        if decimals:
            scaled = {
                "volume": _scaled(decimals.volume_ml(item.volume), "volume_ml"),
                "amount": _scaled(decimals.amount_minor(item.amount), "amount_minor"),
            }
    elif isinstance(item, NozzleStatus):
        fields = {"price_raw": item.price, "nozzle": item.nozzle, "nozzle_out": item.nozzle_out}
        if decimals:
            scaled = {"price": _scaled(decimals.price_mmu(item.price), "unit_price_mmu")}
    elif isinstance(item, Alarm):
        fields = {"alarm": item.alarm, "meaning": _enum_name(AlarmCode, item.alarm)}
    elif isinstance(item, PumpParameters):
        fields = {
            "volume_decimals": item.volume_decimals,
            "amount_decimals": item.amount_decimals,
            "price_decimals": item.price_decimals,
            "max_amount_raw": item.max_amount,
            "grades": list(item.grades),
        }
    elif isinstance(item, PumpIdentity):
        fields = {"identity": item.identity}
    elif isinstance(item, TotalCounters):
        fields = {
            "counter": item.counter,
            "nozzle": item.nozzle,
            "counts": "amount" if item.is_amount else "volume",
            "total_raw": item.total,
            "meter1_raw": item.meter1,
            "meter2_raw": item.meter2,
        }
        if decimals:
            if item.is_amount:
                scaled = {"total": _scaled(decimals.total_amount_minor(item.total), "amount_minor")}
            else:
                scaled = {
                    "total": _scaled(decimals.total_volume_ml(item.total), "volume_ml"),
                    "meter1": _scaled(decimals.total_volume_ml(item.meter1), "volume_ml"),
                    "meter2": _scaled(decimals.total_volume_ml(item.meter2), "volume_ml"),
                }
    else:
        fields = {"note": "unknown transaction code, kept raw"}
    body: dict[str, Any] = {"fields": fields}
    if decimals:
        body["scaled"] = scaled
    return body


def _describe_units(data: bytes, direction: Direction, decimals: Decimals | None) -> list[Any]:
    names = _NAMES_TO if direction is Direction.TO_DEVICE else _NAMES_FROM
    out = []
    for code, body in split_transactions(data):
        entry: dict[str, Any] = {
            "trans": f"0x{code:02X}",
            "name": names.get(code, "unknown"),
            "lng": len(body),
            "raw": body.hex(" "),
        }
        try:
            entry.update(describe_transaction(decode_transaction(code, body, direction), decimals))
        except DartMalformed as exc:
            entry["error"] = {"reason": exc.reason, "message": exc.message}
        out.append(entry)
    return out


def describe(
    frame: bytes,
    direction: str | None,
    decimals: Decimals | None = None,
) -> dict[str, Any]:
    """One wire frame explained: line level, then each transaction in standard-model terms.

    ``direction`` ``to-device`` / ``from-device`` picks CD or DC readings; ``None`` gives
    both. ``decimals`` (the pump's, from DC7 or configuration) adds the scaled values; without
    them the values stay raw and ``"decimals": "unknown"`` says so. A frame that is not a
    DART frame raises :class:`DartMalformed` (its message says why in one line).
    """
    parsed = decode_frame(frame)
    result: dict[str, Any] = {
        "protocol": "dart",
        "hex": bytes(frame).hex(" "),
        "address": f"0x{parsed.address:02X}",
        "kind": parsed.kind.value,
        "tx": parsed.tx if parsed.kind not in (FrameKind.POLL,) else None,
        "control": f"0x{parsed.control:02X}",
        "decimals": decimals.to_json() if decimals else "unknown",
    }
    if parsed.kind is not FrameKind.DATA:
        result["meaning"] = _SHORT_MEANING[parsed.kind]
        return result
    result["crc"] = f"0x{parsed.crc():04X}"
    result["crc_algorithm"] = "CRC-16/ARC"
    if direction is None:
        result["direction"] = "unknown"
        result["as_to_device"] = _describe_units(parsed.data, Direction.TO_DEVICE, decimals)
        result["as_from_device"] = _describe_units(parsed.data, Direction.FROM_DEVICE, decimals)
        return result
    chosen = _direction(direction)
    result["direction"] = chosen.value
    result["transactions"] = _describe_units(parsed.data, chosen, decimals)
    return result


_SHORT_MEANING: dict[FrameKind, str] = {
    FrameKind.POLL: "master asks the pump for data",
    FrameKind.ACK: "data frame with this tx# received",
    FrameKind.NAK: "data frame with this tx# refused: send it again",
    FrameKind.EOT: "the pump has nothing to send",
    FrameKind.ACKPOLL: "acknowledge this tx# and poll in one",
    FrameKind.DATA: "data",
}


def _direction(text: str) -> Direction:
    try:
        return Direction(text)
    except ValueError:
        raise InvalidValue(f"direction must be to-device or from-device, got {text!r}") from None


def parse_hex(text: str) -> bytes:
    """Hex text -> bytes, tolerant of spaces, colons, dashes, commas and ``0x`` prefixes."""
    cleaned = text.replace("0x", " ").replace("0X", " ")
    for separator in ":-,;":
        cleaned = cleaned.replace(separator, " ")
    digits = "".join(cleaned.split())
    if not digits or len(digits) % 2 or any(c not in string.hexdigits for c in digits):
        raise DartMalformed(BAD_HEX, f"not an even run of hex digits: {text[:40]!r}")
    return bytes.fromhex(digits)


def frame_summary(frame: Frame) -> str:
    """A one-line description of a frame (for logs)."""
    if frame.kind is FrameKind.DATA:
        return f"0x{frame.address:02X} data tx={frame.tx} {frame.data.hex(' ')}"
    return f"0x{frame.address:02X} {frame.kind.value} tx={frame.tx}"
