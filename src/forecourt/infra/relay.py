"""The outbox relay: the only publisher, for every bus backend.

It claims unpublished rows with ``FOR UPDATE SKIP LOCKED`` (several relays can run side by
side, each takes different rows) — never with a ``WHERE id > last_seen`` cursor, which skips
rows whose transactions commit out of id order. It publishes each row, waits for the
broker's acknowledgement, then marks the rows published in the same transaction. A crash in
between re-publishes; the broker's de-duplication (``Nats-Msg-Id`` = event id) and the
consumers' inbox absorb the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import timedelta

import sqlalchemy as sa

from forecourt.infra.bus import Bus
from forecourt.infra.db import Database, outbox_table
from forecourt.infra.logging import get_logger
from forecourt.kernel.events import Envelope

log = get_logger("forecourt.relay")


def _envelope(row: sa.Row) -> Envelope:
    return Envelope(
        id=row.event_id,
        type=row.type,
        source=row.source,
        subject=row.subject,
        time=row.time,
        traceparent=row.traceparent,
        data=json.loads(row.data),
        encoded=row.data.encode(),
    )


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        batch_size: int = 500,
        idle_seconds: float = 0.05,
        retention: timedelta = timedelta(hours=24),
    ) -> None:
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.retention = retention
        self.published = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def relay_once(self) -> int:
        """Claim, publish and mark one batch; returns how many rows were published."""
        t = outbox_table
        async with self.db.begin() as uow:
            conn = uow.conn
            rows = (
                await conn.execute(
                    sa.select(t)
                    .where(t.c.published_at.is_(None))
                    .order_by(t.c.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            # Pipelined: every message out, then every ack; order is not promised anyway.
            await self.bus.publish_many([_envelope(r) for r in rows])
            await conn.execute(
                t.update()
                .where(t.c.id.in_([r.id for r in rows]))
                .values(published_at=self.db.clock.now())
            )
        self.published += len(rows)
        return len(rows)

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
            value = await conn.scalar(
                sa.select(sa.func.count()).select_from(t).where(t.c.published_at.is_(None))
            )
        return int(value or 0)

    async def prune(self) -> int:
        """Delete rows published longer ago than the retention."""
        t = outbox_table
        cutoff = self.db.clock.now() - self.retention
        async with self.db.begin() as uow:
            result = await uow.conn.execute(
                t.delete().where(t.c.published_at.is_not(None), t.c.published_at < cutoff)
            )
        return int(result.rowcount or 0)

    async def run(self) -> None:
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

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
