"""One captured jsonPTS message explained in the standard model's terms (``protocol decode``).

jsonPTS numbers are decimal litres, currency units and currency units per litre, so they
convert to our integers (ml, minor units, milli-minor units per litre) without knowing the
controller's configured decimals; the currency's exponent is the one assumption (CNY by
default, given by the caller). Each known quantity field is shown raw (as the wire wrote it)
and scaled, with ``exact: false`` when it is finer than our unit.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from forecourt.protocols.jsonpts.codec import (
    JsonPtsMalformed,
    NumberFormat,
    Quantity,
    parse_envelope,
    parse_packet,
)
from forecourt.protocols.model import as_json

_QUANTITIES: dict[str, tuple[Quantity, str]] = {
    "Volume": (Quantity.VOLUME, "volume_ml"),
    "LastVolume": (Quantity.VOLUME, "volume_ml"),
    "Dose": (Quantity.VOLUME, "dose"),
    "Amount": (Quantity.AMOUNT, "amount_minor"),
    "LastAmount": (Quantity.AMOUNT, "amount_minor"),
    "Price": (Quantity.PRICE, "unit_price_mmu"),
    "LastPrice": (Quantity.PRICE, "unit_price_mmu"),
    "TotalVolume": (Quantity.TOTAL_VOLUME, "totalizer_ml"),
    "VolumeTotal": (Quantity.TOTAL_VOLUME, "totalizer_ml"),
    "TotalAmount": (Quantity.TOTAL_AMOUNT, "amount_total_minor"),
    "AmountTotal": (Quantity.TOTAL_AMOUNT, "amount_total_minor"),
}

_REQUESTS = frozenset(
    {
        "PumpGetStatus",
        "PumpAuthorize",
        "PumpStop",
        "PumpEmergencyStop",
        "PumpSuspend",
        "PumpResume",
        "PumpCloseTransaction",
        "PumpGetTotals",
        "PumpSetPrices",
        "PumpGetPrices",
        "ReportGetPumpTransactions",
        "ProbeGetMeasurements",
    }
)


def _scaled(data: dict[str, Any], fmt: NumberFormat) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        known = _QUANTITIES.get(name)
        if known is None or isinstance(value, bool) or not isinstance(value, int | Decimal):
            continue
        quantity, unit_name = known
        read = fmt.read(value, quantity)
        out[name] = {"raw": format(Decimal(value), "f"), unit_name: read.units, "exact": read.exact}
    return out


def describe(body: bytes, direction: str | None = None, *, currency: str = "CNY") -> dict[str, Any]:
    """Decode one jsonPTS envelope (request or reply); :class:`JsonPtsMalformed` when it is
    not one (the message says why in one line)."""
    fmt = NumberFormat(3, 2, 2, currency, 3, 2)
    packets = []
    kinds = set()
    for item in parse_envelope(body):
        packet = parse_packet(item)
        entry: dict[str, Any] = {"id": packet.id, "type": packet.type}
        if packet.error:
            entry["error"] = {"code": packet.code, "message": packet.message}
        elif packet.message is not None:
            entry["message"] = packet.message
        if packet.data is not None:
            entry["data"] = as_json(packet.data)
            if isinstance(packet.data, dict):
                scaled = _scaled(packet.data, fmt)
                if scaled:
                    entry["scaled"] = scaled
        kinds.add("to-device" if packet.type in _REQUESTS else "from-device")
        packets.append(entry)
    seen = "to-device" if kinds == {"to-device"} else "from-device"
    if direction is not None and direction != seen and len(kinds) == 1:
        raise JsonPtsMalformed(
            f"this is a {seen.replace('-', ' ')} message, not {direction.replace('-', ' ')}"
        )
    return {
        "protocol": "jsonpts",
        "direction": seen,
        "currency": currency,
        "units": "jsonPTS numbers are decimal litres and currency units: scaled exactly",
        "packets": packets,
    }
