"""The standard device model: what every protocol adapter reports, whatever the wire says.

Pumps are addressed by their fuelling-point number at the station (1-based), tanks by their
tank number at the station. All quantities are exact integers with their unit in their name:
volumes in millilitres (``_ml``), amounts in minor units (``_minor``), unit prices in
milli-minor units per litre (``_mmu``), heights in micrometres (``_um``), temperatures in
milli-degrees Celsius (``_mdegc``). A value a device sent in another form (a float, BCD with
unknown decimals) is converted by the driver, and where the conversion is not exact the wire
text is kept in ``raw`` with ``FLAG_INEXACT`` so nothing is silently rounded.

Devices yield :class:`DeviceEvent` values (state changes, filling progress, finished
transactions, tank readings, alarms, frames refused) to the edge; see
:mod:`forecourt.protocols.driver` for the interface that carries them.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from forecourt.kernel.errors import ForecourtError


class DriverUnavailable(ForecourtError):
    code = "edge.driver_unavailable"
    http_status = 503


class DeviceRejected(ForecourtError):
    code = "edge.device_rejected"
    http_status = 409


# Flags a driver may set on a DeviceTransaction (the edge adds its own, see edge.controller).
FLAG_INEXACT = "inexact_device_value"  # a value not representable in our units; see ``raw``
FLAG_EXTRA_DECIMALS = "extra_device_decimals"  # more decimals than configured, still exact
FLAG_NO_TOTALIZER = "no_device_totalizer"  # the device reported no totalizer


class PumpState(enum.StrEnum):
    """What the device says about one fuelling point (the standard model)."""

    IDLE = "idle"  # nozzles hung, nothing pending
    CALLING = "calling"  # a nozzle is up, waiting for authorisation
    AUTHORISED = "authorised"  # authorised, no product has flowed yet
    FUELLING = "fuelling"  # product flowing
    SUSPENDED = "suspended"  # paused by a command
    STOPPED = "stopped"  # stopped by a command before the nozzle was hung
    END_OF_TRANSACTION = "end_of_transaction"  # nozzle hung, transaction waits to be closed
    OFFLINE = "offline"  # the controller cannot reach the dispenser
    ERROR = "error"


class PresetType(enum.StrEnum):
    FULL_TANK = "full_tank"
    VOLUME = "volume"
    AMOUNT = "amount"


@dataclass(frozen=True, slots=True)
class Preset:
    type: PresetType = PresetType.FULL_TANK
    volume_ml: int | None = None
    amount_minor: int | None = None


@dataclass(frozen=True, slots=True)
class PumpStatus:
    pump: int
    state: PumpState
    nozzle: int | None = None  # the nozzle up / in use, when known
    volume_ml: int | None = None  # running or final volume of the current transaction
    amount_minor: int | None = None
    unit_price_mmu: int | None = None  # milli-minor units per litre
    transaction: int | None = None  # the device's own transaction number, when it has one
    error: str | None = None  # why the state is ERROR (the device's code, or a bad packet)


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who the controller is and which life of it we talk to.

    ``device_id`` names the controller (a serial number or unique identifier where the protocol
    offers one, else the configured address); ``boot_marker`` changes when it restarts, where the
    protocol shows that (``None`` when it does not). Transaction numbers are only unique within
    one ``device_id`` and one epoch; the edge detects an epoch change from these and from
    transaction contents that do not match what it journaled under the same number.
    """

    device_id: str
    boot_marker: str | None = None
    firmware: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceTransaction:
    """One finished dispensing as the device recorded it."""

    pump: int
    nozzle: int
    transaction: int
    volume_ml: int
    amount_minor: int
    unit_price_mmu: int
    totalizer_start_ml: int | None  # the nozzle's volume totalizer before (read from the
    totalizer_end_ml: int | None  # device, never derived) and after; None when not reported
    started_at: datetime | None
    ended_at: datetime
    grade_code: str | None = None  # the device's grade id, as text, when it reports one
    closed: bool = False
    flags: tuple[str, ...] = ()  # FLAG_* above
    raw: tuple[tuple[str, str], ...] = ()  # (wire field, wire text) of inexact values


@dataclass(frozen=True, slots=True)
class NozzleTotals:
    pump: int
    nozzle: int
    volume_ml: int
    amount_minor: int


class Capability(enum.StrEnum):
    """What a driver (its protocol and device) can do; the controller asks before it acts."""

    PRESET_VOLUME = "preset_volume"  # authorise with a volume limit
    PRESET_AMOUNT = "preset_amount"  # authorise with an amount limit
    PRICE_BEFORE_AUTHORISE = "price_before_authorise"  # the price is downloaded, then released
    PRICE_WITH_AUTHORISE = "price_with_authorise"  # the authorisation carries the price
    STACKED_SALES = "stacked_sales"  # a pump can hold a finished sale and start another
    TOTALS = "totals"  # nozzle totalizers can be read
    DEVICE_TRANSACTION_NUMBERS = "device_transaction_numbers"  # the device numbers its sales
    TRANSACTION_REPORT = "transaction_report"  # the device's memory can be read by time window
    SUSPEND = "suspend"  # suspend / resume a fuelling
    # One exchange stops every pump on the line: a broadcast, or one request with a stop for
    # each pump (driver.StopsAllAtOnce).
    EMERGENCY_STOP_ALL = "emergency_stop_all"
    TANK_GAUGE = "tank_gauge"  # reads tank measurements
    # The driver has no loop of its own: it reports only while answering the controller's
    # calls, so its events never call for another poll (a poll already saw them).
    EVENTS_ONLY_WHEN_ASKED = "events_only_when_asked"


