"""The consumer host on real databases (SQLite, PostgreSQL) and real buses (in-process,
NATS JetStream): every event processed by each consumer, or dead-lettered, never lost.

What is proven here: effects apply once however often an event is delivered, per consumer
(the inbox is keyed by the consumer's name); a handler that keeps failing is dead-lettered
after its budget and the events behind it flow; an event whose deliveries ran past the
budget without an outcome (the consumer died) is dead-lettered without running again; a
malformed message is dead-lettered as it arrived; a dead letter that cannot be stored
leaves the message pending; a database outage longer than the retry budget loses nothing
and dead-letters nothing; a poison event in a batch costs only itself; replay and
retention. Real process kills are in tests/e2e/test_delivery_crashes.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from forecourt.chaos.proxy import FaultProxy
from forecourt.infra.bus import Bus, Delivery
from forecourt.infra.bus.memory import MemoryBus
from forecourt.infra.bus.nats import NatsBus
from forecourt.infra.consumers import (
    Consumer,
    ConsumerHost,
    get_dead_letter,
    list_dead_letters,
    request_replay,
)
from forecourt.infra.db import (
    Database,
    UnitOfWork,
    dead_letter_table,
    idempotency_table,
    inbox_table,
    probe_effect_table,
)
from forecourt.kernel.events import Envelope
from tests.infra.support import platform_db
from tests.infra.support import sale_event as event
from tests.support import eventually


class Effects:
    """A consumer's effect: one probe_effect row per application; fails on demand."""

    def __init__(self, name: str, fail: Callable[[Envelope], bool] = lambda e: False) -> None:
        self.name = name
        self.fail = fail
        self.calls = 0

    async def __call__(self, envelope: Envelope, uow: UnitOfWork) -> None:
        self.calls += 1
        if self.fail(envelope):
            raise RuntimeError(f"refused {envelope.data.get('n')}")
        await uow.conn.execute(
            probe_effect_table.insert().values(
                consumer=self.name,
                event_id=envelope.id,
                event_time=envelope.time,
                applied_at=uow.db.clock.now(),
            )
        )


async def applied(db: Database, event_id: str, consumer: str | None = None) -> int:
    t = probe_effect_table
    query = sa.select(sa.func.count()).select_from(t).where(t.c.event_id == event_id)
    if consumer is not None:
        query = query.where(t.c.consumer == consumer)
    async with db.connection() as conn:
        return int(await conn.scalar(query) or 0)


def consumer(name: str, effects: Effects, **kw: object) -> Consumer:
    return Consumer(name, ("forecourt.sales.>",), effects, **kw)  # type: ignore[arg-type]


def host(db: Database, bus: Bus, consumers: list[Consumer], **kw: object) -> ConsumerHost:
    options: dict[str, object] = {
        "retry_backoff": (0.02, 0.1),
        "outage_backoff": (0.05, 0.3),
        "replay_interval": 0.05,
        "monitor_interval": 0.2,
        "registry": CollectorRegistry(),
    }
    options.update(kw)
    return ConsumerHost(db, bus, consumers, **options)  # type: ignore[arg-type]


@pytest.fixture
async def bus(
    bus_kind: tuple[str, str | None], db: Database, unique_stream: str
) -> AsyncIterator[Bus]:
    made: Bus
    kind, nats_url = bus_kind
    if kind == "memory":
        made = MemoryBus(
            db, ack_wait=1.0, poll_interval=0.02, retry_backoff=(0.02, 0.1), duplicate_window=0
        )
    else:
        assert nats_url is not None
        made = NatsBus(
            nats_url,
            stream=unique_stream,
            subject_prefix=unique_stream.lower(),
            duplicate_window=0.1,  # repeats reach the consumer: the inbox must absorb them
            retry_backoff=(0.02, 0.2),
            fetch_timeout=0.3,
            ack_wait=2.0,
        )
    await made.connect()
    try:
        yield made
    finally:
        await made.close()


async def test_an_event_delivered_twice_takes_effect_once(db: Database, bus: Bus) -> None:
    effects = Effects("twice")
    running = host(db, bus, [consumer("twice", effects)])
    await running.start()
    try:
        once = event(1)
        await bus.publish(once)
        await eventually(lambda: applied(db, once.id), what="the first delivery's effect")
        await asyncio.sleep(0.2)  # past the NATS duplicate window: a true redelivery
        await bus.publish(once)
        marker = event(2)
        await bus.publish(marker)
        await eventually(lambda: applied(db, marker.id), what="the marker behind the repeat")
        await eventually(lambda: running.skipped["twice"] >= 1, what="the repeat skipped")
        assert await applied(db, once.id) == 1
    finally:
        await running.stop()


