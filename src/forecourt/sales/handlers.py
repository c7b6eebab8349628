"""Use cases of ``sales``: ingest an edge's batch exactly once, answer queries."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from operator import itemgetter
from typing import Any
from uuid import UUID

from pydantic_core import to_json

from forecourt.infra.crash import crash_point
from forecourt.infra.db import Database
from forecourt.infra.logging import get_logger
from forecourt.kernel.errors import NotFound
from forecourt.kernel.events import EventRecord
from forecourt.kernel.money import Rounding
from forecourt.network.contracts import StationDirectory, StationReferences
from forecourt.sales.contracts import (
    SALE_AMOUNT_MISMATCH,
    SALE_COMPLETED,
    SALE_CONFLICT,
    SALE_NATURAL_KEY_COLLISION,
    SALE_QUARANTINED,
    SaleV2,
    UploadedSale,
)
from forecourt.sales.domain import (
    ALERTED_FLAGS,
    DispenseType,
    Flag,
    IngestStatus,
    Sale,
    SequenceBook,
    amount_agrees,
    quarantines,
    value_flags,
)
from forecourt.sales.store import SalesStore

log = get_logger("forecourt.sales")
INEXACT_DEVICE_VALUE = Flag.INEXACT_DEVICE_VALUE.value
SOURCE = "/forecourt/sales"


@dataclass(frozen=True)
class RefusedItem:
    """An item of a batch that is not a valid sale of its schema version: HQ stores nothing
    of it and answers ``refused`` with the reasons; the rest of the batch goes on."""

    index: int
    sale_id: UUID | None  # as far as readable
    station_seq: int | None
    errors: list[dict[str, Any]]  # {loc, msg, type}, loc relative to the item


@dataclass(frozen=True)
class UploadBatch:
    """A batch whose envelope is valid: the valid sales, and the items refused one by one."""

    schema_version: int
    sales: Sequence[UploadedSale]
    indices: Sequence[int] | None = None  # each sale's position in the request; None: 0, 1, …
    refused: Sequence[RefusedItem] = field(default_factory=tuple)


def to_domain(s: UploadedSale, station_code: str) -> Sale:
    device: dict[str, Any] = {}
    if isinstance(s, SaleV2):  # what v2 adds: the controller's identity, epoch and flags
        device = {
            "device_id": s.device_id,
            "device_epoch": s.device_epoch,
            "device_flags": tuple(sorted(set(s.device_flags))),
            "device_raw": None if s.device_raw is None else tuple(sorted(s.device_raw.items())),
        }
    return Sale(
        sale_id=s.sale_id,
        station_code=station_code,
        station_seq=s.station_seq,
        fuelling_point=s.fuelling_point,
        nozzle=s.nozzle,
        grade=s.grade,
        volume_ml=s.volume_ml,
        unit_price_mmu=s.unit_price_mmu,
        amount_minor=s.amount_minor,
        currency=s.currency,
        price_version=s.price_version,
        snapshot_version=s.snapshot_version,
        totalizer_start_ml=s.totalizer_start_ml,
        totalizer_end_ml=s.totalizer_end_ml,
        device_txn=s.device_txn,
        dispense_type=DispenseType(s.dispense_type),
        started_at=s.started_at,
        ended_at=s.ended_at,
        business_date=s.business_date,
        shift_id=s.shift_id,
        schema_version=s.schema_version,
        **device,
    )


def judge(sale: Sale, refs: StationReferences) -> list[Flag]:
    """Flags a sale earns against master data and its own values (pure; before any
    database work). The flags that need the station's history (natural key, station_seq)
    are the batch's, in :func:`ingest_batch`."""
    flags: list[Flag] = []
    if sale.device_flags and INEXACT_DEVICE_VALUE in sale.device_flags:
        flags.append(Flag.INEXACT_DEVICE_VALUE)  # the edge's note on the legal meter's value
    ref = refs.nozzles.get((sale.fuelling_point, sale.nozzle))
    if sale.fuelling_point not in refs.fuelling_points:
        flags.append(Flag.UNKNOWN_FUELLING_POINT)
    elif ref is None:
        flags.append(Flag.UNKNOWN_NOZZLE)
    elif ref.grade != sale.grade:
        flags.append(Flag.GRADE_MISMATCH)
    flags.extend(value_flags(sale))
    if sale.currency != refs.currency:
        # Amounts in another currency cannot be checked against our rules (quarantined).
        flags.append(Flag.CURRENCY_MISMATCH)
        return flags
    # Each dispenser's own amount resolution and rounding (an unknown fuelling point: 1, ½↑).
    resolution, rounding = refs.amount_rules.get(sale.fuelling_point, (1, Rounding.HALF_UP))
    if not amount_agrees(sale, resolution_minor=resolution, rounding=rounding):
        flags.append(Flag.AMOUNT_MISMATCH)
    return flags