class VolumeUnit(enum.StrEnum):
    LITRES = "litres"
    US_GALLONS = "us_gallons"
    IMPERIAL_GALLONS = "imperial_gallons"


class LengthUnit(enum.StrEnum):
    MILLIMETRES = "millimetres"
    INCHES = "inches"


class TemperatureUnit(enum.StrEnum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


@dataclass(frozen=True, slots=True)
class TankMeasurement:
    """One reading of one tank by a gauge; a value the gauge did not report is ``None``."""

    tank: int
    measured_at: datetime
    volume_ml: int | None
    tc_volume_ml: int | None  # temperature-compensated volume (to the gauge's reference)
    ullage_ml: int | None
    product_height_um: int | None
    water_height_um: int | None
    temperature_mdegc: int | None
    water_volume_ml: int | None
    product_code: str | None = None
    #: gauge status for this tank (e.g. "delivery_in_progress", "leak_test_in_progress",
    #: "invalid_height")
    status: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    raw: tuple[tuple[str, str], ...] = ()  # (field, wire text) of inexact values


@dataclass(frozen=True, slots=True)
class TankDelivery:
    """A product delivery into a tank as the gauge recorded it (start and end readings)."""

    tank: int
    started_at: datetime
    ended_at: datetime
    start_volume_ml: int | None
    end_volume_ml: int | None
    start_tc_volume_ml: int | None
    end_tc_volume_ml: int | None
    start_water_height_um: int | None
    end_water_height_um: int | None
    start_temperature_mdegc: int | None
    end_temperature_mdegc: int | None
    start_product_height_um: int | None
    end_product_height_um: int | None
    product_code: str | None = None
    flags: tuple[str, ...] = ()
    raw: tuple[tuple[str, str], ...] = ()

    @property
    def volume_ml(self) -> int | None:
        """Delivered volume as the gauge measured it (end − start), when both are known."""
        if self.start_volume_ml is None or self.end_volume_ml is None:
            return None
        return self.end_volume_ml - self.start_volume_ml


@dataclass(frozen=True, slots=True)
class DeviceAlarm:
    """An alarm a device reports (a tank gauge's, a pump's error code)."""

    source: str  # "tank" or "pump"
    number: int  # the tank or fuelling point
    code: str  # the standard name, e.g. "high_water", "overfill", "probe_out"
    device_code: str  # the vendor's own code, as sent
    raised_at: datetime | None = None
    active: bool = True


class DeviceHealthState(enum.StrEnum):
    ONLINE = "online"
    DEGRADED = "degraded"  # answers, but some frames were refused lately
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """How one device (one address on a line) is doing, as its driver sees it."""

    device: str  # the configured device name
    state: DeviceHealthState
    since: datetime | None = None
    reason: str | None = None  # why offline/degraded (the last error)
    frames_refused: int = 0
    timeouts: int = 0
    counters: tuple[tuple[str, int], ...] = ()  # refusals by reason, etc.


# --- events a driver yields ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Something a device reported; ``device`` is the configured device name."""

    device: str


@dataclass(frozen=True, slots=True)
class PumpStatusChanged(DeviceEvent):
    status: PumpStatus


@dataclass(frozen=True, slots=True)
class FillingProgress(DeviceEvent):
    pump: int
    nozzle: int | None
    volume_ml: int
    amount_minor: int


@dataclass(frozen=True, slots=True)
class TransactionFinished(DeviceEvent):
    transaction: DeviceTransaction


@dataclass(frozen=True, slots=True)
class TankMeasured(DeviceEvent):
    measurement: TankMeasurement


@dataclass(frozen=True, slots=True)
class DeliveryRecorded(DeviceEvent):
    delivery: TankDelivery


@dataclass(frozen=True, slots=True)
class AlarmReported(DeviceEvent):
    alarm: DeviceAlarm


@dataclass(frozen=True, slots=True)
class HealthChanged(DeviceEvent):
    health: DeviceHealth


@dataclass(frozen=True, slots=True)
class IdentityChanged(DeviceEvent):
    """The device's identity or boot marker changed (a pump was power-cycled, a controller
    swapped): the edge asks :meth:`identity` again and begins a new epoch if it must."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class FrameRefused(DeviceEvent):
    """A frame or message the driver refused (bad checksum, truncated, out of sequence…)."""

    reason: str  # a stable reason code, e.g. "bad_crc", "truncated", "out_of_sequence"
    detail: str = ""
    frame_hex: str = field(default="", repr=False)


def as_json(value: Any) -> Any:
    """A standard-model value (dataclasses, enums, datetimes, nested) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_json(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value
