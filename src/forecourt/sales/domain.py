"""Sales domain: what an uploaded sale is, how HQ judges it, and the station sequence book.

Pure Python: no frameworks. HQ stores every schema-valid sale (the dispenser is the legal
meter); unknown references quarantine a sale, they never drop it. What the edge says about
the device's values (``device_flags``) is stored and shown; only a legal-meter value the edge
could not represent exactly quarantines the sale, so that a person looks at it.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from uuid import UUID

from forecourt.kernel.errors import ForecourtError
from forecourt.kernel.ids import uuid5_str
from forecourt.kernel.money import Rounding, charge_minor


class SalesError(ForecourtError):
    code = "sales.error"


class SchemaInvalid(SalesError):
    code = "sales.schema_invalid"
    http_status = 422


class UnsupportedSchemaVersion(SalesError):
    code = "sales.unsupported_schema_version"
    http_status = 422


class StationMismatch(SalesError):
    code = "sales.station_mismatch"
    http_status = 403


class DispenseType(enum.StrEnum):
    SALE = "sale"
    PUMP_TEST = "pump_test"
    OWN_USE = "own_use"
    DRIVE_OFF = "drive_off"


class IngestStatus(enum.StrEnum):
    CREATED = "created"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    CONFLICT = "conflict"


class Flag(enum.StrEnum):
    AMOUNT_MISMATCH = "amount_mismatch"
    NATURAL_KEY_COLLISION = "natural_key_collision"
    UNKNOWN_FUELLING_POINT = "unknown_fuelling_point"
    UNKNOWN_NOZZLE = "unknown_nozzle"
    GRADE_MISMATCH = "grade_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    # The edge's device flag of the same name: a meter value not representable in our units.
    INEXACT_DEVICE_VALUE = "inexact_device_value"


QUARANTINE_FLAGS = frozenset(
    {
        Flag.UNKNOWN_FUELLING_POINT,
        Flag.UNKNOWN_NOZZLE,
        Flag.GRADE_MISMATCH,
        Flag.CURRENCY_MISMATCH,
        Flag.INEXACT_DEVICE_VALUE,
    }
)

# The meter's own identity of a sale: (device, epoch, fuelling point, nozzle, device
# transaction, end totalizer). v1 sales know no device (None, None, …); a v2 sale whose
# device reported no totalizer has None last. None is a value here: keys match exactly.
NaturalKey = tuple[str | None, int | None, int, int, int, int | None]


@dataclass(frozen=True, slots=True)
class Sale:
    """One completed dispensing as the edge journaled it."""

    sale_id: UUID
    station_code: str
    station_seq: int
    fuelling_point: int
    nozzle: int
    grade: str
    volume_ml: int
    unit_price_mmu: int
    amount_minor: int
    currency: str
    price_version: str | None
    snapshot_version: int
    totalizer_start_ml: int | None  # None (v2 only): the device did not report it
    totalizer_end_ml: int | None
    device_txn: int | None
    dispense_type: DispenseType
    started_at: datetime | None
    ended_at: datetime
    business_date: date
    shift_id: str
    schema_version: int
    # v2: the controller, its numbering epoch, and the edge's notes on the device's values
    device_id: str | None = None
    device_epoch: int | None = None
    device_flags: tuple[str, ...] = ()  # sorted, no repeats
    device_raw: tuple[tuple[str, str], ...] | None = None  # sorted by name

    def payload_hash(self) -> str:
        """A canonical digest of everything the edge said: same id + other digest = conflict.

        The fields in declaration order as text (ISO for dates and times, normalised to UTC
        so an offset change alone is no conflict), joined by a unit separator. Stable across
        processes and versions as long as the field list is; a new schema version extends it
        at the end, so a v1 sale's digest (stored for every v1 sale) never changes.
        """
        started = self.started_at.astimezone(UTC).isoformat() if self.started_at else "None"
        parts: tuple[str, ...] = (  # every field, in order (a test checks none is missing)
            str(self.sale_id),
            self.station_code,
            str(self.station_seq),
            str(self.fuelling_point),
            str(self.nozzle),
            self.grade,
            str(self.volume_ml),
            str(self.unit_price_mmu),
            str(self.amount_minor),
            self.currency,
            repr(self.price_version),
            str(self.snapshot_version),
            str(self.totalizer_start_ml),
            str(self.totalizer_end_ml),
            repr(self.device_txn),
            self.dispense_type.value,
            started,
            self.ended_at.astimezone(UTC).isoformat(),
            self.business_date.isoformat(),
            self.shift_id,
            str(self.schema_version),
        )
        if self.schema_version >= 2:
            parts += (
                repr(self.device_id),
                repr(self.device_epoch),
                json.dumps(self.device_flags),
                json.dumps(self.device_raw),
            )
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def event_id(self, event_type: str, variant: str = "") -> str:
        """The id of an event about this sale: derived, so a re-processed sale can never
        announce the same fact under two ids. ``variant`` tells apart several facts of one
        type about one sale (each conflicting payload is its own conflict)."""
        key = f"{event_type}|{self.station_code}|{self.sale_id}"
        return uuid5_str(_EVENT_NAMESPACE_BYTES, f"{key}|{variant}" if variant else key)

    @property
    def natural_key(self) -> NaturalKey | None:
        """The meter's own identity (see :data:`NaturalKey`); None without a device
        transaction number."""
        if self.device_txn is None:
            return None
        return (
            self.device_id,
            self.device_epoch,
            self.fuelling_point,
            self.nozzle,
            self.device_txn,
            self.totalizer_end_ml,
        )


_EVENT_NAMESPACE = UUID("5b0a3c1e-8f0e-4c55-9a41-0f6a7c1d2e90")
_EVENT_NAMESPACE_BYTES = _EVENT_NAMESPACE.bytes


def amount_agrees(sale: Sale, *, resolution_minor: int, rounding: Rounding) -> bool:
    """True when the amount is within one resolution unit of volume × unit price.

    The dispenser rounds to its own resolution; anything further off means the meter, the
    price or the journal is wrong, so the sale is recorded and flagged.
    """
    if resolution_minor <= 0:
        raise SalesError("a dispenser's amount resolution must be positive")
    # Integers the upload schema has checked: the kernel's rule without its value objects.
    expected = charge_minor(sale.volume_ml, sale.unit_price_mmu, resolution_minor, rounding)
    return abs(expected - sale.amount_minor) <= resolution_minor


# --- the per-station sequence book: high-water mark and gaps --------------------------------

Gap = tuple[int, int]  # inclusive range of missing sequence numbers


@dataclass(frozen=True)
class SequenceBook:
    high_water: int = 0
    gaps: tuple[Gap, ...] = ()

    def receive(self, seqs: Iterable[int]) -> SequenceBook:
        """Account for newly stored sequence numbers, in any order, repeats allowed.

        Works on ranges, never on individual missing numbers, so a wild sequence number
        costs one range, not memory proportional to the jump.
        """
        got = sorted(set(seqs))
        if not got:
            return self
        if got[0] < 1:
            raise SalesError("station sequences start at 1")
        new_high = max(self.high_water, got[-1])
        intervals = list(self.gaps)
        if new_high > self.high_water:
            intervals.append((self.high_water + 1, new_high))
        remaining: list[Gap] = []
        i = 0
        for first, last in sorted(intervals):
            while i < len(got) and got[i] < first:
                i += 1
            start = first
            j = i
            while j < len(got) and got[j] <= last:
                if got[j] > start:
                    remaining.append((start, got[j] - 1))
                start = got[j] + 1
                j += 1
            if start <= last:
                remaining.append((start, last))
        return SequenceBook(high_water=new_high, gaps=tuple(remaining))

    def missing_count(self) -> int:
        return sum(last - first + 1 for first, last in self.gaps)
