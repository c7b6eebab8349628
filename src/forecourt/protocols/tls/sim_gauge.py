"""The simulated TLS gauge's device model: tanks, deliveries, alarms, and its answers.

A :class:`GaugeConfig` says what the gauge holds (from code, or a JSON file, see
:meth:`GaugeConfig.from_json`); :class:`GaugeModel` answers a decoded request with the reply a
TLS-350 would give, in the gauge's own units (the simulator's numbers are litres, millimetres
and °C unless the configuration says otherwise; only the labels differ). Volumes may drift down
slowly (``drift_per_minute``) so a polling screen looks alive; product height follows volume.

A request for a tank the gauge does not have is answered with no tank records (a real console
fills an inactive device's numbers with ``?``; that case is left to the codec tests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from forecourt.kernel.clock import Clock, SystemClock
from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.tls.codec import (
    TANK_ALARMS,
    DeliveryRecord,
    DeliveryReply,
    GaugeFloat,
    InventoryReply,
    RawReply,
    Reply,
    Request,
    SystemAlarm,
    SystemStatusReply,
    TankAlarms,
    TankDeliveries,
    TankInventory,
    TankStatusReply,
    WallClock,
)

# Volume change per degree Celsius used for the temperature-compensated volume (gasoline is
# near 0.00095/°C; a round figure is enough for a simulator).
_EXPANSION_PER_DEGC = 0.0009
_REFERENCE_DEGC = 15.0


@dataclass
class SimDelivery:
    """One delivery the simulated gauge holds in memory (readings in gauge units)."""

    started: datetime
    ended: datetime
    start_volume: float
    end_volume: float
    start_tc_volume: float | None = None
    end_tc_volume: float | None = None
    start_water: float = 0.0
    end_water: float = 0.0
    start_temperature: float = 15.0
    end_temperature: float = 15.0
    start_height: float = 0.0
    end_height: float = 0.0

    def floats(self) -> tuple[float, ...]:
        return (
            self.start_volume,
            self.start_tc_volume if self.start_tc_volume is not None else self.start_volume,
            self.start_water,
            self.start_temperature,
            self.end_volume,
            self.end_tc_volume if self.end_tc_volume is not None else self.end_volume,
            self.end_water,
            self.end_temperature,
            self.start_height,
            self.end_height,
        )


@dataclass
class SimTank:
    """One tank of the simulated gauge (numbers in the gauge's units)."""

    number: int
    product: str = "1"
    capacity: float = 30000.0
    volume: float = 15000.0
    height: float = 1200.0
    water: float = 0.0
    water_volume: float = 0.0
    temperature: float = 15.0
    tc_volume: float | None = None  # None: derived from volume and temperature
    status: int = 0  # i201 status bits
    fields: int = 7  # how many inventory floats the gauge sends (older consoles send fewer)
    alarms: list[str] = field(default_factory=list)  # active i205 alarm type numbers
    deliveries: list[SimDelivery] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.number <= 99:
            raise InvalidValue(f"tank number {self.number} outside 1-99")
        if len(self.product) != 1 or not 0x20 <= ord(self.product) <= 0x7E:
            raise InvalidValue(f"a product code is one printable character: {self.product!r}")
        if self.capacity <= 0 or not 0 <= self.volume <= self.capacity:
            raise InvalidValue(f"tank {self.number}: volume must lie within the capacity")
        if not 0 <= self.fields <= 0xFF:
            raise InvalidValue(f"tank {self.number}: fields must be 0-255")
        for code in self.alarms:
            if len(code) != 2 or not code.isdigit():
                raise InvalidValue(f"tank {self.number}: alarm type {code!r} is two digits")


def _aware(text: str, tz: ZoneInfo) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=tz)


