"""NATS JetStream bus: the production backend, same contract as :mod:`.memory`.

Stream
    One stream (``FORECOURT`` by default) captures ``forecourt.>`` on file storage with
    limits retention: events are kept for ``max_age`` (7 days) or until ``max_bytes``
    (1 GiB), oldest discarded first, 1 MiB per message at most. The duplicate window
    (2 minutes) makes publishing idempotent per event id: every message carries
    ``Nats-Msg-Id`` = ``envelope.id``, so the outbox relay re-publishing after a crash within
    the window stores nothing new. ``connect()`` creates the stream when it is missing and
    leaves an existing one alone (operators own its limits).

Publishing
    CloudEvents binary mode: the ``ce-*`` headers of :meth:`Envelope.headers`, the JSON body
    of :meth:`Envelope.body`. :meth:`NatsBus.publish` waits for the stream's PubAck and
    raises if there is none, which is what lets the relay mark a row published.

Consuming
    Each ``subscribe(consumer, ...)`` binds a durable *pull* consumer named after
    ``consumer`` (sanitised to ``[A-Za-z0-9_-]``) with explicit acks, ``max_deliver`` and an
    ``ack_wait`` (30 s, extended with progress acks while a handler runs). Several processes
    subscribing with the same name share the work. A background task fetches batches and
    calls the handler once per message, ``Delivery.attempt`` being JetStream's delivery
    count. Success acks; an exception naks with an exponential delay so JetStream redelivers
    later; the last allowed failure terminates the message (the handler, e.g. the inbox, has
    dead-lettered it by then); a message whose headers or body do not parse as an event is
    terminated and logged. Delivery is at least once and no order is assumed.

    Several subject filters on one consumer need NATS Server 2.10 (``filter_subjects``); on
    older servers a consumer with several subjects becomes one durable per subject (named
    ``<consumer>_<hash>``), so an event matching two overlapping filters arrives twice,
    which the inbox absorbs.

Subject prefix
    ``subject_prefix="t1"`` puts every subject of this bus under ``t1.``: the stream captures
    ``t1.forecourt.>``, events are published to ``t1.<bus_subject>`` and subscription filters
    are prefixed the same way. Handlers see the same envelopes. It exists so tests (or
    several environments sharing one server) can use their own stream without overlapping
    subjects; by default there is no prefix and the subject is ``Envelope.bus_subject``
    (``forecourt.sales.sale.completed.v1``). :func:`forecourt.infra.bus.make_bus` uses the
    defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from forecourt.infra.bus import Delivery, Handler
from forecourt.infra.logging import get_logger
from forecourt.kernel.events import Envelope, EventRecord

log = get_logger("forecourt.bus.nats")

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_PREFIX_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def consumer_name(consumer: str) -> str:
    """A JetStream-safe durable name for ``consumer`` (no dots, wildcards or spaces)."""
    name = _NAME_UNSAFE.sub("_", consumer.strip())
    if not name:
        raise ValueError(f"consumer name {consumer!r} is empty once sanitised")
    return name


def _wire_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """The event's headers as published: transport headers (``Nats-*``) removed."""
    return {k: v for k, v in (headers or {}).items() if not k.lower().startswith("nats-")}


