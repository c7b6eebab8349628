"""What other contexts and the edge may use from ``network``: station snapshots, references
and the station directory (authentication of station credentials). Nothing else is public.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time
from functools import cached_property
from typing import Annotated, Protocol
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from forecourt.kernel.money import Rounding
from forecourt.network.domain import Price, PriceScope, business_date, effective_prices, shift_id


@dataclass(frozen=True)
class StationIdentity:
    code: str
    region: str


@dataclass(frozen=True)
class NozzleRef:
    grade: str
    tank: int


@dataclass(frozen=True)
class StationReferences:
    """What HQ checks an uploaded sale against."""

    code: str
    region: str
    timezone: str
    currency: str
    nozzles: dict[tuple[int, int], NozzleRef]  # (fuelling point, nozzle) → grade, tank
    amount_rules: dict[int, tuple[int, Rounding]]  # fuelling point → (resolution, rounding)
    grades: frozenset[str]

    @cached_property
    def fuelling_points(self) -> frozenset[int]:
        return frozenset(fp for fp, _ in self.nozzles)


class StationDirectory(Protocol):
    async def authenticate(self, token: str, source: str | None = None) -> StationIdentity | None:
        """The station a credential belongs to, or None (unknown, revoked or expired).
        ``source`` (the client's address) counts the failures: past the limit it raises
        :class:`~forecourt.kernel.errors.TooManyRequests` (429) instead."""
        ...

    async def references(self, station_code: str) -> StationReferences | None: ...


# --- the station snapshot an edge node pulls, persists and starts from --------------------


def _wall_clock(value: time) -> time:
    if value.tzinfo is not None:
        raise ValueError("a station's local time has no UTC offset: it is in its own time zone")
    return value


# A wall-clock time at the station, in the station's own time zone (``timezone``): no UTC
# offset, so not OpenAPI's ``format: time`` (RFC 3339 full-time, which has one). Answered as
# Python writes a naive time, HH:MM:SS (with .ffffff when it has microseconds).
LOCAL_TIME_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?$"
LocalTime = Annotated[
    time,
    AfterValidator(_wall_clock),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": LOCAL_TIME_PATTERN,
            "description": "a local wall-clock time at the station, in the station's own "
            "time zone (its timezone), without a UTC offset: HH:MM[:SS]",
            "examples": ["06:00:00"],
        }
    ),
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SnapshotGrade(_Model):
    code: str
    name: str
    kind: str


class SnapshotTank(_Model):
    number: int
    grade: str
    capacity_ml: int


class SnapshotNozzle(_Model):
    number: int
    grade: str
    tank: int


class SnapshotModel(_Model):
    code: str
    amount_resolution_minor: int
    rounding: Rounding
    volume_decimals: int


class SnapshotFuellingPoint(_Model):
    number: int
    dispenser: int
    model: SnapshotModel
    nozzles: list[SnapshotNozzle]


class SnapshotPrice(_Model):
    price_id: str
    grade: str
    scope: PriceScope
    scope_code: str
    milli_minor_per_litre: int
    currency: str
    effective_from: datetime
    # The published price set the price belongs to (``POST /v1/network/price-sets``); a
    # sale authorised at this price carries it. Left out of the JSON when there is none (a
    # price from a chain file), so such a snapshot reads as it did before price sets.
    price_set_id: str | None = Field(
        default=None, max_length=64, exclude_if=lambda value: value is None
    )


class SnapshotStation(_Model):
    code: str
    name: str
    region: str
    timezone: str
    business_day_cutoff: LocalTime
    shift_starts: list[LocalTime]


class StationSnapshot(_Model):
    """Everything an edge node needs to sell without HQ, versioned by network revision."""

    version: int = Field(ge=1)
    generated_at: datetime
    chain: str
    currency: str
    station: SnapshotStation
    grades: list[SnapshotGrade]
    tanks: list[SnapshotTank]
    fuelling_points: list[SnapshotFuellingPoint]
    prices: list[SnapshotPrice]

    def prices_at(self, at: datetime) -> dict[str, SnapshotPrice]:
        """Price in force per grade at ``at`` (the same rule HQ uses)."""
        by_id = {p.price_id: p for p in self.prices}
        domain_prices = [
            Price(
                grade=p.grade,
                scope=p.scope,
                scope_code=p.scope_code,
                milli_minor_per_litre=p.milli_minor_per_litre,
                currency=p.currency,
                effective_from=p.effective_from,
                price_id=p.price_id,
                price_set_id=p.price_set_id,
            )
            for p in self.prices
        ]
        chosen = effective_prices(
            domain_prices, station=self.station.code, region=self.station.region, at=at
        )
        return {grade: by_id[p.price_id] for grade, p in chosen.items()}

    def next_price_change_after(self, at: datetime) -> datetime | None:
        upcoming = [p.effective_from for p in self.prices if p.effective_from > at]
        return min(upcoming) if upcoming else None

    def fuelling_point(self, number: int) -> SnapshotFuellingPoint | None:
        return next((fp for fp in self.fuelling_points if fp.number == number), None)

    def business_date(self, at: datetime) -> date:
        return business_date(at, ZoneInfo(self.station.timezone), self.station.business_day_cutoff)

    def shift_id(self, at: datetime) -> str:
        st = self.station
        return shift_id(at, ZoneInfo(st.timezone), st.business_day_cutoff, tuple(st.shift_starts))
