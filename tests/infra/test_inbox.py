"""Inbox consumers on real databases (SQLite, PostgreSQL) and real buses (memory, NATS).

What is proven: an effect is applied once however often (and however concurrently) its
event is delivered; the effect runs under the event's trace id; a handler that keeps
failing ends in ``platform.dead_letter`` after ``max_deliver`` attempts, with its headers,
body and error, and the events behind it still flow.
"""

from __future__ import annotations

import asyncio
import json

import sqlalchemy as sa

from forecourt.infra.bus import Delivery
from forecourt.infra.bus.memory import MemoryBus
from forecourt.infra.db import (
    Database,
    UnitOfWork,
    audit_outbox_table,
    dead_letter_table,
    inbox_table,
)
from forecourt.infra.inbox import InboxConsumer
from forecourt.kernel.events import Envelope, trace_id_of
from tests.infra.support import Buses
from tests.infra.support import sale_event as event
from tests.support import eventually

SETTLE = 0.3


async def book_sale(envelope: Envelope, uow: UnitOfWork) -> None:
    """The effect under test: one audit record per handled event."""
    await uow.record_audit(actor="sales-projector", action="sale.booked", target=envelope.id)


async def effects(db: Database, event_id: str) -> list[sa.Row]:
    t = audit_outbox_table
    async with db.connection() as conn:
        return list((await conn.execute(sa.select(t).where(t.c.target == event_id))).all())


async def inbox_rows(db: Database, consumer: str, event_id: str) -> int:
    t = inbox_table
    async with db.connection() as conn:
        value = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(t)
            .where(t.c.consumer == consumer, t.c.event_id == event_id)
        )
    return int(value or 0)


# --- through the bus: both databases x both buses -----------------------------------------


async def test_an_event_delivered_twice_by_the_bus_takes_effect_once(
    db: Database, buses: Buses
) -> None:
    bus = await buses.new(dedupe=False)
    consumer = InboxConsumer(db, bus, "inbox-twice", ["forecourt.sales.>"], book_sale)
    await consumer.start()
    sent = event(1)

    await bus.publish(sent)
    await eventually(lambda: consumer.processed == 1)
    await asyncio.sleep(buses.dedupe_gap)
    await bus.publish(sent)  # the broker lets it through: only the inbox stands in the way
    await eventually(lambda: consumer.skipped == 1)
    await consumer.stop()

    rows = await effects(db, sent.id)
    assert len(rows) == 1
    assert rows[0].trace_id == trace_id_of(sent.traceparent)  # the effect ran under its trace
    assert await inbox_rows(db, "inbox-twice", sent.id) == 1
    assert consumer.processed == 1


async def test_a_handler_that_always_fails_is_dead_lettered_and_later_events_still_flow(
    db: Database, buses: Buses
) -> None:
    bus = await buses.new()
    attempts: list[int] = []

    async def picky(envelope: Envelope, uow: UnitOfWork) -> None:
        await book_sale(envelope, uow)  # rolled back with the failure below
        if envelope.data.get("poison"):
            attempts.append(1)
            raise ValueError(f"pump {envelope.data['n']} is not on this forecourt")

    consumer = InboxConsumer(db, bus, "inbox-poison", ["forecourt.sales.>"], picky, max_deliver=3)
    await consumer.start()
    poison, later = event(9, poison=True), event(10)

    await bus.publish(poison)
    await bus.publish(later)
    await eventually(lambda: consumer.dead == 1 and consumer.processed == 1)
    await asyncio.sleep(0.6)  # longer than the next retry would take on either bus
    await consumer.stop()

    assert len(attempts) == 3
    async with db.connection() as conn:
        dead = (await conn.execute(sa.select(dead_letter_table))).all()
    assert len(dead) == 1
    row = dead[0]
    assert row.consumer == "inbox-poison"
    assert row.event_id == poison.id
    assert row.type == poison.type
    assert row.deliveries == 3
    assert row.error == "ValueError: pump 9 is not on this forecourt"
    assert json.loads(row.headers) == poison.headers()
    assert row.body == poison.body().decode()
    assert await effects(db, poison.id) == []
    assert await inbox_rows(db, "inbox-poison", poison.id) == 0
    assert len(await effects(db, later.id)) == 1
    assert await inbox_rows(db, "inbox-poison", later.id) == 1


# --- deliveries handed straight to the consumer: both databases ---------------------------


def delivery(envelope: Envelope, attempt: int) -> Delivery:
    return Delivery(envelope, attempt, envelope.headers(), envelope.body())


async def test_a_repeated_delivery_is_skipped_without_running_the_handler(db: Database) -> None:
    calls: list[str] = []

    async def counting(envelope: Envelope, uow: UnitOfWork) -> None:
        calls.append(envelope.id)
        await book_sale(envelope, uow)

    consumer = InboxConsumer(db, MemoryBus(), "inbox-direct", ["forecourt.>"], counting)
    sent = event(3)

    await consumer.on_delivery(delivery(sent, 1))
    await consumer.on_delivery(delivery(sent, 2))

    assert calls == [sent.id]
    assert (consumer.processed, consumer.skipped) == (1, 1)
    assert len(await effects(db, sent.id)) == 1


async def test_concurrent_deliveries_of_one_event_take_effect_once_and_are_not_dead_lettered(
    db: Database,
) -> None:
    async def slow(envelope: Envelope, uow: UnitOfWork) -> None:
        await book_sale(envelope, uow)
        await asyncio.sleep(0.1)  # both deliveries are inside the handler at once (PostgreSQL)

    # max_deliver=1: any failure would be final, so a lost race must not count as one.
    consumer = InboxConsumer(db, MemoryBus(), "inbox-race", ["forecourt.>"], slow, max_deliver=1)
    sent = event(4)

    results = await asyncio.gather(
        consumer.on_delivery(delivery(sent, 1)),
        consumer.on_delivery(delivery(sent, 1)),
        return_exceptions=True,
    )

    assert results == [None, None]
    assert consumer.processed == 1
    assert consumer.skipped == 1
    assert consumer.dead == 0
    assert len(await effects(db, sent.id)) == 1
    assert await inbox_rows(db, "inbox-race", sent.id) == 1
    async with db.connection() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(dead_letter_table)) == 0