def flag_details(
    flag: Flag, sale: Sale, book: SequenceBook, other: UUID | None = None
) -> dict[str, Any]:
    """What an alert of kind ``flag`` says about the sale (beyond its id)."""
    details: dict[str, Any] = {"station_seq": sale.station_seq}
    if flag is Flag.ZERO_VOLUME:
        details["volume_ml"] = sale.volume_ml
    elif flag is Flag.NEGATIVE_AMOUNT:
        details.update(amount_minor=sale.amount_minor, dispense_type=sale.dispense_type.value)
    elif flag is Flag.TOTALIZER_REVERSED:
        details.update(
            totalizer_start_ml=sale.totalizer_start_ml, totalizer_end_ml=sale.totalizer_end_ml
        )
    elif flag is Flag.ENDED_BEFORE_STARTED:
        started = sale.started_at.isoformat() if sale.started_at else None
        details.update(started_at=started, ended_at=sale.ended_at.isoformat())
    elif flag is Flag.BUSINESS_DATE_FAR:
        details.update(
            business_date=sale.business_date.isoformat(), ended_at=sale.ended_at.isoformat()
        )
    elif flag is Flag.DUPLICATE_STATION_SEQ:
        details["other_sale_id"] = str(other) if other else None
    elif flag is Flag.SEQUENCE_JUMP:
        details["high_water_mark"] = book.high_water
    return details


def sale_data(sale: Sale) -> dict[str, Any]:
    data = {
        "sale_id": str(sale.sale_id),
        "station": sale.station_code,
        "station_seq": sale.station_seq,
        "fuelling_point": sale.fuelling_point,
        "nozzle": sale.nozzle,
        "grade": sale.grade,
        "volume_ml": sale.volume_ml,
        "unit_price_mmu": sale.unit_price_mmu,
        "amount_minor": sale.amount_minor,
        "currency": sale.currency,
        "price_version": sale.price_version,
        "dispense_type": sale.dispense_type.value,
        "device_txn": sale.device_txn,
        "totalizer_start_ml": sale.totalizer_start_ml,
        "totalizer_end_ml": sale.totalizer_end_ml,
        "started_at": sale.started_at.isoformat() if sale.started_at else None,
        "ended_at": sale.ended_at.isoformat(),
        "business_date": sale.business_date.isoformat(),
        "shift_id": sale.shift_id,
    }
    if sale.schema_version >= 2:
        data.update(
            device_id=sale.device_id,
            device_epoch=sale.device_epoch,
            device_flags=list(sale.device_flags),
            device_raw=dict(sale.device_raw) if sale.device_raw is not None else None,
        )
    return data


@dataclass
class IngestCounters:
    """Hook for metrics: called once per batch with each status and flag and how many."""

    on_status: Callable[[str, int], None] = lambda _status, _n: None
    on_flag: Callable[[str, int], None] = lambda _flag, _n: None