async def test_each_consumer_has_its_own_inbox(db: Database, bus: Bus) -> None:
    first, second = Effects("first"), Effects("second")
    running = host(db, bus, [consumer("first", first), consumer("second", second)])
    await running.start()
    try:
        shared = event(3)
        await bus.publish(shared)
        await eventually(lambda: applied(db, shared.id, "first"), what="the first consumer")
        await eventually(lambda: applied(db, shared.id, "second"), what="the second consumer")
        assert await applied(db, shared.id) == 2
    finally:
        await running.stop()


async def test_a_handler_that_keeps_failing_is_dead_lettered_and_later_events_flow(
    db: Database, bus: Bus
) -> None:
    effects = Effects("poison", fail=lambda e: e.data["n"] == 13)
    running = host(db, bus, [consumer("poison", effects, max_deliver=3)])
    await running.start()
    try:
        bad = event(13, litres="12.5")
        await bus.publish(bad)
        good = event(14)
        await bus.publish(good)
        await eventually(lambda: applied(db, good.id), what="the event behind the poison")
        letters = await eventually(
            lambda: list_dead_letters(db, consumer="poison"), what="the dead letter"
        )
        assert [d.event_id for d in letters] == [bad.id]
        assert letters[0].deliveries == 3
        assert "refused 13" in letters[0].error
        assert json.loads(letters[0].body)["litres"] == "12.5"
        assert letters[0].headers["ce-id"] == bad.id
        assert await applied(db, bad.id) == 0
        # Settled: the bus does not deliver it a fourth time (a marker proves the wait).
        calls = effects.calls
        marker = event(15)
        await bus.publish(marker)
        await eventually(lambda: applied(db, marker.id), what="a later marker")
        assert effects.calls == calls + 1
        await eventually(lambda: _pending_is_zero(bus, "poison"), what="everything settled")
    finally:
        await running.stop()


# --- the verdicts, delivery by delivery (no bus needed) -----------------------------------


class NoBus:
    """handle_batch is called directly: nothing is subscribed."""

    transactional = False


def delivery(envelope: Envelope, attempt: int) -> Delivery:
    return replace(Delivery.of(envelope), attempt=attempt)


async def test_a_delivery_past_its_budget_is_dead_lettered_without_running(db: Database) -> None:
    effects = Effects("budget")
    spec = consumer("budget", effects, max_deliver=3)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    late = event(20)
    # The consumer died during attempt 3 (its last): the bus delivers a fourth time.
    assert await running.handle_batch(spec, [delivery(late, 4)]) == [None]
    assert effects.calls == 0
    (letter,) = await list_dead_letters(db, consumer="budget")
    assert letter.event_id == late.id
    assert "budget of 3 used up" in letter.error
    assert letter.deliveries == 4


async def test_the_last_allowed_attempt_runs_and_its_failure_is_dead_lettered(
    db: Database,
) -> None:
    effects = Effects("last", fail=lambda e: True)
    spec = consumer("last", effects, max_deliver=3)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    e = event(21)
    (verdict,) = await running.handle_batch(spec, [delivery(e, 2)])
    assert verdict is not None
    assert verdict > 0
    assert await list_dead_letters(db) == []
    assert await running.handle_batch(spec, [delivery(e, 3)]) == [None]
    assert effects.calls == 2
    assert [d.event_id for d in await list_dead_letters(db)] == [e.id]


async def test_a_malformed_message_is_dead_lettered_as_it_arrived(db: Database) -> None:
    spec = consumer("malformed", Effects("malformed"))
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    broken = Delivery("evt-1", 1, {"ce-id": "evt-1", "ce-type": "x"}, b"\xff{not json", "a.b")
    assert await running.handle_batch(spec, [broken]) == [None]
    (letter,) = await list_dead_letters(db)
    assert letter.event_id == "evt-1"
    assert letter.error.startswith("malformed")
    assert letter.subject == "a.b"
    assert letter.headers == {"ce-id": "evt-1", "ce-type": "x"}