class _Puller:
    """The fetch loop of one durable pull consumer."""

    def __init__(
        self,
        bus: NatsBus,
        psub: JetStreamContext.PullSubscription,
        durable: str,
        handler: Handler,
        max_deliver: int,
    ) -> None:
        self.bus = bus
        self.psub = psub
        self.durable = durable
        self.handler = handler
        self.max_deliver = max_deliver
        self.stopping = False
        self.idle = False
        self.task = asyncio.create_task(self._run(), name=f"nats-bus:{durable}")

    async def _run(self) -> None:
        bus = self.bus
        failures = 0
        while not self.stopping:
            self.idle = True  # waiting for messages: safe to cancel
            try:
                msgs = await self.psub.fetch(bus.fetch_batch, timeout=bus.fetch_timeout)
            except TimeoutError:  # nothing to do (nats.errors.TimeoutError subclasses it)
                continue
            except Exception as exc:  # noqa: BLE001 - reconnecting, stream gone, ...: retry
                failures += 1
                log.warning("bus.fetch_failed", consumer=self.durable, error=repr(exc))
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            finally:
                self.idle = False
            failures = 0
            fetched_at = time.monotonic()
            for i, msg in enumerate(msgs):
                if self.stopping:  # hand the rest back at once rather than after ack_wait
                    for rest in msgs[i:]:
                        await _settle(rest.nak(), self.durable, "nak")
                    break
                if time.monotonic() - fetched_at > bus.ack_wait / 3:
                    await _settle(msg.in_progress(), self.durable, "in_progress")
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        try:
            attempt = msg.metadata.num_delivered
            headers = _wire_headers(msg.headers)
            envelope = Envelope.from_wire(headers, msg.data)
        except Exception as exc:  # noqa: BLE001 - a poison message must not stop the loop
            log.error(
                "bus.malformed_message",
                consumer=self.durable,
                subject=msg.subject,
                error=str(exc),
            )
            await _settle(msg.term(), self.durable, "term")
            return
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            await self.handler(Delivery(envelope, attempt, headers, msg.data))
        except asyncio.CancelledError:
            raise  # not acked: JetStream redelivers after ack_wait
        except Exception as exc:  # noqa: BLE001 - a failing handler means redeliver, never lose
            if attempt >= self.max_deliver:
                log.error(
                    "bus.delivery_exhausted",
                    consumer=self.durable,
                    event_id=envelope.id,
                    deliveries=attempt,
                    error=str(exc),
                )
                await _settle(msg.term(), self.durable, "term")
            else:
                delay = self.bus.retry_delay(attempt)
                log.warning(
                    "bus.handler_failed",
                    consumer=self.durable,
                    event_id=envelope.id,
                    attempt=attempt,
                    retry_in=delay,
                    error=str(exc),
                )
                await _settle(msg.nak(delay=delay), self.durable, "nak")
        else:
            await _settle(msg.ack(), self.durable, "ack")
        finally:
            keepalive.cancel()

    async def _keep_alive(self, msg: Msg) -> None:
        """Progress acks while a handler runs longer than a third of ``ack_wait``."""
        while True:
            await asyncio.sleep(self.bus.ack_wait / 3)
            await _settle(msg.in_progress(), self.durable, "in_progress")

    async def stop(self, grace: float) -> None:
        self.stopping = True
        if self.idle:
            self.task.cancel()
        done, _ = await asyncio.wait({self.task}, timeout=grace)
        if not done:
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        with contextlib.suppress(Exception):
            await self.psub.unsubscribe()


async def _settle(op: Any, durable: str, what: str) -> None:
    """Send an ack/nak/term/progress; a lost one only means a redelivery later."""
    try:
        await op
    except Exception as exc:  # noqa: BLE001
        log.warning("bus.ack_failed", consumer=durable, op=what, error=repr(exc))


class NatsSubscription:
    def __init__(self, bus: NatsBus, pullers: list[_Puller]) -> None:
        self.bus = bus
        self.pullers = pullers

    @property
    def durables(self) -> list[str]:
        return [p.durable for p in self.pullers]

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop(self.bus.stop_grace) for p in self.pullers))
        self.bus._subs.discard(self)


class _PendingAcks:
    """The acknowledgements one pipelined publish still waits for."""

    def __init__(self, count: int) -> None:
        self.waiting = set(range(count))
        self.error: tuple[int, str] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def answer(self, index: int, error: str | None) -> None:
        if error is not None and self.error is None:
            self.error = (index, error)
        self.waiting.discard(index)
        if (not self.waiting or self.error is not None) and not self.done.done():
            self.done.set_result(None)


