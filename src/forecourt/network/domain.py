"""The station network model: pure values, no frameworks.

chain → regions → stations (IANA timezone, business-day cut-off, shifts) → dispensers →
fuelling points → nozzles; each nozzle draws one chain-level grade from one station tank.
Prices carry ``effective_from`` so a switch at a given instant is data, not code; the most
specific scope wins (station over region over chain).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from forecourt.kernel.errors import ForecourtError
from forecourt.kernel.money import Rounding


class NetworkError(ForecourtError):
    code = "network.invalid"
    http_status = 422


class UnknownStation(ForecourtError):
    code = "network.unknown_station"
    http_status = 404


class PriceScope(enum.StrEnum):
    CHAIN = "chain"
    REGION = "region"
    STATION = "station"


SCOPE_RANK = {PriceScope.CHAIN: 0, PriceScope.REGION: 1, PriceScope.STATION: 2}


@dataclass(frozen=True)
class Grade:
    code: str
    name: str
    kind: str = "gasoline"  # gasoline | diesel | other


@dataclass(frozen=True)
class DispenserModel:
    code: str
    amount_resolution_minor: int = 1
    rounding: Rounding = Rounding.HALF_UP
    volume_decimals: int = 2

    def __post_init__(self) -> None:
        if self.amount_resolution_minor <= 0:
            raise NetworkError(f"model {self.code}: amount resolution must be positive")
        if not 0 <= self.volume_decimals <= 3:
            raise NetworkError(f"model {self.code}: volume decimals must be 0..3")


@dataclass(frozen=True)
class Tank:
    number: int
    grade: str
    capacity_ml: int


@dataclass(frozen=True)
class Nozzle:
    number: int
    grade: str
    tank: int


@dataclass(frozen=True)
class FuellingPoint:
    number: int
    nozzles: tuple[Nozzle, ...]


@dataclass(frozen=True)
class Dispenser:
    number: int
    model: str
    fuelling_points: tuple[FuellingPoint, ...]


@dataclass(frozen=True)
class Station:
    code: str
    name: str
    region: str
    timezone: str
    business_day_cutoff: time = time(0, 0)
    shift_starts: tuple[time, ...] = (time(0, 0),)  # local start times; one is the cut-off
    tanks: tuple[Tank, ...] = ()
    dispensers: tuple[Dispenser, ...] = ()

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise NetworkError(f"station {self.code}: unknown timezone {self.timezone!r}") from None
        if self.business_day_cutoff not in self.shift_starts:
            raise NetworkError(f"station {self.code}: the first shift must start at the cut-off")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class Price:
    grade: str
    scope: PriceScope
    scope_code: str  # chain, region or station code
    milli_minor_per_litre: int
    currency: str
    effective_from: datetime
    price_id: str = ""

    def __post_init__(self) -> None:
        if self.effective_from.tzinfo is None:
            raise NetworkError("price effective_from must carry a timezone")


@dataclass(frozen=True)
class Chain:
    code: str
    name: str
    currency: str
    regions: tuple[tuple[str, str], ...] = ()  # (code, name)
    grades: tuple[Grade, ...] = ()
    dispenser_models: tuple[DispenserModel, ...] = ()
    stations: tuple[Station, ...] = ()
    prices: tuple[Price, ...] = field(default_factory=tuple)


def business_date(at: datetime, zone: ZoneInfo, cutoff: time) -> date:
    """The station business day an instant belongs to: local time minus the cut-off.

    With a 06:00 cut-off, 05:59 local on the 2nd still belongs to the 1st. A business day
    starts when the local clock first reaches the cut-off, so when a DST change repeats an
    hour containing the cut-off, the repeated part stays in the new day.
    """
    local = at.astimezone(zone)
    shifted = local - timedelta(hours=cutoff.hour, minutes=cutoff.minute, seconds=cutoff.second)
    day = shifted.date()
    if _first_instant(day + timedelta(days=1), cutoff, zone) <= at.astimezone(UTC):
        return day + timedelta(days=1)
    return day


def _first_instant(day: date, wall: time, zone: ZoneInfo) -> datetime:
    """The first instant (in UTC) the local clock shows ``wall`` on ``day`` (``fold=0``)."""
    return datetime.combine(day, wall, tzinfo=zone).astimezone(UTC)


def shift_id(at: datetime, zone: ZoneInfo, cutoff: time, shift_starts: tuple[time, ...]) -> str:
    """``<business date>/<n>``: the n-th shift of the business day (shift 1 starts at cut-off)."""
    day = business_date(at, zone, cutoff)
    local = at.astimezone(zone)

    def start_of(start: time) -> datetime:
        begins = datetime.combine(day, start, tzinfo=zone)
        return begins + timedelta(days=1) if start < cutoff else begins

    def begun(start: time) -> bool:
        # By the local clock, or since its first occurrence when a DST change repeats it.
        begins = start_of(start)
        return begins <= local or begins.astimezone(UTC) <= at.astimezone(UTC)

    number = sum(1 for start in shift_starts if begun(start))
    return f"{day.isoformat()}/{max(number, 1)}"


def effective_prices(
    prices: list[Price], *, station: str, region: str, at: datetime
) -> dict[str, Price]:
    """The price in force per grade at ``at``.

    The most specific scope that has a price in force wins (station over region over chain,
    as configuration overrides do); within a scope the latest ``effective_from`` not after
    ``at`` wins.
    """
    best: dict[str, Price] = {}
    for price in prices:
        if price.effective_from > at:
            continue
        if not applies_to(price, station=station, region=region):
            continue
        current = best.get(price.grade)
        if current is None or _price_key(price) > _price_key(current):
            best[price.grade] = price
    return best


def applies_to(price: Price, *, station: str, region: str) -> bool:
    return (
        price.scope is PriceScope.CHAIN
        or (price.scope is PriceScope.REGION and price.scope_code == region)
        or (price.scope is PriceScope.STATION and price.scope_code == station)
    )


def _price_key(price: Price) -> tuple[int, datetime]:
    return (SCOPE_RANK[price.scope], price.effective_from)
