"""The in-process bus on the embedded database (SQLite and PostgreSQL): durable like a
JetStream durable, restart included.

What is proven: events published (through the relay, in its transaction) for a
subscription survive the bus and the database being closed before any consumer ran; a
subscription receives what is published after it existed and nothing from before (unlike a
JetStream durable with ``DeliverPolicy.ALL``); a handler runs outside the bus's
transactions, so on SQLite another writer commits while it waits; a delivery claimed by a
subscription that dies unsettled comes back after ``ack_wait`` with attempt 2, while a
stopped one hands its batch back at once; a delay verdict is honoured and a raising handler
gets its batch again; on PostgreSQL two subscriptions with one name (two "processes") share
the rows without doubles; ``pending`` counts; an oversized record is refused alone; a
publish whose transaction rolls back leaves nothing (not even in the duplicate window).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from forecourt.infra.bus import Delivery, PublishRefused, Verdict
from forecourt.infra.bus.memory import MemoryBus
from forecourt.infra.db import Database, delivery_table, subscription_table
from forecourt.infra.relay import OutboxRelay
from forecourt.kernel.events import Envelope, event_type
from tests.infra.support import platform_db
from tests.infra.support import sale_event as event
from tests.support import eventually

SALES = ["forecourt.sales.>"]


def fast_bus(db: Database, **options: object) -> MemoryBus:
    settings: dict[str, object] = {"poll_interval": 0.01, "retry_backoff": (0.02, 0.2)}
    settings.update(options)
    return MemoryBus(db, **settings)  # type: ignore[arg-type]


class Recorder:
    """A batch handler that records every delivery and answers ``verdict(delivery)``."""

    def __init__(self, verdict: Callable[[Delivery], Verdict] = lambda d: None) -> None:
        self.deliveries: list[Delivery] = []
        self.batches = 0
        self.verdict = verdict

    async def __call__(self, batch: Sequence[Delivery]) -> list[Verdict]:
        self.batches += 1
        self.deliveries.extend(batch)
        return [self.verdict(d) for d in batch]

    def ids(self) -> list[str]:
        return [d.event_id for d in self.deliveries]


async def delivery_rows(db: Database, consumer: str) -> list[tuple[int, datetime | None]]:
    """(attempts, lease_until) of each delivery row of ``consumer``."""
    t = delivery_table
    async with db.connection() as conn:
        result = await conn.execute(
            sa.select(t.c.attempts, t.c.lease_until).where(t.c.consumer == consumer)
        )
        return [(r.attempts, r.lease_until) for r in result]


async def settled(bus: MemoryBus, consumer: str) -> bool:
    """No delivery row of ``consumer`` is left (waiting or in flight): nothing more can
    arrive for it until something new is published. Checked instead of watching for a
    while that nothing else arrives."""
    return await bus.pending(consumer) == 0


def voided_event(n: int = 0) -> Envelope:
    return Envelope(
        type=event_type("sales", "sale.voided"),
        source="/stations/st-0042",
        subject=f"sale-{n}",
        time=datetime.now(UTC),
        data={"n": n},
    )


# --- on both databases --------------------------------------------------------------------


async def test_events_published_through_the_relay_survive_a_restart_before_any_consumer_ran(
    db_url: str,
) -> None:
    events = [event(i) for i in range(12)]
    async with platform_db(db_url) as db:
        bus = fast_bus(db)
        sub = await bus.subscribe("mem-restart", SALES, Recorder())
        await sub.stop()  # the durable exists; no consumer runs from here on
        async with db.begin() as uow:
            await uow.emit(*events)
        assert await OutboxRelay(db, bus).drain() == 12
        assert await bus.pending("mem-restart") == 12
        await bus.close()
    # the process is gone; a new one opens the same database

    async with platform_db(db_url, migrate=False) as db:
        bus = fast_bus(db)
        assert await bus.pending("mem-restart") == 12
        rec = Recorder()
        await bus.subscribe("mem-restart", SALES, rec)
        await eventually(lambda: len(rec.deliveries) >= 12, what="every event after restart")
        await eventually(lambda: settled(bus, "mem-restart"), what="all settled")
        assert sorted(rec.ids()) == sorted(e.id for e in events)
        by_id = {d.event_id: d for d in rec.deliveries}
        for sent in events:
            got = by_id[sent.id]
            assert got.envelope() == sent
            assert got.headers == sent.headers()
            assert got.body == sent.body()
            assert got.subject == sent.bus_subject
            assert got.attempt == 1
        await bus.close()


async def test_a_subscription_gets_what_is_published_after_it_and_nothing_from_before(
    db: Database,
) -> None:
    bus = fast_bus(db)
    early_rec, late_rec = Recorder(), Recorder()
    await bus.subscribe("mem-early", SALES, early_rec)
    before, after = event(1), event(2)

    await bus.publish(before)
    await eventually(lambda: before.id in early_rec.ids())
    await bus.subscribe("mem-late", SALES, late_rec)
    await bus.publish(after)
    await eventually(lambda: after.id in early_rec.ids() and after.id in late_rec.ids())
    await eventually(lambda: settled(bus, "mem-early"), what="mem-early settled")
    await eventually(lambda: settled(bus, "mem-late"), what="mem-late settled")

    assert sorted(early_rec.ids()) == sorted([before.id, after.id])
    assert late_rec.ids() == [after.id]  # no history: 'before' was not kept for it
    await bus.close()


async def test_subscriptions_are_durable_rows_and_filters_follow_nats_wildcards(
    db: Database,
) -> None:
    bus = fast_bus(db)
    voided_rec = Recorder()
    assert await bus.pending("mem-voided") is None
    await bus.subscribe(
        "mem-voided", ["forecourt.*.sale.voided.v1", "forecourt.*.sale.voided.v1"], voided_rec
    )
    assert await bus.pending("mem-voided") == 0
    completed = event(1)  # sale.completed: not matched
    marker = voided_event(2)  # matched, published after it: had no better chance

    await bus.publish(completed)
    await bus.publish(marker)
    await eventually(lambda: voided_rec.deliveries, what="the marker's delivery")
    await eventually(lambda: settled(bus, "mem-voided"), what="mem-voided settled")
    assert voided_rec.ids() == [marker.id]
    await bus.close()

    async with db.connection() as conn:
        row = (await conn.execute(sa.select(subscription_table))).one()
    assert row.consumer == "mem-voided"
    assert row.subjects == '["forecourt.*.sale.voided.v1"]'


async def test_a_delivery_of_a_killed_subscription_comes_back_after_ack_wait_with_attempt_2(
    db: Database,
) -> None:
    ack_wait = 0.6
    bus = fast_bus(db, ack_wait=ack_wait)
    entered = asyncio.Event()

    async def hangs(batch: Sequence[Delivery]) -> list[Verdict]:
        entered.set()
        await asyncio.Event().wait()  # never returns: the process is killed in here
        raise AssertionError("unreachable")

    sub = await bus.subscribe("mem-killed", SALES, hangs)
    sent = event(3)
    await bus.publish(sent)
    async with asyncio.timeout(10):
        await entered.wait()
    claimed_at = time.monotonic()
    sub.task.cancel()  # killed: nothing settles or hands back the claimed row
    with pytest.raises(asyncio.CancelledError):
        await sub.task
    [(attempts, lease_until)] = await delivery_rows(db, "mem-killed")
    assert attempts == 1
    assert lease_until is not None

    rec = Recorder()
    await bus.subscribe("mem-killed", SALES, rec)  # the restarted process
    await eventually(lambda: rec.deliveries, what="the redelivery")

    assert time.monotonic() - claimed_at >= ack_wait * 0.9  # not before the lease ran out
    assert [(d.event_id, d.attempt) for d in rec.deliveries] == [(sent.id, 2)]
    await eventually(lambda: settled(bus, "mem-killed"))
    await bus.close()


async def test_a_handler_running_longer_than_ack_wait_keeps_its_lease(db: Database) -> None:
    ack_wait = 0.45
    bus = fast_bus(db, ack_wait=ack_wait)
    slow_calls: list[int] = []

    async def slow(batch: Sequence[Delivery]) -> list[Verdict]:
        slow_calls.extend(d.attempt for d in batch)
        await asyncio.sleep(ack_wait * 3)  # deliberately slow: the lease is extended meanwhile
        return [None] * len(batch)

    await bus.subscribe("mem-long", SALES, slow)
    await bus.publish(event(1))
    await eventually(lambda: slow_calls, what="the slow handler")
    rival = Recorder()  # another instance of the consumer, ready to take expired leases
    await bus.subscribe("mem-long", SALES, rival)
    await eventually(lambda: settled(bus, "mem-long"), what="the slow handler's settlement")

    assert slow_calls == [1]
    assert rival.deliveries == []
    await bus.close()


async def test_a_stopped_subscription_hands_its_unsettled_batch_back_at_once(
    db: Database,
) -> None:
    bus = fast_bus(db, ack_wait=60.0, stop_grace=0.2)
    entered = asyncio.Event()

    async def hangs(batch: Sequence[Delivery]) -> list[Verdict]:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sub = await bus.subscribe("mem-stopped", SALES, hangs)
    sent = event(4)
    await bus.publish(sent)
    async with asyncio.timeout(10):
        await entered.wait()
    await sub.stop()  # the handler does not finish within stop_grace: cancelled

    rec = Recorder()
    await bus.subscribe("mem-stopped", SALES, rec)
    await eventually(lambda: rec.deliveries, timeout=5, what="the handed-back delivery")
    assert [(d.event_id, d.attempt) for d in rec.deliveries] == [(sent.id, 2)]
    await bus.close()


async def test_a_delay_verdict_is_honoured(db: Database) -> None:
    delay = 0.5
    seen_at: list[float] = []

    def later_once(d: Delivery) -> Verdict:
        seen_at.append(time.monotonic())
        return delay if d.attempt == 1 else None

    bus = fast_bus(db)
    rec = Recorder(later_once)
    await bus.subscribe("mem-delay", SALES, rec)
    sent = event(5)
    await bus.publish(sent)
    await eventually(lambda: len(rec.deliveries) >= 2, what="the delayed redelivery")
    await eventually(lambda: settled(bus, "mem-delay"), what="mem-delay settled")

    assert [d.attempt for d in rec.deliveries] == [1, 2]
    assert seen_at[1] - seen_at[0] >= delay * 0.9
    await bus.close()


async def test_a_raising_handler_gets_its_whole_batch_again_with_a_higher_attempt(
    db: Database,
) -> None:
    calls: list[list[tuple[str, int]]] = []

    async def fails_first(batch: Sequence[Delivery]) -> list[Verdict]:
        calls.append([(d.event_id, d.attempt) for d in batch])
        if len(calls) == 1:
            raise RuntimeError("handler failed")
        return [None] * len(batch)

    bus = fast_bus(db)
    events = [event(i) for i in range(3)]
    async with db.begin() as uow:  # one relay pass: one publish, then one claim
        await uow.emit(*events)
    await bus.subscribe("mem-raise", SALES, fails_first)
    await OutboxRelay(db, bus).drain()
    await eventually(lambda: settled(bus, "mem-raise"), what="the retried batch settled")

    assert sorted(calls[0]) == sorted((e.id, 1) for e in events)
    assert sorted(x for batch in calls[1:] for x in batch) == sorted((e.id, 2) for e in events)
    await bus.close()


async def test_pending_counts_waiting_and_in_flight_deliveries(db: Database) -> None:
    bus = fast_bus(db)
    release = asyncio.Event()
    started = asyncio.Event()

    async def gated(batch: Sequence[Delivery]) -> list[Verdict]:
        started.set()
        await release.wait()
        return [None] * len(batch)

    assert await bus.pending("mem-pending") is None
    sub = await bus.subscribe("mem-pending", SALES, gated)
    await sub.stop()
    assert await bus.pending("mem-pending") == 0
    for i in range(3):
        await bus.publish(event(i))
    assert await bus.pending("mem-pending") == 3  # waiting

    await bus.subscribe("mem-pending", SALES, gated, batch_size=2)
    async with asyncio.timeout(10):
        await started.wait()
    assert await bus.pending("mem-pending") == 3  # two in flight, one waiting
    release.set()
    await eventually(lambda: settled(bus, "mem-pending"), what="everything settled")
    assert await bus.pending("mem-unknown") is None
    await bus.close()


async def test_an_oversized_record_is_refused_and_the_rest_of_the_batch_is_stored(
    db: Database,
) -> None:
    bus = fast_bus(db)
    sub = await bus.subscribe("mem-size", SALES, Recorder())
    await sub.stop()
    small, huge, small2 = event(1), event(2, blob="x" * (1024**2)), event(3)

    with pytest.raises(PublishRefused) as refused:
        await bus.publish_records([small.record(), huge.record(), small2.record()])

    assert list(refused.value.refused) == [1]
    assert "exceeds" in refused.value.refused[1]
    assert await bus.pending("mem-size") == 2
    await bus.close()


async def test_a_publish_whose_transaction_rolls_back_leaves_nothing(db: Database) -> None:
    bus = fast_bus(db)
    sub = await bus.subscribe("mem-rollback", SALES, Recorder())
    await sub.stop()
    sent = event(6)

    class Abort(Exception):
        pass

    async def publish_then_abort() -> None:
        async with db.begin() as uow:
            await bus.publish_records([sent.record()], conn=uow.conn)
            raise Abort

    with pytest.raises(Abort):
        await publish_then_abort()
    assert await bus.pending("mem-rollback") == 0

    # Not remembered in the duplicate window either: publishing it again stores it.
    async with db.begin() as uow:
        await bus.publish_records([sent.record()], conn=uow.conn)
    assert await bus.pending("mem-rollback") == 1
    # ...and now it is: a repeat within the window is not stored again.
    await bus.publish(sent)
    assert await bus.pending("mem-rollback") == 1
    await bus.close()


async def test_a_subscription_made_by_another_process_is_seen_by_publishes(
    db: Database, db_url: str
) -> None:
    publisher = fast_bus(db, subscription_ttl=0.2)
    await publisher.publish(event(0))  # caches "no subscriptions"
    async with platform_db(db_url, migrate=False) as other_db:
        other = fast_bus(other_db)
        rec = Recorder()
        await other.subscribe("mem-other", SALES, rec)
        await asyncio.sleep(0.25)  # the time under test: the publisher's cache outlives its ttl
        sent = event(1)
        await publisher.publish(sent)
        await eventually(lambda: rec.ids() == [sent.id], what="the other process's delivery")
        await other.close()


# --- SQLite: the write lock -----------------------------------------------------------------


async def test_a_slow_handler_does_not_hold_the_sqlite_write_lock(sqlite_url: str) -> None:
    async with platform_db(sqlite_url) as db:
        bus = fast_bus(db)
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow(batch: Sequence[Delivery]) -> list[Verdict]:
            entered.set()
            await release.wait()
            return [None] * len(batch)

        await bus.subscribe("mem-slow", SALES, slow)
        await bus.publish(event(1))
        async with asyncio.timeout(10):
            await entered.wait()

        other = event(2)
        async with asyncio.timeout(1.0):  # the handler is still waiting
            async with db.begin() as uow:
                await uow.emit(other)
        assert not release.is_set()

        release.set()
        await eventually(lambda: settled(bus, "mem-slow"))
        await bus.close()


# --- PostgreSQL: several processes ----------------------------------------------------------


async def test_two_subscriptions_with_one_name_share_the_rows_without_doubles(
    pg_db: Database, pg_url: str
) -> None:
    async with (
        platform_db(pg_url, migrate=False) as db_a,
        platform_db(pg_url, migrate=False) as db_b,
    ):
        bus_a, bus_b = fast_bus(db_a), fast_bus(db_b)

        class Slow(Recorder):
            async def __call__(self, batch: Sequence[Delivery]) -> list[Verdict]:
                await asyncio.sleep(0.01)  # deliberately slow: both get a share
                return await super().__call__(batch)

        rec_a, rec_b = Slow(), Slow()
        await bus_a.subscribe("mem-shared", SALES, rec_a, batch_size=5)
        await bus_b.subscribe("mem-shared", SALES, rec_b, batch_size=5)
        events = [event(i) for i in range(150)]
        async with pg_db.begin() as uow:
            await uow.emit(*events)
        await OutboxRelay(pg_db, fast_bus(pg_db)).drain()

        await eventually(
            lambda: len(rec_a.deliveries) + len(rec_b.deliveries) >= 150, what="every event"
        )
        await eventually(lambda: settled(bus_a, "mem-shared"), what="mem-shared settled")

        got = rec_a.ids() + rec_b.ids()
        assert rec_a.deliveries, "subscription A got nothing: the rows were not shared"
        assert rec_b.deliveries, "subscription B got nothing: the rows were not shared"
        assert len(got) == len(set(got)) == 150
        assert set(got) == {e.id for e in events}
        assert {d.attempt for d in rec_a.deliveries + rec_b.deliveries} == {1}
        await bus_a.close()
        await bus_b.close()
