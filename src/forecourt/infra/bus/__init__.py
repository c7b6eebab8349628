"""The event bus interface. Backends: ``memory`` (in-process) and ``nats`` (JetStream).

Only the outbox relay publishes. Delivery is at-least-once and unordered; consumers
de-duplicate through the inbox (see :mod:`forecourt.infra.inbox`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from forecourt.kernel.events import Envelope, EventRecord


@dataclass(frozen=True)
class Delivery:
    envelope: Envelope
    attempt: int  # 1 on first delivery
    headers: dict[str, str]
    body: bytes


Handler = Callable[[Delivery], Awaitable[None]]


class Subscription(Protocol):
    async def stop(self) -> None: ...


class Bus(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, envelope: Envelope) -> None:
        """Publish and wait for the broker's acknowledgement; idempotent per ``envelope.id``."""
        ...

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """Publish several events, waiting for every acknowledgement (pipelined where the
        broker allows); raises if any one is not acknowledged."""
        ...

    async def publish_records(self, records: Sequence[EventRecord]) -> None:
        """``publish_many`` for events exactly as the outbox stored them (the relay's path:
        a backend need not decode the bodies it only forwards)."""
        ...

    async def subscribe(
        self, consumer: str, subjects: list[str], handler: Handler, *, max_deliver: int
    ) -> Subscription:
        """Deliver matching events to ``handler``; an exception means redeliver later. After
        ``max_deliver`` failed deliveries the event is handed to the dead-letter handler
        (the inbox runner) via a final delivery with ``attempt == max_deliver``."""
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


def make_bus(url: str, *, stream: str = "FORECOURT", subject_prefix: str | None = None) -> Bus:
    if url.startswith("memory"):
        from forecourt.infra.bus.memory import MemoryBus

        return MemoryBus()
    if url.startswith("nats"):
        from forecourt.infra.bus.nats import NatsBus

        return NatsBus(url, stream=stream, subject_prefix=subject_prefix or "")
    raise ValueError(f"unsupported bus url {url!r} (memory:// or nats://host:port)")
