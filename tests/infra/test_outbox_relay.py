"""The outbox relay against real databases (SQLite, PostgreSQL) and real buses (the
in-process bus on the test's database, NATS JetStream).

What is proven: an event leaves the outbox only once its transaction has committed, never
from a rolled-back one; ``drain`` empties the backlog; a crash at ``relay.after_publish``
keeps the rows and the next pass publishes them again, delivered once (broker
de-duplication; the in-process bus publishes and deletes atomically); on PostgreSQL two
relays side by side split the rows (``FOR UPDATE SKIP LOCKED``) without publishing one
twice, and a row whose transaction commits after a later row's is still published (a
``WHERE id > last_seen`` cursor would skip it), also when it commits while a later batch
waits for its acknowledgements (a delete of "every id up to the highest claimed" would
lose it); a refused row is parked and the rows behind it flow, and operators can requeue
it; a full bus keeps the rows, raises the alarm once and backs off; on SQLite a broker's
slow acknowledgements do not hold the write lock; with the in-process bus a failure
inside the publish leaves the outbox rows and no delivery.

:class:`SpyBus` forwards to a real bus and records what the relay published; it can block
a publish until released, refuse some events for good, play a full stream or fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncConnection
from structlog.testing import capture_logs

import forecourt.infra.relay as relay_module
from forecourt.infra.bus import (
    BatchHandler,
    Bus,
    BusFull,
    Delivery,
    PublishRefused,
    Subscription,
    Verdict,
)
from forecourt.infra.bus.memory import MemoryBus
from forecourt.infra.db import Database, delivery_table, outbox_parked_table, outbox_table
from forecourt.infra.relay import OutboxRelay
from forecourt.kernel.events import Envelope, EventRecord
from tests.infra.support import Buses, platform_db
from tests.infra.support import sale_event as event
from tests.support import eventually

SALES = ["forecourt.sales.>"]


@pytest.fixture
async def relay_buses(
    bus_kind: tuple[str, str | None], unique_stream: str, db: Database
) -> AsyncIterator[Buses]:
    """Buses of each backend; the in-process ones keep their deliveries in ``db`` (the
    relay's database, as the relay publishes in its own transaction)."""
    made = Buses(bus_kind[0], bus_kind[1], unique_stream, db=db)
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.fixture
async def pg_relay_buses(
    bus_kind: tuple[str, str | None], unique_stream: str, pg_db: Database
) -> AsyncIterator[Buses]:
    made = Buses(bus_kind[0], bus_kind[1], unique_stream, db=pg_db)
    try:
        yield made
    finally:
        await made.cleanup()


class SimulatedCrash(Exception):
    pass


class Boom(Exception):
    pass


class SpyBus:
    """Forwards to a real bus (or to none: a broker that stores everything) and records the
    ids the relay published through it."""

    def __init__(
        self,
        inner: Bus | None = None,
        *,
        delay: float = 0.0,
        transactional: bool | None = None,
    ) -> None:
        self.inner = inner
        self.delay = delay
        self.transactional = (
            bool(getattr(inner, "transactional", False)) if transactional is None else transactional
        )
        self.published: list[str] = []
        self.calls = 0
        self.in_flight = self.max_in_flight = 0
        self.refuse: set[str] = set()  # event ids refused for good
        self.full = False  # play a full stream
        self.fail_after_inner: Exception | None = None  # raise after the inner publish
        self.block: asyncio.Event | None = None  # publish waits for it
        self.entered = asyncio.Event()

    async def connect(self) -> None:
        if self.inner is not None:
            await self.inner.connect()

    async def close(self) -> None:
        if self.inner is not None:
            await self.inner.close()

    async def ready(self) -> bool:
        return True

    async def subscribe(
        self, consumer: str, subjects: list[str], handler: BatchHandler, *, batch_size: int = 100
    ) -> Subscription:
        assert self.inner is not None
        return await self.inner.subscribe(consumer, subjects, handler, batch_size=batch_size)

    async def pending(self, consumer: str) -> int | None:
        return None if self.inner is None else await self.inner.pending(consumer)

    async def publish(self, envelope: Envelope) -> None:
        await self.publish_records([envelope.record()])

    async def publish_records(
        self, records: Sequence[EventRecord], *, conn: AsyncConnection | None = None
    ) -> None:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.entered.set()
            if self.block is not None:
                await self.block.wait()
            if self.delay:  # a deliberately slow broker: publishes overlap
                await asyncio.sleep(self.delay)
            if self.full:
                raise BusFull("stream 'FORECOURT' is full: maximum bytes exceeded")
            refused = {i: f"refused {r.id}" for i, r in enumerate(records) if r.id in self.refuse}
            stored = [r for i, r in enumerate(records) if i not in refused]
            if self.inner is not None and stored:
                if self.transactional:
                    await self.inner.publish_records(stored, conn=conn)
                else:
                    await self.inner.publish_records(stored)
        finally:
            self.in_flight -= 1
        self.published.extend(r.id for r in stored)
        if self.fail_after_inner is not None:
            raise self.fail_after_inner
        if refused:
            raise PublishRefused(refused)


class Recorder:
    """A batch handler recording every delivery and settling it."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def __call__(self, batch: Sequence[Delivery]) -> list[Verdict]:
        self.deliveries.extend(batch)
        return [None] * len(batch)

    def ids(self) -> list[str]:
        return [d.event_id for d in self.deliveries]


async def everything_arrived(bus: Bus, consumer: str, rec: Recorder) -> None:
    """Wait until whatever was published for ``consumer`` so far has arrived (in place of
    watching for a while that nothing else does): a marker published after it has been
    delivered, and nothing of the consumer is pending (waiting or unacknowledged). A
    delivery still to come would be pending or would have had the marker's chance. The
    marker's deliveries are then taken out of ``rec``."""
    marker = event(-1, marker=True)
    await bus.publish(marker)
    await eventually(lambda: marker.id in rec.ids(), what="the marker's delivery")
    await eventually(lambda: _pending_is_zero(bus, consumer), what=f"{consumer} settled")
    rec.deliveries = [d for d in rec.deliveries if d.event_id != marker.id]


async def _pending_is_zero(bus: Bus, consumer: str) -> bool:
    return await bus.pending(consumer) == 0


async def unpublished_ids(db: Database) -> set[str]:
    t = outbox_table
    async with db.connection() as conn:
        rows = await conn.execute(sa.select(t.c.event_id))
        return {r.event_id for r in rows}


async def outbox_id(db: Database, event_id: str) -> int:
    t = outbox_table
    async with db.connection() as conn:
        value = await conn.scalar(sa.select(t.c.id).where(t.c.event_id == event_id))
    assert value is not None, f"{event_id} is not in the outbox"
    return int(value)


async def emit_then_fail(db: Database, envelope: Envelope) -> None:
    async with db.begin() as uow:
        await uow.emit(envelope)
        raise Boom


# --- on both databases and both buses ----------------------------------------------------


async def test_events_are_published_only_once_their_unit_of_work_commits(
    db: Database, db_url: str, relay_buses: Buses
) -> None:
    bus = await relay_buses.new()
    rec = Recorder()
    await bus.subscribe("relay-commit", SALES, rec)
    committed, rolled_back, held = event(1), event(2), event(3)
    async with platform_db(db_url, migrate=False) as relay_db:  # the relay's own process
        spy = SpyBus(bus)
        relay = OutboxRelay(relay_db, spy)
        at_the_lock = asyncio.Event()
        if relay_db.is_sqlite:  # runs before the relay's BEGIN IMMEDIATE (inserted first)
            sa_event.listen(
                relay_db.engine.sync_engine, "begin", lambda _c: at_the_lock.set(), insert=True
            )

        async with db.begin() as uow:
            await uow.emit(committed)
        with pytest.raises(Boom):
            await emit_then_fail(db, rolled_back)
        async with db.begin() as uow:
            await uow.emit(held)
            while_open = asyncio.create_task(relay.drain())
            # PostgreSQL: the relay's pass ends, having seen only committed rows. SQLite:
            # its first statement waits for this writer's lock. Either way the held event
            # has not left the database.
            async with asyncio.timeout(10):
                if relay_db.is_sqlite:
                    await at_the_lock.wait()
                else:
                    assert await while_open == 1
            assert held.id not in spy.published
            assert held.id not in rec.ids()
        await while_open
        await relay.drain()
        await everything_arrived(bus, "relay-commit", rec)

        assert sorted(spy.published) == sorted([committed.id, held.id])
        assert sorted(rec.ids()) == sorted([committed.id, held.id])
        assert {d.event_id: d.envelope() for d in rec.deliveries} == {
            committed.id: committed,
            held.id: held,
        }
        assert await relay.backlog() == 0
        assert await unpublished_ids(db) == set()


async def test_drain_publishes_the_whole_backlog(db: Database, relay_buses: Buses) -> None:
    bus = await relay_buses.new()
    rec = Recorder()
    await bus.subscribe("relay-drain", SALES, rec)
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
    assert relay.parked == relay.failures == 0
    assert sorted(spy.published) == sorted(e.id for e in events)
    await everything_arrived(bus, "relay-drain", rec)
    assert sorted(rec.ids()) == sorted(e.id for e in events)
    assert await relay.drain() == 0


async def test_a_crash_after_the_publish_keeps_the_rows_and_the_event_arrives_once(
    db: Database, relay_buses: Buses, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = await relay_buses.new()  # the broker de-duplicates the repeat
    rec = Recorder()
    await bus.subscribe("relay-crash", SALES, rec)
    sent = event(7)
    async with db.begin() as uow:
        await uow.emit(sent)
    reached: list[str] = []

    def crash_point(name: str) -> None:
        reached.append(name)
        if name == "relay.after_publish":
            raise SimulatedCrash(name)  # the process dies here: nothing after it runs

    monkeypatch.setattr(relay_module, "crash_point", crash_point)
    crashing = SpyBus(bus)
    with pytest.raises(SimulatedCrash):
        await OutboxRelay(db, crashing).relay_once()
    monkeypatch.undo()

    assert reached == ["relay.after_publish"]
    assert crashing.published == [sent.id]  # acknowledged by the bus...
    assert await unpublished_ids(db) == {sent.id}  # ...and the delete never committed
    restarted = SpyBus(bus)
    assert await OutboxRelay(db, restarted).drain() == 1
    await everything_arrived(bus, "relay-crash", rec)

    assert restarted.published == [sent.id]
    assert await unpublished_ids(db) == set()
    assert rec.ids() == [sent.id]


async def test_a_refused_event_is_parked_and_the_events_behind_it_flow(
    db: Database, relay_buses: Buses
) -> None:
    bus = await relay_buses.new()
    rec = Recorder()
    await bus.subscribe("relay-park", SALES, rec)
    events = [event(i) for i in range(6)]
    async with db.begin() as uow:
        await uow.emit(*events)
    refused = events[1]
    refused_outbox_id = await outbox_id(db, refused.id)
    spy = SpyBus(bus)
    spy.refuse = {refused.id}
    relay = OutboxRelay(db, spy, batch_size=4)

    with capture_logs() as logs:
        assert await relay.drain() == 6

    assert await unpublished_ids(db) == set()
    assert relay.published == 5
    assert relay.parked == 1
    assert await relay.parked_count() == 1
    async with db.connection() as conn:
        parked = (await conn.execute(sa.select(outbox_parked_table))).one()
    assert parked.id == refused_outbox_id
    assert parked.event_id == refused.id
    assert parked.reason == f"refused {refused.id}"
    assert parked.data == refused.body().decode()
    assert parked.parked_at is not None
    [line] = [e for e in logs if e["event"] == "relay.event_parked"]
    assert line["log_level"] == "error"
    assert (line["event_id"], line["type"]) == (refused.id, refused.type)
    assert line["reason"] == f"refused {refused.id}"
    await eventually(lambda: len(rec.deliveries) >= 5)
    assert sorted(rec.ids()) == sorted(e.id for e in events if e is not refused)

    # An operator puts it back once the broker would take it.
    spy.refuse = set()
    assert await relay.requeue_parked([refused_outbox_id + 1000]) == 0
    assert await relay.requeue_parked([refused_outbox_id]) == 1
    assert await relay.parked_count() == 0
    assert await unpublished_ids(db) == {refused.id}
    assert await relay.drain() == 1
    await everything_arrived(bus, "relay-park", rec)
    assert sorted(rec.ids()) == sorted(e.id for e in events)
    assert rec.deliveries[-1].envelope() == refused


async def test_an_event_too_large_for_the_bus_is_parked_by_either_backend(
    db: Database, relay_buses: Buses
) -> None:
    bus = await relay_buses.new()
    rec = Recorder()
    await bus.subscribe("relay-large", SALES, rec)
    small, huge = event(1), event(2, blob="x" * (1024**2 + 10))
    async with db.begin() as uow:
        await uow.emit(small, huge)
    relay = OutboxRelay(db, bus)

    assert await relay.drain() == 2

    assert (relay.published, relay.parked) == (1, 1)
    async with db.connection() as conn:
        parked = (await conn.execute(sa.select(outbox_parked_table))).one()
    assert parked.event_id == huge.id
    assert parked.reason
    await eventually(lambda: rec.ids() == [small.id])
    assert await unpublished_ids(db) == set()


async def test_a_full_bus_keeps_the_rows_and_raises_the_alarm_until_a_publish_succeeds(
    db: Database, relay_buses: Buses
) -> None:
    bus = await relay_buses.new()
    rec = Recorder()
    await bus.subscribe("relay-full", SALES, rec)
    sent = event(8)
    async with db.begin() as uow:
        await uow.emit(sent)
    spy = SpyBus(bus)
    spy.full = True
    relay = OutboxRelay(db, spy, idle_seconds=0.01)

    with capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(BusFull):
                await relay.relay_once()
    assert await unpublished_ids(db) == {sent.id}
    assert relay.alarm is not None
    assert relay.alarm.startswith("bus full: ")
    assert relay.health()["alarm"] == relay.alarm
    assert [e["log_level"] for e in logs if e["event"] == "relay.bus_full"] == ["error"]

    spy.full = False
    assert await relay.relay_once() == 1
    assert relay.alarm is None
    assert await unpublished_ids(db) == set()
    await eventually(lambda: rec.ids() == [sent.id])


async def test_a_full_bus_makes_the_running_relay_back_off(db: Database) -> None:
    spy = SpyBus()  # a broker without consumers
    spy.full = True
    relay = OutboxRelay(db, spy, idle_seconds=0.005, lanes=1)
    relay.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(20):  # new rows signal the relay: they must not cut the backoff
            async with db.begin() as uow:
                await uow.emit(event(i))
            await asyncio.sleep(0.05)  # the time the backoff is watched over
        elapsed = loop.time() - started
        await eventually(lambda: spy.calls >= 3)
    finally:
        await relay.stop()

    # Without a backoff it would have tried every few milliseconds (hundreds of times);
    # doubling from 0.1 s it tries about log2(elapsed / 0.1) + 1 times (0, 0.1, 0.3, 0.7 s).
    assert spy.calls <= 6, f"{spy.calls} publishes in {elapsed:.1f} s: no backoff"
    assert relay.alarm is not None
    assert relay.alarm.startswith("bus full")
    assert relay.failures == 0
    assert await relay.backlog() == 20


async def test_a_failing_publish_keeps_the_rows_and_is_counted(db: Database) -> None:
    spy = SpyBus()
    spy.fail_after_inner = ConnectionError("no answer from the broker")
    async with db.begin() as uow:
        await uow.emit(event(1))
    relay = OutboxRelay(db, spy)

    with pytest.raises(ConnectionError):
        await relay.relay_once()

    assert relay.failures == 1
    assert relay.last_error == "ConnectionError: no answer from the broker"
    assert relay.alarm is None
    assert await relay.backlog() == 1
    spy.fail_after_inner = None
    assert await relay.drain() == 1
    assert relay.health()["published"] == 1


# --- the in-process bus: publish and delete in one transaction ------------------------------


async def test_with_the_memory_bus_a_failure_inside_the_publish_leaves_outbox_rows_only(
    db: Database,
) -> None:
    bus = MemoryBus(db, poll_interval=0.01)
    rec = Recorder()
    sub = await bus.subscribe("relay-atomic", SALES, rec)
    await sub.stop()  # no consumer runs: the delivery rows are what is inspected
    sent = event(9)
    async with db.begin() as uow:
        await uow.emit(sent)
    spy = SpyBus(bus)
    spy.fail_after_inner = SimulatedCrash("killed after the inserts, before the commit")

    with pytest.raises(SimulatedCrash):
        await OutboxRelay(db, spy).relay_once()

    assert spy.published == [sent.id]  # the delivery rows were inserted...
    assert await unpublished_ids(db) == {sent.id}  # ...and rolled back with the delete
    assert await bus.pending("relay-atomic") == 0
    async with db.connection() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(delivery_table)) == 0

    assert await OutboxRelay(db, bus).drain() == 1
    assert await unpublished_ids(db) == set()
    assert await bus.pending("relay-atomic") == 1
    await bus.subscribe("relay-atomic", SALES, rec)
    await eventually(lambda: rec.ids() == [sent.id])
    await bus.close()


# --- SQLite: the broker's acknowledgements do not hold the write lock ---------------------


async def test_on_sqlite_a_writer_is_not_blocked_while_the_relay_waits_for_the_broker(
    sqlite_url: str,
) -> None:
    async with platform_db(sqlite_url) as db:
        first, second = event(1), event(2)
        async with db.begin() as uow:
            await uow.emit(first)
        spy = SpyBus(transactional=False)  # a broker: acknowledgements come later
        spy.block = asyncio.Event()
        relay = OutboxRelay(db, spy)
        passing = asyncio.create_task(relay.relay_once())
        async with asyncio.timeout(10):
            await spy.entered.wait()

        async with asyncio.timeout(1.0):  # the relay is still waiting for the broker
            async with db.begin() as uow:
                await uow.emit(second)
        assert not passing.done()

        spy.block.set()
        assert await passing == 1
        assert await unpublished_ids(db) == {second.id}  # exactly the published rows went
        assert await relay.drain() == 1
        assert spy.published == [first.id, second.id]


# --- PostgreSQL only: concurrency ---------------------------------------------------------


async def test_two_relays_side_by_side_split_the_rows_and_never_publish_one_twice(
    pg_db: Database, pg_url: str, pg_relay_buses: Buses
) -> None:
    bus = await pg_relay_buses.new()
    rec = Recorder()
    await bus.subscribe("relay-pair", SALES, rec)
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
    await everything_arrived(bus, "relay-pair", rec)
    assert sorted(rec.ids()) == sorted(e.id for e in events)


async def test_a_row_that_commits_after_a_later_row_is_still_published(
    pg_db: Database, pg_relay_buses: Buses
) -> None:
    bus = await pg_relay_buses.new()
    rec = Recorder()
    await bus.subscribe("relay-order", SALES, rec)
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

    late_id = await outbox_id(pg_db, late.id)
    assert await relay.drain() == 1  # only the committed, higher id is visible
    release.set()
    await writer
    early_id = await outbox_id(pg_db, early.id)
    assert early_id < late_id  # the lower id committed after the higher one was published
    assert await relay.drain() == 1  # ...and it is not skipped

    assert await unpublished_ids(pg_db) == set()
    await eventually(lambda: len(rec.deliveries) >= 2)
    assert sorted(rec.ids()) == sorted([early.id, late.id])


@pytest.mark.parametrize("transactional", [False, True], ids=["broker", "memory-bus"])
async def test_a_lower_id_committing_while_a_batch_awaits_its_acks_is_not_deleted(
    pg_db: Database, transactional: bool
) -> None:
    inner = MemoryBus(pg_db) if transactional else None
    if inner is not None:
        await (await inner.subscribe("relay-late-low", SALES, Recorder())).stop()
    spy = SpyBus(inner, transactional=transactional)
    spy.block = asyncio.Event()
    early, late = event(1), event(2)
    inserted, commit_early = asyncio.Event(), asyncio.Event()

    async def slow_writer() -> None:  # takes the lower id first, commits it later
        async with pg_db.begin() as uow:
            await uow.emit(early)
            inserted.set()
            await commit_early.wait()

    writer = asyncio.create_task(slow_writer())
    await inserted.wait()
    async with pg_db.begin() as uow:
        await uow.emit(late)
    late_id = await outbox_id(pg_db, late.id)
    relay = OutboxRelay(pg_db, spy)

    passing = asyncio.create_task(relay.relay_once())  # claims only the higher id
    async with asyncio.timeout(10):
        await spy.entered.wait()
    commit_early.set()
    await writer  # the lower id is committed while the publish of the higher one waits
    spy.block.set()
    assert await passing == 1

    assert spy.published == [late.id]
    assert await outbox_id(pg_db, early.id) < late_id  # a lower id than the batch's
    assert await unpublished_ids(pg_db) == {early.id}  # not deleted with the later batch
    assert await relay.drain() == 1
    assert spy.published == [late.id, early.id]
    assert await unpublished_ids(pg_db) == set()
    if inner is not None:
        assert await inner.pending("relay-late-low") == 2
        await inner.close()


async def test_the_relay_vacuums_the_outbox_so_claims_do_not_walk_dead_rows(
    pg_db: Database, pg_relay_buses: Buses
) -> None:
    bus = await pg_relay_buses.new()
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
    pg_db: Database, pg_relay_buses: Buses
) -> None:
    bus = await pg_relay_buses.new()
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
        await eventually(lambda: _empty(relay), what="an empty outbox")
    finally:
        await relay.stop()

    assert spy.max_in_flight > 1, "the lanes never published at the same time"
    assert sorted(spy.published) == sorted(e.id for e in events)


async def _empty(relay: OutboxRelay) -> bool:
    return await relay.backlog() == 0
