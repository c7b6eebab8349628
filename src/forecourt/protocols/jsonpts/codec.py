"""jsonPTS wire codec: the packet envelope, exact decimal <-> integer scaling, local date-times.

jsonPTS (Technotrade PTS-2) is JSON over HTTP POST ``/jsonPTS``::

    {"Protocol": "jsonPTS", "Packets": [{"Id": 1, "Type": "PumpGetStatus", "Data": {"Pump": 1}}]}

Replies use the same envelope and echo each request's ``Id``; a refused packet carries
``"Error": true, "Code": n, "Message": "..."``. Both sides of the wire (the driver and the
simulator) use this module, so what one writes the other reads with the same rules.

Numbers are never floats: :func:`loads` parses every JSON number with a fraction or exponent as
:class:`decimal.Decimal` (integers stay ``int``) and :func:`dumps` writes ``Decimal`` back as an
exact JSON number (``Decimal("7.89")`` -> ``7.89``, never ``7.8899999999999997``). Python floats
are refused on output so one cannot slip in unnoticed.

The device expresses volume in litres, amounts in major currency units and prices in major units
per litre, each with a configured number of decimals (:class:`NumberFormat`). Conversions to our
integers (ml, minor units, milli-minor per litre) are exact or fail: a value finer than the
configured decimals, or finer than our integer unit, is an error rather than a silent rounding.

A finished transaction must never be lost for an odd value, so :meth:`NumberFormat.read` reads a
wire number leniently: it says whether the value had more decimals than configured and whether
it is a whole number of our units, and gives the nearest integer (half-even) when it is not.

Totalizers have decimals of their own on a PTS-2 (``VolumeTotal``/``AmountTotal`` in
``SystemDecimalDigits``); they default to the volume and amount decimals.

Every failure to read the wire raises :class:`JsonPtsMalformed` (code ``jsonpts.malformed``);
an integer we cannot express in the device's decimals raises :class:`JsonPtsPrecision`
(code ``jsonpts.precision``).

Vendor error codes (:class:`PtsErrorCode`): the numbers and names of the Technotrade PTS-2 SDK's
result list (Java SDK ``com.technotrade.pts2.enumeration.Result``, stored file 17288538076); a
refused packet carries the number in ``Code`` and the name in ``Message`` (third-party clients
compare ``Message`` with ``"JSONPTS_ERROR_NOT_FOUND"``, e.g. stored file 23248885078).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from forecourt.kernel.errors import ForecourtError, InvalidValue
from forecourt.kernel.money import currency_exponent

PROTOCOL = "jsonPTS"

# Bounds that keep hostile input cheap: no real device value comes near them, and they stop a
# number such as 1E+999999999 from turning into a billion-digit integer.
_MAX_DIGITS = 30
_MAX_EXPONENT = 40

# Local date-time format on the wire: "2026-11-25T10:00:00" (controller local time, no offset).
_WIRE_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class JsonPtsMalformed(ForecourtError):
    """Bytes that are not a well-formed jsonPTS message (bad JSON, envelope, field or type)."""

    code = "jsonpts.malformed"
    http_status = 400


class JsonPtsPrecision(InvalidValue):
    """An integer quantity that the device's configured decimals cannot express exactly."""

    code = "jsonpts.precision"


