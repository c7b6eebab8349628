"""The outbox relay: the only publisher, for every bus backend.

It takes unpublished rows in id order, publishes them, and deletes exactly the rows the bus
stored: never "every row up to the highest id taken", since a row with a lower id may
commit while a later batch is being published. Rows are never found with a
``WHERE id > last_seen`` cursor either, which skips rows whose transactions commit out of id
order. Three ways, by bus and database:

* A transactional bus (the in-process bus, ``bus.transactional``): claim, publish (the
  bus's inserts in the relay's transaction) and delete in one write transaction. Nothing
  waits outside the database, and a crash anywhere leaves either the outbox rows or the
  deliveries, never both and never neither.
* A broker (NATS) on PostgreSQL: claim with ``FOR UPDATE SKIP LOCKED``, publish and wait
  for the acknowledgements, then delete, in one transaction. The rows stay locked while the
  broker answers, so ``lanes`` loops (and several relays) never take the same rows.
* A broker on SQLite: the batch is read with a read connection and the write lock is *not*
  held while the broker answers (it would stall every writer of the process); the
  acknowledged rows are then deleted in a short write transaction. One relay runs per
  SQLite database; a second one would at worst publish some rows twice, which the broker's
  de-duplication and the consumers' inbox absorb.

With a broker, a crash between its acknowledgement and the delete (crash point
``relay.after_publish``) publishes the rows again: the broker's de-duplication
(``Nats-Msg-Id`` = event id) and the consumers' inbox absorb the repeat.

What the bus answers
    * :class:`~forecourt.infra.bus.PublishRefused`: the stored rows are deleted and each
      refused row is moved to ``platform.outbox_parked`` with the reason, in the same
      transaction (``relay.event_parked`` at error level): one refused row never blocks the
      rows behind it. :meth:`OutboxRelay.requeue_parked` puts parked rows back.
    * :class:`~forecourt.infra.bus.BusFull`: the rows stay; the relay backs off (doubling,
      up to 5 s) and raises :attr:`OutboxRelay.alarm` (``relay.bus_full`` logged once per
      episode) until a publish goes through again.
    * Anything else: the rows stay; the relay counts a failure, keeps ``last_error`` and
      backs off the same way.

Counters for metrics: ``published``, ``parked``, ``failures``, ``alarm``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.infra.background import BackgroundService
from forecourt.infra.bus import Bus, BusFull, PublishRefused
from forecourt.infra.crash import crash_point
from forecourt.infra.db import (
    OUTBOX_COLUMNS,
    Database,
    asyncpg_connection,
    outbox_parked_table,
    outbox_table,
)
from forecourt.infra.logging import get_logger
from forecourt.kernel.events import EventRecord

log = get_logger("forecourt.relay")


CLAIM_SQL = (
    "SELECT id, event_id, type, source, subject, time, traceparent, data, created_at"
    " FROM platform.outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
)
DELETE_SQL = "DELETE FROM platform.outbox WHERE id = ANY($1::bigint[])"
MAX_BACKOFF = 5.0


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
        self.parked = 0
        self.failures = 0
        self.vacuums = 0
        self._bus_alarm: str | None = None
        self._deleted_since_vacuum = 0

    # --- state for operators and metrics --------------------------------------------

    @property
    def alarm(self) -> str | None:  # type: ignore[override]
        """Why the relay cannot publish (``"bus full: ..."``), or why its task crashed;
        None when all is well."""
        if self._bus_alarm is not None:
            return self._bus_alarm
        if super().alarm:
            return f"relay task crashed: {self.last_error}"
        return None

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "published": self.published,
            "parked": self.parked,
            "failures": self.failures,
        }

    # --- one pass -------------------------------------------------------------------

    async def relay_once(self) -> int:
        """Take, publish and delete one batch; returns how many rows left the outbox
        (published or parked). Raises what the bus raised, except ``PublishRefused``
        (the refused rows are parked); the rows then stay."""
        try:
            if getattr(self.bus, "transactional", False):
                n = await self._relay_in_transaction()
            elif self.db.is_sqlite:
                n = await self._relay_sqlite()
            else:
                n = await self._relay_postgres()
        except BusFull as exc:
            if self._bus_alarm is None:
                log.error("relay.bus_full", error=str(exc))
            self._bus_alarm = f"bus full: {exc}"
            raise
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        if self.vacuum_every and self._deleted_since_vacuum >= self.vacuum_every:
            await self.vacuum()
        return n

    async def _relay_in_transaction(self) -> int:
        """Transactional bus: claim, publish and delete in one write transaction."""
        async with self.db.begin() as uow:
            rows = await self._claim(uow.conn, lock=not self.db.is_sqlite)
            if not rows:
                return 0
            refused = await self._publish(rows, uow.conn)
            crash_point("relay.after_publish")
            await self._remove(uow.conn, rows, refused)
        return self._done(rows, refused)

    async def _relay_postgres(self) -> int:
        """Broker on PostgreSQL: the claim–publish–delete transaction (asyncpg directly, the
        relay's hot path); the rows stay locked until the broker has answered."""
        async with self.db.begin() as uow:
            apg = await asyncpg_connection(uow.conn)
            rows = await apg.fetch(CLAIM_SQL, self.batch_size)
            if not rows:
                return 0
            refused = await self._publish(rows, None)
            crash_point("relay.after_publish")
            await self._remove(uow.conn, rows, refused)
        return self._done(rows, refused)

    async def _relay_sqlite(self) -> int:
        """Broker on SQLite: read, publish without the write lock, delete what was stored."""
        async with self.db.connection() as conn:
            rows = await self._claim(conn, lock=False)
        if not rows:
            return 0
        refused = await self._publish(rows, None)
        crash_point("relay.after_publish")
        async with self.db.begin() as uow:
            await self._remove(uow.conn, rows, refused)
        return self._done(rows, refused)

    async def _claim(self, conn: AsyncConnection, *, lock: bool) -> list[Any]:
        t = outbox_table
        query = sa.select(t).order_by(t.c.id).limit(self.batch_size)
        if lock:
            query = query.with_for_update(skip_locked=True)
        return [r._mapping for r in (await conn.execute(query)).all()]

    async def _publish(
        self, rows: Sequence[Any], conn: AsyncConnection | None
    ) -> Mapping[int, str]:
        """Publish; the refused rows by index (empty when every row was stored)."""
        records = [_record(r) for r in rows]
        try:
            if conn is None:
                await self.bus.publish_records(records)
            else:
                await self.bus.publish_records(records, conn=conn)
        except PublishRefused as exc:
            return exc.refused
        return {}

    async def _remove(
        self, conn: AsyncConnection, rows: Sequence[Any], refused: Mapping[int, str]
    ) -> None:
        """Delete exactly these rows; park the refused ones (same transaction)."""
        ids = [r["id"] for r in rows]
        if self.db.is_sqlite:
            await conn.execute(outbox_table.delete().where(outbox_table.c.id.in_(ids)))
        else:
            apg = await asyncpg_connection(conn)
            await apg.execute(DELETE_SQL, ids)
        if refused:
            await self._park(conn, [(rows[i], reason) for i, reason in refused.items()])

    async def _park(self, conn: AsyncConnection, refused: list[tuple[Any, str]]) -> None:
        p = outbox_parked_table
        now = self.db.clock.now()
        ids = [row["id"] for row, _ in refused]
        # A parked row keeps its outbox id, unless that id is parked already (SQLite reuses
        # the ids of deleted rows): then it gets a new one.
        taken = set((await conn.execute(sa.select(p.c.id).where(p.c.id.in_(ids)))).scalars())
        values = []
        for row, reason in refused:
            value = {c: row[c] for c in OUTBOX_COLUMNS}
            value.update(parked_at=now, reason=reason)
            if row["id"] not in taken:
                value["id"] = row["id"]
            values.append(value)
            log.error(
                "relay.event_parked",
                outbox_id=row["id"],
                event_id=row["event_id"],
                type=row["type"],
                reason=reason,
            )
        for value in values:  # one by one: the rows may differ in whether they name an id
            await conn.execute(p.insert().values(**value))

    def _done(self, rows: Sequence[Any], refused: Mapping[int, str]) -> int:
        """After the commit: counters, and the bus alarm is over."""
        if self._bus_alarm is not None:
            log.info("relay.bus_full_cleared", was=self._bus_alarm)
            self._bus_alarm = None
        self.published += len(rows) - len(refused)
        self.parked += len(refused)
        if not self.db.is_sqlite:
            self._deleted_since_vacuum += len(rows)
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

    # --- operators --------------------------------------------------------------------

    async def backlog(self) -> int:
        t = outbox_table
        async with self.db.connection() as conn:
            value = await conn.scalar(sa.select(sa.func.count()).select_from(t))
        return int(value or 0)

    async def parked_count(self) -> int:
        """Rows in ``platform.outbox_parked`` (see :func:`count_parked`)."""
        return await count_parked(self.db)

    async def requeue_parked(self, ids: list[int] | None = None) -> int:
        """Move parked rows back into the outbox (see :func:`requeue_parked`)."""
        return await requeue_parked(self.db, ids)

    # --- running ----------------------------------------------------------------------

    async def drain(self, timeout: float = 30.0) -> int:
        """Publish until the outbox is empty (or the timeout passes); returns rows taken."""
        total = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            n = await self.relay_once()
            total += n
            if n == 0:
                return total
        return total

    async def run(self) -> None:
        """Relay until cancelled. On PostgreSQL ``lanes`` loops run side by side, each in
        its own transaction (``SKIP LOCKED`` keeps their rows apart), so one lane claims
        and deletes while another waits for the broker's acknowledgements."""
        lanes = 1 if self.db.is_sqlite else max(1, self.lanes)
        await asyncio.gather(*(self._lane() for _ in range(lanes)))

    async def _lane(self) -> None:
        backoff = 0.0
        while True:
            self.db.outbox_signal.clear()  # before the pass: an emit during it wakes us
            try:
                n = await self.relay_once()
            except BusFull:  # alarmed and logged (once) by relay_once; the rows stay
                backoff = min(max(backoff * 2, 0.1), MAX_BACKOFF)
            except Exception:  # noqa: BLE001 - counted by relay_once; the rows stay
                backoff = min(max(backoff * 2, 0.1), MAX_BACKOFF)
                log.warning("relay.publish_failed", error=self.last_error, retry_in=backoff)
            else:
                backoff = 0.0
                if not n:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self.db.outbox_signal.wait(), timeout=self.idle_seconds
                        )
                continue
            # After a failure the backoff is waited out: new rows must not cut it short.
            await asyncio.sleep(backoff)


async def requeue_parked(db: Database, ids: list[int] | None = None) -> int:
    """Move parked rows (these ids, or all when None) back into the outbox, to be
    published again (e.g. once the stream's limits were raised); returns how many."""
    p, t = outbox_parked_table, outbox_table
    where = sa.true() if ids is None else p.c.id.in_(ids)
    async with db.begin() as uow:
        chosen = sa.select(*(p.c[c] for c in OUTBOX_COLUMNS)).where(where).order_by(p.c.id)
        await uow.conn.execute(t.insert().from_select(list(OUTBOX_COLUMNS), chosen))
        result = await uow.conn.execute(p.delete().where(where))
        moved = int(result.rowcount or 0)
    if moved:
        log.info("relay.parked_requeued", events=moved)
        db.outbox_signal.set()
    return moved


async def count_parked(db: Database) -> int:
    """Outbox rows the broker refused for good (kept in ``platform.outbox_parked``, waiting
    for an operator)."""
    async with db.connection() as conn:
        value = await conn.scalar(sa.select(sa.func.count()).select_from(outbox_parked_table))
    return int(value or 0)
