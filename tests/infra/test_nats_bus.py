"""The NATS JetStream bus beyond the shared contract, against a real server: the stream's
policy (created, and updated on connect), how each kind of publish failure is reported
(stream full, refused for good, no answer), the durable consumers (no delivery limit, an
old limit removed), progress acks, a killed subscriber, lag and usage figures, and the
transport headers. Each test has a stream (under a subject prefix) of its own, deleted
afterwards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import api
from structlog.testing import capture_logs

from forecourt.infra.bus import BusFull, Delivery, PublishRefused, Verdict
from forecourt.infra.bus.nats import NatsBus, classify_puback, consumer_name
from forecourt.kernel.events import Envelope, EventRecord, event_type, new_traceparent
from tests.infra.support import Buses
from tests.support import eventually


@pytest.fixture
async def buses(nats_url: str, unique_stream: str) -> AsyncIterator[Buses]:
    made = Buses("nats", nats_url, unique_stream)
    try:
        yield made
    finally:
        await made.cleanup()


async def nats_bus(buses: Buses, **options: Any) -> NatsBus:
    bus = await buses.new(**options)
    assert isinstance(bus, NatsBus)
    return bus


@pytest.fixture
async def bus(buses: Buses) -> NatsBus:
    return await nats_bus(buses)


def event(n: int = 0, name: str = "sale.completed", **data: object) -> Envelope:
    return Envelope(
        type=event_type("sales", name),
        source="/stations/st-0042",
        subject=f"sale-{n}",
        time=datetime.now(UTC),
        traceparent=new_traceparent(),
        data={"n": n, **data},
    )


def records(count: int, start: int = 0) -> list[EventRecord]:
    return [event(start + i).record() for i in range(count)]


async def stored(bus: NatsBus) -> int:
    return (await bus.js.stream_info(bus.stream)).state.messages


class Recorder:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def __call__(self, batch: Sequence[Delivery]) -> list[Verdict]:
        self.deliveries.extend(batch)
        return [None for _ in batch]


# --- the stream ---------------------------------------------------------------------------


async def test_the_stream_is_created_with_discard_new_and_the_configured_limits(
    buses: Buses, unique_stream: str
) -> None:
    bus = await nats_bus(
        buses, max_age=3600.0, max_bytes=10 * 1024**2, max_msgs=5000, duplicate_window=60.0
    )

    config = (await bus.js.stream_info(unique_stream)).config

    assert config.subjects == [f"{unique_stream.lower()}.forecourt.>"]
    assert config.storage == "file"
    assert config.retention == "limits"
    assert config.discard == "new"  # a full stream refuses rather than drops unread events
    assert config.max_age == 3600.0
    assert config.max_bytes == 10 * 1024**2
    assert config.max_msgs == 5000
    assert config.max_msg_size == 1024**2
    assert config.duplicate_window == 60.0
    assert config.num_replicas == 1


async def test_the_default_policy_keeps_a_week_within_a_gibibyte(bus: NatsBus) -> None:
    config = (await bus.js.stream_info(bus.stream)).config

    assert (config.max_age, config.max_bytes, config.max_msgs) == (7 * 24 * 3600.0, 1024**3, -1)
    assert config.duplicate_window == 120.0
    assert config.discard == "new"


async def test_an_existing_stream_with_another_policy_is_updated_on_connect(
    buses: Buses, unique_stream: str, nats_url: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().add_stream(
            name=unique_stream,
            subjects=[f"{unique_stream.lower()}.forecourt.>"],
            discard=api.DiscardPolicy.OLD,
            max_age=60.0,
            max_msgs=10,
        )
        buses.streams.add(unique_stream)
        with capture_logs() as logs:
            bus = await nats_bus(buses, max_age=7200.0, max_bytes=1024**2)
        config = (await nc.jetstream().stream_info(unique_stream)).config
    finally:
        await nc.close()

    assert (config.discard, config.max_age, config.max_bytes, config.max_msgs) == (
        "new",
        7200.0,
        1024**2,
        -1,
    )
    updated = [e for e in logs if e["event"] == "bus.stream_updated"]
    assert len(updated) == 1
    assert updated[0]["differences"]["discard"] == {"from": "old", "to": "new"}
    assert updated[0]["differences"]["max_age"] == {"from": 60.0, "to": 7200.0}
    assert updated[0]["differences"]["max_msgs"] == {"from": 10, "to": -1}
    assert "duplicate_window" in updated[0]["differences"]  # 60 s (max_age) → 120 s
    assert await bus.ready()

    with capture_logs() as again:  # a second process finds it as configured
        await nats_bus(buses, max_age=7200.0, max_bytes=1024**2)
    assert not [e for e in again if e["event"] == "bus.stream_updated"]


async def test_a_policy_the_server_cannot_hold_fails_connect_clearly(
    buses: Buses, unique_stream: str, nats_url: str
) -> None:
    with pytest.raises(RuntimeError, match="replicas=3"):  # a single server, not a cluster
        await nats_bus(buses, replicas=3)

    await nats_bus(buses)  # created with one replica
    with pytest.raises(RuntimeError, match="replicas=3 needs a JetStream cluster"):
        await nats_bus(buses, replicas=3)

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.delete_stream(unique_stream)
        await js.add_stream(
            name=unique_stream,
            subjects=[f"{unique_stream.lower()}.forecourt.>"],
            storage=api.StorageType.MEMORY,
        )
        with pytest.raises(RuntimeError, match="can not change storage type"):
            await nats_bus(buses)
    finally:
        await nc.close()


# --- publishing ---------------------------------------------------------------------------


async def test_messages_carry_the_event_id_as_msg_id_and_the_expected_stream(
    bus: NatsBus, unique_stream: str
) -> None:
    sent = event()

    await bus.publish(sent)
    got = await bus.js.get_last_msg(unique_stream, bus.wire_subject(sent.bus_subject))

    assert got.subject == f"{unique_stream.lower()}.forecourt.sales.sale.completed.v1"
    assert got.headers is not None
    assert got.headers["Nats-Msg-Id"] == sent.id
    assert got.headers["Nats-Expected-Stream"] == unique_stream
    assert {k: v for k, v in got.headers.items() if not k.startswith("Nats-")} == sent.headers()
    assert got.data == sent.body()


async def test_republishing_an_event_id_within_the_window_is_stored_and_delivered_once(
    bus: NatsBus,
) -> None:
    rec = Recorder()
    await bus.subscribe("nats-dedupe", ["forecourt.>"], rec)
    first, marker = event(1), event(2, "sale.voided")

    await bus.publish(first)
    await bus.publish(first)  # e.g. the relay crashed before deleting its outbox row
    await bus.publish_records([first.record(), marker.record()])  # acknowledged as stored
    await eventually(lambda: marker.id in [d.event_id for d in rec.deliveries])
    await pending_is(bus, "nats-dedupe", 0)

    assert [d.event_id for d in rec.deliveries] == [first.id, marker.id]
    assert await stored(bus) == 2


async def pending_is(bus: NatsBus, consumer: str, expected: int) -> None:
    async def check() -> bool:
        return await bus.pending(consumer) == expected

    await eventually(check, what=f"{expected} pending for {consumer}")


@pytest.mark.parametrize("limit", ["max_msgs", "max_bytes"])
async def test_a_full_stream_raises_bus_full_and_stores_nothing_more(
    buses: Buses, limit: str
) -> None:
    bus = await nats_bus(buses)
    await bus.publish_records(records(1))
    size = (await bus.js.stream_info(bus.stream)).state.bytes  # one message, as stored
    limits = {"max_msgs": 3} if limit == "max_msgs" else {"max_bytes": 3 * size + size // 2}
    bus = await nats_bus(buses, **limits)  # connect updates the stream to the new limit
    await bus.publish_records(records(2, start=1))
    assert (await bus.stream_usage())["usage"] >= 0.75

    with pytest.raises(BusFull, match="full") as raised:
        await bus.publish_records(records(2, start=3))

    assert not isinstance(raised.value, PublishRefused)
    assert "err_code 10077" in str(raised.value)  # maximum messages / bytes exceeded
    assert await stored(bus) == 3  # nothing more, and nothing old dropped


async def test_an_oversize_record_is_refused_alone_and_the_others_are_stored(
    bus: NatsBus,
) -> None:
    batch = records(5)
    huge = event(2, blob="x" * (1024**2)).record()  # over the 1 MiB message limit
    batch[2] = huge

    with pytest.raises(PublishRefused) as raised:
        await bus.publish_records(batch)

    assert list(raised.value.refused) == [2]
    assert huge.id in raised.value.refused[2]
    assert "exceeds the maximum" in raised.value.refused[2]
    assert await stored(bus) == 4
    assert await bus.ready()  # the connection survived (the server was never sent it)


async def test_a_record_the_server_finds_too_large_is_refused_alone(bus: NatsBus) -> None:
    config = (await bus.js.stream_info(bus.stream)).config
    config.max_msg_size = 2000  # an operator lowered it behind the bus's back
    await bus.js.update_stream(config)
    batch = records(3)
    batch[0] = event(0, blob="x" * 3000).record()

    with pytest.raises(PublishRefused) as raised:
        await bus.publish_records(batch)

    assert list(raised.value.refused) == [0]
    assert "err_code 10054" in raised.value.refused[0]
    assert await stored(bus) == 2


async def test_a_subject_the_stream_does_not_capture_is_refused_alone(bus: NatsBus) -> None:
    other = event(9).record()._replace(type="com.elsewhere.thing.happened.v1")
    batch = [*records(2), other]

    with pytest.raises(PublishRefused) as raised:
        await bus.publish_records(batch)

    assert list(raised.value.refused) == [2]
    assert "not captured" in raised.value.refused[2]
    assert await stored(bus) == 2


async def test_another_stream_capturing_the_subject_cannot_store_the_event(
    bus: NatsBus, unique_stream: str
) -> None:
    other = f"{unique_stream}_OTHER"
    await bus.js.delete_stream(unique_stream)
    await bus.js.add_stream(name=other, subjects=[bus.wire_subject("forecourt.>")])
    try:
        with pytest.raises(PublishRefused) as raised:
            await bus.publish_records(records(2))
        assert sorted(raised.value.refused) == [0, 1]
        assert "err_code 10060" in raised.value.refused[0]  # expected stream does not match
        assert (await bus.js.stream_info(other)).state.messages == 0
    finally:
        await bus.js.delete_stream(other)


async def test_no_stream_answering_is_a_plain_failure(bus: NatsBus, unique_stream: str) -> None:
    await bus.publish_records(records(3))
    await bus.js.delete_stream(unique_stream)

    with pytest.raises(RuntimeError, match=r"no stream answered \(status 503\)") as raised:
        await bus.publish_records(records(3, start=3))

    assert not isinstance(raised.value, PublishRefused | BusFull)


async def test_no_answer_within_the_timeout_is_a_plain_failure(
    buses: Buses, unique_stream: str, nats_url: str
) -> None:
    bus = await nats_bus(buses, publish_timeout=0.3)
    await bus.js.delete_stream(unique_stream)
    nc = await nats.connect(nats_url)  # something listens, and never answers
    heard: list[str] = []

    async def listen(msg: Msg) -> None:
        heard.append(msg.subject)

    await nc.subscribe(bus.wire_subject("forecourt.>"), cb=listen)
    try:
        probe = bus.wire_subject("forecourt.probe")
        await eventually(lambda: _probe(bus, probe, heard), what="the listener heard")
        with pytest.raises(TimeoutError, match="3 of 3 event"):
            await bus.publish_records(records(3))
    finally:
        await nc.close()


async def _probe(bus: NatsBus, subject: str, heard: list[str]) -> bool:
    await bus.nc.publish(subject, b"")
    await bus.nc.flush()
    return subject in heard


async def test_publishing_needs_a_connection(bus: NatsBus) -> None:
    assert await bus.ready()

    await bus.close()

    assert not await bus.ready()
    with pytest.raises(RuntimeError, match="connect"):
        await bus.publish(event())


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (b'{"stream":"S", "seq":1}', "stored"),
        (b'{"stream":"S", "seq":1,"duplicate": true}', "stored"),
        (b'{"stream":"T", "seq":1}', "refused"),
        (
            b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds '
            b'maximum allowed"},"stream":"S","seq":0}',
            "refused",
        ),
        (
            b'{"error":{"code":400,"err_code":10060,"description":"expected stream does '
            b'not match"},"stream":"S","seq":0}',
            "refused",
        ),
        (
            b'{"error":{"code":503,"err_code":10077,"description":"maximum messages '
            b'exceeded"},"stream":"S","seq":0}',
            "full",
        ),
        (
            b'{"error":{"code":503,"err_code":10077,"description":"maximum bytes '
            b'exceeded"},"stream":"S","seq":0}',
            "full",
        ),
        (
            b'{"error":{"code":503,"err_code":10077,"description":"maximum messages per '
            b'subject exceeded"},"stream":"S","seq":0}',
            "full",
        ),
        (
            b'{"error":{"code":503,"err_code":10023,"description":"insufficient '
            b'resources"},"stream":"S","seq":0}',
            "full",
        ),
        (b'{"error":{"code":500,"err_code":10077,"description":"disk I/O error"}}', "failed"),
        (b'{"error":{"code":500,"err_code":10999,"description":"something new"}}', "failed"),
        (b"", "failed"),
        (b"not json", "failed"),
    ],
)
def test_pubacks_are_sorted_as_the_server_words_them(answer: bytes, outcome: str) -> None:
    headers = {"Status": "503"} if not answer else None

    assert classify_puback(answer, headers, "S")[0] == outcome
    if answer.startswith(b"{"):
        json.loads(answer)  # the table holds real answers


# --- consuming ----------------------------------------------------------------------------


async def test_the_durable_pull_consumer_has_no_delivery_limit(
    bus: NatsBus, unique_stream: str
) -> None:
    await bus.subscribe("sales.projector", ["forecourt.sales.>"], Recorder())

    info = await bus.js.consumer_info(unique_stream, "sales_projector")

    assert info.config.durable_name == "sales_projector"
    assert info.config.deliver_subject is None  # pull, not push
    assert info.config.ack_policy == "explicit"
    assert info.config.max_deliver == -1
    assert info.config.ack_wait == 30.0
    assert info.config.filter_subject == f"{unique_stream.lower()}.forecourt.sales.>"


async def test_a_durable_created_with_a_delivery_limit_loses_it(
    bus: NatsBus, unique_stream: str
) -> None:
    await bus.js.add_consumer(
        unique_stream,
        api.ConsumerConfig(
            name="legacy",
            durable_name="legacy",
            ack_policy=api.AckPolicy.EXPLICIT,
            max_deliver=5,
            ack_wait=10.0,
            filter_subject=bus.wire_subject("forecourt.sales.>"),
        ),
    )

    await bus.subscribe("legacy", ["forecourt.sales.>"], Recorder())
    info = await bus.js.consumer_info(unique_stream, "legacy")

    assert info.config.max_deliver == -1
    assert info.config.ack_wait == 30.0


async def test_a_slow_batch_is_kept_with_progress_acks(buses: Buses) -> None:
    one, two = await nats_bus(buses, ack_wait=0.6), await nats_bus(buses, ack_wait=0.6)
    seen: list[int] = []

    async def slow(batch: Sequence[Delivery]) -> list[Verdict]:
        seen.extend(d.attempt for d in batch)
        await asyncio.sleep(1.5)  # the work: 2.5 x ack_wait
        return [None for _ in batch]

    # Whichever gets the batch, the other one waits for anything handed out again.
    await one.subscribe("nats-slow", ["forecourt.sales.>"], slow)
    await two.subscribe("nats-slow", ["forecourt.sales.>"], slow)
    await one.publish_records(records(3))
    await eventually(lambda: len(seen) == 3, what="the batch")
    await pending_is(one, "nats-slow", 0)

    assert seen == [1, 1, 1]  # never handed out again while it ran


async def test_a_killed_subscriber_leaves_its_batch_to_come_back_after_ack_wait(
    buses: Buses,
) -> None:
    dying = await nats_bus(buses, ack_wait=1.0)
    release = asyncio.Event()
    first: list[Delivery] = []

    async def hang(batch: Sequence[Delivery]) -> list[Verdict]:
        first.extend(batch)
        await release.wait()
        return [None for _ in batch]

    await dying.subscribe("nats-killed", ["forecourt.sales.>"], hang)
    await dying.publish_records(records(2))
    await eventually(lambda: len(first) == 2, what="the first batch")
    assert dying._nc is not None
    await dying._nc.close()  # the process dies: no nak, no progress ack

    survivor, rec = await nats_bus(buses, ack_wait=1.0), Recorder()
    await survivor.subscribe("nats-killed", ["forecourt.sales.>"], rec)
    await eventually(lambda: len(rec.deliveries) == 2, what="the batch again")
    release.set()
    await pending_is(survivor, "nats-killed", 0)

    assert sorted(d.event_id for d in rec.deliveries) == sorted(d.event_id for d in first)
    assert {d.attempt for d in rec.deliveries} == {2}


async def test_pending_sums_the_durables_of_a_consumer_with_several_filters(
    buses: Buses,
) -> None:
    bus = await nats_bus(buses)
    assert await bus.pending("nats-multi") is None
    release = asyncio.Event()

    async def wait(batch: Sequence[Delivery]) -> list[Verdict]:
        await release.wait()
        return [None for _ in batch]

    subjects = ["forecourt.sales.sale.completed.v1", "forecourt.sales.sale.voided.v1"]
    await bus.subscribe("nats-multi", subjects, wait)
    await bus.publish_records([event(1).record(), event(2, "sale.voided").record()])

    await pending_is(bus, "nats-multi", 2)
    other = await nats_bus(buses)  # a process that did not subscribe
    assert await other.pending("nats-multi") == 2
    release.set()
    await pending_is(bus, "nats-multi", 0)


async def test_stream_usage_reports_the_tightest_limit(buses: Buses) -> None:
    bus = await nats_bus(buses, max_msgs=20, max_bytes=1024**2)
    await bus.publish_records(records(5))

    usage = await bus.stream_usage()

    assert usage["messages"] == 5
    assert 0 < usage["bytes"] < 5 * 1024
    assert (usage["max_msgs"], usage["max_bytes"]) == (20, 1024**2)
    assert usage["max_age"] == 7 * 24 * 3600.0
    assert usage["usage"] == pytest.approx(0.25)  # 5 of 20 messages, a few KiB of 1 MiB


async def test_stream_usage_is_zero_without_size_limits(buses: Buses) -> None:
    bus = await nats_bus(buses, max_bytes=-1)
    await bus.publish_records(records(2))

    usage = await bus.stream_usage()

    assert (usage["messages"], usage["max_bytes"], usage["max_msgs"]) == (2, -1, -1)
    assert usage["usage"] == 0.0


def test_without_a_prefix_the_wire_subject_is_the_bus_subject() -> None:
    bus = NatsBus("nats://127.0.0.1:4222")

    assert bus.wire_subject(event().bus_subject) == "forecourt.sales.sale.completed.v1"
    assert bus.bus_subject("forecourt.sales.sale.completed.v1") == bus.wire_subject(
        "forecourt.sales.sale.completed.v1"
    )
    assert bus.stream_subjects == ["forecourt.>"]
    assert consumer_name("sales.projector v2/*") == "sales_projector_v2__"
    assert NatsBus.transactional is False
    prefixed = NatsBus("nats://127.0.0.1:4222", subject_prefix="t1")
    assert prefixed.bus_subject("t1.forecourt.sales.x.v1") == "forecourt.sales.x.v1"