class PtsErrorCode(enum.IntEnum):
    """Error codes a PTS-2 puts in a refused packet's ``Code`` (its ``Message`` is the name).

    Numbers and names as listed by the vendor's SDK (see the module docstring); only the codes
    that concern pumps, transactions and the requests we use are listed.
    """

    JSONPTS_ERROR_NOT_FOUND = 1  # request not found: the firmware does not know the Type
    INVALID_JSON_REQUEST = 2
    NO_DATA_ERROR = 3
    NO_DATA_FOR_RESPONSE = 4
    JSON_REQUEST_IS_TOO_LONG = 5
    JSONPTS_ERROR_NO_PERMISSIONS = 6
    JSONPTS_ERROR_COULD_NOT_GET_DATETIME = 17
    JSONPTS_ERROR_COULD_NOT_GET_PUMP_NUMBER = 18
    JSONPTS_ERROR_COULD_NOT_GET_PUMP_TRANSACTION_NUMBER = 19
    JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE = 20
    JSONPTS_ERROR_PUMP_TRANSACTION_NUMBER_OUT_OF_RANGE = 21
    JSONPTS_ERROR_PUMP_TRANSACTION_NOT_FOUND = 22
    JSONPTS_ERROR_COULD_NOT_GET_TRANSACTION_NUMBER = 25
    JSONPTS_ERROR_TRANSACTION_NUMBER_OUT_OF_RANGE = 26
    JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH = 27
    JSONPTS_ERROR_TRANSACTION_NUMBER_ALREADY_EXIST = 28
    JSONPTS_ERROR_COULD_NOT_GET_NOZZLE_NUMBER = 29
    JSONPTS_ERROR_COULD_NOT_GET_FUEL_GRADE_ID = 30
    JSONPTS_ERROR_NOZZLE_NUMBER_OUT_OF_RANGE = 33
    JSONPTS_ERROR_COULD_NOT_GET_TYPE = 34
    JSONPTS_ERROR_TYPE_OUT_OF_RANGE = 36
    JSONPTS_ERROR_COULD_NOT_GET_DOSE_VALUE = 37
    JSONPTS_ERROR_COULD_NOT_GET_PRICE_VALUE = 38
    JSONPTS_ERROR_DUPLICATED_AUTHORIZATION_REQUEST = 39
    JSONPTS_ERROR_PUMP_BUSY_OTHER_USER = 40
    JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED = 41
    JSONPTS_ERROR_PUMP_BUSY_FILLING = 42
    JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS = 43
    JSONPTS_ERROR_DATE_OUT_OF_RANGE = 47
    JSONPTS_ERROR_TIME_OUT_OF_RANGE = 48
    JSONPTS_ERROR_PUMP_IS_NOT_CONFIGURED = 52
    JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION = 69
    JSONPTS_ERROR_DATETIME_INCORRECT_FORMAT = 71
    JSONPTS_ERROR_REPEATED_AUTHORIZE_PUMP_PRICE_DIFFERENT = 78


# --------------------------------------------------------------------------- JSON text


def _reject_constant(name: str) -> Any:
    raise JsonPtsMalformed(f"{name} is not a JSON number jsonPTS accepts")


def loads(body: bytes | str) -> Any:
    """Parse JSON text exactly: fractions become ``Decimal``; NaN/Infinity are refused."""
    try:
        text = body.decode("utf-8-sig") if isinstance(body, bytes | bytearray) else body
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except JsonPtsMalformed:
        raise
    # ValueError covers JSONDecodeError and Python's int-digit limit; RecursionError comes
    # from absurdly nested arrays; UnicodeDecodeError is a ValueError too.
    except (ValueError, RecursionError, TypeError) as exc:
        raise JsonPtsMalformed(f"not valid JSON: {exc}") from None