@dataclass
class IngestOutcome:
    """What HQ answers for one batch (the :class:`BatchResult` contract), kept as plain
    values: a big batch answers thousands of sales, so no model object per sale."""

    schema_version: int
    station: str
    results: list[dict[str, Any]]  # index, sale_id, station_seq, status, flags (errors)
    high_water_mark: int
    gaps: list[tuple[int, int]]

    def to_json(self) -> bytes:
        return to_json(
            {
                "schema_version": self.schema_version,
                "station": self.station,
                "results": self.results,
                "high_water_mark": self.high_water_mark,
                "gaps": self.gaps,
            }
        )


async def ingest_batch(
    db: Database,
    directory: StationDirectory,
    station_code: str,
    batch: UploadBatch,
    *,
    traceparent: str | None = None,
    counters: IngestCounters | None = None,
) -> IngestOutcome:
    """Record a batch from one station: every schema-valid sale is stored exactly once.

    Order does not matter and repeats are answered from what is stored: same ``sale_id`` and
    same payload → ``duplicate``; same ``sale_id`` and another payload → ``conflict`` (kept
    aside with an alert, the first version stays authoritative). Items refused by the schema
    are answered ``refused`` at their place and alerted; they never hold the others back.
    """
    counters = counters or IngestCounters()
    refs = await directory.references(station_code)
    if refs is None:
        raise NotFound(f"unknown station {station_code!r}", code="sales.unknown_station")
    now = db.clock.now()
    sales = [to_domain(s, station_code) for s in batch.sales]
    judged = [(sale, judge(sale, refs), sale.payload_hash()) for sale in sales]

    results: list[dict[str, Any]] = []
    rows: list[tuple[Any, ...]] = []
    conflicts: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    events: list[EventRecord] = []

    def event(kind: str, sale: Sale, data: dict[str, Any], variant: str = "", **extra: Any) -> None:
        # Built straight as outbox records: one JSON encoding per event, no envelope object
        # (uow.emit_records still checks the envelope's rules once per distinct value).
        events.append(
            EventRecord(
                sale.event_id(kind, variant),
                kind,
                SOURCE,
                f"{station_code}/{data['sale_id']}",
                now,
                traceparent,
                to_json({**data, **extra}).decode(),
            )
        )

    def alert(kind: str, sale_id: UUID | None, **details: Any) -> None:
        alerts.append(
            {
                "station_code": station_code,
                "kind": kind,
                "sale_id": sale_id,
                "details": json.dumps(details, sort_keys=True, default=str),
                "raised_at": now,
            }
        )

    for item in batch.refused:
        alert(
            "refused",
            item.sale_id,
            index=item.index,
            station_seq=item.station_seq,
            errors=item.errors,
        )

    async with db.begin() as uow:
        store = SalesStore(uow.conn)
        await store.lock_station(station_code)
        stored_hashes = await store.existing(station_code, [s.sale_id for s in sales])
        keys = [s.natural_key for s in sales if s.natural_key is not None]
        key_hits = await store.natural_key_hits(station_code, keys)
        book = await store.sequence_book(station_code)
        # station_seq → the sale holding it: stored ones (one query for the batch's new
        # sales), then this batch's in order (the later of two is flagged).
        seq_holders = await store.station_seq_holders(
            station_code, [s.station_seq for s in sales if s.sale_id not in stored_hashes]
        )
        changed = [
            (s.sale_id, digest)
            for s, _, digest in judged
            if stored_hashes.get(s.sale_id) not in (None, digest)
        ]
        # A conflict already recorded (the edge sent the same other payload again) is
        # answered again, not recorded, alerted and announced twice.
        known_conflicts = await store.known_conflicts(station_code, changed) if changed else set()
        batch_hashes: dict[UUID, str] = {}
        seqs: list[int] = []
        positions = batch.indices if batch.indices is not None else range(len(sales))
        for index, (sale, flags, digest) in zip(positions, judged, strict=True):
            previous = stored_hashes.get(sale.sale_id) or batch_hashes.get(sale.sale_id)
            if previous is not None:
                if previous == digest:
                    results.append(_result(index, sale, IngestStatus.DUPLICATE, []))
                    continue
                if (sale.sale_id, digest) in known_conflicts:
                    results.append(_result(index, sale, IngestStatus.CONFLICT, []))
                    continue
                known_conflicts.add((sale.sale_id, digest))
                data = sale_data(sale)
                conflicts.append(
                    {
                        "station_code": station_code,
                        "sale_id": sale.sale_id,
                        "payload_hash": digest,
                        "payload": json.dumps(data, sort_keys=True),
                        "received_at": now,
                    }
                )
                alert("conflict", sale.sale_id, stored_hash=previous, received_hash=digest)
                event(SALE_CONFLICT, sale, data, digest, stored_hash=previous, received_hash=digest)
                results.append(_result(index, sale, IngestStatus.CONFLICT, []))
                continue
            batch_hashes[sale.sale_id] = digest
            key = sale.natural_key
            if key is not None:
                if key in key_hits:
                    flags.append(Flag.NATURAL_KEY_COLLISION)
                key_hits.add(key)
            holder = seq_holders.setdefault(sale.station_seq, sale.sale_id)
            if holder != sale.sale_id:
                flags.append(Flag.DUPLICATE_STATION_SEQ)
            if book.is_jump(sale.station_seq):
                flags.append(Flag.SEQUENCE_JUMP)
            quarantined = quarantines(flags)
            flag_names = [f.value for f in flags]
            rows.append(_row(sale, digest, quarantined, flag_names, now))
            seqs.append(sale.station_seq)
            data = sale_data(sale)
            if quarantined:
                alert("quarantined", sale.sale_id, flags=flag_names)
                event(SALE_QUARANTINED, sale, data, flags=flag_names)
            else:
                event(SALE_COMPLETED, sale, data, flags=flag_names)
            for raised in flags:
                if raised in ALERTED_FLAGS:
                    alert(raised.value, sale.sale_id, **flag_details(raised, sale, book, holder))
            if Flag.AMOUNT_MISMATCH in flags:
                event(SALE_AMOUNT_MISMATCH, sale, data)
            if Flag.NATURAL_KEY_COLLISION in flags:
                event(SALE_NATURAL_KEY_COLLISION, sale, data)
            status = IngestStatus.QUARANTINED if quarantined else IngestStatus.CREATED
            results.append(_result(index, sale, status, flag_names))
        new_book = book.receive(seqs)
        if new_book.dropped:  # the gap list is bounded: the oldest gaps are given up
            alert(
                "sequence_gaps_dropped",
                None,
                ranges=len(new_book.dropped),
                first=list(new_book.dropped[0]),
                last=list(new_book.dropped[-1]),
                missing=sum(b - a + 1 for a, b in new_book.dropped),
            )
        await store.insert_sales(rows)
        crash_point("hq.mid_batch")
        await store.insert_conflicts(conflicts)
        await store.insert_alerts(alerts)
        if new_book != book:
            await store.save_sequence_book(station_code, new_book, now)
        await uow.emit_records(events)
        # One audit record per upload, in its transaction: which station sent what.
        await uow.record_audit(
            actor=f"station:{station_code}",
            action="sales.upload",
            target=f"station:{station_code}",
            details={
                "sales": len(sales) + len(batch.refused),
                "stored": len(rows),
                "conflicts": len(conflicts),
                "refused": len(batch.refused),
                "station_seq": [min(seqs), max(seqs)] if seqs else None,
            },
        )
    # Said once the batch is committed: a rolled-back batch raised nothing.
    for row in alerts:
        log.warning(
            "sales.alert",
            kind=row["kind"],
            station=station_code,
            sale_id=str(row["sale_id"]) if row["sale_id"] else None,
            **json.loads(row["details"]),
        )
    if batch.refused:
        results.extend(_refused_result(item) for item in batch.refused)
        results.sort(key=itemgetter("index"))  # the request's order
    tally: dict[str, int] = {}
    flag_tally: dict[str, int] = {}
    for r in results:
        tally[r["status"]] = tally.get(r["status"], 0) + 1
        for f in r["flags"]:
            flag_tally[f] = flag_tally.get(f, 0) + 1
    for status_name, n in tally.items():
        counters.on_status(status_name, n)
    for flag, n in flag_tally.items():
        counters.on_flag(flag, n)
    return IngestOutcome(
        schema_version=batch.schema_version,
        station=station_code,
        results=results,
        high_water_mark=new_book.high_water,
        gaps=list(new_book.gaps),
    )


