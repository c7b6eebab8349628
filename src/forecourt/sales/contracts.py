"""Public messages of ``sales``: the upload schema edges speak and the events HQ publishes.

Upload schema versions: HQ accepts N and N−1 (``SUPPORTED_SCHEMA_VERSIONS``); edges send the
newest they know. A v2 batch may hold v1 items too: an edge upgraded with a full outbox
still holds payloads it journaled as v1, and sends them as they are.

What the schema refuses is what HQ cannot store or compute with, never what is merely odd
(an odd sale is stored and flagged, see ``sales.domain``): times outside the years
2000–2100 (UTC) or with an offset beyond ±18:00, dates outside 2000–2100, integers beyond
the bounds below (well inside PostgreSQL's bigint, exact in JSON), and control characters
(U+0000–U+001F: PostgreSQL text cannot hold NUL, and no field of a sale has a use for the
others) in any text field. A started time after the ended time is *not* refused: the meter
is the meter, the sale is flagged.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
)

from forecourt.kernel.events import event_type

SUPPORTED_SCHEMA_VERSIONS = (1, 2)
MAX_BATCH = 5000

SALE_COMPLETED = event_type("sales", "sale.completed")
SALE_QUARANTINED = event_type("sales", "sale.quarantined")
SALE_CONFLICT = event_type("sales", "sale.conflict")
SALE_AMOUNT_MISMATCH = event_type("sales", "sale.amount_mismatch")
SALE_NATURAL_KEY_COLLISION = event_type("sales", "sale.natural_key_collision")

BIG = 2**53  # keep every integer exact in JSON consumers too
# Sane bounds of one dispensing's figures (far beyond any real one, far inside a bigint, and
# their products and sums stay exact): 1 000 m³, 10⁹ minor units per litre, ±10¹⁵ minor units.
MAX_VOLUME_ML = 10**9
MAX_UNIT_PRICE_MMU = 10**12
MAX_AMOUNT_MINOR = 10**15
# Times and dates HQ takes: the years 2000 to 2100 (times in UTC), offsets as real zones have.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2101, 1, 1, tzinfo=UTC)  # exclusive
FIRST_DATE = date(2000, 1, 1)
LAST_DATE = date(2100, 12, 31)
MAX_OFFSET = timedelta(hours=18)

_CONTROL = re.compile("[\x00-\x1f]")


def _no_control(value: str) -> str:
    # PostgreSQL text cannot hold NUL (it answered 500 for the whole batch once); no text
    # field of a sale has a use for any other control character either. Refused here: the
    # one item is answered ``refused``.
    if _CONTROL.search(value) is not None:
        raise ValueError("text must not contain control characters (U+0000 to U+001F)")
    return value


def _time_in_range(value: datetime) -> datetime:
    # Year 1 or 9999 with an offset overflowed in UTC conversion (a 500): refused here.
    offset = value.utcoffset()
    if offset is None or abs(offset) > MAX_OFFSET:
        raise ValueError("the UTC offset must be within ±18:00")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST <= utc < LATEST:
        raise ValueError("the time must be in the years 2000 to 2100 (UTC)")
    return value


def _date_in_range(value: date) -> date:
    if not FIRST_DATE <= value <= LAST_DATE:
        raise ValueError("the date must be in the years 2000 to 2100")
    return value


Text = Annotated[str, AfterValidator(_no_control)]
Time = Annotated[AwareDatetime, AfterValidator(_time_in_range)]
Day = Annotated[date, AfterValidator(_date_in_range)]


class SaleV1(BaseModel):
    """One journaled dispensing, as uploaded (schema v1). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sale_id: UUID
    station_seq: int = Field(ge=1, lt=BIG)
    fuelling_point: int = Field(ge=1, le=999)
    nozzle: int = Field(ge=1, le=99)
    grade: Text = Field(min_length=1, max_length=40)
    volume_ml: int = Field(ge=0, le=MAX_VOLUME_ML)
    unit_price_mmu: int = Field(ge=0, le=MAX_UNIT_PRICE_MMU)
    amount_minor: int = Field(ge=-MAX_AMOUNT_MINOR, le=MAX_AMOUNT_MINOR)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    price_version: Text | None = Field(default=None, max_length=64)
    snapshot_version: int = Field(ge=0, lt=BIG)
    totalizer_start_ml: int = Field(ge=0, lt=BIG)
    totalizer_end_ml: int = Field(ge=0, lt=BIG)
    device_txn: int | None = Field(default=None, ge=0, lt=BIG)
    dispense_type: Literal["sale", "pump_test", "own_use", "drive_off"]
    started_at: Time | None = None
    ended_at: Time
    business_date: Day
    shift_id: Text = Field(min_length=1, max_length=40)
    schema_version: Literal[1] = 1


# v2 device fields: flag names as in edge.drivers (e.g. ``inexact_device_value``).
DeviceFlag = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,40}$")]
RawKey = Annotated[Text, Field(min_length=1, max_length=40)]
RawText = Annotated[Text, Field(max_length=64)]