async def test_a_poison_event_in_a_batch_costs_only_itself(db: Database) -> None:
    effects = Effects("batch", fail=lambda e: e.data["n"] == 2)
    spec = consumer("batch", effects, max_deliver=5)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    batch = [event(n) for n in range(5)]
    verdicts = await running.handle_batch(spec, [delivery(e, 1) for e in batch])
    assert [v is None for v in verdicts] == [True, True, False, True, True]
    for e in batch:
        assert await applied(db, e.id) == (0 if e.data["n"] == 2 else 1)


async def test_a_batch_already_applied_is_skipped_and_settled(db: Database) -> None:
    effects = Effects("repeat")
    spec = consumer("repeat", effects)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    batch = [delivery(event(n), 1) for n in range(3)]
    assert await running.handle_batch(spec, batch) == [None] * 3
    assert await running.handle_batch(spec, [replace(d, attempt=2) for d in batch]) == [None] * 3
    assert effects.calls == 3
    assert running.skipped["repeat"] == 3


async def test_concurrent_deliveries_of_one_event_take_effect_once(db: Database) -> None:
    gate = asyncio.Event()

    class Slow(Effects):
        async def __call__(self, envelope: Envelope, uow: UnitOfWork) -> None:
            await gate.wait()
            await super().__call__(envelope, uow)

    spec = consumer("race", Slow("race"), max_deliver=1)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    e = event(30)
    both = asyncio.gather(
        running.handle_batch(spec, [delivery(e, 1)]), running.handle_batch(spec, [delivery(e, 1)])
    )
    await asyncio.sleep(0.05)
    gate.set()
    assert await both == [[None], [None]]
    assert await applied(db, e.id) == 1
    assert await list_dead_letters(db) == []


async def test_replay_applies_a_dead_letter_once_it_can_and_keeps_it_while_it_cannot(
    db: Database,
) -> None:
    broken = {"on": True}
    effects = Effects("replay", fail=lambda e: broken["on"])
    spec = consumer("replay", effects, max_deliver=1)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    e = event(40)
    assert await running.handle_batch(spec, [delivery(e, 1)]) == [None]
    (letter,) = await list_dead_letters(db)
    assert await running.replay_once() == 0  # nothing asked for
    assert await request_replay(db, [letter.id]) == 1
    assert await running.replay_once() == 0  # still refused: kept, with the new error
    kept = await get_dead_letter(db, letter.id)
    assert kept is not None
    assert kept.replays == 1
    assert kept.replay_requested_at is None
    broken["on"] = False
    assert await request_replay(db) == 1
    assert await running.replay_once() == 1
    assert await get_dead_letter(db, letter.id) is None
    assert await applied(db, e.id) == 1
    async with db.connection() as conn:
        inbox = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(inbox_table)
            .where(inbox_table.c.event_id == e.id)
        )
    assert inbox == 1


async def test_retention_purges_old_inbox_rows_dead_letters_and_expired_keys(db: Database) -> None:
    spec = consumer("purge", Effects("purge", fail=lambda e: True), max_deliver=1)
    running = host(
        db,
        NoBus(),  # type: ignore[arg-type]
        [spec],
        inbox_retention=timedelta(days=1),
        dead_letter_retention=timedelta(days=1),
    )
    now = db.clock.now()
    old = now - timedelta(days=2)
    async with db.begin() as uow:
        await uow.conn.execute(
            inbox_table.insert(),
            [
                {"consumer": "purge", "event_id": "old", "processed_at": old},
                {"consumer": "purge", "event_id": "new", "processed_at": now},
            ],
        )
        await uow.conn.execute(
            idempotency_table.insert(),
            [
                {
                    "scope": "s",
                    "key": "gone",
                    "request_hash": "h",
                    "created_at": old,
                    "expires_at": old,
                },
                {
                    "scope": "s",
                    "key": "kept",
                    "request_hash": "h",
                    "created_at": now,
                    "expires_at": now + timedelta(hours=24),
                },
            ],
        )
    assert await running.handle_batch(spec, [delivery(event(50), 1)]) == [None]
    assert await running.handle_batch(spec, [delivery(event(51), 1)]) == [None]
    async with db.begin() as uow:
        await uow.conn.execute(dead_letter_table.update().values(dead_at=old))
    asked = (await list_dead_letters(db))[-1]
    assert await request_replay(db, [asked.id]) == 1  # asked for: kept however old
    purged = await running.purge_once()
    assert purged == {"inbox": 1, "dead_letter": 1, "idempotency": 1}
    assert [d.id for d in await list_dead_letters(db)] == [asked.id]
    assert await running.purge_once() == {"inbox": 0, "dead_letter": 0, "idempotency": 0}


