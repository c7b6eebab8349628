"""The event bus interface. Backends: ``memory`` (in-process, durable on the embedded
database) and ``nats`` (JetStream).

Only the outbox relay publishes. Delivery is at-least-once and unordered; consumers
de-duplicate through the inbox and decide, delivery by delivery, what becomes of a message
(see :mod:`forecourt.infra.consumers`).

The delivery contract, the same on both backends
    * A bus hands a subscriber *batches* of :class:`Delivery` (raw headers and body, the
      bus's own delivery count in ``attempt``) and the subscriber answers one
      :data:`Verdict` per delivery: ``None`` settles it (its effect, or its dead-letter
      record, is durable: the bus forgets it), a number of seconds asks for it again after
      that delay. An exception from the handler asks for the whole batch again later.
    * A bus never terminates a message on its own: there is no broker-side delivery limit.
      The redelivery budget is the subscriber's (the consumer host dead-letters), so a
      consumer that dies on its last allowed attempt still ends in processed or
      dead-lettered, and a dead-letter store that cannot be written leaves the message
      pending rather than gone.
    * A delivery not settled within ``ack_wait`` (the process died) is delivered again with
      a higher ``attempt``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from forecourt.kernel.events import Envelope, EventRecord

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from forecourt.infra.db import Database


@dataclass(frozen=True)
class Delivery:
    """One message as the bus delivered it. ``envelope()`` parses it (and raises
    :class:`~forecourt.kernel.errors.InvalidValue` for a malformed one, which the consumer
    host dead-letters as it is)."""

    event_id: str  # ``ce-id`` as far as readable ('' when absent)
    attempt: int  # 1 on first delivery; counted by the bus, crashes included
    headers: dict[str, str]
    body: bytes
    subject: str = ""  # the bus subject (without any wire prefix)

    def envelope(self) -> Envelope:
        return Envelope.from_wire(self.headers, self.body)

    @classmethod
    def of(cls, envelope: Envelope, attempt: int = 1) -> Delivery:
        return cls(envelope.id, attempt, envelope.headers(), envelope.body(), envelope.bus_subject)


Verdict = float | None  # None: settled; seconds: deliver again after that delay
BatchHandler = Callable[[Sequence[Delivery]], Awaitable[Sequence[Verdict]]]


class PublishRefused(Exception):  # noqa: N818 - the broker's word
    """The broker refused some records of a publish *for good* (too large, a subject no
    stream captures, ...): ``refused`` maps each such record's index to the reason.
    Every other record of the batch was stored (acknowledged). The relay parks the refused
    rows and deletes the rest. A failure that may pass (no answer, a full stream, a lost
    connection) is any other exception, and then nothing of the batch counts as stored."""

    def __init__(self, refused: Mapping[int, str]) -> None:
        self.refused = dict(refused)
        first = min(self.refused)
        super().__init__(f"{len(self.refused)} event(s) refused; first: {self.refused[first]}")


class BusFull(Exception):  # noqa: N818
    """The stream is full (``discard: new``) and refuses new events until consumers catch
    up or retention frees space: the relay keeps its rows, backs off and alarms."""


class Subscription(Protocol):
    async def stop(self) -> None: ...


class Bus(Protocol):
    #: True when ``publish_records(..., conn=)`` writes into the caller's transaction
    #: (the embedded bus): the relay then publishes and deletes in one transaction.
    transactional: bool

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish_records(
        self, records: Sequence[EventRecord], *, conn: AsyncConnection | None = None
    ) -> None:
        """Publish events exactly as the outbox stored them and wait until every one is
        stored (acknowledged); idempotent per event id within the broker's duplicate
        window. Raises :class:`PublishRefused` when some are refused for good, any other
        exception when the outcome is unknown or may change (nothing then counts as
        stored)."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """``publish_records`` for one envelope (tests and tools)."""
        ...

    async def subscribe(
        self,
        consumer: str,
        subjects: list[str],
        handler: BatchHandler,
        *,
        batch_size: int = 100,
    ) -> Subscription:
        """Deliver matching events to ``handler`` in batches of up to ``batch_size`` (see
        the module docstring for the verdicts). Several subscriptions with one consumer
        name, in one process or several, share the work."""
        ...

    async def pending(self, consumer: str) -> int | None:
        """Events matching ``consumer`` not yet settled by it (waiting or in flight);
        None when the bus cannot tell (no such consumer yet)."""
        ...

    async def ready(self) -> bool: ...


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard rules: ``*`` one token, ``>`` one or more trailing tokens."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def make_bus(
    url: str,
    *,
    db: Database | None = None,
    stream: str = "FORECOURT",
    subject_prefix: str | None = None,
    **options: object,
) -> Bus:
    """The bus for ``url``. ``memory://`` keeps its deliveries in ``db`` (the process's own
    database, so they survive a restart); ``nats://`` takes the stream policy in
    ``options`` (see :class:`~forecourt.infra.bus.nats.NatsBus`)."""
    if url.startswith("memory"):
        from forecourt.infra.bus.memory import MemoryBus

        if db is None:
            raise ValueError("the in-process bus keeps its deliveries in a database: pass db")
        return MemoryBus(db)
    if url.startswith("nats"):
        from forecourt.infra.bus.nats import NatsBus

        return NatsBus(url, stream=stream, subject_prefix=subject_prefix or "", **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported bus url {url!r} (memory:// or nats://host:port)")
