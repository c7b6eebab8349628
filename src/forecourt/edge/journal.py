"""The edge's local journal: SQLite in WAL mode with ``synchronous=FULL``.

A completed dispensing is journaled together with its upload-outbox row in one local
transaction, with a gap-free per-station sequence and an edge-assigned UUIDv7 ``sale_id``.
All writes run on one dedicated thread, off the event loop, so pump polling never waits on
an fsync and SQLite sees exactly one writer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from forecourt.infra.db import UTCDateTime
from forecourt.infra.migrate import upgrade_sync
from forecourt.kernel.clock import Clock
from forecourt.kernel.ids import new_id

T = TypeVar("T")

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
)
device_txn_t = sa.Table(
    "device_txn",
    md,
    sa.Column("fuelling_point", sa.Integer, primary_key=True),
    sa.Column("device_txn", sa.Integer, primary_key=True),
    sa.Column("sale_id", sa.String(36), nullable=False),
    sa.Column("closed_at", UTCDateTime()),
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
)


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
    totalizer_start_ml: int
    totalizer_end_ml: int
    device_txn: int | None
    dispense_type: str
    started_at: datetime | None
    ended_at: datetime
    business_date: date
    shift_id: str


@dataclass(frozen=True)
class Journaled:
    sale_id: str
    seq: int
    new: bool  # False when the device transaction had been journaled before


@dataclass(frozen=True)
class PendingUpload:
    seq: int
    sale_id: str
    payload: dict[str, Any]


def _payload(draft: SaleDraft, sale_id: str, seq: int) -> dict[str, Any]:
    body = asdict(draft)
    body["started_at"] = draft.started_at.isoformat() if draft.started_at else None
    body["ended_at"] = draft.ended_at.isoformat()
    body["business_date"] = draft.business_date.isoformat()
    body.update(sale_id=sale_id, station_seq=seq, schema_version=1)
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
        with self.engine.begin() as conn:
            if draft.device_txn is not None:
                known = conn.execute(
                    sa.select(device_txn_t.c.sale_id).where(
                        device_txn_t.c.fuelling_point == draft.fuelling_point,
                        device_txn_t.c.device_txn == draft.device_txn,
                    )
                ).first()
                if known is not None:
                    seq = conn.scalar(
                        sa.select(journal_t.c.seq).where(journal_t.c.sale_id == known.sale_id)
                    )
                    return Journaled(sale_id=known.sale_id, seq=int(seq or 0), new=False)
            # Gap-free: the one writer takes max+1 inside the same transaction.
            seq = (
                int(conn.scalar(sa.select(sa.func.coalesce(sa.func.max(journal_t.c.seq), 0))) or 0)
                + 1
            )
            sale_id = str(new_id())
            payload = _payload(draft, sale_id, seq)
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
                )
            )
            if draft.device_txn is not None:
                conn.execute(
                    device_txn_t.insert().values(
                        fuelling_point=draft.fuelling_point,
                        device_txn=draft.device_txn,
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
        return Journaled(sale_id=sale_id, seq=seq, new=True)

    async def mark_settled(self, sale_id: str, fuelling_point: int, device_txn: int | None) -> None:
        await self._run(self._mark_settled, sale_id, fuelling_point, device_txn)

    def _mark_settled(self, sale_id: str, fuelling_point: int, device_txn: int | None) -> None:
        now = self.clock.now()
        with self.engine.begin() as conn:
            conn.execute(
                journal_t.update()
                .where(journal_t.c.sale_id == sale_id, journal_t.c.settled_at.is_(None))
                .values(settled_at=now)
            )
            if device_txn is not None:
                conn.execute(
                    device_txn_t.update()
                    .where(
                        device_txn_t.c.fuelling_point == fuelling_point,
                        device_txn_t.c.device_txn == device_txn,
                    )
                    .values(closed_at=now)
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

    # --- audit ------------------------------------------------------------------------------

    async def record_audit(
        self, *, actor: str, action: str, target: str, details: dict[str, Any]
    ) -> None:
        await self._run(self._record_audit, actor, action, target, details)

    def _record_audit(self, actor: str, action: str, target: str, details: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                audit_t.insert().values(
                    at=self.clock.now(),
                    actor=actor,
                    action=action,
                    target=target,
                    details=json.dumps(details, sort_keys=True, default=str),
                )
            )
