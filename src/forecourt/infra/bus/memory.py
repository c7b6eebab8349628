"""The in-process bus: the embedded default, durable on the process's own database.

It keeps the delivery contract of :mod:`forecourt.infra.bus` exactly as JetStream does, a
restart included, with two tables of the ``platform`` schema instead of a broker.

What it stores
    ``subscription``: one row per consumer name, its subject filters as a JSON list.
    :meth:`MemoryBus.subscribe` creates it (or updates its filters) and nothing removes it:
    like a JetStream durable, the consumer exists from then on, while no process runs it
    too, and every event published from then on is kept for it.

    ``delivery``: one row per (consumer, event) not yet settled: the bus subject, the
    CloudEvents binary-mode headers (JSON), the body, ``attempts`` (hand-outs so far,
    crashes included), ``available_at`` (not before) and ``lease_until`` (in flight until).

Publishing
    :meth:`MemoryBus.publish_records` inserts one ``delivery`` row per record and matching
    subscription (NATS wildcard rules on the record's bus subject). With ``conn`` (the
    outbox relay's transaction) the rows are written in that transaction, so the relay's
    delete of the outbox rows and these inserts commit together or not at all: an event is
    neither lost nor doubled between the outbox and the bus. Without ``conn`` it commits a
    transaction of its own. A record whose body and headers exceed ``max_msg_size`` (1 MiB,
    as the JetStream stream) is refused for good (:class:`PublishRefused`); the others of
    the batch are stored.

    De-duplication: an event id whose publish this process committed within the last
    ``duplicate_window`` seconds (at most ``duplicate_ids`` of them) is not stored again.
    The window is this process's own; across processes the consumers' inbox absorbs a
    repeat. (The relay never repeats itself here: its publish and delete are atomic.)

    The subscription list is read from the database and cached for ``subscription_ttl``
    seconds (1 s); a :meth:`subscribe` in this process refreshes it at once. A
    subscription made by *another* process is therefore seen by this process's publishes
    at most ``subscription_ttl`` after it was made; events this process publishes in that
    interval are not kept for it. ``subscription_ttl=0`` reads the list on every publish.

Consuming
    Each :meth:`MemoryBus.subscribe` runs one polling task. It claims up to ``batch_size``
    available rows of its consumer (``available_at`` passed, no running lease), oldest
    first, in one short write transaction: ``attempts + 1`` and a lease of ``ack_wait``
    seconds (on PostgreSQL with ``FOR UPDATE SKIP LOCKED``; SQLite has one writer at a
    time), so several subscriptions with one consumer name, in one process or several,
    share the rows without doubles. Then,
    outside any transaction of the bus (on SQLite the write lock is free while a handler
    runs), it hands the batch to the handler, ``Delivery.attempt`` being the row's
    ``attempts``. While the handler runs, the lease is extended every ``ack_wait / 3``.
    The verdicts are settled in one transaction: ``None`` deletes the row, a delay makes it
    available again that many seconds later. A handler that raises has the whole batch
    retried after ``retry_backoff`` (doubling from the first value by attempt, up to the
    second). A process that dies after a claim leaves its rows leased: ``ack_wait`` later
    they are claimed again, with a higher attempt. A subscription's ``stop()`` lets a
    running batch finish (up to ``stop_grace``) and hands unsettled rows back at once.

    With nothing available a task waits ``poll_interval``, or less: a publish committed in
    this process wakes this process's subscriptions. A publish made by another process is
    seen at the next poll. The bus never drops a delivery by itself (no delivery limit).

    Lease and delay times are wall-clock (UTC), not the database's (possibly simulated)
    clock: they are transport timings, like JetStream's.

Differences from JetStream
    A JetStream durable here is created with ``DeliverPolicy.ALL`` and receives the
    stream's history. This bus keeps no history: events published before a consumer's
    ``subscription`` row existed are not kept for it, and an event no subscription matches
    is stored nowhere. Delivery rows are deleted once settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.infra.background import cancel_and_wait
from forecourt.infra.bus import (
    BatchHandler,
    Delivery,
    PublishRefused,
    Verdict,
    subject_matches,
)
from forecourt.infra.db import Database, delivery_table, subscription_table
from forecourt.infra.logging import get_logger
from forecourt.kernel.events import Envelope, EventRecord

log = get_logger("forecourt.bus.memory")

MAX_MSG_SIZE = 1024**2  # as the JetStream stream's max_msg_size


def _now() -> datetime:
    return datetime.now(UTC)


class _Claimed:
    """One claimed row: what the handler gets and the attempt this process holds."""

    __slots__ = ("attempt", "delivery", "id")

    def __init__(self, row: Any, attempt: int) -> None:
        self.id: int = row.id
        self.attempt = attempt
        try:
            headers = json.loads(row.headers)
        except ValueError:
            headers = {}  # the consumer host dead-letters it as malformed
        self.delivery = Delivery(row.event_id, attempt, headers, row.body.encode(), row.subject)


class _MemorySubscription:
    """The polling task of one ``subscribe`` call."""

    def __init__(
        self,
        bus: MemoryBus,
        consumer: str,
        subjects: list[str],
        handler: BatchHandler,
        batch_size: int,
    ) -> None:
        self.bus = bus
        self.consumer = consumer
        self.subjects = subjects
        self.handler = handler
        self.batch_size = batch_size
        self.wake = asyncio.Event()
        self.stopping = False
        self.held: list[_Claimed] = []  # claimed, not yet settled
        self.busy = False  # between a claim and its settlement
        self.task = asyncio.create_task(self._run(), name=f"memory-bus:{consumer}")

    async def _run(self) -> None:
        bus = self.bus
        failures = 0
        while not self.stopping:
            self.wake.clear()  # before the claim: a publish committed after it wakes us
            try:
                claimed = await bus._claim(self.consumer, self.batch_size)
            except Exception as exc:  # noqa: BLE001 - database unreachable, ...: retry
                failures += 1
                log.warning("bus.claim_failed", consumer=self.consumer, error=repr(exc))
                await self._idle(min(0.1 * 2**failures, 5.0))
                continue
            failures = 0
            if not claimed:
                await self._idle(bus.poll_interval)
                continue
            self.busy = True
            self.held = claimed
            try:
                verdicts = await self._handle(claimed)
                await bus._settle(self.consumer, claimed, verdicts)
                self.held = []
            except Exception as exc:  # noqa: BLE001 - not settled: the lease runs out
                log.warning("bus.settle_failed", consumer=self.consumer, error=repr(exc))
                self.held = []
            finally:
                self.busy = False

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)

    async def _handle(self, claimed: list[_Claimed]) -> Sequence[Verdict]:
        deliveries = [c.delivery for c in claimed]
        keep_alive = asyncio.create_task(self._keep_alive(claimed))
        try:
            verdicts = await self.handler(deliveries)
            if len(verdicts) != len(deliveries):
                raise ValueError(f"{len(verdicts)} verdicts for {len(deliveries)} deliveries")
            return verdicts
        except Exception as exc:  # noqa: BLE001 - a failing handler means redeliver, never lose
            log.warning(
                "bus.handler_failed",
                consumer=self.consumer,
                deliveries=len(deliveries),
                error=repr(exc),
            )
            return [self.bus.retry_delay(c.attempt) for c in claimed]
        finally:
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_alive

    async def _keep_alive(self, claimed: list[_Claimed]) -> None:
        """Extend the lease while the handler runs (JetStream: progress acks)."""
        while True:
            await asyncio.sleep(self.bus.ack_wait / 3)
            try:
                await self.bus._extend(claimed)
            except Exception as exc:  # noqa: BLE001 - at worst a redelivery later
                log.warning("bus.lease_extend_failed", consumer=self.consumer, error=repr(exc))

    async def stop(self) -> None:
        """Stop polling: a running batch may finish (up to ``stop_grace``); rows claimed and
        not settled are handed back at once rather than after ``ack_wait``."""
        self.stopping = True
        self.wake.set()  # an idle wait ends now, and the loop sees ``stopping``
        # Not cancelled at once: a claim in progress is a database call, and a cancelled
        # aiosqlite call can leave its connection's close waiting for ever.
        done, _ = await asyncio.wait({self.task}, timeout=self.bus.stop_grace)
        if not done:
            await cancel_and_wait(self.task)
        if not self.task.cancelled() and self.task.exception() is not None:
            log.warning(
                "bus.subscription_failed", consumer=self.consumer, error=repr(self.task.exception())
            )
        held, self.held = self.held, []
        if held:
            try:
                await self.bus._release(held)
            except Exception as exc:  # noqa: BLE001 - the lease runs out instead
                log.warning("bus.release_failed", consumer=self.consumer, error=repr(exc))
        self.bus._subs.discard(self)


class _AfterCommit:
    """Runs once when the caller's transaction commits; nothing when it rolls back."""

    def __init__(self, bus: MemoryBus, ids: list[str]) -> None:
        self.bus = bus
        self.ids = ids
        self.done = False

    def commit(self, _conn: Any) -> None:
        if not self.done:
            self.done = True
            self.bus._committed(self.ids)

    def rollback(self, _conn: Any) -> None:
        self.done = True