# --- outages ------------------------------------------------------------------------------


@pytest.fixture
async def proxied_pg(pg_url: str) -> AsyncIterator[tuple[Database, FaultProxy]]:
    from sqlalchemy.engine import make_url

    async with platform_db(pg_url):
        pass  # migrated through a direct connection
    url = make_url(pg_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    async with platform_db(through, migrate=False) as db:
        yield db, proxy
    await proxy.stop()


async def test_an_outage_during_the_last_attempt_is_waited_out_and_spends_no_attempt(
    proxied_pg: tuple[Database, FaultProxy],
) -> None:
    db, proxy = proxied_pg

    def failing(envelope: Envelope) -> bool:
        if effects.calls == 2:  # the database goes away under the last attempt
            proxy.cut()
        return True  # and the handler fails on its own every time

    effects = Effects("pending", fail=failing)
    spec = consumer("pending", effects, max_deliver=2)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    e = event(60)
    assert (await running.handle_batch(spec, [delivery(e, 1)]))[0] is not None
    # The last attempt: the database is down when its failure is looked at, so the batch is
    # held (no verdict yet), and the attempt is made again once the database answers.
    last = asyncio.create_task(running.handle_batch(spec, [delivery(e, 2)]))
    await eventually(lambda: running.outage, what="the outage noticed")
    await eventually(lambda: running._outages_in_a_row >= 3, what="a few checks in the outage")
    assert not last.done(), "a verdict during the outage (a redelivery would count)"
    proxy.pass_through()
    assert await asyncio.wait_for(last, 20) == [None]  # dead-lettered, then settled
    assert not running.outage
    assert effects.calls == 2 + 1  # attempt 1, attempt 2 in the outage, attempt 2 again
    (letter,) = await list_dead_letters(db)
    assert letter.event_id == e.id
    assert letter.deliveries == 2


async def test_a_delivery_past_its_budget_stays_pending_while_its_dead_letter_cannot_be_stored(
    proxied_pg: tuple[Database, FaultProxy],
) -> None:
    db, proxy = proxied_pg
    effects = Effects("late")
    spec = consumer("late", effects, max_deliver=2)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    late = event(61)
    broken = Delivery("evt-61", 1, {"ce-id": "evt-61"}, b"not an event", "a.b")
    proxy.cut()
    verdicts = await running.handle_batch(spec, [delivery(late, 3), broken])
    assert all(v is not None for v in verdicts), "settled although nothing could be stored"
    proxy.pass_through()
    assert await running.handle_batch(spec, [delivery(late, 4), broken]) == [None, None]
    assert {d.event_id for d in await list_dead_letters(db)} == {late.id, "evt-61"}
    assert effects.calls == 0


async def test_a_database_outage_longer_than_the_retry_budget_loses_and_dead_letters_nothing(
    proxied_pg: tuple[Database, FaultProxy], nats_url: str, unique_stream: str
) -> None:
    db, proxy = proxied_pg
    bus = NatsBus(
        nats_url,
        stream=unique_stream,
        subject_prefix=unique_stream.lower(),
        retry_backoff=(0.02, 0.1),
        fetch_timeout=0.3,
        ack_wait=2.0,
    )
    await bus.connect()
    effects = Effects("outage")
    running = host(db, bus, [consumer("outage", effects, max_deliver=3)])
    await running.start()
    try:
        before = event(70)
        await bus.publish(before)
        await eventually(lambda: applied(db, before.id), what="the event before the outage")
        proxy.cut()
        during = [event(71 + n) for n in range(20)]
        for e in during:
            await bus.publish(e)
        await eventually(lambda: running.outage, what="the outage noticed")
        # Down far longer than 3 attempts at 0.02–0.1 s of retry backoff take.
        await eventually(lambda: running._outages_in_a_row >= 6, what="a long outage")
        proxy.pass_through()
        for e in during:
            await eventually(lambda e=e: applied(db, e.id), what=f"event {e.data['n']}")
        assert await list_dead_letters(db) == []
        assert not running.outage
        await eventually(lambda: _pending_is_zero(bus, "outage"), what="nothing pending")
        # Nothing was handed back for the outage's sake: no event was delivered twice, so
        # a host restarted now would find every budget as the handler left it.
        info = await bus.js.consumer_info(unique_stream, "outage")
        assert info.num_redelivered == 0
    finally:
        await running.stop()
        await bus.close()


async def _pending_is_zero(bus: Bus, name: str) -> bool:
    return await bus.pending(name) == 0


async def test_a_lost_connection_mid_batch_is_tried_again_in_place(db: Database) -> None:
    drops = {"left": 3}

    class Dropping(Effects):
        async def __call__(self, envelope: Envelope, uow: UnitOfWork) -> None:
            if drops["left"]:
                drops["left"] -= 1
                raise ConnectionResetError("connection was closed in the middle of operation")
            await super().__call__(envelope, uow)

    spec = consumer("drop", Dropping("drop"), max_deliver=2)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    batch = [event(n) for n in range(3)]
    # The last allowed attempt: three drops are ridden out, none counts, nothing handed back.
    assert await running.handle_batch(spec, [delivery(e, 2) for e in batch]) == [None] * 3
    assert await list_dead_letters(db) == []
    for e in batch:
        assert await applied(db, e.id) == 1


async def test_a_connection_that_keeps_dropping_counts_as_the_handler_failing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forecourt.infra import consumers as consumers_module

    monkeypatch.setattr(consumers_module, "DROPS_RIDDEN_OUT", 2)

    class AlwaysDropping(Effects):
        async def __call__(self, envelope: Envelope, uow: UnitOfWork) -> None:
            self.calls += 1
            raise ConnectionResetError("connection was closed in the middle of operation")

    effects = AlwaysDropping("dropping")
    spec = consumer("dropping", effects, max_deliver=1)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    e = event(90)
    assert await running.handle_batch(spec, [delivery(e, 1)]) == [None]  # dead-lettered
    assert effects.calls == 1 + 2  # the attempt and the two drops ridden out
    (letter,) = await list_dead_letters(db)
    assert "ConnectionResetError" in letter.error


class FillingBus(NoBus):
    """A bus whose stream is nearly full and whose consumer is far behind."""

    def __init__(self) -> None:
        self.usage = 0.9
        self.behind = 500

    async def pending(self, consumer: str) -> int:
        return self.behind

    async def stream_usage(self) -> dict[str, float]:
        return {"usage": self.usage, "messages": 10.0}


async def test_the_host_alarms_before_a_lagging_consumer_reaches_retention(db: Database) -> None:
    bus = FillingBus()
    spec = consumer("lagging", Effects("lagging"))
    running = host(db, bus, [spec], pending_alarm=100)  # type: ignore[arg-type]
    figures = await running.sample()
    assert figures["pending"] == {"lagging": 500}
    assert "retention" in running.alarms
    assert "backlog:lagging" in running.alarms
    bus.usage, bus.behind = 0.5, 10
    await running.sample()
    assert running.alarms == {}


async def test_one_event_twice_in_a_batch_takes_effect_once(db: Database) -> None:
    effects = Effects("twin")
    spec = consumer("twin", effects)
    running = host(db, NoBus(), [spec])  # type: ignore[arg-type]
    e = event(80)
    # A repeat stored on the stream after the duplicate window can arrive in the same fetch.
    assert await running.handle_batch(spec, [delivery(e, 1), delivery(e, 1)]) == [None, None]
    assert await applied(db, e.id) == 1
    assert effects.calls == 1


class Overlap(Effects):
    """Effects that take a while and count how many run at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.running = 0
        self.most = 0

    async def __call__(self, envelope: Envelope, uow: UnitOfWork) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.05)
            await super().__call__(envelope, uow)
        finally:
            self.running -= 1


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_consumer_runs_as_many_batches_at_once_as_asked_each_event_once(
    db: Database, bus: Bus, concurrency: int
) -> None:
    effects = Overlap("side_by_side")
    spec = consumer("side_by_side", effects, batch_size=1, concurrency=concurrency)
    running = host(db, bus, [spec])
    await running.start()
    try:
        events = [event(200 + n) for n in range(12)]
        for e in events:
            await bus.publish(e)

        async def all_applied() -> bool:
            return all([await applied(db, e.id) == 1 for e in events])

        await eventually(all_applied, what="every event applied", timeout=20)
        if db.is_sqlite:
            assert effects.most == 1  # one writer: one batch at a time
        else:
            assert effects.most == concurrency
    finally:
        await running.stop()
    assert all([await applied(db, e.id) == 1 for e in events])


def test_a_consumer_needs_at_least_one_batch_at_a_time() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        consumer("none_at_once", Effects("x"), concurrency=0)
