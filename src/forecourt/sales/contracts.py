"""Public messages of ``sales``: the upload schema edges speak and the events HQ publishes.

Upload schema versions: v1 now. When v2 arrives HQ accepts N and N−1
(``SUPPORTED_SCHEMA_VERSIONS``); edges send the newest they know.
"""

from __future__ import annotations

from datetime import date
from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from forecourt.kernel.events import event_type

SUPPORTED_SCHEMA_VERSIONS = (1,)
MAX_BATCH = 5000

SALE_COMPLETED = event_type("sales", "sale.completed")
SALE_QUARANTINED = event_type("sales", "sale.quarantined")
SALE_CONFLICT = event_type("sales", "sale.conflict")
SALE_AMOUNT_MISMATCH = event_type("sales", "sale.amount_mismatch")
SALE_NATURAL_KEY_COLLISION = event_type("sales", "sale.natural_key_collision")

BIG = 2**53  # keep every integer exact in JSON consumers too


class SaleV1(BaseModel):
    """One journaled dispensing, as uploaded (schema v1). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sale_id: UUID
    station_seq: int = Field(ge=1, lt=BIG)
    fuelling_point: int = Field(ge=1, le=999)
    nozzle: int = Field(ge=1, le=99)
    grade: str = Field(min_length=1, max_length=40)
    volume_ml: int = Field(ge=0, lt=BIG)
    unit_price_mmu: int = Field(ge=0, lt=BIG)
    amount_minor: int = Field(gt=-BIG, lt=BIG)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    price_version: str | None = Field(default=None, max_length=64)
    snapshot_version: int = Field(ge=0, lt=BIG)
    totalizer_start_ml: int = Field(ge=0, lt=BIG)
    totalizer_end_ml: int = Field(ge=0, lt=BIG)
    device_txn: int | None = Field(default=None, ge=0, lt=BIG)
    dispense_type: Literal["sale", "pump_test", "own_use", "drive_off"]
    started_at: AwareDatetime | None = None
    ended_at: AwareDatetime
    business_date: date
    shift_id: str = Field(min_length=1, max_length=40)
    schema_version: Literal[1] = 1


class SalesBatchV1(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    schema_version: Literal[1]
    sales: list[SaleV1] = Field(min_length=1, max_length=MAX_BATCH)


class SaleResult(BaseModel):
    sale_id: UUID
    station_seq: int
    status: Literal["created", "duplicate", "quarantined", "conflict"]
    flags: list[str] = []


class BatchResult(BaseModel):
    schema_version: int
    station: str
    results: list[SaleResult]
    high_water_mark: int
    gaps: list[tuple[int, int]]