class MemoryBus:
    """The :class:`~forecourt.infra.bus.Bus` on the embedded database (see the module
    docstring)."""

    transactional = True

    def __init__(
        self,
        db: Database,
        *,
        ack_wait: float = 30.0,
        poll_interval: float = 0.05,
        retry_backoff: tuple[float, float] = (0.5, 30.0),
        max_msg_size: int = MAX_MSG_SIZE,
        duplicate_window: float = 120.0,
        duplicate_ids: int = 100_000,
        subscription_ttl: float = 1.0,
        stop_grace: float = 10.0,
    ) -> None:
        self.db = db
        self.ack_wait = ack_wait
        self.poll_interval = poll_interval
        self.retry_backoff = retry_backoff
        self.max_msg_size = max_msg_size
        self.duplicate_window = duplicate_window
        self.duplicate_ids = duplicate_ids
        self.subscription_ttl = subscription_ttl
        self.stop_grace = stop_grace
        self.published = 0  # delivery rows written by this process (committed or not)
        self._subs: set[_MemorySubscription] = set()
        self._seen: OrderedDict[str, float] = OrderedDict()  # event id -> committed at
        self._filters: list[tuple[str, list[str]]] = []
        self._filters_at: float | None = None
        self._closed = False

    def retry_delay(self, attempt: int) -> float:
        base, cap = self.retry_backoff
        return float(min(base * 2 ** max(attempt - 1, 0), cap))

    # --- lifecycle ------------------------------------------------------------------

    async def connect(self) -> None:
        self._closed = False

    async def close(self) -> None:
        """Stop every polling task; the rows stay for the next run."""
        self._closed = True
        await asyncio.gather(*(sub.stop() for sub in list(self._subs)))

    async def ready(self) -> bool:
        return not self._closed

    # --- publishing -----------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        await self.publish_records([envelope.record()])

    async def publish_records(
        self, records: Sequence[EventRecord], *, conn: AsyncConnection | None = None
    ) -> None:
        if not records:
            return
        if conn is None:
            refused: PublishRefused | None = None
            async with self.db.begin() as uow:
                try:
                    await self._store(records, uow.conn)
                except PublishRefused as exc:  # the others are stored: commit them
                    refused = exc
            if refused is not None:
                raise refused
            return
        if conn.engine.url != self.db.engine.url:
            raise ValueError(
                "publish_records(conn=...) needs a transaction on the bus's own database"
            )
        await self._store(records, conn)

    async def _store(self, records: Sequence[EventRecord], conn: AsyncConnection) -> None:
        consumers_by_subject: dict[str, list[str]] = {}
        filters = await self._subscriptions(conn)
        self._forget_old()
        now = _now()
        refused: dict[int, str] = {}
        rows: list[dict[str, Any]] = []
        ids: list[str] = []
        batch_ids: set[str] = set()
        for i, record in enumerate(records):
            headers = json.dumps(record.headers())
            # A str of n characters is at most 4n bytes: encode only when it may be too big.
            if len(record.data) * 4 + len(headers) > self.max_msg_size:
                size = len(record.data.encode()) + len(headers.encode())
                if size > self.max_msg_size:
                    refused[i] = (
                        f"message size {size} exceeds maximum allowed ({self.max_msg_size})"
                    )
                    continue
            if record.id in self._seen or record.id in batch_ids:
                continue  # within the duplicate window: already stored
            batch_ids.add(record.id)
            ids.append(record.id)
            subject = record.bus_subject
            consumers = consumers_by_subject.get(subject)
            if consumers is None:
                consumers = [
                    name
                    for name, patterns in filters
                    if any(subject_matches(p, subject) for p in patterns)
                ]
                consumers_by_subject[subject] = consumers
            for name in consumers:
                rows.append(
                    {
                        "consumer": name,
                        "event_id": record.id,
                        "subject": subject,
                        "headers": headers,
                        "body": record.data,
                        "attempts": 0,
                        "available_at": now,
                        "lease_until": None,
                        "created_at": now,
                    }
                )
        if rows:
            await conn.execute(delivery_table.insert(), rows)
            self.published += len(rows)
        if ids:
            hook = _AfterCommit(self, ids)
            sync_conn = conn.sync_connection
            assert sync_conn is not None
            event.listen(sync_conn, "commit", hook.commit, once=True)
            event.listen(sync_conn, "rollback", hook.rollback, once=True)
        if refused:
            raise PublishRefused(refused)

    def _committed(self, ids: list[str]) -> None:
        """A publish committed: remember its ids (duplicate window), wake the pollers."""
        if self.duplicate_window > 0 and self.duplicate_ids > 0:
            at = time.monotonic()
            for event_id in ids:
                self._seen[event_id] = at
                self._seen.move_to_end(event_id)
            while len(self._seen) > self.duplicate_ids:
                self._seen.popitem(last=False)
        for sub in self._subs:
            sub.wake.set()

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.duplicate_window
        seen = self._seen
        while seen:
            first = next(iter(seen))
            if seen[first] > horizon:
                break
            del seen[first]

    async def _subscriptions(self, conn: AsyncConnection) -> list[tuple[str, list[str]]]:
        """The subscriptions (consumer, filters), cached for ``subscription_ttl``."""
        loaded = self._filters_at
        if loaded is not None and time.monotonic() - loaded < self.subscription_ttl:
            return self._filters
        t = subscription_table
        result = await conn.execute(sa.select(t.c.consumer, t.c.subjects))
        self._filters = [(r.consumer, list(json.loads(r.subjects))) for r in result]
        self._filters_at = time.monotonic()
        return self._filters

    # --- consuming ------------------------------------------------------------------

    async def subscribe(
        self,
        consumer: str,
        subjects: list[str],
        handler: BatchHandler,
        *,
        batch_size: int = 100,
    ) -> _MemorySubscription:
        if not subjects:
            raise ValueError("subscribe needs at least one subject")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        filters = sorted(set(subjects))
        now = _now()
        t = subscription_table
        insert = sqlite_insert if self.db.is_sqlite else pg_insert
        stmt = insert(t).values(
            consumer=consumer, subjects=json.dumps(filters), created_at=now, updated_at=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.consumer],
            set_={"subjects": stmt.excluded.subjects, "updated_at": stmt.excluded.updated_at},
        )
        async with self.db.begin() as uow:
            await uow.conn.execute(stmt)
        self._filters_at = None  # this process's next publish sees it
        sub = _MemorySubscription(self, consumer, filters, handler, batch_size)
        self._subs.add(sub)
        return sub

    async def _claim(self, consumer: str, limit: int) -> list[_Claimed]:
        t = delivery_table
        now = _now()
        query = (
            sa.select(t.c.id, t.c.event_id, t.c.subject, t.c.headers, t.c.body, t.c.attempts)
            .where(
                t.c.consumer == consumer,
                t.c.available_at <= now,
                sa.or_(t.c.lease_until.is_(None), t.c.lease_until <= now),
            )
            .order_by(t.c.id)
            .limit(limit)
        )
        if not self.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        async with self.db.begin() as uow:
            rows = (await uow.conn.execute(query)).all()
            if not rows:
                return []
            await uow.conn.execute(
                t.update()
                .where(t.c.id.in_([r.id for r in rows]))
                .values(
                    attempts=t.c.attempts + 1, lease_until=now + timedelta(seconds=self.ack_wait)
                )
            )
        return [_Claimed(r, r.attempts + 1) for r in rows]

    async def _settle(
        self, consumer: str, claimed: list[_Claimed], verdicts: Sequence[Verdict]
    ) -> None:
        """One transaction for a batch: settled rows deleted, the others delayed. A row
        claimed again by someone else since (this lease ran out) is theirs to delay."""
        t = delivery_table
        done = [c.id for c, v in zip(claimed, verdicts, strict=True) if v is None]
        now = _now()
        later = [
            {
                "b_id": c.id,
                "b_attempts": c.attempt,
                "b_at": now + timedelta(seconds=max(float(v), 0.0)),
            }
            for c, v in zip(claimed, verdicts, strict=True)
            if v is not None
        ]
        async with self.db.begin() as uow:
            if done:
                await uow.conn.execute(t.delete().where(t.c.id.in_(done)))
            if later:
                await uow.conn.execute(
                    t.update()
                    .where(t.c.id == sa.bindparam("b_id"))
                    .where(t.c.attempts == sa.bindparam("b_attempts"))
                    .values(available_at=sa.bindparam("b_at"), lease_until=None),
                    later,
                )
        if later:
            log.debug("bus.redelivery_scheduled", consumer=consumer, deliveries=len(later))

    async def _extend(self, claimed: list[_Claimed]) -> None:
        await self._update_held(claimed, _now() + timedelta(seconds=self.ack_wait))

    async def _release(self, claimed: list[_Claimed]) -> None:
        await self._update_held(claimed, None)

    async def _update_held(self, claimed: list[_Claimed], lease: datetime | None) -> None:
        t = delivery_table
        async with self.db.begin() as uow:
            await uow.conn.execute(
                t.update()
                .where(t.c.id == sa.bindparam("b_id"))
                .where(t.c.attempts == sa.bindparam("b_attempts"))
                .values(lease_until=lease),
                [{"b_id": c.id, "b_attempts": c.attempt} for c in claimed],
            )

    async def pending(self, consumer: str) -> int | None:
        """Delivery rows of ``consumer`` (waiting or in flight); None without its
        subscription row."""
        async with self.db.connection() as conn:
            known = await conn.scalar(
                sa.select(subscription_table.c.consumer).where(
                    subscription_table.c.consumer == consumer
                )
            )
            if known is None:
                return None
            count = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(delivery_table)
                .where(delivery_table.c.consumer == consumer)
            )
        return int(count or 0)