async def sales_summary(
    db: Database, *, station: str | None, business_date: date | None, grade: str | None
) -> dict[str, Any]:
    """The ``/v1/sales/summary`` answer.

    ``groups``: one per station, grade, currency, dispense type and quarantine, so amounts
    are never added across currencies and pump tests, own use and drive-offs are reported
    apart from sales (``sales`` counts ``sale`` dispensings only, ``dispensings`` every one).
    ``totals``: per currency, the sales (dispense type ``sale``, not quarantined) over all
    groups. A natural-key collision (one meter transaction stored under two sale ids) counts
    once; ``natural_key_duplicates`` says how many extra rows the station holds.
    """
    async with db.connection() as conn:
        store = SalesStore(conn)
        rows = await store.summary(station=station, business_date=business_date, grade=grade)
        duplicates = await store.natural_key_duplicates(station)
    groups: list[dict[str, Any]] = []
    totals: dict[str, dict[str, Any]] = {}
    for r in rows:
        group = {
            "station": r.station_code,
            "grade": r.grade,
            "currency": r.currency,
            "dispense_type": r.dispense_type,
            "quarantined": bool(r.quarantined),
            "dispensings": int(r.dispensings),
            "sales": int(r.sales),
            "volume_ml": int(r.volume_ml),
            "amount_minor": int(r.amount_minor),
        }
        groups.append(group)
        if group["dispense_type"] == DispenseType.SALE.value and not group["quarantined"]:
            total = totals.setdefault(
                r.currency,
                {"currency": r.currency, "sales": 0, "volume_ml": 0, "amount_minor": 0},
            )
            for name in ("sales", "volume_ml", "amount_minor"):
                total[name] += group[name]
    return {
        "groups": groups,
        "totals": [totals[c] for c in sorted(totals)],
        "natural_key_duplicates": duplicates,
    }


