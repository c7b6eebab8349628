"""Database access for SQLite and PostgreSQL behind one interface, and the unit of work.

Each context owns its tables in its own PostgreSQL schema (``network``, ``sales``, and
``platform`` for the outbox, inbox, idempotency and audit-outbox tables). On SQLite the
schema names are translated away (``schema_translate_map``), so the same SQLAlchemy Core
statements run on both; table names are therefore unique across contexts.

SQLite is opened in WAL mode with ``synchronous=FULL``, and writers are serialised inside the
process (one asyncio lock, ``BEGIN IMMEDIATE``), because SQLite has one writer at a time and
an early write lock avoids lock-upgrade deadlocks between connections.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from forecourt.infra.logging import source_var, trace_id_var
from forecourt.kernel.clock import Clock, SystemClock
from forecourt.kernel.events import Envelope, EventRecord, check_records
from forecourt.kernel.ids import new_id

SCHEMAS = ("platform", "network", "sales", "devices", "identity", "audit", "payments")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware timestamps on both backends; naive values are refused."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} cannot be stored")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self,
        value: datetime | None,
        dialect: Dialect,  # noqa: ARG002 - SQLAlchemy signature
    ) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``sqlite:///`` and pick the async drivers we ship."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed.render_as_string(hide_password=False)


# A pooled PostgreSQL connection idle for longer than this is pinged before it is handed
# out (a dead one is replaced at once, so the first request after an outage does not fail).
IDLE_BEFORE_PING_S = 1.0


def _ping_when_idle(engine: AsyncEngine, idle_s: float) -> None:
    """Pessimistic disconnect handling, but only for connections that sat idle.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout, and on asyncpg a ping is three
    round trips (BEGIN, an empty query, ROLLBACK): under load that was about 5 % of the HQ
    workers' CPU for connections used a few milliseconds earlier. A connection in use that
    breaks is still recognised by SQLAlchemy, which then replaces every connection of the
    pool that is older than the failure.
    """
    pool_events = engine.sync_engine.pool

    @event.listens_for(pool_events, "connect")
    def _connected(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool_events, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool_events, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is not None and time.monotonic() - since <= idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # noqa: BLE001 - any failure: the pool takes a new one
            raise sa.exc.DisconnectionError(f"stale pooled connection: {exc}") from exc


class Database:
    """One database (SQLite file or PostgreSQL server) and its engine."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        pool_size: int = 10,
        application_name: str = "forecourt",
    ) -> None:
        self.url = normalise_url(url)
        # Shown in pg_stat_activity, so operators can tell HQ workers from the relay.
        self.application_name = application_name
        self.backend = make_url(self.url).get_backend_name()
        if self.backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.backend!r}")
        self.clock = clock or SystemClock()
        self._pool_size = pool_size
        self._engine: AsyncEngine | None = None
        self._write_lock = asyncio.Lock()
        self.outbox_signal = asyncio.Event()

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.connect() has not been called")
        return self._engine

    def schema(self, context: str) -> str | None:
        return None if self.is_sqlite else context

    async def connect(self) -> None:
        if self._engine is not None:
            return
        if self.is_sqlite:
            path = make_url(self.url).database
            if path and path != ":memory:":
                from pathlib import Path

                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(self.url)
            _configure_sqlite(engine)
            engine = engine.execution_options(schema_translate_map=dict.fromkeys(SCHEMAS))
        else:
            engine = create_async_engine(
                self.url,
                pool_size=self._pool_size,
                max_overflow=self._pool_size,
                connect_args={"server_settings": {"application_name": self.application_name}},
            )
            _ping_when_idle(engine, IDLE_BEFORE_PING_S)
        self._engine = engine

    async def dispose(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A read connection (autocommit-free; rolled back at the end)."""
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[UnitOfWork]:
        """A write transaction; events and audit records commit atomically with it."""
        if self.is_sqlite:
            async with self._write_lock, self.engine.begin() as conn:
                uow = UnitOfWork(conn, self)
                yield uow
        else:
            async with self.engine.begin() as conn:
                uow = UnitOfWork(conn, self)
                yield uow
        if uow.emitted:
            self.outbox_signal.set()


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# --- platform tables (the outbox and friends), shared by every context -------------------

platform_md = sa.MetaData(schema="platform")

outbox_table = sa.Table(
    "outbox",
    platform_md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("source", sa.String(200), nullable=False),
    sa.Column("subject", sa.String(200)),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("traceparent", sa.String(64)),
    sa.Column("data", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

inbox_table = sa.Table(
    "inbox",
    platform_md,
    sa.Column("consumer", sa.String(100), primary_key=True),
    sa.Column("event_id", sa.String(64), primary_key=True),
    sa.Column("processed_at", UTCDateTime(), nullable=False),
)

dead_letter_table = sa.Table(
    "dead_letter",
    platform_md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("consumer", sa.String(100), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("headers", sa.Text(), nullable=False),
    sa.Column("body", sa.Text(), nullable=False),
    sa.Column("deliveries", sa.Integer(), nullable=False),
    sa.Column("error", sa.Text(), nullable=False),
    sa.Column("dead_at", UTCDateTime(), nullable=False),
    sa.Column("replay_requested_at", UTCDateTime()),
    sa.Column("replays", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("subject", sa.String(200), nullable=False, server_default=""),
)

subscription_table = sa.Table(
    "subscription",
    platform_md,
    sa.Column("consumer", sa.String(100), primary_key=True),
    sa.Column("subjects", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

delivery_table = sa.Table(
    "delivery",
    platform_md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("consumer", sa.String(100), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("headers", sa.Text(), nullable=False),
    sa.Column("body", sa.Text(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("available_at", UTCDateTime(), nullable=False),
    sa.Column("lease_until", UTCDateTime()),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

outbox_parked_table = sa.Table(
    "outbox_parked",
    platform_md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("source", sa.String(200), nullable=False),
    sa.Column("subject", sa.String(200)),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("traceparent", sa.String(64)),
    sa.Column("data", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("parked_at", UTCDateTime(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
)

probe_effect_table = sa.Table(
    "probe_effect",
    platform_md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("consumer", sa.String(100), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("event_time", UTCDateTime(), nullable=False),
    sa.Column("applied_at", UTCDateTime(), nullable=False),
)

# One row per (scope, Idempotency-Key); infra/idempotency.py has the states. ``expires_at`` is
# NULL while an outside call may have happened without a known outcome (``started``), so no
# purge (``expires_at <= now``) ever frees such a key.
idempotency_table = sa.Table(
    "idempotency",
    platform_md,
    sa.Column("scope", sa.String(100), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("owner", sa.String(200), nullable=False, server_default=""),
    sa.Column("state", sa.String(20), nullable=False, server_default="reserved"),
    sa.Column("lease_until", UTCDateTime()),
    sa.Column("status_code", sa.Integer()),
    sa.Column("response", sa.Text()),
    sa.Column("response_headers", sa.Text()),
    sa.Column("recovery_point", sa.Text()),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime()),
)

audit_outbox_table = sa.Table(
    "audit_outbox",
    platform_md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("record_id", sa.String(64), nullable=False, unique=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(200), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("details", sa.Text(), nullable=False),
    sa.Column("trace_id", sa.String(32)),
    sa.Column("source", sa.String(100)),
)


OUTBOX_COLUMNS = (
    "event_id",
    "type",
    "source",
    "subject",
    "time",
    "traceparent",
    "data",
    "created_at",
)


async def asyncpg_connection(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn``, inside ``conn``'s transaction.

    SQLAlchemy's asyncpg adapter opens its transaction lazily, on the first statement it
    runs; raw asyncpg work issued before that would autocommit on its own. So when no
    transaction is open yet, run a no-op through SQLAlchemy first to open it.
    """
    raw = await conn.get_raw_connection()
    apg: Any = raw.driver_connection
    if conn.in_transaction() and not apg.is_in_transaction():
        await conn.execute(sa.text("SELECT 1"))
        if not apg.is_in_transaction():
            raise RuntimeError("could not join the unit of work's transaction")
    return apg


class UnitOfWork:
    """One transaction. What a handler writes, emits and audits commits or rolls back together."""

    def __init__(self, conn: AsyncConnection, db: Database) -> None:
        self.conn = conn
        self.db = db
        self.emitted = 0

    async def emit(self, *envelopes: Envelope) -> None:
        """Append events to the transactional outbox (the relay publishes them later)."""
        await self.emit_many(envelopes)

    async def emit_many(self, envelopes: Sequence[Envelope]) -> None:
        await self.emit_records([e.record() for e in envelopes])

    async def emit_records(self, records: Sequence[EventRecord]) -> None:
        """Append already-encoded events to the outbox (the hot path: no envelope objects,
        each body encoded once by the caller; the envelope's rules are still checked)."""
        if not records:
            return
        check_records(records)
        now = self.db.clock.now()
        # An EventRecord is the outbox row in OUTBOX_COLUMNS order, less created_at.
        rows = [(*r, now) for r in records]
        if self.db.is_sqlite:
            await self.conn.execute(
                outbox_table.insert(), [dict(zip(OUTBOX_COLUMNS, row, strict=True)) for row in rows]
            )
        else:
            # COPY on the same asyncpg connection and transaction: the hot path of ingest.
            apg = await asyncpg_connection(self.conn)
            await apg.copy_records_to_table(
                "outbox", schema_name="platform", columns=OUTBOX_COLUMNS, records=rows
            )
        self.emitted += len(records)

    async def record_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        details: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> None:
        """Append to the audit outbox in this transaction (chained and verified downstream).
        ``source``: where the action came from (default: the HTTP client of the request
        being answered, if any); the trace id is the request's."""
        origin = source if source is not None else source_var.get()
        await self.conn.execute(
            audit_outbox_table.insert().values(
                record_id=str(new_id()),
                at=self.db.clock.now(),
                actor=actor,
                action=action,
                target=target,
                details=json.dumps(details or {}, sort_keys=True, default=str),
                trace_id=trace_id_var.get(),
                source=origin[:100] if origin else None,
            )
        )
