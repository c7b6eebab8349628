"""The consumer host: every event processed by each of its consumers, or dead-lettered.

A context registers a consumer in one line::

    BOOKINGS = Consumer("loyalty.bookings", ("forecourt.sales.sale.completed.v1",), book_points)

and :class:`ConsumerHost` (``forecourt worker``, and inside ``forecourt serve`` unless told
otherwise) runs it on either bus with the same guarantees:

Inbox
    The handler runs in a unit of work together with the insert of (consumer, event id) into
    ``platform.inbox``; a repeat delivery finds the row and does nothing. Deliveries come in
    batches: one transaction applies every new event of a batch and its inbox rows, so a
    consumer keeps up with ingest. When a batch fails, its events are retried one by one,
    so one poison event costs only itself.

Budget and dead letters
    An event whose handler keeps failing is dead-lettered after ``max_deliver`` attempts:
    stored in ``platform.dead_letter`` (headers, body, error, deliveries), *then* settled.
    The attempt is the bus's delivery count (crashes included: a consumer killed during its
    last allowed attempt is redelivered past its budget and dead-lettered without running
    again). The database's own failures never add to it: they are waited out in place (see
    Outages), so the count a restarted host finds is the handler's attempts and the
    crashes, never an outage's. A message is settled only once its effect or its dead letter is
    durable: when the dead-letter store cannot be written the message stays pending and
    comes back later. A malformed message (headers or body that are not an event) is
    dead-lettered as it arrived.

Outages
    A failure after which the database does not answer is an outage, not a handler error:
    the host keeps the batch in hand (the bus keeps it alive: progress acks on JetStream,
    lease extensions on the in-process bus), raises its alarm (``outage`` in
    :meth:`ConsumerHost.health`, ``consumer.outage`` in the log once per episode), checks
    the database with a growing pause (up to ``outage_backoff[1]``) and, once it answers,
    applies the batch; no other batch is started meanwhile. A connection that dropped under
    the handler while the database answers at once is tried again in place, up to
    ``DROPS_RIDDEN_OUT`` times. Either way nothing is redelivered for the database's sake,
    so a long outage followed by a crash does not dead-letter events that never failed.

Replay
    ``forecourt events replay ID|--all`` marks dead letters; the host takes marked rows of
    its consumers and runs them through the same inbox transaction, deleting the dead letter
    when the effect commits (or updating it with the new error).

Retention
    Every ``retention_interval`` the host purges inbox rows older than ``inbox_retention``
    (keep it longer than the stream's ``max_age``: an event redelivered after its inbox row
    is gone would take effect again), dead letters older than ``dead_letter_retention`` that
    nobody asked to replay, and expired idempotency records.

Crash points (for tests): ``consumer.last_delivery`` (a batch holding an attempt equal to
the budget, before its handlers run) and ``consumer.after_effect`` (committed, not settled).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from forecourt.infra.background import cancel_and_wait
from forecourt.infra.bus import Bus, Delivery, Subscription, Verdict
from forecourt.infra.crash import crash_point
from forecourt.infra.db import (
    Database,
    UnitOfWork,
    asyncpg_connection,
    dead_letter_table,
    idempotency_table,
    inbox_table,
)
from forecourt.infra.logging import get_logger, trace_id_var
from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.events import Envelope, trace_id_of

LOOP_STOP_GRACE_S = 5.0  # a housekeeping step running at stop may finish within this

log = get_logger("forecourt.consumers")

# The inbox claim on PostgreSQL: the ids it did not hold yet come back.
_CLAIM_SQL = (
    "INSERT INTO platform.inbox (consumer, event_id, processed_at) "
    "SELECT $1, unnest($2::varchar[]), $3 "
    "ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id"
)

EffectHandler = Callable[[Envelope, UnitOfWork], Awaitable[None]]
BatchEffectHandler = Callable[[Sequence[Envelope], UnitOfWork], Awaitable[None]]


@dataclass(frozen=True)
class Consumer:
    """A named consumer: the subjects it takes and the effect of one event.

    ``handle(envelope, uow)`` writes its effect through ``uow`` (and nothing outside the
    database: it runs inside the transaction, which on SQLite holds the one write lock);
    raising means "not now" and counts one attempt. ``default``: run by ``forecourt serve``
    and ``forecourt worker`` when no consumers are named.
    """

    name: str
    subjects: tuple[str, ...]
    handle: EffectHandler
    max_deliver: int = 5
    batch_size: int = 100
    default: bool = True
    description: str = ""
    # Optional: the effect of many events at once (e.g. one multi-row insert), used for
    # every batch instead of ``handle`` per event; it must equal ``handle`` applied to each.
    handle_many: BatchEffectHandler | None = None
    # Batches in flight at once in one host process (each its own subscription sharing the
    # durable): while one waits for the database, the next is fetched and prepared (always
    # one on SQLite). The handler must be safe under that, as it is across processes (the
    # inbox makes it so).
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 100:
            raise ValueError("a consumer needs a name of 1 to 100 characters")
        if not self.subjects:
            raise ValueError(f"consumer {self.name!r} takes no subjects")
        if self.max_deliver < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise ValueError(
                f"consumer {self.name!r}: max_deliver, batch_size and concurrency must be >= 1"
            )


@dataclass(frozen=True)
class DeadLetter:
    id: int
    consumer: str
    event_id: str
    type: str
    subject: str
    deliveries: int
    error: str
    dead_at: datetime
    replay_requested_at: datetime | None
    replays: int
    headers: dict[str, str]
    body: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "consumer": self.consumer,
            "event_id": self.event_id,
            "type": self.type,
            "subject": self.subject,
            "deliveries": self.deliveries,
            "error": self.error,
            "dead_at": self.dead_at.isoformat(),
            "replay_requested_at": (
                self.replay_requested_at.isoformat() if self.replay_requested_at else None
            ),
            "replays": self.replays,
            "headers": self.headers,
            "body": self.body,
        }


def _dead_letter(row: Any) -> DeadLetter:
    try:
        headers = json.loads(row.headers)
    except ValueError:
        headers = {}
    return DeadLetter(
        id=row.id,
        consumer=row.consumer,
        event_id=row.event_id,
        type=row.type,
        subject=row.subject,
        deliveries=row.deliveries,
        error=row.error,
        dead_at=row.dead_at,
        replay_requested_at=row.replay_requested_at,
        replays=row.replays,
        headers=headers if isinstance(headers, dict) else {},
        body=row.body,
    )


# --- the dead-letter store (also used by ``forecourt events``) ----------------------------


async def list_dead_letters(
    db: Database, *, consumer: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    """Dead letters, oldest first (of one consumer when named)."""
    t = dead_letter_table
    query = sa.select(t).order_by(t.c.id).limit(limit)
    if consumer is not None:
        query = query.where(t.c.consumer == consumer)
    async with db.connection() as conn:
        return [_dead_letter(r) for r in (await conn.execute(query)).all()]


async def get_dead_letter(db: Database, dead_letter_id: int) -> DeadLetter | None:
    t = dead_letter_table
    async with db.connection() as conn:
        row = (await conn.execute(sa.select(t).where(t.c.id == dead_letter_id))).first()
    return None if row is None else _dead_letter(row)


async def count_dead_letters(db: Database) -> dict[str, int]:
    """Dead letters per consumer."""
    t = dead_letter_table
    async with db.connection() as conn:
        rows = (
            await conn.execute(sa.select(t.c.consumer, sa.func.count()).group_by(t.c.consumer))
        ).all()
    return {r[0]: int(r[1]) for r in rows}


async def request_replay(
    db: Database, ids: Sequence[int] | None = None, *, consumer: str | None = None
) -> int:
    """Mark dead letters for replay (``ids``; None: every one, of ``consumer`` when named);
    returns how many were marked. A running consumer host replays them within seconds."""
    t = dead_letter_table
    stmt = t.update().values(replay_requested_at=db.clock.now())
    if ids is not None:
        stmt = stmt.where(t.c.id.in_(list(ids)))
    if consumer is not None:
        stmt = stmt.where(t.c.consumer == consumer)
    async with db.begin() as uow:
        result = await uow.conn.execute(stmt)
    return int(result.rowcount or 0)


# --- the host ---------------------------------------------------------------------------


# A batch whose connection dropped under it (the database answering again at once) is tried
# again in place this many times; beyond this it counts as the handler failing, so a handler
# whose own connection keeps failing still ends in the dead-letter store. An outage (the
# database does not answer) is waited out however long it lasts.
DROPS_RIDDEN_OUT = 50

_CONNECTION_ERRORS = (
    "ConnectionDoesNotExistError",
    "ConnectionFailureError",
    "InterfaceError",
    "CannotConnectNowError",
    "ConnectionRefusedError",
    "ConnectionResetError",
)


def _lost_connection(exc: BaseException) -> bool:
    """Whether ``exc`` (or a cause) is the database connection failing, not the handler."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "connection_invalidated", False):
            return True
        if isinstance(current, (ConnectionError, TimeoutError)) or any(
            cls.__name__ in _CONNECTION_ERRORS for cls in type(current).__mro__
        ):
            return True
        if "connection was closed" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _backoff(base: float, cap: float, n: int) -> float:
    return float(min(cap, base * 2 ** max(0, min(n - 1, 30))))


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.processed = Counter(
            "forecourt_consumer_processed",
            "Events a consumer applied (this process)",
            ["consumer"],
            **kw,
        )
        self.dead = Counter(
            "forecourt_consumer_dead_lettered",
            "Events a consumer dead-lettered (this process)",
            ["consumer"],
            **kw,
        )
        self.retries = Counter(
            "forecourt_consumer_retries",
            "Deliveries handed back to be tried again (this process)",
            ["consumer"],
            **kw,
        )
        self.lag = Histogram(
            "forecourt_consumer_lag_seconds",
            "Event time to the consumer's effect committed",
            ["consumer"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            **kw,
        )
        self.pending = Gauge(
            "forecourt_consumer_pending",
            "Events not yet settled by the consumer (from the bus)",
            ["consumer"],
            **kw,
        )
        self.dead_letters = Gauge(
            "forecourt_dead_letters",
            "Dead letters stored for the consumer (from the database)",
            ["consumer"],
            **kw,
        )
        self.outage = Gauge(
            "forecourt_consumer_outage",
            "1 while the consumer host cannot reach its database",
            **kw,
        )


class ConsumerHost:
    """Runs consumers on a bus against a database (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        consumers: Sequence[Consumer],
        *,
        registry: CollectorRegistry | None = None,
        retry_backoff: tuple[float, float] = (0.5, 30.0),
        outage_backoff: tuple[float, float] = (0.2, 2.0),
        replay_interval: float = 1.0,
        monitor_interval: float = 5.0,
        retention_interval: float = 3600.0,
        inbox_retention: timedelta = timedelta(days=14),
        dead_letter_retention: timedelta = timedelta(days=90),
        pending_alarm: int = 100_000,
    ) -> None:
        names = [c.name for c in consumers]
        if len(set(names)) != len(names):
            raise ValueError(f"consumer names repeat: {names}")
        self.db = db
        self.bus = bus
        self.consumers = {c.name: c for c in consumers}
        self.retry_backoff = retry_backoff
        self.outage_backoff = outage_backoff
        self.replay_interval = replay_interval
        self.monitor_interval = monitor_interval
        self.retention_interval = retention_interval
        self.inbox_retention = inbox_retention
        self.dead_letter_retention = dead_letter_retention
        self.pending_alarm = pending_alarm
        self.metrics = _Metrics(registry) if registry is not None else None
        self.processed: dict[str, int] = dict.fromkeys(names, 0)
        self.skipped: dict[str, int] = dict.fromkeys(names, 0)
        self.dead: dict[str, int] = dict.fromkeys(names, 0)
        self.replayed: dict[str, int] = dict.fromkeys(names, 0)
        self.last_error: dict[str, str | None] = dict.fromkeys(names)
        self.outage = False
        self._outages_in_a_row = 0
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Set by stop(): the housekeeping loops end after the step they are in, so a stop
        # never cancels a database call mid-way (a cancelled aiosqlite call can leave its
        # connection's close waiting for a worker thread that is gone).
        self._stopping = asyncio.Event()
        self.alarms: dict[str, str] = {}

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        for consumer in self.consumers.values():
            handler = self._batch_handler(consumer)
            # SQLite has one writer: batches side by side would only queue for its lock.
            for _ in range(1 if self.db.is_sqlite else consumer.concurrency):
                self._subs.append(
                    await self.bus.subscribe(
                        consumer.name,
                        list(consumer.subjects),
                        handler,
                        batch_size=consumer.batch_size,
                    )
                )
        loops = (
            ("consumer-replay", self._replay_loop),
            ("consumer-monitor", self._monitor_loop),
            ("consumer-retention", self._retention_loop),
        )
        for name, loop in loops:
            self._tasks.append(asyncio.create_task(self._supervised(loop), name=name))
        log.info("consumers.started", consumers=sorted(self.consumers))

    async def stop(self) -> None:
        self._stopping.set()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.stop()
        self._subs.clear()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=LOOP_STOP_GRACE_S)
            await cancel_and_wait(*late)
        for task in self._tasks:
            if not task.cancelled():
                task.exception()  # retrieved: its failure was logged by the loop itself
        self._tasks.clear()

    async def _pause(self, seconds: float) -> bool:
        """Sleep between two steps of a housekeeping loop; False once the host is stopping."""
        if not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    async def _supervised(self, loop: Callable[[], Awaitable[None]]) -> None:
        while not self._stopping.is_set():
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a housekeeping loop must not die
                log.warning("consumers.loop_failed", error=f"{type(exc).__name__}: {exc}")
                await self._pause(1.0)

    def health(self) -> dict[str, Any]:
        return {
            "outage": self.outage,
            "alarms": dict(self.alarms),
            "consumers": {
                name: {
                    "processed": self.processed[name],
                    "skipped": self.skipped[name],
                    "dead_lettered": self.dead[name],
                    "replayed": self.replayed[name],
                    "last_error": self.last_error[name],
                }
                for name in self.consumers
            },
        }

    # --- deliveries -------------------------------------------------------------------

    def _batch_handler(
        self, consumer: Consumer
    ) -> Callable[[Sequence[Delivery]], Awaitable[Sequence[Verdict]]]:
        async def on_batch(deliveries: Sequence[Delivery]) -> Sequence[Verdict]:
            return await self.handle_batch(consumer, deliveries)

        return on_batch

    async def handle_batch(
        self, consumer: Consumer, deliveries: Sequence[Delivery]
    ) -> list[Verdict]:
        """The verdict for each delivery of a batch (the bus settles or redelivers)."""
        verdicts: list[Verdict] = [None] * len(deliveries)
        if self.outage:
            await self._ride_out_outage()  # no more work before the database answers
        todo: list[tuple[int, Delivery, Envelope]] = []
        for i, delivery in enumerate(deliveries):
            try:
                envelope = delivery.envelope()
            except InvalidValue as exc:
                verdicts[i] = await self._dead_letter(consumer, delivery, None, f"malformed: {exc}")
                continue
            if delivery.attempt > consumer.max_deliver:
                why = (
                    f"delivery budget of {consumer.max_deliver} used up without an outcome "
                    "(the consumer stopped during an earlier attempt)"
                )
                verdicts[i] = await self._dead_letter(consumer, delivery, envelope, why)
                continue
            todo.append((i, delivery, envelope))
        if not todo:
            return verdicts
        failure = await self._apply_riding_out(consumer, todo)
        if failure is None:
            return verdicts
        if len(todo) == 1:
            i, delivery, envelope = todo[0]
            verdicts[i] = await self._failed(consumer, delivery, envelope, failure)
            return verdicts
        for item in todo:  # one poison event costs only itself
            one = await self._apply_riding_out(consumer, [item])
            if one is not None:
                verdicts[item[0]] = await self._failed(consumer, item[1], item[2], one)
        return verdicts

    async def _apply_riding_out(
        self, consumer: Consumer, items: Sequence[tuple[int, Delivery, Envelope]]
    ) -> Exception | None:
        """:meth:`_apply`, with the database's failures waited out in place: an outage for
        as long as it lasts, a dropped connection up to ``DROPS_RIDDEN_OUT`` times. Returns
        the handler's own failure, or None once applied. The batch is never handed back for
        the database's sake, so its delivery count (the budget) does not grow meanwhile."""
        drops = 0
        while True:
            try:
                await self._apply(consumer, items)
                return None
            except Exception as exc:  # noqa: BLE001 - classified below, never lost
                failure = await self._database_failed(exc)
                if failure == "outage":
                    await self._ride_out_outage()
                    continue
                if failure == "dropped" and drops < DROPS_RIDDEN_OUT:
                    drops += 1
                    if self.metrics is not None:
                        self.metrics.retries.labels(consumer.name).inc()
                    await asyncio.sleep(_backoff(*self.outage_backoff, drops))
                    continue
                return exc

    async def _ride_out_outage(self) -> None:
        """Return once the database answers (checked with a growing pause meanwhile)."""
        while not await self._database_answers():
            pass

    async def _apply(
        self, consumer: Consumer, items: Sequence[tuple[int, Delivery, Envelope]]
    ) -> None:
        """Apply every new event of ``items`` with its inbox row, in one transaction."""
        name = consumer.name
        async with self.db.begin() as uow:
            if any(d.attempt >= consumer.max_deliver for _, d, _ in items):
                crash_point("consumer.last_delivery")
            unique: dict[str, Envelope] = {}
            for _, _delivery, envelope in items:
                unique.setdefault(envelope.id, envelope)
            # The inbox rows first, in one statement: the ids it did not already hold are the
            # events to apply (a concurrent delivery's row makes this one wait for its commit,
            # then skip). No lookup that scans the inbox.
            claimed = await self._claim(uow, name, list(unique))
            applied = [env for event_id, env in unique.items() if event_id in claimed]
            if applied and consumer.handle_many is not None:
                await consumer.handle_many(applied, uow)
            else:
                for envelope in applied:
                    token = trace_id_var.set(trace_id_of(envelope.traceparent))
                    try:
                        await consumer.handle(envelope, uow)
                    finally:
                        trace_id_var.reset(token)
        crash_point("consumer.after_effect")
        self.processed[name] += len(applied)
        self.skipped[name] += len(items) - len(applied)
        if self.metrics is not None and applied:
            self.metrics.processed.labels(name).inc(len(applied))
            wall = self.db.clock.now()
            for env in applied:
                self.metrics.lag.labels(name).observe(max(0.0, (wall - env.time).total_seconds()))
        if self.outage:
            self._outage_over()

    async def _claim(self, uow: UnitOfWork, name: str, ids: list[str]) -> set[str]:
        """Insert the inbox rows of ``ids`` that are not there yet; returns those ids."""
        if not ids:
            return set()
        now = self.db.clock.now()
        if not self.db.is_sqlite:
            # One prepared statement whatever the batch size (a multi-row VALUES would be
            # compiled again for every batch: most of the host's CPU per event).
            apg = await asyncpg_connection(uow.conn)
            rows = await apg.fetch(_CLAIM_SQL, name, ids, now)
            return {r[0] for r in rows}
        stmt = (
            sqlite_insert(inbox_table)
            .values([{"consumer": name, "event_id": i, "processed_at": now} for i in ids])
            .on_conflict_do_nothing(index_elements=["consumer", "event_id"])
            .returning(inbox_table.c.event_id)
        )
        return set((await uow.conn.execute(stmt)).scalars())

    async def _failed(
        self, consumer: Consumer, delivery: Delivery, envelope: Envelope, exc: Exception
    ) -> Verdict:
        """One event's handler failed (the database answers): a retry, or the last attempt."""
        name = consumer.name
        error = f"{type(exc).__name__}: {exc}"
        self.last_error[name] = error
        attempt = delivery.attempt
        if attempt >= consumer.max_deliver:
            return await self._dead_letter(consumer, delivery, envelope, error)
        delay = _backoff(*self.retry_backoff, attempt)
        log.warning(
            "consumer.retry",
            consumer=name,
            event_id=envelope.id,
            attempt=attempt,
            retry_in_s=delay,
            error=error,
        )
        if self.metrics is not None:
            self.metrics.retries.labels(name).inc()
        return delay

    async def _database_failed(self, exc: Exception) -> Literal["outage", "dropped"] | None:
        """Whether a failure was the database's: it does not answer now (an outage), or the
        connection dropped under the handler though the database answers again."""
        if not await self._database_answers():
            return "outage"
        if _lost_connection(exc):
            return "dropped"
        return None

    async def _database_answers(self) -> bool:
        """Whether the database takes a write now; the first failure starts an outage."""
        try:
            async with self.db.begin() as uow:
                await uow.conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure to answer is an outage
            self._outages_in_a_row += 1
            if not self.outage:
                self.outage = True
                self.alarms["outage"] = f"database unreachable: {type(exc).__name__}: {exc}"
                log.error("consumer.outage", error=self.alarms["outage"])
                if self.metrics is not None:
                    self.metrics.outage.set(1)
            await asyncio.sleep(_backoff(*self.outage_backoff, self._outages_in_a_row))
            return False
        if self.outage:
            self._outage_over()
        return True

    def _outage_over(self) -> None:
        self.outage = False
        self._outages_in_a_row = 0
        self.alarms.pop("outage", None)
        log.info("consumer.outage_over")
        if self.metrics is not None:
            self.metrics.outage.set(0)

    async def _dead_letter(
        self, consumer: Consumer, delivery: Delivery, envelope: Envelope | None, error: str
    ) -> Verdict:
        """Store the dead letter, then settle; if it cannot be stored, hand it back."""
        name = consumer.name
        now = self.db.clock.now()
        values = {
            "consumer": name,
            "event_id": (
                envelope.id if envelope else delivery.event_id or f"unreadable-{now.timestamp()}"
            ),
            "type": envelope.type if envelope else delivery.headers.get("ce-type", "?")[:200],
            "subject": delivery.subject[:200],
            "headers": json.dumps(delivery.headers, sort_keys=True),
            "body": delivery.body.decode("utf-8", "replace"),
            "deliveries": delivery.attempt,
            "error": error,
            "dead_at": now,
        }
        insert = sqlite_insert if self.db.is_sqlite else pg_insert
        stmt = insert(dead_letter_table).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["consumer", "event_id"],
            set_={
                "deliveries": stmt.excluded.deliveries,
                "error": stmt.excluded.error,
                "dead_at": stmt.excluded.dead_at,
                "replay_requested_at": None,
            },
        )
        try:
            async with self.db.begin() as uow:
                await uow.conn.execute(stmt)
        except Exception as exc:  # noqa: BLE001 - not stored: the message stays pending
            log.error(
                "consumer.dead_letter_failed",
                consumer=name,
                event_id=values["event_id"],
                error=f"{type(exc).__name__}: {exc}",
            )
            await self._database_answers()
            # Handed back with a pause: the budget is already spent, so the redelivery is
            # dead-lettered again without running.
            return _backoff(*self.outage_backoff, max(1, self._outages_in_a_row))
        self.dead[name] += 1
        if self.metrics is not None:
            self.metrics.dead.labels(name).inc()
        log.error(
            "consumer.dead_lettered",
            consumer=name,
            event_id=values["event_id"],
            type=values["type"],
            deliveries=delivery.attempt,
            error=error,
        )
        return None

    # --- replay, monitoring, retention -------------------------------------------------

    async def replay_once(self) -> int:
        """Run the dead letters marked for replay of this host's consumers; returns how many
        took effect (or were already in effect)."""
        t = dead_letter_table
        async with self.db.connection() as conn:
            rows = (
                await conn.execute(
                    sa.select(t)
                    .where(
                        t.c.replay_requested_at.is_not(None),
                        t.c.consumer.in_(list(self.consumers)),
                    )
                    .order_by(t.c.id)
                    .limit(100)
                )
            ).all()
        done = 0
        for row in rows:
            consumer = self.consumers[row.consumer]
            letter = _dead_letter(row)
            delivery = Delivery(
                letter.event_id, 1, letter.headers, letter.body.encode(), letter.subject
            )
            try:
                envelope = delivery.envelope()
                async with self.db.begin() as uow:
                    seen = await uow.conn.scalar(
                        sa.select(sa.func.count())
                        .select_from(inbox_table)
                        .where(
                            inbox_table.c.consumer == consumer.name,
                            inbox_table.c.event_id == envelope.id,
                        )
                    )
                    if not seen:
                        await consumer.handle(envelope, uow)
                        await uow.conn.execute(
                            inbox_table.insert().values(
                                consumer=consumer.name,
                                event_id=envelope.id,
                                processed_at=self.db.clock.now(),
                            )
                        )
                    await uow.conn.execute(t.delete().where(t.c.id == letter.id))
            except Exception as exc:  # noqa: BLE001 - it stays a dead letter, with this error
                async with self.db.begin() as uow:
                    await uow.conn.execute(
                        t.update()
                        .where(t.c.id == letter.id)
                        .values(
                            replay_requested_at=None,
                            replays=t.c.replays + 1,
                            error=f"{type(exc).__name__}: {exc}",
                            dead_at=self.db.clock.now(),
                        )
                    )
                log.warning("consumer.replay_failed", consumer=consumer.name, id=letter.id)
                continue
            done += 1
            self.replayed[consumer.name] += 1
            log.info("consumer.replayed", consumer=consumer.name, event_id=letter.event_id)
        return done

    async def _replay_loop(self) -> None:
        while True:
            if not self.outage:
                await self.replay_once()
            if not await self._pause(self.replay_interval):
                return

    async def sample(self) -> dict[str, Any]:
        """Pending events per consumer (from the bus) and dead letters (from the database);
        sets the gauges and the backlog alarm."""
        pending: dict[str, int | None] = {}
        for name in self.consumers:
            try:
                pending[name] = await self.bus.pending(name)
            except Exception:  # noqa: BLE001 - unknown for now
                pending[name] = None
        dead = await count_dead_letters(self.db)
        for name, value in pending.items():
            if self.metrics is not None:
                if value is not None:
                    self.metrics.pending.labels(name).set(value)
                self.metrics.dead_letters.labels(name).set(dead.get(name, 0))
            key = f"backlog:{name}"
            if value is not None and value >= self.pending_alarm:
                if key not in self.alarms:
                    log.error("consumer.backlog_high", consumer=name, pending=value)
                self.alarms[key] = f"{value} events pending for {name}"
            else:
                self.alarms.pop(key, None)
        usage = getattr(self.bus, "stream_usage", None)
        if usage is not None:
            try:
                figures = await usage()
            except Exception:  # noqa: BLE001
                figures = None
            if figures is not None and float(figures.get("usage", 0.0)) >= 0.8:
                if "retention" not in self.alarms:
                    log.error("bus.retention_near", **figures)
                self.alarms["retention"] = (
                    f"the stream is {float(figures['usage']):.0%} full: consumers behind "
                    "retention lose nothing (the stream refuses new events), but ingest stops"
                )
            elif figures is not None:
                self.alarms.pop("retention", None)
        return {"pending": pending, "dead_letters": dead}

    async def _monitor_loop(self) -> None:
        while True:
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await self.sample()
            if not await self._pause(
                max(0.1, self.monitor_interval - (time.monotonic() - started))
            ):
                return

    async def purge_once(self) -> dict[str, int]:
        """Delete what retention allows; returns rows deleted per table."""
        now = self.db.clock.now()
        dl = dead_letter_table
        async with self.db.begin() as uow:
            inbox = await uow.conn.execute(
                inbox_table.delete().where(inbox_table.c.processed_at < now - self.inbox_retention)
            )
            dead = await uow.conn.execute(
                dl.delete().where(
                    dl.c.dead_at < now - self.dead_letter_retention,
                    dl.c.replay_requested_at.is_(None),
                )
            )
            keys = await uow.conn.execute(
                idempotency_table.delete().where(idempotency_table.c.expires_at <= now)
            )
        purged = {
            "inbox": int(inbox.rowcount or 0),
            "dead_letter": int(dead.rowcount or 0),
            "idempotency": int(keys.rowcount or 0),
        }
        if any(purged.values()):
            log.info("consumers.purged", **purged)
        return purged

    async def _retention_loop(self) -> None:
        while True:
            if not self.outage:
                await self.purge_once()
            if not await self._pause(self.retention_interval):
                return