class NatsBus:
    """The :class:`~forecourt.infra.bus.Bus` on NATS JetStream (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = "FORECOURT",
        subject_prefix: str = "",
        duplicate_window: float = 120.0,
        max_age: float = 7 * 24 * 3600.0,
        max_bytes: int = 1024**3,
        max_msg_size: int = 1024**2,
        ack_wait: float = 30.0,
        retry_backoff: tuple[float, float] = (0.5, 30.0),
        fetch_batch: int = 32,
        fetch_timeout: float = 2.0,
        publish_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        stop_grace: float = 10.0,
        name: str = "forecourt",
    ) -> None:
        if subject_prefix and not all(_PREFIX_TOKEN.match(t) for t in subject_prefix.split(".")):
            raise ValueError(
                f"subject prefix {subject_prefix!r} must be plain dot-separated tokens"
            )
        self.url = url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.max_msg_size = max_msg_size
        self.ack_wait = ack_wait
        self.retry_backoff = retry_backoff
        self.fetch_batch = fetch_batch
        self.fetch_timeout = fetch_timeout
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.stop_grace = stop_grace
        self.name = name
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._subs: set[NatsSubscription] = set()
        self._closing = False
        self._ack_prefix: str | None = None
        self._pending: dict[str, _PendingAcks] = {}
        self._batch_no = 0

    # --- subjects -------------------------------------------------------------------

    def wire_subject(self, subject: str) -> str:
        """The NATS subject for a bus subject or filter (with the prefix, if any)."""
        return f"{self.subject_prefix}.{subject}" if self.subject_prefix else subject

    @property
    def stream_subjects(self) -> list[str]:
        return [self.wire_subject("forecourt.>")]

    def retry_delay(self, attempt: int) -> float:
        base, cap = self.retry_backoff
        return float(min(base * 2 ** (attempt - 1), cap))

    # --- lifecycle ------------------------------------------------------------------

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("NatsBus.connect() has not been called")
        return self._js

    async def connect(self) -> None:
        if self._nc is not None:
            return
        self._closing = False
        nc = NatsClient()

        async def on_error(exc: Exception) -> None:
            log.warning("bus.nats_error", error=repr(exc))

        async def on_disconnected() -> None:
            if not self._closing:
                log.warning("bus.nats_disconnected", url=self.url)

        async def on_reconnected() -> None:
            log.info("bus.nats_reconnected", url=nc.connected_url)

        try:
            # Reconnect forever once connected; the first connection is bounded here.
            await asyncio.wait_for(
                nc.connect(
                    self.url,
                    name=self.name,
                    connect_timeout=max(1, int(self.connect_timeout)),
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                ),
                timeout=self.connect_timeout,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._nc = nc
        self._js = nc.jetstream(timeout=self.publish_timeout)
        try:
            await self._ensure_stream()
        except BaseException:
            await self.close()
            raise

    async def _ensure_stream(self) -> None:
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            config = api.StreamConfig(
                name=self.stream,
                description="Forecourt domain events (CloudEvents, binary mode)",
                subjects=self.stream_subjects,
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                discard=api.DiscardPolicy.OLD,
                max_age=self.max_age,
                max_bytes=self.max_bytes,
                max_msg_size=self.max_msg_size,
                duplicate_window=self.duplicate_window,
                num_replicas=1,
            )
            try:
                info = await self.js.add_stream(config)
                log.info("bus.stream_created", stream=self.stream, subjects=config.subjects)
            except nats.js.errors.BadRequestError:
                info = await self.js.stream_info(self.stream)  # another process won the race
        missing = set(self.stream_subjects) - set(info.config.subjects or [])
        if missing:
            log.warning("bus.stream_subjects_differ", stream=self.stream, missing=sorted(missing))

    async def ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def close(self) -> None:
        self._closing = True
        for sub in list(self._subs):
            await sub.stop()
        nc, self._nc, self._js = self._nc, None, None
        self._ack_prefix = None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except Exception as exc:  # noqa: BLE001 - closing anyway
                log.warning("bus.drain_failed", error=repr(exc))
                with contextlib.suppress(Exception):
                    await nc.close()

    # --- the Bus protocol -----------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        await self.publish_records([envelope.record()])

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        await self.publish_records([e.record() for e in envelopes])

    async def publish_records(self, records: Sequence[EventRecord]) -> None:
        """Pipelined publish: every message goes out at once, then every PubAck is awaited;
        raises if any one is missing or refused (the relay then keeps its rows).

        The relay's hot path, so it stays lean: headers straight from the stored record,
        no body decoding, and one reply subscription for all acknowledgements instead of
        the client library's per-message future, semaphore and timeout task. Each message
        still carries ``Nats-Msg-Id`` (de-duplication) and ``Nats-Expected-Stream`` (the
        server refuses to store it anywhere else).
        """
        if not records:
            return
        if self._nc is None:
            raise RuntimeError("NatsBus.connect() has not been called")
        nc = self._nc
        prefix = await self._ack_inbox()
        self._batch_no += 1
        token = str(self._batch_no)
        pending = _PendingAcks(len(records))
        self._pending[token] = pending
        reply = f"{prefix}.{token}."
        try:
            for i, record in enumerate(records):
                headers = record.headers()
                headers[MSG_ID_HEADER] = record.id
                headers[EXPECTED_STREAM_HEADER] = self.stream
                await nc.publish(
                    self.wire_subject(record.bus_subject),
                    record.data.encode(),
                    reply=f"{reply}{i}",
                    headers=headers,
                )
            await asyncio.wait_for(asyncio.shield(pending.done), timeout=self.publish_timeout)
        finally:
            del self._pending[token]
        if pending.error is not None:
            raise RuntimeError(f"event {records[pending.error[0]].id}: {pending.error[1]}")

    async def _ack_inbox(self) -> str:
        """The reply subject prefix for PubAcks, subscribed once per connection."""
        if self._ack_prefix is None:
            assert self._nc is not None
            prefix = self._nc.new_inbox()
            await self._nc.subscribe(f"{prefix}.*.*", cb=self._on_ack)
            self._ack_prefix = prefix
        return self._ack_prefix

    async def _on_ack(self, msg: Msg) -> None:
        _, token, index = msg.subject.rsplit(".", 2)
        pending = self._pending.get(token)
        if pending is None:
            return  # an answer after its batch timed out: the relay retries that batch
        error: str | None = None
        if not msg.data:
            status = (msg.headers or {}).get("Status", "?")
            error = f"no stream answered (status {status})"
        else:
            try:
                ack = json.loads(msg.data)
            except ValueError:
                ack = {"error": {"description": f"unreadable PubAck {msg.data[:200]!r}"}}
            if "error" in ack:
                error = str(ack["error"].get("description", ack["error"]))
            elif ack.get("stream") != self.stream:
                error = f"stored in {ack.get('stream')!r}, not {self.stream!r}"
        pending.answer(int(index), error)

    async def subscribe(
        self, consumer: str, subjects: list[str], handler: Handler, *, max_deliver: int
    ) -> NatsSubscription:
        if not subjects:
            raise ValueError("subscribe needs at least one subject")
        if max_deliver < 1:
            raise ValueError("max_deliver must be at least 1")
        base = consumer_name(consumer)
        filters = sorted({self.wire_subject(s) for s in subjects})
        groups: list[tuple[str, list[str]]]
        if len(filters) == 1 or self._supports_filter_subjects():
            groups = [(base, filters)]
        else:
            groups = [(f"{base}_{hashlib.sha1(f.encode()).hexdigest()[:8]}", [f]) for f in filters]
        pullers: list[_Puller] = []
        try:
            for durable, group in groups:
                await self._ensure_consumer(durable, group, max_deliver)
                psub = await self.js.pull_subscribe_bind(durable=durable, stream=self.stream)
                pullers.append(_Puller(self, psub, durable, handler, max_deliver))
        except BaseException:
            for p in pullers:
                await p.stop(0)
            raise
        sub = NatsSubscription(self, pullers)
        self._subs.add(sub)
        return sub

    def _supports_filter_subjects(self) -> bool:
        if self._nc is None:
            return False
        version = self._nc.connected_server_version
        return (version.major, version.minor) >= (2, 10)

    async def _ensure_consumer(self, durable: str, filters: list[str], max_deliver: int) -> None:
        """Create the durable consumer, or update it to this configuration."""
        config = api.ConsumerConfig(
            name=durable,
            durable_name=durable,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=1000,
            replay_policy=api.ReplayPolicy.INSTANT,
        )
        if len(filters) == 1:
            config.filter_subject = filters[0]
        else:
            config.filter_subjects = filters
        info = await self.js.add_consumer(self.stream, config)
        applied = info.config.filter_subjects or (
            [info.config.filter_subject] if info.config.filter_subject else []
        )
        if sorted(applied) != filters:  # e.g. a server that ignores ``filter_subjects``
            raise RuntimeError(
                f"consumer {durable!r} on {self.stream!r} filters {applied}, wanted {filters}"
            )
