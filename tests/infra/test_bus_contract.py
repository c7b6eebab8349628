"""The bus contract, run against both backends: the in-process bus and NATS JetStream.

Every test in the first part runs twice (``memory`` and ``nats``), so the embedded default
and production cannot drift apart: an event published reaches matching subscribers with
its headers and body unchanged, NATS wildcard filters, deliveries in batches, the verdicts
(``None`` settles for good, a delay delivers again with ``attempt + 1``, an exception
delivers the whole batch again), no broker-side delivery limit, redelivery of what a
stopped subscription left unsettled, work shared by subscriptions with one consumer name,
and ``pending``. "Nothing more arrives" is proved by a positive condition (the consumer's
``pending`` back to 0 after a later event arrived), never by waiting a while. The NATS-only
part covers messages that are not events, published raw to the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import cast

import pytest

from forecourt.infra.bus import BatchHandler, Bus, Delivery, Verdict
from forecourt.infra.bus.nats import NatsBus
from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.events import Envelope, event_type, new_traceparent
from tests.infra.support import Buses
from tests.support import eventually


@pytest.fixture
async def bus(buses: Buses) -> Bus:
    return await buses.new()


def event(context: str = "sales", name: str = "sale.completed", **data: object) -> Envelope:
    return Envelope(
        type=event_type(context, name),
        source="/stations/st-0042",
        subject="sale-7",
        time=datetime.now(UTC),
        traceparent=new_traceparent(),
        data=data or {"litres": "41.37", "grade": "E10", "lines": [{"n": 1, "ok": True}]},
    )


class Recorder:
    """A batch handler that records deliveries and batches; ``verdict`` decides each one
    (``None``: settle), ``fail`` makes the whole batch raise."""

    def __init__(
        self,
        verdict: Callable[[Delivery], Verdict] = lambda d: None,
        fail: Callable[[Sequence[Delivery]], bool] = lambda b: False,
    ) -> None:
        self.deliveries: list[Delivery] = []
        self.batches: list[list[Delivery]] = []
        self.at: list[float] = []
        self.verdict = verdict
        self.fail = fail

    async def __call__(self, batch: Sequence[Delivery]) -> list[Verdict]:
        self.batches.append(list(batch))
        self.deliveries.extend(batch)
        self.at.extend(time.monotonic() for _ in batch)
        if self.fail(batch):
            raise RuntimeError(f"handler refused a batch of {len(batch)}")
        return [self.verdict(d) for d in batch]

    def ids(self) -> list[str]:
        return [d.event_id for d in self.deliveries]

    def attempts(self, event_id: str) -> list[int]:
        return [d.attempt for d in self.deliveries if d.event_id == event_id]


async def drained(bus: Bus, *consumers: str) -> None:
    """Wait until every consumer has nothing left to settle: nothing more will arrive."""

    async def check() -> bool:
        return all([await bus.pending(c) == 0 for c in consumers])

    await eventually(check, what=f"{', '.join(consumers)} drained")


async def pending_is(bus: Bus, consumer: str, expected: int) -> None:
    async def check() -> bool:
        return await bus.pending(consumer) == expected

    await eventually(check, what=f"{expected} pending for {consumer}")


# --- the contract, on both backends -------------------------------------------------------


async def test_a_published_event_reaches_a_matching_subscriber_unchanged(bus: Bus) -> None:
    rec = Recorder()
    await bus.subscribe("contract-basic", ["forecourt.sales.sale.completed.v1"], rec)
    sent = event()

    await bus.publish(sent)
    await eventually(lambda: len(rec.deliveries) == 1)

    got = rec.deliveries[0]
    assert got.event_id == sent.id
    assert got.attempt == 1
    assert got.headers == sent.headers()
    assert got.body == sent.body()
    assert got.subject == "forecourt.sales.sale.completed.v1"
    assert got.envelope() == sent
    assert got.envelope().time == sent.time
    assert got.envelope().traceparent == sent.traceparent
    assert await bus.ready()


async def test_an_event_on_another_subject_is_not_delivered(bus: Bus) -> None:
    rec = Recorder()
    await bus.subscribe("contract-other", ["forecourt.sales.sale.completed.v1"], rec)
    other, wanted = event("sales", "sale.voided"), event()

    await bus.publish(other)
    await bus.publish(wanted)
    await eventually(lambda: wanted.id in rec.ids())
    await drained(bus, "contract-other")

    assert rec.ids() == [wanted.id]


async def test_wildcard_filters_match_tokens_like_nats(bus: Bus) -> None:
    all_sales, any_completed, two_filters = Recorder(), Recorder(), Recorder()
    await bus.subscribe("wild-sales", ["forecourt.sales.>"], all_sales)
    await bus.subscribe("wild-completed", ["forecourt.*.sale.completed.v1"], any_completed)
    await bus.subscribe(
        "wild-two",
        ["forecourt.network.station.opened.v1", "forecourt.sales.sale.voided.v1"],
        two_filters,
    )
    completed = event("sales", "sale.completed")
    voided = event("sales", "sale.voided")
    opened = event("network", "station.opened")
    closed = event("network", "station.closed")

    for e in (completed, voided, opened, closed):
        await bus.publish(e)
    await eventually(
        lambda: (
            len(all_sales.deliveries) >= 2
            and len(any_completed.deliveries) >= 1
            and len(two_filters.deliveries) >= 2
        )
    )
    await drained(bus, "wild-sales", "wild-completed", "wild-two")

    assert sorted(all_sales.ids()) == sorted([completed.id, voided.id])
    assert any_completed.ids() == [completed.id]
    assert sorted(two_filters.ids()) == sorted([opened.id, voided.id])


async def test_events_arrive_in_batches_of_at_most_batch_size(bus: Bus) -> None:
    rec = Recorder()
    sub = await bus.subscribe("contract-batches", ["forecourt.sales.>"], rec, batch_size=7)
    await sub.stop()  # the consumer exists from now on: what is published is kept for it
    sent = [event(n=i) for i in range(30)]

    await bus.publish_records([e.record() for e in sent])
    await pending_is(bus, "contract-batches", 30)
    await bus.subscribe("contract-batches", ["forecourt.sales.>"], rec, batch_size=7)
    await eventually(lambda: len(set(rec.ids())) == 30, what="all 30 events")
    await drained(bus, "contract-batches")

    assert sorted(rec.ids()) == sorted(e.id for e in sent)  # each once
    assert max(len(b) for b in rec.batches) <= 7
    assert len(rec.batches[0]) == 7  # a backlog comes in full batches
    by_id = {e.id: e for e in sent}
    assert all(d.envelope() == by_id[d.event_id] for d in rec.deliveries)


async def test_a_settled_delivery_is_never_delivered_again(bus: Bus) -> None:
    rec = Recorder()
    await bus.subscribe("contract-settle", ["forecourt.sales.>"], rec)
    first, marker = event(), event("sales", "sale.voided")

    await bus.publish(first)
    await eventually(lambda: first.id in rec.ids())
    await bus.publish(marker)
    await eventually(lambda: marker.id in rec.ids(), what="the marker")
    await drained(bus, "contract-settle")

    assert rec.ids() == [first.id, marker.id]


async def test_a_delay_verdict_delivers_again_with_the_next_attempt_after_the_delay(
    bus: Bus,
) -> None:
    rec = Recorder(verdict=lambda d: 0.3 if d.attempt == 1 else None)
    await bus.subscribe("contract-delay", ["forecourt.sales.>"], rec)
    sent = event()

    await bus.publish(sent)
    await eventually(lambda: len(rec.attempts(sent.id)) == 2, what="the second attempt")
    await drained(bus, "contract-delay")

    assert rec.attempts(sent.id) == [1, 2]
    assert all(d.envelope() == sent for d in rec.deliveries)
    waited = rec.at[1] - rec.at[0]
    assert 0.25 <= waited < 5.0


async def test_a_raising_handler_gets_the_whole_batch_again(bus: Bus) -> None:
    rec = Recorder(fail=lambda batch: any(d.attempt == 1 for d in batch))
    sub = await bus.subscribe("contract-raise", ["forecourt.sales.>"], rec, batch_size=10)
    await sub.stop()
    sent = [event(n=i) for i in range(3)]
    await bus.publish_records([e.record() for e in sent])
    await bus.subscribe("contract-raise", ["forecourt.sales.>"], rec, batch_size=10)

    await eventually(
        lambda: all(2 in rec.attempts(e.id) for e in sent), what="every event a 2nd time"
    )
    await drained(bus, "contract-raise")

    assert [len(b) for b in rec.batches[:1]] == [3]  # the batch that raised...
    assert sorted(d.event_id for d in rec.deliveries if d.attempt == 2) == sorted(
        e.id for e in sent
    )  # ...came back whole, each event once more
    assert all(rec.attempts(e.id) == [1, 2] for e in sent)


async def test_there_is_no_broker_side_delivery_limit(bus: Bus) -> None:
    rec = Recorder(verdict=lambda d: 0.0 if d.attempt < 9 else None)
    await bus.subscribe("contract-unlimited", ["forecourt.sales.>"], rec)
    sent = event()

    await bus.publish(sent)
    await eventually(lambda: 9 in rec.attempts(sent.id), what="the 9th delivery")
    await drained(bus, "contract-unlimited")

    assert rec.attempts(sent.id) == list(range(1, 10))


async def test_what_a_stopped_subscription_left_unsettled_comes_back_with_a_higher_attempt(
    buses: Buses,
) -> None:
    bus = await buses.new(ack_wait=1.0)
    release = asyncio.Event()
    stuck = Recorder()

    async def hang(batch: Sequence[Delivery]) -> list[Verdict]:
        await stuck(batch)
        await release.wait()  # never set: the batch is still running at stop()
        return [None for _ in batch]

    sub = await bus.subscribe("contract-stop", ["forecourt.sales.>"], hang)
    sent = event()
    await bus.publish(sent)
    await eventually(lambda: stuck.ids() == [sent.id], what="the first delivery")
    await asyncio.wait_for(sub.stop(), timeout=15)

    after = Recorder()
    await bus.subscribe("contract-stop", ["forecourt.sales.>"], after)
    await eventually(lambda: after.ids() == [sent.id], what="the delivery again")
    await drained(bus, "contract-stop")

    assert stuck.attempts(sent.id) == [1]
    assert after.attempts(sent.id) == [2]
    assert after.deliveries[0].envelope() == sent


async def test_a_stopped_subscription_receives_nothing_more(bus: Bus) -> None:
    stopped, running = Recorder(), Recorder()
    sub = await bus.subscribe("contract-stop-a", ["forecourt.sales.>"], stopped)
    await bus.subscribe("contract-stop-b", ["forecourt.sales.>"], running)
    before, after = event(), event()

    await bus.publish(before)
    await eventually(lambda: before.id in stopped.ids())
    await drained(bus, "contract-stop-a")
    await sub.stop()
    await bus.publish(after)
    await eventually(lambda: after.id in running.ids())

    assert await bus.pending("contract-stop-a") == 1  # kept for it, not delivered
    assert stopped.ids() == [before.id]


async def test_subscriptions_with_one_consumer_name_share_the_work(buses: Buses) -> None:
    one, two = await buses.new(), await buses.new()  # two processes
    seen: dict[str, list[str]] = {"one": [], "two": []}

    def worker(name: str) -> BatchHandler:
        async def handle(batch: Sequence[Delivery]) -> list[Verdict]:
            seen[name].extend(d.event_id for d in batch)
            await asyncio.sleep(0.02)  # some work, so the other one gets its turn
            return [None for _ in batch]

        return handle

    await one.subscribe("contract-shared", ["forecourt.sales.>"], worker("one"), batch_size=4)
    await two.subscribe("contract-shared", ["forecourt.sales.>"], worker("two"), batch_size=4)
    sent = [event(n=i) for i in range(40)]

    await one.publish_records([e.record() for e in sent])
    await eventually(lambda: len(set(seen["one"] + seen["two"])) == 40, what="all 40")
    await drained(one, "contract-shared")

    everything = seen["one"] + seen["two"]
    assert sorted(everything) == sorted(e.id for e in sent)  # each settled once
    assert seen["one"]
    assert seen["two"]


async def test_pending_counts_unsettled_events_and_drops_to_zero(bus: Bus) -> None:
    assert await bus.pending("contract-pending") is None  # no such consumer yet
    release = asyncio.Event()

    async def slow(batch: Sequence[Delivery]) -> list[Verdict]:
        await release.wait()
        return [None for _ in batch]

    await bus.subscribe("contract-pending", ["forecourt.sales.>"], slow, batch_size=2)
    assert await bus.pending("contract-pending") == 0

    await bus.publish_records([event(n=i).record() for i in range(5)])
    await pending_is(bus, "contract-pending", 5)  # in flight or waiting
    release.set()
    await drained(bus, "contract-pending")


# --- NATS only ----------------------------------------------------------------------------


@pytest.fixture
async def nats_bus(nats_url: str, unique_stream: str) -> AsyncIterator[NatsBus]:
    made = Buses("nats", nats_url, unique_stream)
    try:
        yield cast(NatsBus, await made.new())  # the "nats" kind builds a NatsBus
    finally:
        await made.cleanup()


async def test_nats_messages_that_are_not_events_are_delivered_raw_not_terminated(
    nats_bus: NatsBus,
) -> None:
    rec = Recorder()
    await nats_bus.subscribe("contract-raw", ["forecourt.sales.>"], rec)
    good = event()
    subject = nats_bus.wire_subject("forecourt.sales.sale.completed.v1")

    await nats_bus.js.publish(subject, b"{not json", headers={"ce-specversion": "1.0"})
    await nats_bus.js.publish(subject, b"{}", headers={"ce-specversion": "0.3", "ce-id": "x"})
    await nats_bus.js.publish(subject, b"\xff\x00 raw")
    await nats_bus.publish(good)
    await eventually(lambda: len(rec.deliveries) == 4, what="all four messages")
    await drained(nats_bus, "contract-raw")

    broken, old, bare, fine = rec.deliveries
    assert (broken.event_id, broken.headers, broken.body) == (
        "",
        {"ce-specversion": "1.0"},
        b"{not json",
    )
    assert (old.event_id, old.headers, old.body) == (
        "x",
        {"ce-specversion": "0.3", "ce-id": "x"},
        b"{}",
    )
    assert (bare.event_id, bare.headers, bare.body) == ("", {}, b"\xff\x00 raw")
    assert all(d.subject == "forecourt.sales.sale.completed.v1" for d in rec.deliveries)
    assert all(d.attempt == 1 for d in rec.deliveries)
    assert fine.envelope() == good
    with pytest.raises(InvalidValue, match="malformed"):
        broken.envelope()