def _result(index: int, sale: Sale, status: IngestStatus, flags: list[str]) -> dict[str, Any]:
    return {
        "index": index,
        "sale_id": sale.sale_id,
        "station_seq": sale.station_seq,
        "status": status.value,
        "flags": flags,
    }


def _refused_result(item: RefusedItem) -> dict[str, Any]:
    return {
        "index": item.index,
        "sale_id": item.sale_id,
        "station_seq": item.station_seq,
        "status": "refused",
        "errors": item.errors,
        "flags": [],
    }


def _row(sale: Sale, digest: str, quarantined: bool, flags: list[str], now: Any) -> tuple[Any, ...]:
    """The ``sales.sale`` row, in ``SALE_COLUMNS`` order (a tuple: built once per sale on the
    hot path; a test checks the order against the table)."""
    return (
        sale.station_code,
        sale.business_date,
        sale.sale_id,
        sale.station_seq,
        sale.fuelling_point,
        sale.nozzle,
        sale.grade,
        sale.volume_ml,
        sale.unit_price_mmu,
        sale.amount_minor,
        sale.currency,
        sale.price_version,
        sale.snapshot_version,
        sale.totalizer_start_ml,
        sale.totalizer_end_ml,
        sale.device_txn,
        sale.dispense_type.value,
        sale.started_at,
        sale.ended_at,
        sale.shift_id,
        sale.schema_version,
        digest,
        quarantined,
        ",".join(flags),
        now,
        sale.device_id,
        sale.device_epoch,
        ",".join(sale.device_flags),
        None if sale.device_raw is None else json.dumps(dict(sale.device_raw), sort_keys=True),
    )
