"""The edge's local journal: SQLite in WAL mode with ``synchronous=FULL``.

A completed dispensing is journaled together with its upload-outbox row in one local
transaction, with a gap-free per-station sequence and an edge-assigned UUIDv7 ``sale_id``.
All writes run on one dedicated thread, off the event loop, so pump polling never waits on
an fsync and SQLite sees exactly one writer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from forecourt.edge.domain import transaction_fingerprint
from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import upgrade_sync
from forecourt.kernel.clock import Clock
from forecourt.kernel.ids import new_id
from forecourt.protocols.model import DeviceAlarm, TankDelivery, TankMeasurement, as_json

T = TypeVar("T")

FLAG_EPOCH_CHANGE = "device_epoch_change"  # the first sale of a new device epoch

md = sa.MetaData()
snapshot_t = sa.Table(
    "snapshot",
    md,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("fetched_at", UTCDateTime(), nullable=False),
)
journal_t = sa.Table(
    "journal",
    md,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sale_id", sa.String(36), nullable=False, unique=True),
    sa.Column("fuelling_point", sa.Integer, nullable=False),
    sa.Column("device_txn", sa.Integer),
    sa.Column("grade", sa.String(40), nullable=False),
    sa.Column("volume_ml", sa.Integer, nullable=False),
    sa.Column("amount_minor", sa.Integer, nullable=False),
    sa.Column("dispense_type", sa.String(20), nullable=False),
    sa.Column("business_date", sa.String(10), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("journaled_at", UTCDateTime(), nullable=False),
    sa.Column("settled_at", UTCDateTime()),
    sa.Column("hq_status", sa.String(20)),
    sa.Column("hq_flags", sa.String(400)),
    sa.Column("hq_acked_at", UTCDateTime()),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("device_epoch", sa.Integer, nullable=False),
    sa.Column("nozzle", sa.Integer),
    sa.Column("totalizer_end_ml", sa.BigInteger),
    sa.Column("ended_at", UTCDateTime()),
    sa.Column("flags", sa.String(400), nullable=False),
)
# (device, fuelling point, device transaction, epoch) → sale, with the transaction's content
# fingerprint: de-duplicates re-read device transactions before a sale_id is ever assigned,
# and tells a re-used number (a restarted or wrapped counter) from a re-read.
device_txn_t = sa.Table(
    "device_sale",
    md,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("fuelling_point", sa.Integer, primary_key=True),
    sa.Column("device_txn", sa.Integer, primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),
    sa.Column("fingerprint", sa.String(200), nullable=False),
    sa.Column("sale_id", sa.String(36), nullable=False),
    sa.Column("closed_at", UTCDateTime()),
)
device_epoch_t = sa.Table(
    "device_epoch",
    md,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("boot_marker", sa.String(200)),
    sa.Column("changed_at", UTCDateTime(), nullable=False),
    sa.Column("reason", sa.String(200), nullable=False),
)
outbox_t = sa.Table(
    "upload_outbox",
    md,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sale_id", sa.String(36), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("rejected", sa.Boolean, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)
audit_t = sa.Table(
    "audit_outbox",
    md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(200), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("details", sa.Text, nullable=False),
    sa.Column("record_id", sa.String(36), unique=True),
    sa.Column("rejected", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_error", sa.Text),
    sa.Column("uploaded_at", UTCDateTime()),  # HQ's trail holds it since
)


tank_reading_t = sa.Table(
    "tank_reading",
    md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("tank", sa.Integer, nullable=False),
    sa.Column("measured_at", UTCDateTime(), nullable=False),
    sa.Column("volume_ml", sa.BigInteger),
    sa.Column("tc_volume_ml", sa.BigInteger),
    sa.Column("ullage_ml", sa.BigInteger),
    sa.Column("product_height_um", sa.BigInteger),
    sa.Column("water_height_um", sa.BigInteger),
    sa.Column("water_volume_ml", sa.BigInteger),
    sa.Column("temperature_mdegc", sa.Integer),
    sa.Column("product_code", sa.String(40)),
    sa.Column("status", sa.String(400), nullable=False),
    sa.Column("flags", sa.String(400), nullable=False),
    sa.Column("journaled_at", UTCDateTime(), nullable=False),
)
# A delivery is read again at every deliveries read until the gauge forgets it: keyed by
# (gauge, tank, start) so it is journaled once.
tank_delivery_t = sa.Table(
    "tank_delivery",
    md,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("tank", sa.Integer, primary_key=True),
    sa.Column("started_at", UTCDateTime(), primary_key=True),
    sa.Column("ended_at", UTCDateTime(), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("journaled_at", UTCDateTime(), nullable=False),
)
# An alarm a device reports, from the read it first appeared in to the read it was gone in.
device_alarm_t = sa.Table(
    "device_alarm",
    md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("source", sa.String(20), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("code", sa.String(60), nullable=False),
    sa.Column("device_code", sa.String(60), nullable=False),
    sa.Column("raised_at", UTCDateTime()),
    sa.Column("first_seen", UTCDateTime(), nullable=False),
    sa.Column("cleared_at", UTCDateTime()),
)


@dataclass(frozen=True)
class GaugeJournaled:
    """What one gauge read added to the journal: the readings, the deliveries not seen
    before, and the alarms that appeared and that went away."""

    readings: int
    deliveries: list[TankDelivery]
    raised: list[DeviceAlarm]
    cleared: list[tuple[str, int, str]]  # (source, number, code)


def _alarm_key(source: str, number: int, code: str, raised_at: datetime | None) -> tuple:
    return (source, number, code, raised_at.astimezone(UTC) if raised_at else None)


@dataclass(frozen=True)
class SaleDraft:
    """A finished dispensing before the journal gives it an id and a sequence number."""

    fuelling_point: int
    nozzle: int
    grade: str
    volume_ml: int
    unit_price_mmu: int
    amount_minor: int
    currency: str
    price_version: str | None
    snapshot_version: int
    totalizer_start_ml: int | None
    totalizer_end_ml: int | None
    device_txn: int | None
    dispense_type: str
    started_at: datetime | None
    ended_at: datetime
    business_date: date
    shift_id: str
    device_id: str = ""
    device_flags: tuple[str, ...] = ()  # see edge.controller / edge.drivers FLAG_*
    device_raw: tuple[tuple[str, str], ...] = ()  # wire text of values not exact in our units

    def fingerprint(self) -> str:
        return transaction_fingerprint(
            nozzle=self.nozzle,
            volume_ml=self.volume_ml,
            amount_minor=self.amount_minor,
            unit_price_mmu=self.unit_price_mmu,
            ended_at=self.ended_at,
            totalizer_end_ml=self.totalizer_end_ml,
        )


@dataclass(frozen=True)
class Journaled:
    sale_id: str
    seq: int
    new: bool  # False when the device transaction had been journaled before
    epoch: int = 0
    epoch_changed: bool = False  # this sale re-used a number of the epoch: a new epoch began
    settled: bool = False  # (re-reads) already closed at the device


@dataclass(frozen=True)
class OpenSale:
    """A journaled sale not yet closed at the device."""

    sale_id: str
    fuelling_point: int
    device_txn: int
    fingerprint: str


@dataclass(frozen=True)
class NozzleReading:
    """The newest journaled end totalizer of a nozzle (continuity of the meter)."""

    sale_id: str
    totalizer_end_ml: int


@dataclass(frozen=True)
class PendingUpload:
    seq: int
    sale_id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class PendingAudit:
    id: int
    record_id: str
    payload: dict[str, Any]


def _details(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


UPLOAD_SCHEMA_VERSION = 2


def _payload(draft: SaleDraft, sale_id: str, seq: int, epoch: int) -> dict[str, Any]:
    """The sale as uploaded (schema v2, docs/api.md)."""
    body = asdict(draft)
    body["started_at"] = draft.started_at.isoformat() if draft.started_at else None
    body["ended_at"] = draft.ended_at.isoformat()
    body["business_date"] = draft.business_date.isoformat()
    body["device_flags"] = sorted(set(draft.device_flags))
    body["device_raw"] = dict(draft.device_raw) or None
    body.update(
        sale_id=sale_id,
        station_seq=seq,
        device_epoch=epoch,
        schema_version=UPLOAD_SCHEMA_VERSION,
    )
    return body


class Journal:
    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-journal")
        self._engine: sa.Engine | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            raise RuntimeError("journal is not open")
        return self._engine

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(f"sqlite:///{self.path}", pool_size=1, max_overflow=0)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a journaled sale survives power loss
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        with engine.begin() as conn:
            upgrade_sync(conn, "edge", None)
        self._engine = engine

    async def close(self) -> None:
        if self._engine is not None:
            await self._run(self._engine.dispose)
            self._engine = None
        self._executor.shutdown(wait=True)

    # --- snapshots -----------------------------------------------------------------------

    async def save_snapshot(self, version: int, body: str) -> bool:
        return await self._run(self._save_snapshot, version, body)

    def _save_snapshot(self, version: int, body: str) -> bool:
        with self.engine.begin() as conn:
            if conn.scalar(sa.select(sa.func.count()).where(snapshot_t.c.version == version)):
                return False
            conn.execute(
                snapshot_t.insert().values(version=version, body=body, fetched_at=self.clock.now())
            )
            # keep the last few versions; the newest is what the edge starts from offline
            keep = sa.select(snapshot_t.c.version).order_by(snapshot_t.c.version.desc()).limit(5)
            conn.execute(snapshot_t.delete().where(snapshot_t.c.version.not_in(keep)))
            return True

    async def latest_snapshot(self) -> str | None:
        return await self._run(self._latest_snapshot)

    def _latest_snapshot(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.scalar(
                sa.select(snapshot_t.c.body).order_by(snapshot_t.c.version.desc()).limit(1)
            )

    # --- the sales journal ------------------------------------------------------------------

    async def record_sale(self, draft: SaleDraft) -> Journaled:
        return await self._run(self._record_sale, draft)

    def _record_sale(self, draft: SaleDraft) -> Journaled:
        now = self.clock.now()
        fingerprint = draft.fingerprint()
        with self.engine.begin() as conn:
            epoch = self._epoch(conn, draft.device_id)
            epoch_changed = False
            flags = set(draft.device_flags)
            if draft.device_txn is not None:
                # Any device: the contents name the dispensing even when the controller was
                # once named differently (an unreadable identifier, a swap of the PTS board).
                same_number = conn.execute(
                    sa.select(
                        device_txn_t.c.sale_id,
                        device_txn_t.c.device_id,
                        device_txn_t.c.epoch,
                        device_txn_t.c.fingerprint,
                        device_txn_t.c.closed_at,
                    ).where(
                        device_txn_t.c.fuelling_point == draft.fuelling_point,
                        device_txn_t.c.device_txn == draft.device_txn,
                    )
                ).all()
                for known in same_number:
                    if known.fingerprint == fingerprint:  # a re-read of a journaled sale
                        seq = conn.scalar(
                            sa.select(journal_t.c.seq).where(journal_t.c.sale_id == known.sale_id)
                        )
                        return Journaled(
                            sale_id=known.sale_id,
                            seq=int(seq or 0),
                            new=False,
                            epoch=known.epoch,
                            settled=known.closed_at is not None,
                        )
                if any(
                    known.epoch == epoch and known.device_id == draft.device_id
                    for known in same_number
                ):
                    # Same number, other contents, same epoch: the device's numbering started
                    # again (a restart with counters reset, a swap, a wrap). A new epoch begins.
                    epoch = self._bump_epoch(
                        conn,
                        draft.device_id,
                        epoch,
                        None,
                        f"fp {draft.fuelling_point} re-used transaction {draft.device_txn}",
                        now,
                    )
                    epoch_changed = True
                    flags.add(FLAG_EPOCH_CHANGE)
            # Gap-free: the one writer takes max+1 inside the same transaction.
            seq = (
                int(conn.scalar(sa.select(sa.func.coalesce(sa.func.max(journal_t.c.seq), 0))) or 0)
                + 1
            )
            sale_id = str(new_id())
            final = replace(draft, device_flags=tuple(sorted(flags)))
            payload = _payload(final, sale_id, seq, epoch)
            text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
            conn.execute(
                journal_t.insert().values(
                    seq=seq,
                    sale_id=sale_id,
                    fuelling_point=draft.fuelling_point,
                    device_txn=draft.device_txn,
                    grade=draft.grade,
                    volume_ml=draft.volume_ml,
                    amount_minor=draft.amount_minor,
                    dispense_type=draft.dispense_type,
                    business_date=draft.business_date.isoformat(),
                    payload=text,
                    journaled_at=now,
                    device_id=draft.device_id,
                    device_epoch=epoch,
                    nozzle=draft.nozzle,
                    totalizer_end_ml=draft.totalizer_end_ml,
                    ended_at=draft.ended_at,
                    flags=",".join(sorted(flags))[:400],
                )
            )
            if draft.device_txn is not None:
                conn.execute(
                    device_txn_t.insert().values(
                        device_id=draft.device_id,
                        fuelling_point=draft.fuelling_point,
                        device_txn=draft.device_txn,
                        epoch=epoch,
                        fingerprint=fingerprint,
                        sale_id=sale_id,
                    )
                )
            conn.execute(
                outbox_t.insert().values(
                    seq=seq,
                    sale_id=sale_id,
                    payload=text,
                    size_bytes=len(text),
                    attempts=0,
                    rejected=False,
                    created_at=now,
                )
            )
        return Journaled(
            sale_id=sale_id, seq=seq, new=True, epoch=epoch, epoch_changed=epoch_changed
        )

    @staticmethod
    def _epoch(conn: sa.Connection, device_id: str) -> int:
        epoch = conn.scalar(
            sa.select(device_epoch_t.c.epoch).where(device_epoch_t.c.device_id == device_id)
        )
        return int(epoch or 0)

    @staticmethod
    def _bump_epoch(
        conn: sa.Connection,
        device_id: str,
        current: int,
        boot_marker: str | None,
        reason: str,
        now: datetime,
    ) -> int:
        new = current + 1
        updated = conn.execute(
            device_epoch_t.update()
            .where(device_epoch_t.c.device_id == device_id)
            .values(epoch=new, changed_at=now, reason=reason[:200], boot_marker=boot_marker)
        ).rowcount
        if not updated:
            conn.execute(
                device_epoch_t.insert().values(
                    device_id=device_id,
                    epoch=new,
                    boot_marker=boot_marker,
                    changed_at=now,
                    reason=reason[:200],
                )
            )
        return new

    async def observe_device(self, device_id: str, boot_marker: str | None) -> tuple[int, bool]:
        """Record the controller's boot marker; a changed one begins a new epoch.
        Returns (epoch, changed)."""
        return await self._run(self._observe_device, device_id, boot_marker)

    def _observe_device(self, device_id: str, boot_marker: str | None) -> tuple[int, bool]:
        now = self.clock.now()
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(device_epoch_t.c.epoch, device_epoch_t.c.boot_marker).where(
                    device_epoch_t.c.device_id == device_id
                )
            ).first()
            if row is None:
                conn.execute(
                    device_epoch_t.insert().values(
                        device_id=device_id,
                        epoch=0,
                        boot_marker=boot_marker,
                        changed_at=now,
                        reason="first seen",
                    )
                )
                return 0, False
            if boot_marker is None or row.boot_marker == boot_marker:
                return int(row.epoch), False
            if row.boot_marker is None:  # the first marker this device ever showed us
                conn.execute(
                    device_epoch_t.update()
                    .where(device_epoch_t.c.device_id == device_id)
                    .values(boot_marker=boot_marker)
                )
                return int(row.epoch), False
            epoch = self._bump_epoch(
                conn, device_id, int(row.epoch), boot_marker, "controller restarted", now
            )
            return epoch, True

    async def device_epoch(self, device_id: str) -> int:
        return await self._run(self._device_epoch, device_id)

    def _device_epoch(self, device_id: str) -> int:
        with self.engine.connect() as conn:
            return self._epoch(conn, device_id)

    async def mark_settled(self, sale_id: str) -> None:
        """The sale is closed at the device (by us, or seen closed)."""
        await self._run(self._mark_settled, sale_id)

    def _mark_settled(self, sale_id: str) -> None:
        now = self.clock.now()
        with self.engine.begin() as conn:
            conn.execute(
                journal_t.update()
                .where(journal_t.c.sale_id == sale_id, journal_t.c.settled_at.is_(None))
                .values(settled_at=now)
            )
            conn.execute(
                device_txn_t.update()
                .where(device_txn_t.c.sale_id == sale_id, device_txn_t.c.closed_at.is_(None))
                .values(closed_at=now)
            )

    async def open_sales(self) -> list[OpenSale]:
        """Journaled sales not yet closed at the device (to close after a restart)."""
        return await self._run(self._open_sales)

    def _open_sales(self) -> list[OpenSale]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    device_txn_t.c.sale_id,
                    device_txn_t.c.fuelling_point,
                    device_txn_t.c.device_txn,
                    device_txn_t.c.fingerprint,
                )
                .where(device_txn_t.c.closed_at.is_(None))
                .order_by(device_txn_t.c.fuelling_point, device_txn_t.c.device_txn)
            )
            return [
                OpenSale(r.sale_id, r.fuelling_point, r.device_txn, r.fingerprint) for r in rows
            ]

    async def last_sale_end(self, fuelling_point: int) -> datetime | None:
        """When the newest journaled sale of a fuelling point ended (device time)."""
        return await self._run(self._last_sale_end, fuelling_point)

    def _last_sale_end(self, fuelling_point: int) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.scalar(
                sa.select(sa.func.max(journal_t.c.ended_at)).where(
                    journal_t.c.fuelling_point == fuelling_point
                )
            )
            if value is None:
                return None
            if isinstance(value, str):  # an aggregate comes back untyped on SQLite
                value = datetime.fromisoformat(value)
            return value if value.tzinfo else value.replace(tzinfo=UTC)

    async def last_reading(self, fuelling_point: int, nozzle: int) -> NozzleReading | None:
        """The newest journaled end totalizer of a nozzle (any epoch: the meter is the
        dispenser's, it survives a controller restart)."""
        return await self._run(self._last_reading, fuelling_point, nozzle)

    def _last_reading(self, fuelling_point: int, nozzle: int) -> NozzleReading | None:
        with self.engine.connect() as conn:
            return self._newest_reading(conn, fuelling_point, nozzle)

    async def last_readings(
        self, nozzles: Iterable[tuple[int, int]]
    ) -> dict[tuple[int, int], NozzleReading | None]:
        """:meth:`last_reading` of each (fuelling point, nozzle), in one visit to the journal."""
        return await self._run(self._last_readings, list(nozzles))

    def _last_readings(
        self, nozzles: list[tuple[int, int]]
    ) -> dict[tuple[int, int], NozzleReading | None]:
        with self.engine.connect() as conn:
            return {key: self._newest_reading(conn, *key) for key in nozzles}

    @staticmethod
    def _newest_reading(
        conn: sa.Connection, fuelling_point: int, nozzle: int
    ) -> NozzleReading | None:
        row = conn.execute(
            sa.select(journal_t.c.sale_id, journal_t.c.totalizer_end_ml)
            .where(
                journal_t.c.fuelling_point == fuelling_point,
                journal_t.c.nozzle == nozzle,
                journal_t.c.totalizer_end_ml.is_not(None),
            )
            .order_by(journal_t.c.seq.desc())
            .limit(1)
        ).first()
        return NozzleReading(row.sale_id, int(row.totalizer_end_ml)) if row else None

    async def known(self, draft: SaleDraft) -> Journaled | None:
        """The journaled sale this draft re-reads, if any (same fuelling point, number and
        contents, whichever name the controller had then)."""
        return await self._run(self._known, draft)

    def _known(self, draft: SaleDraft) -> Journaled | None:
        if draft.device_txn is None:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    device_txn_t.c.sale_id,
                    device_txn_t.c.epoch,
                    device_txn_t.c.closed_at,
                    journal_t.c.seq,
                )
                .join(journal_t, journal_t.c.sale_id == device_txn_t.c.sale_id)
                .where(
                    device_txn_t.c.fuelling_point == draft.fuelling_point,
                    device_txn_t.c.device_txn == draft.device_txn,
                    device_txn_t.c.fingerprint == draft.fingerprint(),
                )
            ).first()
            if row is None:
                return None
            return Journaled(
                sale_id=row.sale_id,
                seq=int(row.seq),
                new=False,
                epoch=int(row.epoch),
                settled=row.closed_at is not None,
            )

    # --- the upload outbox -----------------------------------------------------------------

    async def pending_uploads(self, limit: int) -> list[PendingUpload]:
        return await self._run(self._pending_uploads, limit)

    def _pending_uploads(self, limit: int) -> list[PendingUpload]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(outbox_t.c.seq, outbox_t.c.sale_id, outbox_t.c.payload)
                .where(outbox_t.c.rejected.is_(False))
                .order_by(outbox_t.c.seq)
                .limit(limit)
            )
            return [PendingUpload(r.seq, r.sale_id, json.loads(r.payload)) for r in rows]

    async def record_answers(self, answers: list[tuple[str, str, list[str]]]) -> None:
        """Store HQ's answer per sale (sale_id, status, flags) and drop them from the outbox:
        an item whose answer is recorded is never sent again."""
        await self._run(self._record_answers, answers)

    def _record_answers(self, answers: list[tuple[str, str, list[str]]]) -> None:
        now = self.clock.now()
        with self.engine.begin() as conn:
            for sale_id, status, flags in answers:
                conn.execute(
                    journal_t.update()
                    .where(journal_t.c.sale_id == sale_id)
                    .values(hq_status=status, hq_flags=",".join(flags), hq_acked_at=now)
                )
            conn.execute(outbox_t.delete().where(outbox_t.c.sale_id.in_([a[0] for a in answers])))

    async def record_failure(self, seqs: list[int], error: str, *, reject: bool = False) -> None:
        await self._run(self._record_failure, seqs, error, reject)

    def _record_failure(self, seqs: list[int], error: str, reject: bool) -> None:
        with self.engine.begin() as conn:
            values: dict[str, Any] = {
                "attempts": outbox_t.c.attempts + 1,
                "last_error": error[:2000],
            }
            if reject:
                values["rejected"] = True
            conn.execute(outbox_t.update().where(outbox_t.c.seq.in_(seqs)).values(**values))

    async def outbox_usage(self) -> tuple[int, int, int]:
        """(pending items, pending bytes, rejected items)."""
        return await self._run(self._outbox_usage)

    def _outbox_usage(self) -> tuple[int, int, int]:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(outbox_t.c.size_bytes), 0),
                    sa.func.coalesce(sa.func.sum(sa.case((outbox_t.c.rejected, 1), else_=0)), 0),
                )
            ).one()
            return int(row[0]), int(row[1]), int(row[2])

    # --- reading the journal ---------------------------------------------------------------

    async def summary(self) -> list[dict[str, Any]]:
        """Per grade: count, millilitres and amount of everything journaled."""
        return await self._run(self._summary)

    def _summary(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    journal_t.c.grade,
                    sa.func.count().label("sales"),
                    sa.func.sum(journal_t.c.volume_ml).label("volume_ml"),
                    sa.func.sum(journal_t.c.amount_minor).label("amount_minor"),
                )
                .group_by(journal_t.c.grade)
                .order_by(journal_t.c.grade)
            )
            return [
                {
                    "grade": r.grade,
                    "sales": r.sales,
                    "volume_ml": int(r.volume_ml),
                    "amount_minor": int(r.amount_minor),
                }
                for r in rows
            ]

    async def sale(self, sale_id: str) -> dict[str, Any] | None:
        return await self._run(self._sale, sale_id)

    def _sale(self, sale_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(journal_t).where(journal_t.c.sale_id == sale_id)).first()
            return dict(row._mapping) if row else None

    async def sequence_check(self) -> tuple[int, int]:
        """(count, max seq): equal when the sequence is gap-free."""
        return await self._run(self._sequence_check)

    def _sequence_check(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(journal_t.c.seq), 0))
            ).one()
            return int(row[0]), int(row[1])

    # --- tank gauges ------------------------------------------------------------------------

    async def record_gauge_read(
        self,
        device_id: str,
        measurements: list[TankMeasurement],
        deliveries: list[TankDelivery] | None,
        alarms: list[DeviceAlarm] | None,
    ) -> GaugeJournaled:
        """Journal one read of a gauge in one transaction: every measurement; each delivery
        once (``None``: deliveries were not read this time); and the device's alarms as it
        reports them now (``None``: not read), an alarm no longer reported being cleared."""
        return await self._run(self._record_gauge_read, device_id, measurements, deliveries, alarms)

    def _record_gauge_read(
        self,
        device_id: str,
        measurements: list[TankMeasurement],
        deliveries: list[TankDelivery] | None,
        alarms: list[DeviceAlarm] | None,
    ) -> GaugeJournaled:
        now = self.clock.now()
        new_deliveries: list[TankDelivery] = []
        raised: list[DeviceAlarm] = []
        cleared: list[tuple[str, int, str]] = []
        with self.engine.begin() as conn:
            if measurements:
                conn.execute(
                    tank_reading_t.insert(),
                    [
                        {
                            "device_id": device_id,
                            "tank": m.tank,
                            "measured_at": m.measured_at,
                            "volume_ml": m.volume_ml,
                            "tc_volume_ml": m.tc_volume_ml,
                            "ullage_ml": m.ullage_ml,
                            "product_height_um": m.product_height_um,
                            "water_height_um": m.water_height_um,
                            "water_volume_ml": m.water_volume_ml,
                            "temperature_mdegc": m.temperature_mdegc,
                            "product_code": m.product_code,
                            "status": ",".join(m.status)[:400],
                            "flags": ",".join(m.flags)[:400],
                            "journaled_at": now,
                        }
                        for m in measurements
                    ],
                )
            for delivery in deliveries or ():
                known = conn.scalar(
                    sa.select(sa.func.count()).where(
                        tank_delivery_t.c.device_id == device_id,
                        tank_delivery_t.c.tank == delivery.tank,
                        tank_delivery_t.c.started_at == delivery.started_at,
                    )
                )
                if known:
                    continue
                conn.execute(
                    tank_delivery_t.insert().values(
                        device_id=device_id,
                        tank=delivery.tank,
                        started_at=delivery.started_at,
                        ended_at=delivery.ended_at,
                        payload=json.dumps(as_json(delivery), sort_keys=True),
                        journaled_at=now,
                    )
                )
                new_deliveries.append(delivery)
            if alarms is not None:
                open_rows = conn.execute(
                    sa.select(
                        device_alarm_t.c.id,
                        device_alarm_t.c.source,
                        device_alarm_t.c.number,
                        device_alarm_t.c.code,
                        device_alarm_t.c.raised_at,
                    ).where(
                        device_alarm_t.c.device_id == device_id,
                        device_alarm_t.c.cleared_at.is_(None),
                    )
                ).fetchall()
                open_by_key = {
                    _alarm_key(r.source, r.number, r.code, r.raised_at): r.id for r in open_rows
                }
                reported = {
                    _alarm_key(a.source, a.number, a.code, a.raised_at): a
                    for a in alarms
                    if a.active
                }
                for key, alarm in reported.items():
                    if key in open_by_key:
                        continue
                    conn.execute(
                        device_alarm_t.insert().values(
                            device_id=device_id,
                            source=alarm.source[:20],
                            number=alarm.number,
                            code=alarm.code[:60],
                            device_code=alarm.device_code[:60],
                            raised_at=alarm.raised_at,
                            first_seen=now,
                        )
                    )
                    raised.append(alarm)
                gone = [(key, row_id) for key, row_id in open_by_key.items() if key not in reported]
                for key, row_id in gone:
                    conn.execute(
                        device_alarm_t.update()
                        .where(device_alarm_t.c.id == row_id)
                        .values(cleared_at=now)
                    )
                    cleared.append((key[0], key[1], key[2]))
        return GaugeJournaled(len(measurements), new_deliveries, raised, cleared)

    async def tank_readings(
        self, device_id: str, tank: int, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The newest readings of one tank, newest first."""
        return await self._run(self._tank_readings, device_id, tank, limit)

    def _tank_readings(self, device_id: str, tank: int, limit: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(tank_reading_t)
                .where(tank_reading_t.c.device_id == device_id, tank_reading_t.c.tank == tank)
                .order_by(tank_reading_t.c.measured_at.desc(), tank_reading_t.c.id.desc())
                .limit(limit)
            ).fetchall()
        return [dict(r._mapping) for r in rows]

    async def tank_deliveries(self, device_id: str) -> list[dict[str, Any]]:
        """Every journaled delivery of a gauge, oldest first, as the gauge recorded it."""
        return await self._run(self._tank_deliveries, device_id)

    def _tank_deliveries(self, device_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(tank_delivery_t.c.payload)
                .where(tank_delivery_t.c.device_id == device_id)
                .order_by(tank_delivery_t.c.started_at, tank_delivery_t.c.tank)
            ).fetchall()
        return [json.loads(r.payload) for r in rows]

    async def device_alarms(self, device_id: str) -> list[dict[str, Any]]:
        """A device's alarms, open and cleared, oldest first."""
        return await self._run(self._device_alarms, device_id)

    def _device_alarms(self, device_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(device_alarm_t)
                .where(device_alarm_t.c.device_id == device_id)
                .order_by(device_alarm_t.c.id)
            ).fetchall()
        return [dict(r._mapping) for r in rows]

    async def prune_gauge_history(self, before: datetime) -> int:
        """Readings journaled before ``before`` are deleted (the gauge history is kept as long
        as sales are); deliveries and alarms stay. Returns how many went."""
        return await self._run(self._prune_gauge_history, before)

    def _prune_gauge_history(self, before: datetime) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                tank_reading_t.delete().where(tank_reading_t.c.journaled_at < before)
            )
        return int(result.rowcount or 0)

    # --- audit ------------------------------------------------------------------------------

    async def record_audit(
        self, *, actor: str, action: str, target: str, details: dict[str, Any]
    ) -> None:
        await self._run(self._record_audit, actor, action, target, details)

    def _record_audit(self, actor: str, action: str, target: str, details: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                audit_t.insert().values(
                    record_id=str(new_id()),
                    at=self.clock.now(),
                    actor=actor,
                    action=action,
                    target=target,
                    details=json.dumps(details, sort_keys=True, default=str),
                )
            )

    async def pending_audit(self, limit: int) -> list[PendingAudit]:
        """Audit records not yet in HQ's trail (refused ones excluded), oldest first."""
        return await self._run(self._pending_audit, limit)

    def _pending_audit(self, limit: int) -> list[PendingAudit]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(audit_t)
                .where(audit_t.c.uploaded_at.is_(None), audit_t.c.rejected.is_(False))
                .order_by(audit_t.c.id)
                .limit(limit)
            )
            return [
                PendingAudit(
                    id=r.id,
                    record_id=r.record_id,
                    payload={
                        "record_id": r.record_id,
                        "at": r.at.isoformat(),
                        "actor": r.actor,
                        "action": r.action,
                        "target": r.target,
                        "details": _details(r.details),
                    },
                )
                for r in rows
            ]

    async def audit_answered(self, delivered: list[int], refused: dict[int, str]) -> None:
        """HQ's answer on uploaded records: ``delivered`` (in HQ's trail now, or already)
        are marked uploaded and never sent again (kept here for the retention period, see
        :meth:`prune_uploaded_audit`); ``refused`` (id → HQ's reason) stay, marked, out of
        the pending set, for a person to look at."""
        await self._run(self._audit_answered, delivered, refused)

    def _audit_answered(self, delivered: list[int], refused: dict[int, str]) -> None:
        now = self.clock.now()
        with self.engine.begin() as conn:
            for start in range(0, len(delivered), 500):
                chunk = delivered[start : start + 500]
                conn.execute(
                    audit_t.update().where(audit_t.c.id.in_(chunk)).values(uploaded_at=now)
                )
            for row_id, reason in refused.items():
                conn.execute(
                    audit_t.update()
                    .where(audit_t.c.id == row_id)
                    .values(rejected=True, last_error=reason[:2000])
                )

    async def audit_usage(self) -> tuple[int, int]:
        """(records waiting for HQ, records HQ refused)."""
        return await self._run(self._audit_usage)

    def _audit_usage(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(sa.case((audit_t.c.rejected, 1), else_=0)), 0),
                )
                .select_from(audit_t)
                .where(audit_t.c.uploaded_at.is_(None))
            ).one()
            total, rejected = int(row[0]), int(row[1])
            return total - rejected, rejected

    async def prune_uploaded_audit(self, before: datetime) -> int:
        """Delete audit records HQ's trail took before ``before``; never one HQ does not hold
        (waiting or refused). Returns how many went."""
        return await self._run(self._prune_uploaded_audit, before)

    def _prune_uploaded_audit(self, before: datetime) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                audit_t.delete().where(
                    audit_t.c.uploaded_at.is_not(None), audit_t.c.uploaded_at < before
                )
            )
        return int(result.rowcount or 0)

    # --- retention and disk usage -----------------------------------------------------------
    # Settled sales HQ has answered with a final status leave the journal for the archive
    # (forecourt.edge.retention writes and fsyncs it before anything is deleted here). The
    # newest row always stays: record_sale numbers the next sale max(seq) + 1, so deleting it
    # would hand its number out again. Audit rows leave only once HQ's trail has held them
    # for the retention period (prune_uploaded_audit): a record HQ lacks is never deleted.

    archivable_statuses = ("created", "duplicate", "quarantined", "conflict")

    def _archivable(self, journaled_before: datetime) -> sa.ColumnElement[bool]:
        newest = sa.select(sa.func.max(journal_t.c.seq)).scalar_subquery()
        in_outbox = sa.exists().where(outbox_t.c.seq == journal_t.c.seq).correlate(journal_t)
        return sa.and_(
            journal_t.c.settled_at.is_not(None),
            journal_t.c.hq_acked_at.is_not(None),
            journal_t.c.hq_status.in_(self.archivable_statuses),
            journal_t.c.journaled_at < journaled_before,
            journal_t.c.seq < newest,
            ~in_outbox,
        )

    async def retention_candidates(
        self, journaled_before: datetime, limit: int
    ) -> list[dict[str, Any]]:
        """Full rows, lowest seq first, that may move to the archive: settled, answered by HQ
        (created, duplicate, quarantined or conflict; never refused or pending), journaled
        before the cutoff, not in the upload outbox, and not the newest row."""
        return await self._run(self._retention_candidates, journaled_before, limit)

    def _retention_candidates(self, journaled_before: datetime, limit: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(journal_t)
                .where(self._archivable(journaled_before))
                .order_by(journal_t.c.seq)
                .limit(limit)
            )
            return [dict(r._mapping) for r in rows]

    async def delete_archived(self, seqs: list[int], journaled_before: datetime) -> int:
        """Delete archived rows in one transaction (each re-checked: only what may go goes),
        with the device-transaction memory of sales no longer in the journal whose device
        transaction was closed before the cutoff (no pump still shows it). Returns how many
        journal rows were deleted."""
        return await self._run(self._delete_archived, seqs, journaled_before)

    def _delete_archived(self, seqs: list[int], journaled_before: datetime) -> int:
        deleted = 0
        with self.engine.begin() as conn:
            for start in range(0, len(seqs), 500):  # stay well inside SQLite's variable limit
                chunk = seqs[start : start + 500]
                result = conn.execute(
                    journal_t.delete().where(
                        journal_t.c.seq.in_(chunk), self._archivable(journaled_before)
                    )
                )
                deleted += result.rowcount
            in_journal = (
                sa.exists()
                .where(journal_t.c.sale_id == device_txn_t.c.sale_id)
                .correlate(device_txn_t)
            )
            conn.execute(
                device_txn_t.delete().where(
                    device_txn_t.c.closed_at.is_not(None),
                    device_txn_t.c.closed_at < journaled_before,
                    ~in_journal,
                )
            )
        return deleted

    async def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file and truncate it (after retention
        deleted many rows, so the WAL does not stay large on disk)."""
        await self._run(self._checkpoint)

    def _checkpoint(self) -> None:
        raw = self.engine.raw_connection()  # a PRAGMA outside any transaction
        try:
            cursor = raw.cursor()
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cursor.close()
        finally:
            raw.close()

    def disk_bytes(self) -> tuple[int, int]:
        """(database file, write-ahead log) in bytes as they are on disk now; deleted rows'
        pages are reused by new sales, so the file stops growing rather than shrinks."""
        sizes = []
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return sizes[0], sizes[1]

    async def sequence_check_with_archive(
        self, archive_dir: Path | None = None
    ) -> tuple[int, int, int]:
        """(rows in the journal, rows only in the archive, max seq): the sequence is gap-free
        when the first two add up to the third. The archived seqs come from the archive's
        manifest (default ``<journal>.archive/``); a row archived but not yet deleted (a
        crash between the two steps) counts once, as a journal row."""
        return await self._run(self._sequence_check_with_archive, archive_dir)

    def _sequence_check_with_archive(self, archive_dir: Path | None) -> tuple[int, int, int]:
        # Imported here: the retention module builds on the journal, not the other way round.
        from forecourt.edge.retention import Archive, default_archive_dir

        ranges = Archive(archive_dir or default_archive_dir(self.path)).archived_ranges()
        with self.engine.connect() as conn:
            present, top = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(journal_t.c.seq), 0))
            ).one()
            archived = 0
            for low, high in ranges:  # merged ranges: few, each an index range count
                still_here = conn.scalar(
                    sa.select(sa.func.count()).where(journal_t.c.seq.between(low, high))
                )
                archived += high - low + 1 - int(still_here or 0)
        return int(present), archived, max(int(top), ranges[-1][1] if ranges else 0)