@dataclass
class GaugeConfig:
    """What the simulated gauge holds and how it is set up."""

    tanks: list[SimTank]
    security_code: str | None = None
    timezone: str = "UTC"
    drift_per_minute: float = 0.0  # volume units drawn from every tank per minute
    software: str = "346330-100-B"
    #: functions this console answers with 9999FF1B, like an older firmware (e.g. ``i902``)
    unsupported: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        numbers = [tank.number for tank in self.tanks]
        if len(set(numbers)) != len(numbers):
            raise InvalidValue("tank numbers must be unique")
        if self.security_code is not None and (
            len(self.security_code) != 6
            or not all(0x20 <= ord(c) <= 0x7E for c in self.security_code)
        ):
            raise InvalidValue("a security code is six printable characters")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidValue(f"unknown IANA time zone {self.timezone!r}") from None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @classmethod
    def default(cls, tanks: int = 3, **settings: Any) -> GaugeConfig:
        """``tanks`` tanks of 30,000 (litres) with products ``1``, ``2``, ``3``…"""
        if not 1 <= tanks <= 99:
            raise InvalidValue("a gauge has 1-99 tanks")
        made = [
            SimTank(
                number=n,
                product=str(n % 10),
                capacity=30000.0,
                volume=30000.0 * (0.8 - 0.1 * ((n - 1) % 6)),
                height=2400.0 * (0.8 - 0.1 * ((n - 1) % 6)),
                water=3.5 if n == 1 else 0.0,
                water_volume=12.0 if n == 1 else 0.0,
                temperature=14.0 + n,
            )
            for n in range(1, tanks + 1)
        ]
        return cls(tanks=made, **settings)

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> GaugeConfig:
        """``{"timezone", "security_code", "drift_per_minute", "tanks": [{"number",
        "product", "capacity", "volume", "height", "water", "water_volume", "temperature",
        "tc_volume", "status", "fields", "alarms": ["05"], "deliveries": [{"started":
        "2026-11-30T06:00", "ended": ..., "start_volume": ..., ...}]}],
        "unsupported": ["i902"]}``"""
        if not isinstance(document, Mapping):
            raise InvalidValue("a gauge configuration is a JSON object")
        try:
            tz = ZoneInfo(str(document.get("timezone", "UTC")))
            tanks = []
            for item in document.get("tanks", []):
                values = dict(item)
                deliveries = [
                    SimDelivery(
                        **{
                            **d,
                            "started": _aware(d["started"], tz),
                            "ended": _aware(d["ended"], tz),
                        }
                    )
                    for d in values.pop("deliveries", [])
                ]
                tanks.append(SimTank(**values, deliveries=deliveries))
            return cls(
                tanks=tanks,
                security_code=document.get("security_code"),
                timezone=str(document.get("timezone", "UTC")),
                drift_per_minute=float(document.get("drift_per_minute", 0.0)),
                software=str(document.get("software", "346330-100-B")),
                unsupported=[str(f) for f in document.get("unsupported", [])],
            )
        except InvalidValue:
            raise
        except (TypeError, ValueError, KeyError, ZoneInfoNotFoundError) as exc:
            raise InvalidValue(f"bad gauge configuration: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> GaugeConfig:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidValue(f"cannot read gauge configuration {path}: {exc}") from None
        return cls.from_json(document)


class GaugeModel:
    """The gauge's state and its answer to each known request."""

    def __init__(self, config: GaugeConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.started = self.clock.now()
        self.tanks = {tank.number: tank for tank in config.tanks}

    def tank(self, number: int) -> SimTank:
        return self.tanks[number]

    def set_alarms(self, number: int, codes: list[str]) -> None:
        for code in codes:
            if code not in TANK_ALARMS and not (len(code) == 2 and code.isdigit()):
                raise InvalidValue(f"alarm type {code!r} is two digits")
        self.tanks[number].alarms = list(codes)

    def now(self) -> WallClock:
        return WallClock.from_datetime(self.clock.now(), self.config.tz)

    def _selected(self, request: Request) -> list[SimTank]:
        if request.tank == 0:
            return [self.tanks[n] for n in sorted(self.tanks)]
        return [self.tanks[request.tank]] if request.tank in self.tanks else []

    def _drawn(self, tank: SimTank) -> float:
        minutes = (self.clock.now() - self.started).total_seconds() / 60
        return min(tank.volume, max(0.0, self.config.drift_per_minute * minutes))

    def inventory(self, tank: SimTank) -> TankInventory:
        volume = tank.volume - self._drawn(tank)
        height = tank.height * (volume / tank.volume) if tank.volume else 0.0
        tc_volume = (
            tank.tc_volume
            if tank.tc_volume is not None and volume == tank.volume
            else volume * (1 - _EXPANSION_PER_DEGC * (tank.temperature - _REFERENCE_DEGC))
        )
        values = [
            volume,
            tc_volume,
            tank.capacity - volume,
            height,
            tank.water,
            tank.temperature,
            tank.water_volume,
        ]
        values += [0.0] * max(0, tank.fields - len(values))
        floats = tuple(GaugeFloat.of(v) for v in values[: tank.fields])
        return TankInventory(tank.number, tank.product, tank.status, floats)

    def reply(self, request: Request) -> Reply:
        """The reply to a known computer-format request (see codec.FUNCTIONS)."""
        at = self.now()
        tanks = self._selected(request)
        tz = self.config.tz
        if request.function == "i201":
            return InventoryReply(request.code, at, tuple(self.inventory(t) for t in tanks))
        if request.function in ("i202", "i20C"):
            found = []
            for tank in tanks:
                held = tank.deliveries[-1:] if request.function == "i20C" else tank.deliveries
                records = tuple(
                    DeliveryRecord(
                        WallClock.from_datetime(d.started, tz),
                        WallClock.from_datetime(d.ended, tz),
                        tuple(GaugeFloat.of(v) for v in d.floats()),
                    )
                    for d in held
                )
                found.append(TankDeliveries(tank.number, tank.product, records))
            return DeliveryReply(request.code, at, tuple(found))
        if request.function == "i205":
            return TankStatusReply(
                request.code, at, tuple(TankAlarms(t.number, tuple(t.alarms)) for t in tanks)
            )
        if request.function == "i101":
            alarms = tuple(
                SystemAlarm("02", code, tank.number)
                for tank in self._selected(Request("i101"))
                for code in tank.alarms
            )
            return SystemStatusReply(request.code, at, alarms)
        if request.function == "i902":
            created = WallClock.from_datetime(self.started, tz).text
            stamp = ".".join(created[i : i + 2] for i in range(0, 10, 2))
            return RawReply(
                request.code, f"{at.text}SOFTWARE# {self.config.software}CREATED - {stamp}"
            )
        raise InvalidValue(f"the simulated gauge does not answer {request.function}")
