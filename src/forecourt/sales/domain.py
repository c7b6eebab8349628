"""Sales domain: what an uploaded sale is, how HQ judges it, and the station sequence book.

Pure Python: no frameworks. HQ stores every schema-valid sale (the dispenser is the legal
meter); unknown references quarantine a sale, they never drop it. What the edge says about
the device's values (``device_flags``) is stored and shown; only a legal-meter value the edge
could not represent exactly quarantines the sale, so that a person looks at it.

Absurd but real sales are stored, flagged and alerted, never dropped or refused (the upload
schema refuses only what cannot be stored, see ``sales.contracts``). Each flagged sale raises
alerts (one per :data:`ALERTED_FLAGS` member, kind = flag name, and ``quarantined`` when it
is) and its event carries its flags. What each flag means and whether it quarantines:

- ``zero_volume``: nothing dispensed (a nozzle lifted and hung up). Flag only.
- ``negative_amount``: an amount below zero. Quarantine, whatever the dispense type: no type
  has a use for it (``sale`` and ``drive_off`` are amounts owed, ``pump_test`` and
  ``own_use`` are zero or priced at the pump; refunds are not dispensings). A negative
  amount on a ``sale`` is how a skimmed till would look.
- ``totalizer_reversed``: the end totalizer below the start one: the meter's own record
  contradicts itself (or was tampered with). Quarantine.
- ``ended_before_started``: a clock problem; the meter's volume and amount stand. Flag only.
- ``business_date_far``: the business date more than :data:`BUSINESS_DATE_TOLERANCE` from
  the day the sale ended (UTC); the sale would be booked into another period's accounts.
  Quarantine.
- ``duplicate_station_seq``: another sale (another ``sale_id``) already holds this
  ``station_seq``, stored or earlier in the batch; the later one is flagged. Flag only: both
  may be real, the edge's numbering is what is wrong.
- ``sequence_jump``: a ``station_seq`` more than :data:`SEQUENCE_JUMP` beyond the high-water
  mark. Flag only; the sequence book keeps it aside (no high-water move, no gap range).
- ``amount_mismatch``: the amount is not volume × unit price as this dispenser rounds it (its
  amount resolution and rounding; over- *and* under-reported). Flag only.
- ``natural_key_collision``: the meter's transaction is already stored under another
  ``sale_id``; summaries count it once. Flag only.
- the reference flags (``unknown_fuelling_point``, ``unknown_nozzle``, ``grade_mismatch``,
  ``currency_mismatch``) and ``inexact_device_value``: quarantine.

A sale is quarantined when *any* of its flags is a quarantine flag, whatever else it has.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
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
    # Absurd but real values (see the module docstring)
    ZERO_VOLUME = "zero_volume"
    NEGATIVE_AMOUNT = "negative_amount"
    TOTALIZER_REVERSED = "totalizer_reversed"
    ENDED_BEFORE_STARTED = "ended_before_started"
    BUSINESS_DATE_FAR = "business_date_far"
    DUPLICATE_STATION_SEQ = "duplicate_station_seq"
    SEQUENCE_JUMP = "sequence_jump"


QUARANTINE_FLAGS = frozenset(
    {
        Flag.UNKNOWN_FUELLING_POINT,
        Flag.UNKNOWN_NOZZLE,
        Flag.GRADE_MISMATCH,
        Flag.CURRENCY_MISMATCH,
        Flag.INEXACT_DEVICE_VALUE,
        Flag.NEGATIVE_AMOUNT,
        Flag.TOTALIZER_REVERSED,
        Flag.BUSINESS_DATE_FAR,
    }
)
# Flags alerted under their own kind (a quarantined sale is alerted ``quarantined`` too).
ALERTED_FLAGS = frozenset(
    {
        Flag.AMOUNT_MISMATCH,
        Flag.NATURAL_KEY_COLLISION,
        Flag.ZERO_VOLUME,
        Flag.NEGATIVE_AMOUNT,
        Flag.TOTALIZER_REVERSED,
        Flag.ENDED_BEFORE_STARTED,
        Flag.BUSINESS_DATE_FAR,
        Flag.DUPLICATE_STATION_SEQ,
        Flag.SEQUENCE_JUMP,
    }
)

# A business date further than this from the (UTC) day a sale ended is not a time zone or a
# business-day cutoff (at most a day or two) nor a day closed late: ``business_date_far``.
BUSINESS_DATE_TOLERANCE = timedelta(days=7)
# A station_seq more than this beyond the high-water mark is a ``sequence_jump`` (a batch
# holds at most 5 000 sales; an edge offline for weeks is a few 10 000 behind at most).
SEQUENCE_JUMP = 100_000


def quarantines(flags: Iterable[Flag]) -> bool:
    """Whether a sale with these flags is quarantined: any quarantine flag, whatever else."""
    return any(f in QUARANTINE_FLAGS for f in flags)


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
    """True when the amount is exactly volume × unit price as this dispenser charges it:
    rounded with its own rounding to its own amount resolution (1 fen, 10 fen …).

    The dispenser computes its amount from the volume and price it reports, with integer
    rules HQ knows (``kernel.money.charge_minor``), so any difference, above or below,
    means the meter, the price or the journal is wrong (an under-reported amount is how
    cash is skimmed): the sale is recorded and flagged.
    """
    if resolution_minor <= 0:
        raise SalesError("a dispenser's amount resolution must be positive")
    # Integers the upload schema has checked: the kernel's rule without its value objects.
    expected = charge_minor(sale.volume_ml, sale.unit_price_mmu, resolution_minor, rounding)
    return sale.amount_minor == expected


def value_flags(sale: Sale) -> list[Flag]:
    """Flags a sale earns from its own values alone: absurd but possible (see the module
    docstring); the sale is stored whatever they are."""
    flags: list[Flag] = []
    if sale.volume_ml == 0:
        flags.append(Flag.ZERO_VOLUME)
    if sale.amount_minor < 0:
        flags.append(Flag.NEGATIVE_AMOUNT)
    start, end = sale.totalizer_start_ml, sale.totalizer_end_ml
    if start is not None and end is not None and end < start:
        flags.append(Flag.TOTALIZER_REVERSED)
    if sale.started_at is not None and sale.started_at > sale.ended_at:
        flags.append(Flag.ENDED_BEFORE_STARTED)
    ended_day = sale.ended_at.astimezone(UTC).date()
    if abs(sale.business_date - ended_day) > BUSINESS_DATE_TOLERANCE:
        flags.append(Flag.BUSINESS_DATE_FAR)
    return flags


# --- the per-station sequence book: high-water mark and gaps --------------------------------

Gap = tuple[int, int]  # inclusive range of missing sequence numbers

MAX_GAPS = 1000  # gap ranges a book keeps: beyond, the oldest (lowest) are given up
MAX_JUMPS = 256  # sequence jumps a book remembers until its high-water mark reaches them


@dataclass(frozen=True)
class SequenceBook:
    """A station's received sequence numbers: everything up to ``high_water`` except the
    ``gaps``, and the ``jumps`` above it.

    A sequence number more than :data:`SEQUENCE_JUMP` beyond the high-water mark (see
    :meth:`is_jump`) is a jump: remembered aside (the lowest :data:`MAX_JUMPS`), it moves
    neither the high-water mark nor opens a gap, so one wild number (2⁵³ − 1) never makes the
    book report quadrillions of missing sales. Once the high-water mark passes a remembered
    jump it counts as received. The gap list is bounded: beyond :data:`MAX_GAPS` ranges the
    lowest are given up (``dropped``, for an alert; not stored) and their numbers count as
    received from then on.
    """

    high_water: int = 0
    gaps: tuple[Gap, ...] = ()
    jumps: tuple[int, ...] = ()  # sorted, above high_water
    dropped: tuple[Gap, ...] = field(default=(), compare=False)  # by the last receive

    def is_jump(self, seq: int) -> bool:
        return seq > self.high_water + SEQUENCE_JUMP

    def receive(self, seqs: Iterable[int]) -> SequenceBook:
        """Account for newly stored sequence numbers, in any order, repeats allowed. Jumps
        are judged against the high-water mark before the call (as ingest flags them).

        Works on ranges, never on individual missing numbers, so a far sequence number
        costs one range, not memory proportional to the distance.
        """
        got = sorted(set(seqs))
        if not got:
            return SequenceBook(self.high_water, self.gaps, self.jumps)
        if got[0] < 1:
            raise SalesError("station sequences start at 1")
        limit = self.high_water + SEQUENCE_JUMP
        jumps = set(self.jumps)
        jumps.update(s for s in got if s > limit)
        got = [s for s in got if s <= limit]
        new_high = max(self.high_water, got[-1]) if got else self.high_water
        reached = {j for j in jumps if j <= new_high}
        if reached:
            got = sorted(set(got) | reached)
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
        dropped: tuple[Gap, ...] = ()
        if len(remaining) > MAX_GAPS:
            dropped = tuple(remaining[:-MAX_GAPS])
            remaining = remaining[-MAX_GAPS:]
        return SequenceBook(
            high_water=new_high,
            gaps=tuple(remaining),
            jumps=tuple(sorted(jumps - reached))[:MAX_JUMPS],
            dropped=dropped,
        )

    def missing_count(self) -> int:
        return sum(last - first + 1 for first, last in self.gaps)