class SaleV2(BaseModel):
    """One journaled dispensing, as uploaded (schema v2): v1 plus the device's identity and
    what the edge knows about the quality of the device's values. Unknown fields are refused.

    v1 is frozen on the wire, so v2 spells out every field rather than inheriting them.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sale_id: UUID
    station_seq: int = Field(ge=1, lt=BIG)
    fuelling_point: int = Field(ge=1, le=999)
    nozzle: int = Field(ge=1, le=99)
    grade: Text = Field(min_length=1, max_length=40)
    volume_ml: int = Field(ge=0, le=MAX_VOLUME_ML)
    unit_price_mmu: int = Field(ge=0, le=MAX_UNIT_PRICE_MMU)
    amount_minor: int = Field(ge=-MAX_AMOUNT_MINOR, le=MAX_AMOUNT_MINOR)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    price_version: Text | None = Field(default=None, max_length=64)
    snapshot_version: int = Field(ge=0, lt=BIG)
    # None: the device did not report it (never a guess; see edge.drivers).
    totalizer_start_ml: int | None = Field(default=None, ge=0, lt=BIG)
    totalizer_end_ml: int | None = Field(default=None, ge=0, lt=BIG)
    device_txn: int | None = Field(default=None, ge=0, lt=BIG)
    dispense_type: Literal["sale", "pump_test", "own_use", "drive_off"]
    started_at: Time | None = None
    ended_at: Time
    business_date: Day
    shift_id: Text = Field(min_length=1, max_length=40)
    device_id: Text = Field(min_length=1, max_length=64)  # the controller's identity
    # Bumped by the edge when the controller's transaction numbering starts again.
    device_epoch: int = Field(ge=0, lt=BIG)
    device_flags: list[DeviceFlag] = Field(default_factory=list, max_length=16)
    # Wire text of device values the edge could not represent exactly.
    device_raw: dict[RawKey, RawText] | None = Field(default=None, max_length=16)
    schema_version: Literal[2]


UploadedSale = SaleV1 | SaleV2


def item_version(item: Any) -> str | None:
    """The upload schema an item declares (v1 items may leave it out: v1's default)."""
    if isinstance(item, dict):
        version = item.get("schema_version", 1)
    else:  # an item already validated (serialising a batch)
        version = getattr(item, "schema_version", None)
    return str(version) if type(version) is int else None


# Either version, told apart by the item's own ``schema_version``.
AnySale = Annotated[
    Annotated[SaleV1, Tag("1")] | Annotated[SaleV2, Tag("2")],
    Discriminator(
        item_version,
        custom_error_type="unsupported_schema_version",
        custom_error_message="an item is an object with schema_version 1 or 2 (1 if left out)",
    ),
]


class SalesBatchV1(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    schema_version: Literal[1]
    sales: list[SaleV1] = Field(min_length=1, max_length=MAX_BATCH)


class SalesBatchV2(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    schema_version: Literal[2]
    sales: list[AnySale] = Field(min_length=1, max_length=MAX_BATCH)


SalesBatch = Annotated[SalesBatchV1 | SalesBatchV2, Field(discriminator="schema_version")]


class BatchEnvelope(BaseModel):
    """The batch without its items: what must hold before any item is judged on its own."""

    model_config = ConfigDict(extra="forbid", strict=True)

    schema_version: Literal[1, 2]
    sales: list[Any] = Field(min_length=1, max_length=MAX_BATCH)


class ItemError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class SaleResult(BaseModel):
    """HQ's verdict on one item, at its position in the request (``index``)."""

    index: int
    sale_id: UUID | None  # None only for a refused item whose sale_id is unreadable
    station_seq: int | None
    status: Literal["created", "duplicate", "quarantined", "conflict", "refused"]
    flags: list[str] = []
    errors: list[ItemError] | None = None  # refused items only: why


class BatchResult(BaseModel):
    schema_version: int
    station: str
    results: list[SaleResult]
    high_water_mark: int
    gaps: list[tuple[int, int]]


# --- what other contexts may read of a sale ---------------------------------------------------


class SaleDue(BaseModel):
    """What a sale known at HQ is due: its amount in minor units (fen for CNY), its currency,
    what kind of dispensing it was, and whether ingest quarantined it."""

    model_config = ConfigDict(frozen=True)

    station_code: str
    sale_id: UUID
    amount_minor: int
    currency: str
    dispense_type: str
    business_date: date
    quarantined: bool


async def sale_due(conn: Any, station_code: str, sale_id: UUID) -> SaleDue | None:
    """The sale ``sale_id`` of ``station_code`` as HQ holds it, or None (not uploaded yet);
    ``conn``: an open SQLAlchemy ``AsyncConnection`` (the caller's transaction)."""
    import sqlalchemy as sa

    from forecourt.sales.store import sale_t

    row = (
        await conn.execute(
            sa.select(
                sale_t.c.amount_minor,
                sale_t.c.currency,
                sale_t.c.dispense_type,
                sale_t.c.business_date,
                sale_t.c.quarantined,
            )
            .where(sale_t.c.station_code == station_code, sale_t.c.sale_id == sale_id)
            .order_by(sale_t.c.business_date)
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    return SaleDue(
        station_code=station_code,
        sale_id=sale_id,
        amount_minor=int(row.amount_minor),
        currency=row.currency,
        dispense_type=row.dispense_type,
        business_date=row.business_date,
        quarantined=bool(row.quarantined),
    )
