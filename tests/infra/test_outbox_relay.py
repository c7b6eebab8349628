"""The outbox relay against real databases (SQLite, PostgreSQL) and real buses (memory, NATS).

What is proven: an event leaves the outbox only once its transaction has committed, never
from a rolled-back one; ``drain`` empties the backlog; on PostgreSQL two relays side by side
split the rows (``FOR UPDATE SKIP LOCKED``) without publishing one twice, and a row whose
transaction commits after a later row's is still published (a ``WHERE id > last_seen``
cursor would skip it); a crash between publishing and marking re-publishes, and the
consumer's inbox absorbs the repeat.

The buses are wrapped in :class:`SpyBus`, which forwards every call to the real bus and
records what the relay published (optionally slowing publishes down, or failing right after
a successful publish to play a crash before the rows are marked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

from forecourt.infra.bus import Bus, Delivery, Handler, Subscription
from forecourt.infra.db import Database, UnitOfWork, audit_outbox_table, outbox_table
from forecourt.infra.inbox import InboxConsumer
from forecourt.infra.relay import OutboxRelay
from forecourt.kernel.events import Envelope, EventRecord
from tests.infra.support import Buses, platform_db
from tests.infra.support import sale_event as event
from tests.support import eventually

SETTLE = 0.3


class SimulatedCrash(Exception):
    pass


class SpyBus:
    """Forwards to a real bus and records the ids the relay published through it."""

    def __init__(self, inner: Bus, *, delay: float = 0.0, crash_after_publish: bool = False):
        self.inner = inner
        self.delay = delay
        self.crash_after_publish = crash_after_publish
        self.published: list[str] = []
        self.in_flight = self.max_in_flight = 0

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def subscribe(
        self, consumer: str, subjects: list[str], handler: Handler, *, max_deliver: int
    ) -> Subscription:
        return await self.inner.subscribe(consumer, subjects, handler, max_deliver=max_deliver)

    async def publish(self, envelope: Envelope) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        await self.inner.publish(envelope)  # acknowledged by the broker...
        self.published.append(envelope.id)
        if self.crash_after_publish:  # ...and the process dies before the rows are marked
            raise SimulatedCrash(f"crashed after publishing {envelope.id}")

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        await self.inner.publish_many(envelopes)  # every one acknowledged by the broker...
        self.published.extend(e.id for e in envelopes)
        if self.crash_after_publish:  # ...and the process dies before the rows are marked
            raise SimulatedCrash(f"crashed after publishing {len(envelopes)} events")

    async def publish_records(self, records: Sequence[EventRecord]) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            await self.inner.publish_records(records)  # every one acknowledged by the broker...
        finally:
            self.in_flight -= 1
        self.published.extend(r.id for r in records)
        if self.crash_after_publish:  # ...and the process dies before the rows are marked
            raise SimulatedCrash(f"crashed after publishing {len(records)} events")


class Recorder:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def ids(self) -> list[str]:
        return [d.envelope.id for d in self.deliveries]


async def unpublished_ids(db: Database) -> set[str]:
    t = outbox_table
    async with db.connection() as conn:
        rows = await conn.execute(sa.select(t.c.event_id))
        return {r.event_id for r in rows}


class Boom(Exception):
    pass


async def emit_then_fail(db: Database, envelope: Envelope) -> None:
    async with db.begin() as uow:
        await uow.emit(envelope)
        raise Boom


# --- on both databases and both buses ----------------------------------------------------


async def test_events_are_published_only_once_their_unit_of_work_commits(
    db: Database, db_url: str, buses: Buses
) -> None:
    bus = await buses.new()
    rec = Recorder()
    await bus.subscribe("relay-commit", ["forecourt.sales.>"], rec, max_deliver=3)
    committed, rolled_back, held = event(1), event(2), event(3)
    async with platform_db(db_url, migrate=False) as relay_db:  # the relay's own process
        spy = SpyBus(bus)
        relay = OutboxRelay(relay_db, spy)

        async with db.begin() as uow:
            await uow.emit(committed)
        with pytest.raises(Boom):
            await emit_then_fail(db, rolled_back)
        async with db.begin() as uow:
            await uow.emit(held)
            while_open = asyncio.create_task(relay.drain())
            await asyncio.sleep(SETTLE)
            # PostgreSQL: the relay ran and saw only committed rows. SQLite: it is waiting
            # for the writer. Either way the held event has not left the database.
            assert held.id not in spy.published
            assert held.id not in rec.ids()
        await while_open
        await relay.drain()
        await eventually(lambda: {committed.id, held.id} <= set(rec.ids()))
        await asyncio.sleep(SETTLE)

        assert sorted(spy.published) == sorted([committed.id, held.id])
        assert sorted(rec.ids()) == sorted([committed.id, held.id])
        assert {d.envelope.id: d.envelope for d in rec.deliveries} == {
            committed.id: committed,
            held.id: held,
        }
        assert await relay.backlog() == 0
        assert await unpublished_ids(db) == set()


async def test_drain_publishes_the_whole_backlog(db: Database, buses: Buses) -> None:
    bus = await buses.new()
    rec = Recorder()
    await bus.subscribe("relay-drain", ["forecourt.sales.>"], rec, max_deliver=3)
    events = [event(i) for i in range(25)]
    for i in range(0, 25, 5):
        async with db.begin() as uow:
            await uow.emit(*events[i : i + 5])
    spy = SpyBus(bus)
    relay = OutboxRelay(db, spy, batch_size=7)
    assert await relay.backlog() == 25

    assert await relay.drain() == 25

    assert await relay.backlog() == 0
    assert relay.published == 25
    assert sorted(spy.published) == sorted(e.id for e in events)
    await eventually(lambda: len(rec.deliveries) >= 25)
    await asyncio.sleep(SETTLE)
    assert sorted(rec.ids()) == sorted(e.id for e in events)
    assert await relay.drain() == 0


async def test_a_crash_between_publish_and_marking_republishes_and_the_inbox_absorbs_it(
    db: Database, buses: Buses
) -> None:
    bus = await buses.new(dedupe=False)  # so the repeat really reaches the consumer

    async def effect(envelope: Envelope, uow: UnitOfWork) -> None:
        await uow.record_audit(actor="test", action="sale.booked", target=envelope.id)

    consumer = InboxConsumer(db, bus, "relay-crash", ["forecourt.sales.>"], effect, max_deliver=3)
    await consumer.start()
    sent = event(7)
    async with db.begin() as uow:
        await uow.emit(sent)

    crashing = OutboxRelay(db, SpyBus(bus, crash_after_publish=True))
    with pytest.raises(SimulatedCrash):
        await crashing.relay_once()
    assert await unpublished_ids(db) == {sent.id}  # the mark was rolled back with the crash
    await eventually(lambda: consumer.processed == 1)
    await asyncio.sleep(buses.dedupe_gap)

    restarted = SpyBus(bus)
    assert await OutboxRelay(db, restarted).drain() == 1
    await eventually(lambda: consumer.skipped == 1)

    assert restarted.published == [sent.id]
    assert await unpublished_ids(db) == set()
    async with db.connection() as conn:
        effects = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(audit_outbox_table)
            .where(audit_outbox_table.c.target == sent.id)
        )
    assert effects == 1
    assert consumer.processed == 1
    await consumer.stop()


# --- PostgreSQL only: concurrency ---------------------------------------------------------


async def test_two_relays_side_by_side_split_the_rows_and_never_publish_one_twice(
    pg_db: Database, pg_url: str, buses: Buses
) -> None:
    bus = await buses.new()
    rec = Recorder()
    await bus.subscribe("relay-pair", ["forecourt.sales.>"], rec, max_deliver=3)
    events = [event(i) for i in range(120)]
    async with pg_db.begin() as uow:
        await uow.emit(*events)

    async with (
        platform_db(pg_url, migrate=False) as db_a,
        platform_db(pg_url, migrate=False) as db_b,
    ):
        spy_a, spy_b = SpyBus(bus, delay=0.01), SpyBus(bus, delay=0.01)
        relay_a = OutboxRelay(db_a, spy_a, batch_size=10)
        relay_b = OutboxRelay(db_b, spy_b, batch_size=10)

        await asyncio.gather(relay_a.drain(), relay_b.drain())

    published = spy_a.published + spy_b.published
    assert spy_a.published, "relay A published nothing: the relays did not run side by side"
    assert spy_b.published, "relay B published nothing: the relays did not run side by side"
    assert not set(spy_a.published) & set(spy_b.published)
    assert len(published) == len(set(published)) == 120
    assert set(published) == {e.id for e in events}
    assert await unpublished_ids(pg_db) == set()
    await eventually(lambda: len(rec.deliveries) >= 120)
    assert sorted(rec.ids()) == sorted(e.id for e in events)


async def test_a_row_that_commits_after_a_later_row_is_still_published(
    pg_db: Database, buses: Buses
) -> None:
    bus = await buses.new()
    rec = Recorder()
    await bus.subscribe("relay-order", ["forecourt.sales.>"], rec, max_deliver=3)
    early, late = event(1), event(2)
    inserted, release = asyncio.Event(), asyncio.Event()

    async def slow_writer() -> None:  # connection 1: takes the lower id, commits last
        async with pg_db.begin() as uow:
            await uow.emit(early)
            inserted.set()
            await release.wait()

    writer = asyncio.create_task(slow_writer())
    await inserted.wait()
    async with pg_db.begin() as uow:  # connection 2: the higher id, committed first
        await uow.emit(late)
    relay = OutboxRelay(pg_db, bus)

    async def outbox_id(event_id: str) -> int:
        async with pg_db.connection() as conn:
            return int(
                await conn.scalar(
                    sa.select(outbox_table.c.id).where(outbox_table.c.event_id == event_id)
                )
            )

    late_id = await outbox_id(late.id)
    assert await relay.drain() == 1  # only the committed, higher id is visible
    release.set()
    await writer
    early_id = await outbox_id(early.id)
    assert early_id < late_id  # the lower id committed after the higher one was published
    assert await relay.drain() == 1  # ...and it is not skipped

    assert await unpublished_ids(pg_db) == set()
    await eventually(lambda: len(rec.deliveries) >= 2)
    assert sorted(rec.ids()) == sorted([early.id, late.id])


async def test_the_relay_vacuums_the_outbox_so_claims_do_not_walk_dead_rows(
    pg_db: Database, buses: Buses
) -> None:
    bus = await buses.new()
    events = [event(i) for i in range(60)]
    async with pg_db.begin() as uow:
        await uow.emit(*events)
    relay = OutboxRelay(pg_db, SpyBus(bus), batch_size=10, vacuum_every=25)

    assert await relay.drain() == 60

    assert relay.vacuums == 2  # after 30 and after 60 deleted rows
    async with pg_db.connection() as conn:
        vacuumed = await conn.scalar(
            sa.text(
                "SELECT vacuum_count FROM pg_stat_user_tables"
                " WHERE schemaname = 'platform' AND relname = 'outbox'"
            )
        )
    assert vacuumed == 2  # PostgreSQL saw the relay's two VACUUMs (a fresh database)


async def test_relay_lanes_publish_side_by_side_and_never_twice(
    pg_db: Database, buses: Buses
) -> None:
    bus = await buses.new()
    spy = SpyBus(bus, delay=0.02)
    relay = OutboxRelay(pg_db, spy, batch_size=5, lanes=3, idle_seconds=0.01)
    events = [event(i) for i in range(100)]
    for i in range(0, 100, 10):
        async with pg_db.begin() as uow:
            await uow.emit(*events[i : i + 10])
    relay.start()
    try:
        # Until every row is deleted, not merely published: stopping a lane between its
        # publish and its commit rolls the delete back (the rows would go out again).
        async with asyncio.timeout(20):
            while await relay.backlog():
                await asyncio.sleep(0.02)
    finally:
        await relay.stop()

    assert spy.max_in_flight > 1, "the lanes never published at the same time"
    assert sorted(spy.published) == sorted(e.id for e in events)
