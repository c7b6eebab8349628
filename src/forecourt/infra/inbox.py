"""Consumers with an inbox: exactly-once effects over an at-least-once, unordered bus.

A consumer's handler runs inside a unit of work together with the insert of
(consumer, event id) into the inbox table; a repeat delivery finds the row and does nothing.
A delivery that keeps failing is dead-lettered (stored with its headers, body and error) after
``max_deliver`` attempts, and an alert is logged, so a poison message never blocks the rest.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.infra.bus import Bus, Delivery, Subscription
from forecourt.infra.db import Database, UnitOfWork, dead_letter_table, inbox_table
from forecourt.infra.logging import get_logger, trace_id_var
from forecourt.kernel.events import Envelope, trace_id_of

log = get_logger("forecourt.inbox")

EffectHandler = Callable[[Envelope, UnitOfWork], Awaitable[None]]


class InboxConsumer:
    def __init__(
        self,
        db: Database,
        bus: Bus,
        name: str,
        subjects: list[str],
        handler: EffectHandler,
        *,
        max_deliver: int = 5,
    ) -> None:
        self.db = db
        self.bus = bus
        self.name = name
        self.subjects = subjects
        self.handler = handler
        self.max_deliver = max_deliver
        self.processed = 0
        self.skipped = 0
        self.dead = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.bus.subscribe(
            self.name, self.subjects, self.on_delivery, max_deliver=self.max_deliver
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.stop()
            self._sub = None

    async def on_delivery(self, delivery: Delivery) -> None:
        env = delivery.envelope
        token = trace_id_var.set(trace_id_of(env.traceparent))
        try:
            async with self.db.begin() as uow:
                if await self._seen(uow.conn, env.id):
                    self.skipped += 1
                    return
                await self.handler(env, uow)
                await uow.conn.execute(
                    inbox_table.insert().values(
                        consumer=self.name, event_id=env.id, processed_at=self.db.clock.now()
                    )
                )
            self.processed += 1
        except Exception as exc:
            # A concurrent delivery of the same event (redelivery, several instances) may have
            # won the race for the inbox row: then this one lost nothing and is a repeat.
            async with self.db.connection() as conn:
                if await self._seen(conn, env.id):
                    self.skipped += 1
                    return
            if delivery.attempt < self.max_deliver:
                raise  # the bus redelivers later
            await self._dead_letter(delivery, exc)
        finally:
            trace_id_var.reset(token)

    async def _seen(self, conn: AsyncConnection, event_id: str) -> bool:
        count = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(inbox_table)
            .where(inbox_table.c.consumer == self.name, inbox_table.c.event_id == event_id)
        )
        return bool(count)

    async def _dead_letter(self, delivery: Delivery, exc: Exception) -> None:
        env = delivery.envelope
        async with self.db.begin() as uow:
            await uow.conn.execute(
                dead_letter_table.insert().values(
                    consumer=self.name,
                    event_id=env.id,
                    type=env.type,
                    headers=json.dumps(delivery.headers, sort_keys=True),
                    body=delivery.body.decode("utf-8", "replace"),
                    deliveries=delivery.attempt,
                    error=f"{type(exc).__name__}: {exc}",
                    dead_at=self.db.clock.now(),
                )
            )
        self.dead += 1
        log.error(
            "inbox.dead_lettered",
            consumer=self.name,
            event_id=env.id,
            type=env.type,
            deliveries=delivery.attempt,
            error=str(exc),
        )
