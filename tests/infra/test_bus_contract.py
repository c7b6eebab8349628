"""The bus contract, run against both backends: the in-process bus and NATS JetStream.

Every test in the first part runs twice (``memory`` and ``nats``), so the embedded default
and production cannot drift apart: acknowledged publish, CloudEvents headers carried
unchanged, NATS wildcard filters, de-duplication by event id, redelivery with a growing
``attempt`` and a bounded number of deliveries. The NATS-only tests at the end cover what
the memory bus cannot express (stream configuration, poison messages on the wire, a missing
PubAck). NATS tests use a unique stream under a unique subject prefix, deleted afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import cast

import pytest

from forecourt.infra.bus import Bus, Delivery
from forecourt.infra.bus.nats import NatsBus, consumer_name
from forecourt.kernel.events import Envelope, event_type, new_traceparent
from tests.infra.support import Buses
from tests.support import eventually

SETTLE = 0.3  # how long "nothing else arrives" is watched for


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
    """A handler that records deliveries and fails on demand."""

    def __init__(self, fail: Callable[[Delivery], bool] = lambda d: False) -> None:
        self.deliveries: list[Delivery] = []
        self.fail = fail

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.fail(delivery):
            raise RuntimeError(f"handler refused attempt {delivery.attempt}")

    def ids(self) -> list[str]:
        return [d.envelope.id for d in self.deliveries]

    def attempts(self, event_id: str) -> list[int]:
        return [d.attempt for d in self.deliveries if d.envelope.id == event_id]


# --- the contract, on both backends -------------------------------------------------------


async def test_a_published_event_reaches_a_matching_subscriber_unchanged(bus: Bus) -> None:
    rec = Recorder()
    await bus.subscribe("contract-basic", ["forecourt.sales.sale.completed.v1"], rec, max_deliver=3)
    sent = event()

    await bus.publish(sent)
    await eventually(lambda: len(rec.deliveries) == 1)

    got = rec.deliveries[0]
    assert got.envelope == sent
    assert got.envelope.id == sent.id
    assert got.envelope.time == sent.time
    assert got.envelope.traceparent == sent.traceparent
    assert got.envelope.data == sent.data
    assert got.headers == sent.headers()
    assert got.body == sent.body()
    assert got.attempt == 1
    assert await bus.ready()


async def test_an_event_on_another_subject_is_not_delivered(bus: Bus) -> None:
    rec = Recorder()
    await bus.subscribe("contract-other", ["forecourt.sales.sale.completed.v1"], rec, max_deliver=3)
    other, wanted = event("sales", "sale.voided"), event()

    await bus.publish(other)
    await bus.publish(wanted)
    await eventually(lambda: wanted.id in rec.ids())
    await asyncio.sleep(SETTLE)

    assert rec.ids() == [wanted.id]


async def test_wildcard_filters_match_tokens_like_nats(bus: Bus) -> None:
    all_sales, any_completed, two_filters = Recorder(), Recorder(), Recorder()
    await bus.subscribe("wild-sales", ["forecourt.sales.>"], all_sales, max_deliver=3)
    await bus.subscribe(
        "wild-completed", ["forecourt.*.sale.completed.v1"], any_completed, max_deliver=3
    )
    await bus.subscribe(
        "wild-two",
        ["forecourt.network.station.opened.v1", "forecourt.sales.sale.voided.v1"],
        two_filters,
        max_deliver=3,
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
    await asyncio.sleep(SETTLE)

    assert sorted(all_sales.ids()) == sorted([completed.id, voided.id])
    assert any_completed.ids() == [completed.id]
    assert sorted(two_filters.ids()) == sorted([opened.id, voided.id])


async def test_republishing_the_same_event_id_within_the_window_is_delivered_once(
    bus: Bus,
) -> None:
    rec = Recorder()
    await bus.subscribe("contract-dedupe", ["forecourt.>"], rec, max_deliver=3)
    first, marker = event(), event("sales", "sale.voided")

    await bus.publish(first)
    await bus.publish(first)  # e.g. the relay crashed before marking the row published
    await bus.publish(marker)
    await eventually(lambda: first.id in rec.ids() and marker.id in rec.ids())
    await asyncio.sleep(SETTLE)

    assert rec.ids().count(first.id) == 1
    assert len(rec.deliveries) == 2


async def test_a_failing_handler_is_redelivered_with_an_increasing_attempt(bus: Bus) -> None:
    rec = Recorder(fail=lambda d: d.attempt < 3)
    await bus.subscribe("contract-retry", ["forecourt.sales.>"], rec, max_deliver=5)
    sent = event()

    await bus.publish(sent)
    await eventually(lambda: len(rec.deliveries) >= 3)
    await asyncio.sleep(SETTLE)  # the third attempt succeeded: nothing more may come

    assert rec.attempts(sent.id) == [1, 2, 3]
    assert all(d.envelope == sent for d in rec.deliveries)


async def test_delivery_stops_after_max_deliver_and_later_events_still_flow(bus: Bus) -> None:
    poison, later = event(poison=True), event(poison=False)
    rec = Recorder(fail=lambda d: d.envelope.id == poison.id)
    await bus.subscribe("contract-exhaust", ["forecourt.sales.>"], rec, max_deliver=3)

    await bus.publish(poison)
    await eventually(lambda: len(rec.attempts(poison.id)) >= 3)
    await bus.publish(later)
    await eventually(lambda: later.id in rec.ids())
    await asyncio.sleep(0.6)  # longer than either backend's next retry delay would be

    assert rec.attempts(poison.id) == [1, 2, 3]
    assert rec.attempts(later.id) == [1]


async def test_a_stopped_subscription_receives_nothing_more(bus: Bus) -> None:
    stopped, running = Recorder(), Recorder()
    sub = await bus.subscribe("contract-stop-a", ["forecourt.sales.>"], stopped, max_deliver=3)
    await bus.subscribe("contract-stop-b", ["forecourt.sales.>"], running, max_deliver=3)
    before, after = event(), event()

    await bus.publish(before)
    await eventually(lambda: before.id in stopped.ids())
    await sub.stop()
    await bus.publish(after)
    await eventually(lambda: after.id in running.ids())
    await asyncio.sleep(SETTLE)

    assert stopped.ids() == [before.id]


# --- NATS only ----------------------------------------------------------------------------


@pytest.fixture
async def nats_bus(nats_url: str, unique_stream: str) -> AsyncIterator[NatsBus]:
    made = Buses("nats", nats_url, unique_stream)
    try:
        yield cast(NatsBus, await made.new())  # the "nats" kind builds a NatsBus
    finally:
        await made.cleanup()


async def test_nats_bus_creates_a_file_stream_with_a_duplicate_window(
    nats_bus: NatsBus, unique_stream: str
) -> None:
    info = await nats_bus.js.stream_info(unique_stream)

    assert info.config.subjects == [f"{unique_stream.lower()}.forecourt.>"]
    assert info.config.storage == "file"
    assert info.config.duplicate_window == 120.0
    assert info.config.max_age == 7 * 24 * 3600.0
    assert (info.config.max_bytes or 0) > 0


async def test_nats_bus_publishes_to_the_bus_subject_with_the_event_id_as_msg_id(
    nats_bus: NatsBus, unique_stream: str
) -> None:
    sent = event()

    await nats_bus.publish(sent)
    stored = await nats_bus.js.get_last_msg(unique_stream, nats_bus.wire_subject(sent.bus_subject))

    assert stored.subject == f"{unique_stream.lower()}.forecourt.sales.sale.completed.v1"
    assert stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] == sent.id
    assert {k: v for k, v in stored.headers.items() if k.startswith("ce-")} == {
        k: v for k, v in sent.headers().items() if k.startswith("ce-")
    }
    assert stored.data == sent.body()


async def test_nats_subscribe_binds_a_durable_pull_consumer_with_explicit_acks(
    nats_bus: NatsBus, unique_stream: str
) -> None:
    await nats_bus.subscribe("sales.projector", ["forecourt.sales.>"], Recorder(), max_deliver=4)

    info = await nats_bus.js.consumer_info(unique_stream, "sales_projector")

    assert info.config.durable_name == "sales_projector"
    assert info.config.deliver_subject is None  # pull, not push
    assert info.config.ack_policy == "explicit"
    assert info.config.max_deliver == 4  # JetStream itself stops redelivering, too
    assert info.config.ack_wait == 30.0
    assert info.config.filter_subject == f"{unique_stream.lower()}.forecourt.sales.>"


def test_without_a_prefix_the_wire_subject_is_the_bus_subject() -> None:
    bus = NatsBus("nats://127.0.0.1:4222")

    assert bus.wire_subject(event().bus_subject) == "forecourt.sales.sale.completed.v1"
    assert bus.stream_subjects == ["forecourt.>"]
    assert consumer_name("sales.projector v2/*") == "sales_projector_v2__"


async def test_a_malformed_message_is_terminated_and_later_events_still_flow(
    nats_bus: NatsBus, unique_stream: str
) -> None:
    rec = Recorder()
    await nats_bus.subscribe("contract-poison", ["forecourt.sales.>"], rec, max_deliver=3)
    good = event()

    subject = nats_bus.wire_subject("forecourt.sales.sale.completed.v1")
    await nats_bus.js.publish(subject, b"{not json", headers={"ce-specversion": "1.0"})
    await nats_bus.js.publish(subject, b"{}", headers={"ce-specversion": "0.3", "ce-id": "x"})
    await nats_bus.publish(good)
    await eventually(lambda: good.id in rec.ids())
    await asyncio.sleep(SETTLE)

    assert rec.ids() == [good.id]
    info = await nats_bus.js.consumer_info(unique_stream, "contract-poison")
    assert info.num_ack_pending == 0  # the bad ones were terminated, not left to redeliver
    assert info.num_redelivered == 0
    assert info.num_pending == 0


async def test_publish_raises_when_jetstream_does_not_acknowledge(
    nats_bus: NatsBus, unique_stream: str
) -> None:
    await nats_bus.js.delete_stream(unique_stream)

    with pytest.raises(Exception):  # noqa: B017, PT011 - no stream: no PubAck, whatever the error
        await nats_bus.publish(event())


async def test_pipelined_publish_raises_when_jetstream_does_not_acknowledge(
    nats_bus: NatsBus, unique_stream: str
) -> None:
    records = [event(n=i).record() for i in range(5)]
    await nats_bus.publish_records(records)  # acknowledged while the stream exists
    await nats_bus.js.delete_stream(unique_stream)

    with pytest.raises(RuntimeError, match="no stream answered"):
        await nats_bus.publish_records([event(n=i).record() for i in range(5, 10)])


async def test_pipelined_publish_refuses_a_stream_that_is_not_ours(
    nats_bus: NatsBus, unique_stream: str
) -> None:
    # Another stream captures one of our subjects: the server must refuse to store there.
    other = f"{unique_stream}_OTHER"
    subject = nats_bus.wire_subject("forecourt.other.thing.v1")
    await nats_bus.js.delete_stream(unique_stream)
    await nats_bus.js.add_stream(name=other, subjects=[subject])
    try:
        record = Envelope(
            type="com.forecourt.other.thing.v1", source="/t", data={}, time=datetime.now(UTC)
        ).record()
        with pytest.raises(RuntimeError, match=record.id):
            await nats_bus.publish_records([record])
    finally:
        await nats_bus.js.delete_stream(other)


async def test_ready_reports_the_connection(nats_bus: NatsBus) -> None:
    assert await nats_bus.ready()

    await nats_bus.close()

    assert not await nats_bus.ready()
    with pytest.raises(RuntimeError, match="connect"):
        await nats_bus.publish(event())