def _dump_into(value: Any, out: list[str]) -> None:
    # bool before int: bool is a subclass of int and must stay true/false.
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"cannot encode non-finite decimal {value}")
        # Fixed-point text keeps the exact digits (and trailing zeros such as 7.80).
        out.append(format(value, "f"))
    elif isinstance(value, float):
        raise TypeError("floats are not allowed on the jsonPTS wire; use int or Decimal")
    elif isinstance(value, str):
        out.append(json.dumps(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, got {type(key).__name__}")
            if index:
                out.append(",")
            out.append(json.dumps(key))
            out.append(":")
            _dump_into(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _dump_into(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as jsonPTS JSON")


def dumps(value: Any) -> bytes:
    """Encode JSON with exact ``Decimal`` numbers (our own encoder: json can't do it floatless)."""
    out: list[str] = []
    _dump_into(value, out)
    # json.dumps escapes non-ASCII (ensure_ascii), so the text is plain ASCII and valid UTF-8.
    return "".join(out).encode("ascii")


# --------------------------------------------------------------------------- packets


@dataclass(frozen=True, slots=True)
class Packet:
    """One jsonPTS packet, request or reply.

    ``data`` is the decoded ``Data`` member: an object (dict), a list (e.g. a transactions
    report) or ``None`` when absent. ``error``/``code``/``message`` describe a refused packet;
    ``message`` alone is a plain confirmation such as ``"OK"``.
    """

    id: int
    type: str
    data: Any = None
    error: bool = False
    code: int | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"Id": self.id, "Type": self.type}
        if self.data is not None:
            body["Data"] = self.data
        if self.error:
            body["Error"] = True
            body["Code"] = self.code if self.code is not None else 0
        if self.message is not None:
            body["Message"] = self.message
        return body

    def data_object(self) -> dict[str, Any]:
        """``Data`` as an object; a missing or non-object ``Data`` is malformed."""
        if not isinstance(self.data, dict):
            raise JsonPtsMalformed(f"{self.type} packet {self.id} has no Data object")
        return self.data


def error_packet(packet_id: int, packet_type: str, code: int, message: str) -> Packet:
    return Packet(id=packet_id, type=packet_type, error=True, code=int(code), message=message)


def vendor_error(packet_id: int, packet_type: str, code: PtsErrorCode) -> Packet:
    """A refused packet as a PTS-2 writes it: the code's number and its name as the message."""
    return error_packet(packet_id, packet_type, code, code.name)


def confirmation(packet_id: int, packet_type: str) -> Packet:
    """The reply to a command that has no data of its own [inferred: ``"Message": "OK"``]."""
    return Packet(id=packet_id, type=packet_type, message="OK")


def parse_envelope(body: bytes | str) -> list[Any]:
    """Check the envelope and return the raw packet items, each still unvalidated.

    Split from :func:`parse_packet` so a server can answer every well-formed packet of a POST
    even when one of its siblings is broken.
    """
    document = loads(body)
    if not isinstance(document, dict):
        raise JsonPtsMalformed("jsonPTS message must be a JSON object")
    protocol = document.get("Protocol")
    if protocol != PROTOCOL:
        raise JsonPtsMalformed(f"Protocol must be {PROTOCOL!r}, got {protocol!r}")
    packets = document.get("Packets")
    if not isinstance(packets, list):
        raise JsonPtsMalformed("Packets must be a list")
    return packets


def parse_packet(item: Any) -> Packet:
    """Validate one raw packet item from :func:`parse_envelope`."""
    if not isinstance(item, dict):
        raise JsonPtsMalformed("a packet must be a JSON object")
    packet_id = get_int(item, "Id")
    packet_type = get_str(item, "Type")
    data = item.get("Data")
    if data is not None and not isinstance(data, dict | list):
        raise JsonPtsMalformed(f"packet {packet_id}: Data must be an object or a list")
    error = get_bool(item, "Error", default=False)
    code = get_int(item, "Code") if error else get_optional_int(item, "Code")
    message = item.get("Message")
    if message is not None and not isinstance(message, str):
        raise JsonPtsMalformed(f"packet {packet_id}: Message must be a string")
    return Packet(packet_id, packet_type, data, error, code, message)


def decode_envelope(body: bytes | str) -> list[Packet]:
    """Strictly decode a whole message: any broken packet makes the message malformed."""
    return [parse_packet(item) for item in parse_envelope(body)]


def encode_envelope(packets: Iterable[Packet]) -> bytes:
    return dumps({"Protocol": PROTOCOL, "Packets": [packet.to_json() for packet in packets]})


def raw_packet_id(item: Any) -> int:
    """Best-effort ``Id`` of a broken packet, so its error reply can still be matched."""
    if isinstance(item, dict):
        value = item.get("Id")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def raw_packet_type(item: Any) -> str:
    if isinstance(item, dict) and isinstance(item.get("Type"), str):
        return str(item["Type"])
    return ""


# --------------------------------------------------------------------------- typed fields

_MISSING = object()


def _field(data: Mapping[str, Any], name: str) -> Any:
    if not isinstance(data, Mapping):
        raise JsonPtsMalformed(f"expected an object holding {name!r}")
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        raise JsonPtsMalformed(f"missing field {name!r}", field=name)
    return value


def get_int(data: Mapping[str, Any], name: str) -> int:
    """A required JSON integer (``1.0`` and ``true`` are not integers here)."""
    value = _field(data, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JsonPtsMalformed(f"field {name!r} must be an integer", field=name)
    return value


def get_optional_int(data: Mapping[str, Any], name: str, default: int | None = None) -> int | None:
    if not isinstance(data, Mapping):
        raise JsonPtsMalformed(f"expected an object holding {name!r}")
    if data.get(name) is None:
        return default
    return get_int(data, name)


def get_number(data: Mapping[str, Any], name: str) -> Decimal:
    """A required JSON number, as an exact ``Decimal``."""
    value = _field(data, name)
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise JsonPtsMalformed(f"field {name!r} must be a number", field=name)
    if isinstance(value, Decimal) and not value.is_finite():
        raise JsonPtsMalformed(f"field {name!r} must be finite", field=name)
    return Decimal(value)


def get_optional_number(data: Mapping[str, Any], name: str) -> Decimal | None:
    if not isinstance(data, Mapping):
        raise JsonPtsMalformed(f"expected an object holding {name!r}")
    if data.get(name) is None:
        return None
    return get_number(data, name)


def get_str(data: Mapping[str, Any], name: str) -> str:
    value = _field(data, name)
    if not isinstance(value, str):
        raise JsonPtsMalformed(f"field {name!r} must be a string", field=name)
    return value


def get_bool(data: Mapping[str, Any], name: str, *, default: bool) -> bool:
    if not isinstance(data, Mapping):
        raise JsonPtsMalformed(f"expected an object holding {name!r}")
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise JsonPtsMalformed(f"field {name!r} must be true or false", field=name)
    return value


def get_list(data: Mapping[str, Any], name: str) -> list[Any]:
    value = _field(data, name)
    if not isinstance(value, list):
        raise JsonPtsMalformed(f"field {name!r} must be a list", field=name)
    return value


# --------------------------------------------------------------------------- exact scaling


def _check_decimals(name: str, decimals: int, maximum: int) -> int:
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= maximum:
        raise InvalidValue(f"{name} must be an integer between 0 and {maximum}, got {decimals!r}")
    return decimals


def decimal_to_scaled(value: Decimal | int, *, decimals: int, unit_exponent: int) -> int:
    """Wire decimal -> integer count of ``10**-unit_exponent`` units, exactly.

    ``value`` may carry at most ``decimals`` fractional digits (trailing zeros don't count), and
    must be a whole number of units. Example: ``Decimal("7.89")``, 2 decimals, exponent 5
    (milli-fen per litre) -> 789000.
    """
    # Trailing zeros are stripped so "5.230" counts as two decimals, like the number it is;
    # the digits are bounded before any int() so hostile input stays cheap.
    sign, coefficient, exponent = _significant(value)
    if coefficient == 0:
        return 0
    if -exponent > decimals:
        raise JsonPtsMalformed(f"{value} has more than the configured {decimals} decimals")
    shift = exponent + unit_exponent
    if shift < 0:
        raise JsonPtsMalformed(f"{value} is finer than 1e-{unit_exponent} units")
    scaled = coefficient * 10**shift
    return -scaled if sign else scaled


def scaled_to_decimal(units: int, *, decimals: int, unit_exponent: int) -> Decimal:
    """Integer units -> wire decimal with exactly ``decimals`` places, or :class:`JsonPtsPrecision`.

    Built from digits, not by division, so no decimal context can round it.
    """
    if isinstance(units, bool) or not isinstance(units, int):
        raise JsonPtsPrecision(f"expected an integer, got {type(units).__name__}")
    sign = 1 if units < 0 else 0
    magnitude = abs(units)
    if unit_exponent >= decimals:
        step = 10 ** (unit_exponent - decimals)
        if magnitude % step:
            raise JsonPtsPrecision(
                f"{units} units of 1e-{unit_exponent} need more than {decimals} decimals"
            )
        coefficient = magnitude // step
    else:
        coefficient = magnitude * 10 ** (decimals - unit_exponent)
    return Decimal((sign, tuple(int(d) for d in str(coefficient)), -decimals))


def _significant(value: Decimal | int) -> tuple[int, int, int]:
    """(sign, coefficient, exponent) of a finite number with trailing zeros stripped."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise JsonPtsMalformed(f"expected a number, got {type(value).__name__}")
    if isinstance(value, int):
        value = Decimal(value)
    if not value.is_finite():
        raise JsonPtsMalformed(f"{value} is not a finite number")
    sign, digit_tuple, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    digits = list(digit_tuple)
    while digits and digits[-1] == 0:
        digits.pop()
        exponent += 1
    while digits and digits[0] == 0:
        digits.pop(0)
    if not digits:
        return 0, 0, 0
    if len(digits) > _MAX_DIGITS or abs(exponent) > _MAX_EXPONENT:
        raise JsonPtsMalformed(f"{value} is out of range for a device quantity")
    return sign, int("".join(map(str, digits))), exponent


@dataclass(frozen=True, slots=True)
class DeviceValue:
    """A wire number read leniently (see :meth:`NumberFormat.read`)."""

    units: int  # the value in our units; the nearest integer (half-even) when not ``exact``
    exact: bool  # a whole number of our units
    extra_decimals: bool  # more fractional digits than the configured decimals
    wire: str  # the number as the device wrote it (fixed-point text)


def decimal_to_nearest(value: Decimal | int, *, decimals: int, unit_exponent: int) -> DeviceValue:
    """Wire decimal -> :class:`DeviceValue`: never fails for a finite, sane number.

    Unlike :func:`decimal_to_scaled` a value with more decimals than configured, or finer than
    our unit, is not an error: it is flagged, and rounded half-even to our unit when needed.
    """
    sign, coefficient, exponent = _significant(value)
    wire = format(Decimal(value), "f")
    if coefficient == 0:
        return DeviceValue(0, exact=True, extra_decimals=False, wire=wire)
    extra = -exponent > decimals
    shift = exponent + unit_exponent
    if shift >= 0:
        units, exact = coefficient * 10**shift, True
    else:
        # Integer arithmetic, so no decimal context can change the result.
        quotient, remainder = divmod(coefficient, 10**-shift)
        twice = 2 * remainder
        if twice > 10**-shift or (twice == 10**-shift and quotient % 2 == 1):
            quotient += 1
        units, exact = quotient, remainder == 0
    return DeviceValue(-units if sign else units, exact=exact, extra_decimals=extra, wire=wire)


class Quantity(enum.Enum):
    """What a wire number measures, which picks its decimals and our unit."""

    VOLUME = "volume"
    AMOUNT = "amount"
    PRICE = "price"
    TOTAL_VOLUME = "total_volume"
    TOTAL_AMOUNT = "total_amount"


@dataclass(frozen=True, slots=True)
class NumberFormat:
    """How one controller writes numbers: decimals of volume (L), amount and price (per L).

    Our integers: volume in ml (exponent 3), amount in the currency's minor units, price in
    milli-minor units per litre (exponent = currency exponent + 3).
    """

    volume_decimals: int = 2
    amount_decimals: int = 2
    price_decimals: int = 2
    currency: str = "CNY"
    volume_total_decimals: int | None = None  # None: as volume_decimals
    amount_total_decimals: int | None = None  # None: as amount_decimals

    def __post_init__(self) -> None:
        # Volume finer than 0.001 L cannot be whole millilitres.
        _check_decimals("volume_decimals", self.volume_decimals, 3)
        _check_decimals("amount_decimals", self.amount_decimals, 8)
        _check_decimals("price_decimals", self.price_decimals, 8)
        if self.volume_total_decimals is not None:
            _check_decimals("volume_total_decimals", self.volume_total_decimals, 3)
        if self.amount_total_decimals is not None:
            _check_decimals("amount_total_decimals", self.amount_total_decimals, 8)
        currency_exponent(self.currency)

    @property
    def total_volume_decimals(self) -> int:
        if self.volume_total_decimals is None:
            return self.volume_decimals
        return self.volume_total_decimals

    @property
    def total_amount_decimals(self) -> int:
        if self.amount_total_decimals is None:
            return self.amount_decimals
        return self.amount_total_decimals

    def _scale(self, quantity: Quantity) -> tuple[int, int]:
        """(decimals, unit exponent) of a quantity."""
        if quantity is Quantity.VOLUME:
            return self.volume_decimals, 3
        if quantity is Quantity.TOTAL_VOLUME:
            return self.total_volume_decimals, 3
        if quantity is Quantity.AMOUNT:
            return self.amount_decimals, self._amount_exponent
        if quantity is Quantity.TOTAL_AMOUNT:
            return self.total_amount_decimals, self._amount_exponent
        return self.price_decimals, self._price_exponent

    def to_units(self, value: Decimal | int, quantity: Quantity) -> int:
        """Strict: exact at the configured decimals, or :class:`JsonPtsMalformed`."""
        decimals, exponent = self._scale(quantity)
        return decimal_to_scaled(value, decimals=decimals, unit_exponent=exponent)

    def to_wire(self, units: int, quantity: Quantity) -> Decimal:
        decimals, exponent = self._scale(quantity)
        return scaled_to_decimal(units, decimals=decimals, unit_exponent=exponent)

    def read(self, value: Decimal | int, quantity: Quantity) -> DeviceValue:
        """Lenient: the nearest value in our units, flagged when not exact or over-precise."""
        decimals, exponent = self._scale(quantity)
        return decimal_to_nearest(value, decimals=decimals, unit_exponent=exponent)

    def get(self, data: Mapping[str, Any], name: str, quantity: Quantity) -> int:
        """A required field, strictly (see :meth:`to_units`); errors name the field."""
        number = get_number(data, name)
        try:
            return self.to_units(number, quantity)
        except JsonPtsMalformed as exc:
            raise JsonPtsMalformed(f"field {name!r}: {exc.message}", field=name) from None

    def get_lenient(self, data: Mapping[str, Any], name: str, quantity: Quantity) -> DeviceValue:
        number = get_number(data, name)
        try:
            return self.read(number, quantity)
        except JsonPtsMalformed as exc:
            raise JsonPtsMalformed(f"field {name!r}: {exc.message}", field=name) from None

    @property
    def volume_step_ml(self) -> int:
        """The smallest volume the device shows, in ml (0.01 L -> 10 ml)."""
        return 10 ** (3 - self.volume_decimals)

    @property
    def _amount_exponent(self) -> int:
        return currency_exponent(self.currency)

    @property
    def _price_exponent(self) -> int:
        return currency_exponent(self.currency) + 3

    def volume_to_ml(self, value: Decimal | int) -> int:
        return decimal_to_scaled(value, decimals=self.volume_decimals, unit_exponent=3)

    def ml_to_volume(self, volume_ml: int) -> Decimal:
        return scaled_to_decimal(volume_ml, decimals=self.volume_decimals, unit_exponent=3)

    def amount_to_minor(self, value: Decimal | int) -> int:
        return decimal_to_scaled(
            value, decimals=self.amount_decimals, unit_exponent=self._amount_exponent
        )

    def minor_to_amount(self, amount_minor: int) -> Decimal:
        return scaled_to_decimal(
            amount_minor, decimals=self.amount_decimals, unit_exponent=self._amount_exponent
        )

    def price_to_mmu(self, value: Decimal | int) -> int:
        return decimal_to_scaled(
            value, decimals=self.price_decimals, unit_exponent=self._price_exponent
        )

    def mmu_to_price(self, unit_price_mmu: int) -> Decimal:
        return scaled_to_decimal(
            unit_price_mmu, decimals=self.price_decimals, unit_exponent=self._price_exponent
        )

    # Field readers: the value must be present, a number, and exact at these decimals.
    def get_volume_ml(self, data: Mapping[str, Any], name: str) -> int:
        return self.get(data, name, Quantity.VOLUME)

    def get_amount_minor(self, data: Mapping[str, Any], name: str) -> int:
        return self.get(data, name, Quantity.AMOUNT)

    def get_price_mmu(self, data: Mapping[str, Any], name: str) -> int:
        return self.get(data, name, Quantity.PRICE)


# --------------------------------------------------------------------------- date-times


def format_local(instant: datetime, tz: ZoneInfo) -> str:
    """An aware instant as the controller's local wall-clock text, whole seconds (truncated)."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise InvalidValue(f"naive datetime not allowed: {instant!r}")
    return instant.astimezone(tz).strftime(_WIRE_DATETIME_FORMAT)


def parse_local(text: Any, tz: ZoneInfo, *, field: str = "DateTime") -> datetime:
    """Controller local text -> aware datetime in ``tz``.

    Local times repeated by a DST fall-back are read as their first occurrence (fold=0); the
    device gives us nothing to tell them apart.
    """
    if not isinstance(text, str):
        raise JsonPtsMalformed(f"field {field!r} must be a date-time string", field=field)
    try:
        naive = datetime.strptime(text, _WIRE_DATETIME_FORMAT)  # noqa: DTZ007 - local on purpose
    except ValueError:
        raise JsonPtsMalformed(
            f"field {field!r} is not a YYYY-MM-DDTHH:MM:SS date-time: {text!r}", field=field
        ) from None
    return naive.replace(tzinfo=tz)


def get_local_datetime(data: Mapping[str, Any], name: str, tz: ZoneInfo) -> datetime:
    return parse_local(_field(data, name), tz, field=name)


def get_optional_local_datetime(
    data: Mapping[str, Any], name: str, tz: ZoneInfo
) -> datetime | None:
    """Devices write ``""`` (or omit the field) when they have no date-time to give."""
    value = data.get(name) if isinstance(data, Mapping) else None
    if value is None or value == "":
        return None
    return parse_local(value, tz, field=name)


def check_packets(packets: Sequence[Packet]) -> None:
    """Ids must be unique within one message, or replies could not be matched to requests."""
    seen: set[int] = set()
    for packet in packets:
        if packet.id in seen:
            raise InvalidValue(f"duplicate jsonPTS packet Id {packet.id}")
        seen.add(packet.id)
