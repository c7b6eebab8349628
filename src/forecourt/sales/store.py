"""Persistence of sales (SQLAlchemy Core on SQLite and PostgreSQL).

The ``sale`` table's key is (station, business date, ``sale_id``): permanent de-duplication
that also suits range partitioning by business date later. Its index is ordered
(station, ``sale_id``, business date), so it also finds a re-upload whose business date was
changed (a conflict) without a second index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.infra.db import UTCDateTime, asyncpg_connection
from forecourt.sales.domain import DispenseType, Flag, Gap, NaturalKey, SequenceBook

md = sa.MetaData(schema="sales")

sale_t = sa.Table(
    "sale",
    md,
    sa.Column("station_code", sa.String(40), nullable=False),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("sale_id", sa.Uuid, nullable=False),
    sa.Column("station_seq", sa.BigInteger, nullable=False),
    sa.Column("fuelling_point", sa.Integer, nullable=False),
    sa.Column("nozzle", sa.Integer, nullable=False),
    sa.Column("grade", sa.String(40), nullable=False),
    sa.Column("volume_ml", sa.BigInteger, nullable=False),
    sa.Column("unit_price_mmu", sa.BigInteger, nullable=False),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("price_version", sa.String(64)),
    sa.Column("snapshot_version", sa.BigInteger, nullable=False),
    sa.Column("totalizer_start_ml", sa.BigInteger),  # NULL: not reported by the device (v2)
    sa.Column("totalizer_end_ml", sa.BigInteger),
    sa.Column("device_txn", sa.BigInteger),
    sa.Column("dispense_type", sa.String(20), nullable=False),
    sa.Column("started_at", UTCDateTime()),
    sa.Column("ended_at", UTCDateTime(), nullable=False),
    sa.Column("shift_id", sa.String(40), nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("payload_hash", sa.String(64), nullable=False),
    sa.Column("quarantined", sa.Boolean, nullable=False),
    sa.Column("flags", sa.String(400), nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    # v2 (sales_0003); NULL / "" for v1 sales
    sa.Column("device_id", sa.String(64)),
    sa.Column("device_epoch", sa.BigInteger),
    sa.Column("device_flags", sa.Text, nullable=False),  # comma-separated, like ``flags``
    sa.Column("device_raw", sa.Text),  # JSON object: name → wire text
    # The key (station, business date, sale_id), indexed with sale_id second so it also
    # finds a sale_id re-uploaded under another business date (a conflict).
    sa.PrimaryKeyConstraint("station_code", "sale_id", "business_date", name="sale_pkey"),
)
conflict_t = sa.Table(
    "sale_conflict",
    md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("station_code", sa.String(40), nullable=False),
    sa.Column("sale_id", sa.Uuid, nullable=False),
    sa.Column("payload_hash", sa.String(64), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
)
sequence_t = sa.Table(
    "station_sequence",
    md,
    sa.Column("station_code", sa.String(40), primary_key=True),
    sa.Column("high_water", sa.BigInteger, nullable=False),
    sa.Column("gaps", sa.Text, nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("jumps", sa.Text, nullable=False),  # JSON list (sales_0004)
)
alert_t = sa.Table(
    "sales_alert",
    md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("station_code", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(60), nullable=False),
    sa.Column("sale_id", sa.Uuid),
    sa.Column("details", sa.Text, nullable=False),
    sa.Column("raised_at", UTCDateTime(), nullable=False),
)


SALE_COLUMNS = tuple(c.name for c in sale_t.columns)


# Point lookups for a batch, written so PostgreSQL probes the index once per item whatever
# its statistics say: a scalar subquery per item is never turned into a join. With a join
# or ``= ANY``, stale statistics on a fast-growing table (every busy day) can make the
# planner scan all of a station's history per batch and compare it with every item.
EXISTING_SQL = (
    "SELECT id AS sale_id, hash AS payload_hash FROM ("
    " SELECT k.id, (SELECT s.payload_hash FROM sales.sale s"
    "  WHERE s.station_code = $1 AND s.sale_id = k.id LIMIT 1) AS hash"
    " FROM unnest($2::uuid[]) AS k(id)) AS found WHERE hash IS NOT NULL"
)
# Natural keys (see domain.NaturalKey): v1 keys match v1 rows only (no device), v2 keys
# match their device and epoch, and a missing totalizer matches a missing one. The natural-key
# index (station, fp, nozzle, txn, totalizer) narrows each probe to a handful of rows.
NATURAL_KEY_SQL = (
    "SELECT fp, nozzle, txn, tot FROM ("
    " SELECT k.fp, k.nozzle, k.txn, k.tot, (SELECT true FROM sales.sale s"
    "  WHERE s.station_code = $1 AND s.fuelling_point = k.fp AND s.nozzle = k.nozzle"
    "  AND s.device_txn = k.txn AND s.totalizer_end_ml = k.tot AND s.device_id IS NULL"
    "  LIMIT 1) AS hit"
    " FROM unnest($2::int[], $3::int[], $4::bigint[], $5::bigint[]) AS k(fp, nozzle, txn, tot)"
    ") AS found WHERE hit"
)
NATURAL_KEY_V2_SQL = (
    "SELECT dev, epoch, fp, nozzle, txn, tot FROM ("
    " SELECT k.dev, k.epoch, k.fp, k.nozzle, k.txn, k.tot, (SELECT true FROM sales.sale s"
    "  WHERE s.station_code = $1 AND s.fuelling_point = k.fp AND s.nozzle = k.nozzle"
    "  AND s.device_txn = k.txn AND s.totalizer_end_ml IS NOT DISTINCT FROM k.tot"
    "  AND s.device_id = k.dev AND s.device_epoch = k.epoch LIMIT 1) AS hit"
    " FROM unnest($2::text[], $3::bigint[], $4::int[], $5::int[], $6::bigint[], $7::bigint[])"
    " AS k(dev, epoch, fp, nozzle, txn, tot)"
    ") AS found WHERE hit"
)


# Who holds each station_seq (ix_sale_station_seq, sales_0004): one probe per item, as above.
SEQ_HOLDERS_SQL = (
    "SELECT seq, holder FROM ("
    " SELECT k.seq, (SELECT s.sale_id FROM sales.sale s"
    "  WHERE s.station_code = $1 AND s.station_seq = k.seq LIMIT 1) AS holder"
    " FROM unnest($2::bigint[]) AS k(seq)) AS found WHERE holder IS NOT NULL"
)


class SalesStore:
    """Sales persistence. On PostgreSQL the ingest hot path talks to asyncpg directly on the
    same connection and transaction (array parameters instead of expanded IN lists, ``COPY``
    for inserts): far less parsing and Python work per sale, same interface."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.pg = conn.dialect.name == "postgresql"
        self._apg: Any = None

    async def _asyncpg(self) -> Any:
        """The asyncpg connection under ``conn``, looked up once per store (one transaction)
        once that transaction has started."""
        if self._apg is None or (self.conn.in_transaction() and not self._apg.is_in_transaction()):
            self._apg = await asyncpg_connection(self.conn)
        return self._apg

    async def lock_station(self, station_code: str) -> None:
        """Serialise ingest per station (sequence book, conflict checks). SQLite already
        serialises all writers, so only PostgreSQL needs the advisory lock."""
        if self.conn.dialect.name == "postgresql":
            await self.conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                {"k": f"sales:{station_code}"},
            )

    async def existing(self, station_code: str, sale_ids: Sequence[UUID]) -> dict[UUID, str]:
        """sale_id → payload hash for ids already stored for this station."""
        if not sale_ids:
            return {}
        if self.pg:
            apg = await self._asyncpg()
            records = await apg.fetch(EXISTING_SQL, station_code, list(sale_ids))
            return {r["sale_id"]: r["payload_hash"] for r in records}
        rows = await self.conn.execute(
            sa.select(sale_t.c.sale_id, sale_t.c.payload_hash).where(
                sale_t.c.station_code == station_code, sale_t.c.sale_id.in_(sale_ids)
            )
        )
        return {r.sale_id: r.payload_hash for r in rows}

    async def natural_key_hits(
        self, station_code: str, keys: Sequence[NaturalKey]
    ) -> set[NaturalKey]:
        """The given natural keys some stored sale of this station already has."""
        if not keys:
            return set()
        if self.pg:
            apg = await self._asyncpg()
            hits: set[NaturalKey] = set()
            v1 = [k[2:] for k in keys if k[0] is None]
            if v1:
                fp, nozzle, txn, end = (list(column) for column in zip(*v1, strict=True))
                records = await apg.fetch(NATURAL_KEY_SQL, station_code, fp, nozzle, txn, end)
                hits.update((None, None, r[0], r[1], r[2], r[3]) for r in records)
            v2 = [k for k in keys if k[0] is not None]
            if v2:
                columns = [list(column) for column in zip(*v2, strict=True)]
                records = await apg.fetch(NATURAL_KEY_V2_SQL, station_code, *columns)
                hits.update((r[0], r[1], r[2], r[3], r[4], r[5]) for r in records)
            return hits
        # Candidates by (fp, nozzle, txn), never NULL for a keyed sale; exact match here,
        # where None compares as a value (an IN list of tuples would never match a NULL).
        wanted = set(keys)
        cols = (
            sale_t.c.device_id,
            sale_t.c.device_epoch,
            sale_t.c.fuelling_point,
            sale_t.c.nozzle,
            sale_t.c.device_txn,
            sale_t.c.totalizer_end_ml,
        )
        prefixes = list({k[2:5] for k in wanted})
        rows = await self.conn.execute(
            sa.select(*cols).where(
                sale_t.c.station_code == station_code, sa.tuple_(*cols[2:5]).in_(prefixes)
            )
        )
        found = {(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows}
        return found & wanted

    async def station_seq_holders(self, station_code: str, seqs: Sequence[int]) -> dict[int, UUID]:
        """station_seq → a stored sale of this station holding it, for the given numbers."""
        wanted = sorted(set(seqs))
        if not wanted:
            return {}
        if self.pg:
            apg = await self._asyncpg()
            records = await apg.fetch(SEQ_HOLDERS_SQL, station_code, wanted)
            return {r["seq"]: r["holder"] for r in records}
        rows = await self.conn.execute(
            sa.select(sale_t.c.station_seq, sale_t.c.sale_id).where(
                sale_t.c.station_code == station_code, sale_t.c.station_seq.in_(wanted)
            )
        )
        holders: dict[int, UUID] = {}
        for r in rows:
            holders.setdefault(r.station_seq, r.sale_id)
        return holders

    async def insert_sales(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert sale rows given as tuples in ``SALE_COLUMNS`` order."""
        if not rows:
            return
        if self.pg:
            apg = await self._asyncpg()
            await apg.copy_records_to_table(
                "sale", schema_name="sales", columns=SALE_COLUMNS, records=rows
            )
            return
        await self.conn.execute(
            sale_t.insert(), [dict(zip(SALE_COLUMNS, r, strict=True)) for r in rows]
        )

    async def known_conflicts(
        self, station_code: str, received: Sequence[tuple[UUID, str]]
    ) -> set[tuple[UUID, str]]:
        """The (sale_id, payload hash) pairs already recorded as conflicts."""
        rows = await self.conn.execute(
            sa.select(conflict_t.c.sale_id, conflict_t.c.payload_hash).where(
                conflict_t.c.station_code == station_code,
                conflict_t.c.sale_id.in_({sale_id for sale_id, _ in received}),
            )
        )
        return {(r.sale_id, r.payload_hash) for r in rows} & set(received)

    async def insert_conflicts(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.conn.execute(conflict_t.insert(), rows)

    async def insert_alerts(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.conn.execute(alert_t.insert(), rows)

    async def sequence_book(self, station_code: str) -> SequenceBook:
        if self.pg:
            apg = await self._asyncpg()
            row = await apg.fetchrow(
                "SELECT high_water, gaps, jumps FROM sales.station_sequence"
                " WHERE station_code = $1",
                station_code,
            )
        else:
            row = (
                (
                    await self.conn.execute(
                        sa.select(
                            sequence_t.c.high_water, sequence_t.c.gaps, sequence_t.c.jumps
                        ).where(sequence_t.c.station_code == station_code)
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            return SequenceBook()
        gaps: tuple[Gap, ...] = tuple((int(a), int(b)) for a, b in json.loads(row["gaps"]))
        jumps = tuple(int(j) for j in json.loads(row["jumps"]))
        return SequenceBook(high_water=row["high_water"], gaps=gaps, jumps=jumps)

    async def save_sequence_book(
        self, station_code: str, book: SequenceBook, now: datetime
    ) -> None:
        """Write the book (called under the station lock; an upsert on PostgreSQL,
        update-then-insert elsewhere, which the lock makes safe)."""
        if self.pg:
            apg = await self._asyncpg()
            await apg.execute(
                "INSERT INTO sales.station_sequence (station_code, high_water, gaps,"
                " updated_at, jumps) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (station_code)"
                " DO UPDATE SET high_water = $2, gaps = $3, updated_at = $4, jumps = $5",
                station_code,
                book.high_water,
                json.dumps(book.gaps),
                now,
                json.dumps(book.jumps),
            )
            return
        values = {
            "high_water": book.high_water,
            "gaps": json.dumps(book.gaps),
            "updated_at": now,
            "jumps": json.dumps(book.jumps),
        }
        result = await self.conn.execute(
            sequence_t.update().where(sequence_t.c.station_code == station_code).values(**values)
        )
        if result.rowcount == 0:
            await self.conn.execute(sequence_t.insert().values(station_code=station_code, **values))

    # --- queries -------------------------------------------------------------------------

    @staticmethod
    def _filters(
        station: str | None, business_date: date | None, grade: str | None
    ) -> list[sa.ColumnElement[bool]]:
        where: list[sa.ColumnElement[bool]] = []
        if station:
            where.append(sale_t.c.station_code == station)
        if business_date:
            where.append(sale_t.c.business_date == business_date)
        if grade:
            where.append(sale_t.c.grade == grade)
        return where

    async def list_sales(
        self,
        *,
        station: str | None,
        business_date: date | None,
        grade: str | None,
        after: UUID | None,
        limit: int,
    ) -> list[sa.Row]:
        where = self._filters(station, business_date, grade)
        if after is not None:
            where.append(sale_t.c.sale_id > after)
        rows = await self.conn.execute(
            sa.select(sale_t).where(*where).order_by(sale_t.c.sale_id).limit(limit)
        )
        return list(rows)

    async def summary(
        self, *, station: str | None, business_date: date | None, grade: str | None
    ) -> list[sa.Row]:
        """Totals by station, grade, currency, dispense type and quarantine: amounts are
        never added across currencies, and pump tests, own use and drive-offs are reported
        apart from sales (``sales`` counts ``sale`` dispensings only; ``dispensings`` all).
        A sale flagged ``natural_key_collision`` is a meter transaction already stored under
        another sale_id: left out, so each transaction counts once."""
        group = (
            sale_t.c.station_code,
            sale_t.c.grade,
            sale_t.c.currency,
            sale_t.c.dispense_type,
            sale_t.c.quarantined,
        )
        is_sale = sale_t.c.dispense_type == DispenseType.SALE.value
        rows = await self.conn.execute(
            sa.select(
                *group,
                sa.func.count().label("dispensings"),
                sa.func.sum(sa.case((is_sale, 1), else_=0)).label("sales"),
                sa.func.coalesce(sa.func.sum(sale_t.c.volume_ml), 0).label("volume_ml"),
                sa.func.coalesce(sa.func.sum(sale_t.c.amount_minor), 0).label("amount_minor"),
            )
            .where(
                *self._filters(station, business_date, grade),
                sa.not_(sale_t.c.flags.contains(Flag.NATURAL_KEY_COLLISION.value, autoescape=True)),
            )
            .group_by(*group)
            .order_by(*group)
        )
        return list(rows)

    async def natural_key_duplicates(self, station: str | None) -> int:
        """HQ rows that share a natural key with another row (each extra row counts once;
        GROUP BY puts NULLs together, as the natural key compares None as a value)."""
        cols = (
            sale_t.c.station_code,
            sale_t.c.device_id,
            sale_t.c.device_epoch,
            sale_t.c.fuelling_point,
            sale_t.c.nozzle,
            sale_t.c.device_txn,
            sale_t.c.totalizer_end_ml,
        )
        grouped = (
            sa.select(*cols, sa.func.count().label("n"))
            .where(sale_t.c.device_txn.is_not(None), *self._filters(station, None, None))
            .group_by(*cols)
            .having(sa.func.count() > 1)
            .subquery()
        )
        value = await self.conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(grouped.c.n - 1), 0)))
        return int(value or 0)

    async def alerts(self, station: str | None, limit: int) -> list[sa.Row]:
        where = [alert_t.c.station_code == station] if station else []
        rows = await self.conn.execute(
            sa.select(alert_t).where(*where).order_by(alert_t.c.id.desc()).limit(limit)
        )
        return list(rows)
