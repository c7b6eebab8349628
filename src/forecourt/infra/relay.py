"""The outbox relay: the only publisher, for every bus backend.

It claims unpublished rows with ``FOR UPDATE SKIP LOCKED`` (several relays can run side by
side, each takes different rows) — never with a ``WHERE id > last_seen`` cursor, which skips
rows whose transactions commit out of id order. It publishes each row, waits for the
broker's acknowledgement, then deletes the rows in the same transaction. A crash in
between re-publishes; the broker's de-duplication (``Nats-Msg-Id`` = event id) and the
consumers' inbox absorb the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import sqlalchemy as sa

from forecourt.infra.background import BackgroundService
from forecourt.infra.bus import Bus
from forecourt.infra.db import Database, asyncpg_connection, outbox_table
from forecourt.infra.logging import get_logger
from forecourt.kernel.events import EventRecord

log = get_logger("forecourt.relay")


CLAIM_SQL = (
    "SELECT id, event_id, type, source, subject, time, traceparent, data FROM platform.outbox"
    " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
)


def _record(row: Any) -> EventRecord:
    return EventRecord(
        row["event_id"],
        row["type"],
        row["source"],
        row["subject"],
        row["time"],
        row["traceparent"],
        row["data"],
    )


class OutboxRelay(BackgroundService):
    task_name = "outbox-relay"

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        batch_size: int = 500,
        idle_seconds: float = 0.05,
        vacuum_every: int = 20_000,
        lanes: int = 2,
    ) -> None:
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.vacuum_every = vacuum_every
        self.lanes = lanes
        self.published = 0
        self.failures = 0
        self.vacuums = 0
        self._deleted_since_vacuum = 0

    async def relay_once(self) -> int:
        """Claim, publish and delete one batch; returns how many rows were published."""
        if not self.db.is_sqlite:
            return await self._relay_once_postgres()
        t = outbox_table
        async with self.db.begin() as uow:
            conn = uow.conn
            rows = (
                await conn.execute(
                    sa.select(t)
                    .order_by(t.c.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            # Pipelined: every message out, then every ack; order is not promised anyway.
            await self.bus.publish_records([_record(r._mapping) for r in rows])
            # Deleting is cheaper for PostgreSQL than marking (no new row version, no index
            # entries); JetStream keeps the published events for replay.
            await conn.execute(t.delete().where(t.c.id.in_([r.id for r in rows])))
        self.published += len(rows)
        return len(rows)

    async def _relay_once_postgres(self) -> int:
        """The same claim–publish–delete on asyncpg directly (the relay's hot path)."""
        async with self.db.begin() as uow:
            apg = await asyncpg_connection(uow.conn)
            rows = await apg.fetch(CLAIM_SQL, self.batch_size)
            if not rows:
                return 0
            await self.bus.publish_records([_record(r) for r in rows])
            await apg.execute(
                "DELETE FROM platform.outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
        self.published += len(rows)
        self._deleted_since_vacuum += len(rows)
        if self.vacuum_every and self._deleted_since_vacuum >= self.vacuum_every:
            await self.vacuum()
        return len(rows)

    async def vacuum(self) -> None:
        """Vacuum the outbox (PostgreSQL). A queue table: every row is inserted, claimed and
        deleted within moments, and the claim walks the primary key from its start, over
        every deleted row's entry that vacuum has not yet removed. Autovacuum looks at a
        database about once a minute, which at thousands of events a second leaves
        hundreds of thousands of dead entries to walk per claim; so the relay vacuums the
        table itself after every ``vacuum_every`` deleted rows. ``SKIP_LOCKED``: when
        another relay (or autovacuum) is already at it, this one does not wait."""
        self._deleted_since_vacuum = 0
        try:
            async with self.db.engine.connect() as conn:
                auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await auto.exec_driver_sql("VACUUM (SKIP_LOCKED) platform.outbox")
            self.vacuums += 1
        except Exception as exc:  # noqa: BLE001 - an optimisation; relaying goes on
            log.warning("relay.vacuum_failed", error=str(exc))

    async def drain(self, timeout: float = 30.0) -> int:
        """Publish until the outbox is empty (or the timeout passes); returns rows published."""
        total = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            n = await self.relay_once()
            total += n
            if n == 0:
                return total
        return total

    async def backlog(self) -> int:
        t = outbox_table
        async with self.db.connection() as conn:
            value = await conn.scalar(sa.select(sa.func.count()).select_from(t))
        return int(value or 0)

    async def run(self) -> None:
        """Relay until cancelled. On PostgreSQL ``lanes`` loops run side by side, each in
        its own transaction (``SKIP LOCKED`` keeps their rows apart), so one lane claims
        and deletes while another waits for the broker's acknowledgements."""
        lanes = 1 if self.db.is_sqlite else max(1, self.lanes)
        await asyncio.gather(*(self._lane() for _ in range(lanes)))

    async def _lane(self) -> None:
        backoff = self.idle_seconds
        while True:
            try:
                n = await self.relay_once()
                backoff = self.idle_seconds
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep relaying; rows stay unpublished
                self.failures += 1
                log.warning("relay.publish_failed", error=str(exc))
                n = 0
                backoff = min(max(backoff * 2, 0.1), 5.0)
            if n == 0:
                self.db.outbox_signal.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.db.outbox_signal.wait(), timeout=backoff)
