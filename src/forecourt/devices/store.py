"""Persistence of ``devices`` (SQLAlchemy Core on SQLite and PostgreSQL).

On PostgreSQL the tables live in the ``devices`` schema; on SQLite without a schema, each
named ``devices_…`` so that names stay unique across contexts. ``devices_current`` holds one
row per topic (status, pump, tank, device line, and edge alarm by name) with the stamp it
was accepted under; ``devices_history`` the accepted pump and tank states, pruned to the
newest N per pump or tank.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.infra.db import Database, UTCDateTime

SCHEMA = "devices"
md = sa.MetaData(schema=SCHEMA)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

station_t = sa.Table(
    "devices_station",
    md,
    sa.Column("station_code", sa.String(64), primary_key=True),
    sa.Column("online", sa.Boolean),  # NULL: no status received yet
    sa.Column("last_seen", UTCDateTime()),  # HQ's time of the last valid message
    sa.Column("stale", sa.Boolean, nullable=False),  # as the telemetry_stale alarm stands
    sa.Column("discards", sa.BigInteger, nullable=False),
    sa.Column("last_discard_at", UTCDateTime()),
)
current_t = sa.Table(
    "devices_current",
    md,
    sa.Column("station_code", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("key", sa.String(100), primary_key=True),
    sa.Column("boot", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # JSON object: the payload's body
    sa.Column("received_at", UTCDateTime(), nullable=False),
)
history_t = sa.Table(
    "devices_history",
    md,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("station_code", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("key", sa.String(100), nullable=False),
    sa.Column("boot", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
)
alarm_t = sa.Table(
    "devices_alarm",
    md,
    sa.Column("station_code", sa.String(64), primary_key=True),
    sa.Column("source", sa.String(8), primary_key=True),
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=False),
    sa.Column("raised_at", UTCDateTime()),
    sa.Column("cleared_at", UTCDateTime()),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)
alarm_log_t = sa.Table(
    "devices_alarm_log",
    md,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("station_code", sa.String(64), nullable=False),
    sa.Column("source", sa.String(8), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
)
discard_t = sa.Table(
    "devices_discard",
    md,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("station_code", sa.String(64), nullable=False),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
)


async def _translated(conn: AsyncConnection) -> AsyncConnection:
    """On SQLite, the connection with ``devices`` translated away like the other schemas."""
    if conn.dialect.name != "sqlite":
        return conn
    sync = conn.sync_connection
    assert sync is not None  # a connection in use
    mapping = dict(sync.get_execution_options().get("schema_translate_map") or {})
    if SCHEMA in mapping:
        return conn
    mapping[SCHEMA] = None
    return await conn.execution_options(schema_translate_map=mapping)


@asynccontextmanager
async def reading(db: Database) -> AsyncIterator[DevicesStore]:
    """A store on a read connection."""
    async with db.connection() as conn:
        yield DevicesStore(await _translated(conn))


@asynccontextmanager
async def writing(db: Database) -> AsyncIterator[DevicesStore]:
    """A store in a write transaction (committed at the end)."""
    async with db.begin() as uow:
        yield DevicesStore(await _translated(uow.conn))


class DevicesStore:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.pg = conn.dialect.name == "postgresql"

    async def _upsert(self, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        keys = [c.name for c in table.primary_key.columns]
        insert = pg_insert(table) if self.pg else sqlite_insert(table)
        statement = insert.on_conflict_do_update(
            index_elements=keys,
            set_={c.name: insert.excluded[c.name] for c in table.columns if c.name not in keys},
        )
        await self.conn.execute(statement, list(rows))

    # --- writes ------------------------------------------------------------------------------

    async def lock_stations(self, codes: Iterable[str]) -> None:
        """Serialise writers per station (SQLite serialises every writer already)."""
        if self.pg:
            for code in sorted(set(codes)):
                await self.conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"devices:{code}"}
                )

    async def stations(self, codes: Iterable[str] | None = None) -> dict[str, sa.Row[Any]]:
        query = sa.select(station_t)
        if codes is not None:
            query = query.where(station_t.c.station_code.in_(sorted(set(codes))))
        rows = await self.conn.execute(query.order_by(station_t.c.station_code))
        return {r.station_code: r for r in rows}

    async def save_stations(self, rows: Sequence[dict[str, Any]]) -> None:
        await self._upsert(station_t, rows)

    async def current_of(
        self, codes: Iterable[str], kind: str | None = None, key: str | None = None
    ) -> list[sa.Row[Any]]:
        where: list[sa.ColumnElement[bool]] = [current_t.c.station_code.in_(sorted(set(codes)))]
        if kind is not None:
            where.append(current_t.c.kind == kind)
        if key is not None:
            where.append(current_t.c.key == key)
        rows = await self.conn.execute(
            sa.select(current_t).where(*where).order_by(current_t.c.kind, current_t.c.key)
        )
        return list(rows)

    async def save_current(self, rows: Sequence[dict[str, Any]]) -> None:
        await self._upsert(current_t, rows)

    async def append_history(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await self.conn.execute(history_t.insert(), list(rows))

    async def prune_history(self, station: str, kind: str, key: str, keep: int) -> None:
        """Delete all but the newest ``keep`` history rows of one pump or tank."""
        of_key = (
            history_t.c.station_code == station,
            history_t.c.kind == kind,
            history_t.c.key == key,
        )
        oldest_kept = (
            sa.select(history_t.c.id)
            .where(*of_key)
            .order_by(history_t.c.id.desc())
            .offset(keep - 1)
            .limit(1)
            .scalar_subquery()
        )
        await self.conn.execute(history_t.delete().where(*of_key, history_t.c.id < oldest_kept))

    async def alarms_of(self, codes: Iterable[str]) -> dict[tuple[str, str, str], sa.Row[Any]]:
        rows = await self.conn.execute(
            sa.select(alarm_t).where(alarm_t.c.station_code.in_(sorted(set(codes))))
        )
        return {(r.station_code, r.source, r.name): r for r in rows}

    async def save_alarms(self, rows: Sequence[dict[str, Any]]) -> None:
        await self._upsert(alarm_t, rows)

    async def log_alarms(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await self.conn.execute(alarm_log_t.insert(), list(rows))

    async def append_discards(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await self.conn.execute(discard_t.insert(), list(rows))

    async def prune_discards(self, station: str, keep: int) -> None:
        oldest_kept = (
            sa.select(discard_t.c.id)
            .where(discard_t.c.station_code == station)
            .order_by(discard_t.c.id.desc())
            .offset(keep - 1)
            .limit(1)
            .scalar_subquery()
        )
        await self.conn.execute(
            discard_t.delete().where(
                discard_t.c.station_code == station, discard_t.c.id < oldest_kept
            )
        )

    # --- queries -----------------------------------------------------------------------------

    async def history(self, station: str, kind: str, key: str, limit: int) -> list[sa.Row[Any]]:
        """The newest ``limit`` accepted states of one pump or tank, newest first."""
        rows = await self.conn.execute(
            sa.select(history_t)
            .where(
                history_t.c.station_code == station,
                history_t.c.kind == kind,
                history_t.c.key == key,
            )
            .order_by(history_t.c.id.desc())
            .limit(limit)
        )
        return list(rows)

    async def active_alarm_counts(self) -> dict[str, int]:
        rows = await self.conn.execute(
            sa.select(alarm_t.c.station_code, sa.func.count())
            .where(alarm_t.c.active)
            .group_by(alarm_t.c.station_code)
        )
        return {r[0]: int(r[1]) for r in rows}

    async def alarm_log(self, station: str, limit: int) -> list[sa.Row[Any]]:
        rows = await self.conn.execute(
            sa.select(alarm_log_t)
            .where(alarm_log_t.c.station_code == station)
            .order_by(alarm_log_t.c.id.desc())
            .limit(limit)
        )
        return list(rows)

    async def discards(self, station: str, limit: int) -> list[sa.Row[Any]]:
        rows = await self.conn.execute(
            sa.select(discard_t)
            .where(discard_t.c.station_code == station)
            .order_by(discard_t.c.id.desc())
            .limit(limit)
        )
        return list(rows)
