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
from decimal import Decimal, InvalidOperation, localcontext
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from forecourt.kernel.errors import ForecourtError, TooManyRequests
from forecourt.kernel.money import MILLI, Rounding, UnitPrice, currency_exponent


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
    price_set_id: str | None = None  # the published set it belongs to; None from a chain file

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


# --- price sets: a whole price list for a scope, published ahead of its instant --------------


class PriceSetInvalid(NetworkError):
    code = "network.price_set_invalid"


class PriceSetExists(ForecourtError):
    code = "network.price_set_exists"
    http_status = 409


class PriceSetInForce(ForecourtError):
    code = "network.price_set_in_force"
    http_status = 409


class UnknownPriceSet(ForecourtError):
    code = "network.unknown_price_set"
    http_status = 404


class UnknownCredential(ForecourtError):
    code = "network.unknown_credential"
    http_status = 404


class TooManyFailures(TooManyRequests):
    code = "auth.too_many_failures"


class UnknownPrice(ForecourtError):
    code = "network.unknown_price"
    http_status = 404


# A price above this many minor units per litre (100.00 CNY, EUR or USD; 10 000 JPY or KRW)
# is a slipped decimal point, not a price: 789 typed for 7.89 is refused.
MAX_MINOR_PER_LITRE = 10_000
# A set further ahead than this is a mistyped year rather than a plan.
MAX_LEAD = timedelta(days=366)


@dataclass(frozen=True)
class PriceSet:
    """One published price list: every grade sold in its scope, in force from one instant."""

    price_set_id: str
    scope: PriceScope
    scope_code: str
    effective_from: datetime
    currency: str
    prices: tuple[tuple[str, int], ...]  # (grade, milli-minor units per litre), by grade
    created_at: datetime
    withdrawn_at: datetime | None = None

    def status(self, now: datetime, latest_in_force: datetime | None) -> str:
        """``withdrawn``, ``upcoming``, ``in_force`` (the latest begun in its scope) or
        ``superseded``."""
        if self.withdrawn_at is not None:
            return "withdrawn"
        if self.effective_from > now:
            return "upcoming"
        if latest_in_force is not None and self.effective_from < latest_in_force:
            return "superseded"
        return "in_force"


def stations_in_scope(stations: list[Station], scope: PriceScope, scope_code: str) -> list[Station]:
    return [
        s
        for s in stations
        if scope is PriceScope.CHAIN
        or (scope is PriceScope.REGION and s.region == scope_code)
        or (scope is PriceScope.STATION and s.code == scope_code)
    ]


def grades_sold(station: Station) -> set[str]:
    """The grades a station sells: those its nozzles draw."""
    return {n.grade for d in station.dispensers for fp in d.fuelling_points for n in fp.nozzles}


def price_set_gaps(
    stations: list[Station], scope: PriceScope, scope_code: str, priced: set[str]
) -> list[str]:
    """One problem per station in scope that sells a grade the set does not price."""
    return [
        f"gap: station {s.code} sells {', '.join(sorted(missing))} but the set has no price "
        f"for {'it' if len(missing) == 1 else 'them'}"
        for s in stations_in_scope(stations, scope, scope_code)
        if (missing := grades_sold(s) - priced)
    ]


def timing_problems(effective_from: datetime, now: datetime) -> list[str]:
    """A set starts at an instant with a UTC offset, not before HQ's now, within a year."""
    if effective_from.tzinfo is None or effective_from.utcoffset() is None:
        return ["effective_from: has no UTC offset (give one, e.g. 2026-12-24T00:00:00+08:00)"]
    if effective_from < now:
        return [
            f"effective_from: {effective_from.isoformat()} is in the past "
            f"(head office time is {now.isoformat()})"
        ]
    if effective_from > now + MAX_LEAD:
        return [f"effective_from: {effective_from.isoformat()} is more than 366 days ahead"]
    return []


def parse_unit_price(grade: str, text: str, currency: str) -> tuple[int | None, str | None]:
    """``text`` (major units per litre, e.g. "7.89") as exact milli-minor units per litre, or
    the problem with it: not a decimal, not positive, finer than a milli-minor unit, absurd."""
    try:
        value = Decimal(text.strip()) if text.strip() == text and text else Decimal("NaN")
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        return None, f"prices.{grade}: {text!r} is not a decimal number"
    if value <= 0:
        return None, f"prices.{grade}: {text} is not positive"
    ceiling = Decimal(MAX_MINOR_PER_LITRE).scaleb(-currency_exponent(currency))
    if value > ceiling:  # checked before scaling: "1E+999999" is never made an integer
        return None, f"prices.{grade}: {text} is above the ceiling of {ceiling} {currency}/L"
    with localcontext() as exact:
        # Enough digits that scaling never rounds: the value is below the ceiling and its
        # text is short, so a digit beyond milli-minor units is seen, not rounded away.
        exact.prec = 100 + len(text)
        scaled = value.scaleb(currency_exponent(currency) + 3)
        if scaled != scaled.to_integral_value():
            return None, (
                f"prices.{grade}: {text} is finer than 1/{MILLI} of a {currency} minor unit"
            )
        return UnitPrice.from_decimal(value, currency).milli_minor_per_litre, None
