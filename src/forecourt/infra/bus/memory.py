"""In-process bus: the embedded default. Same contract as JetStream: acknowledged publish,
de-duplication by event id within a window, at-least-once redelivery with a bounded count.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Sequence

from forecourt.infra.bus import Delivery, Handler, subject_matches
from forecourt.infra.logging import get_logger
from forecourt.kernel.events import Envelope, EventRecord

log = get_logger("forecourt.bus.memory")


class _MemorySubscription:
    def __init__(
        self, bus: MemoryBus, consumer: str, subjects: list[str], handler: Handler, max_deliver: int
    ) -> None:
        self.bus = bus
        self.consumer = consumer
        self.subjects = subjects
        self.handler = handler
        self.max_deliver = max_deliver
        self.queue: asyncio.Queue[tuple[Envelope, int]] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(), name=f"memory-bus:{consumer}")

    def matches(self, subject: str) -> bool:
        return any(subject_matches(p, subject) for p in self.subjects)

    async def _run(self) -> None:
        while True:
            envelope, attempt = await self.queue.get()
            delivery = Delivery(envelope, attempt, envelope.headers(), envelope.body())
            try:
                await self.handler(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failing handler means redeliver, never lose
                if attempt < self.max_deliver:
                    delay = min(0.05 * 2**attempt, 2.0)
                    asyncio.get_running_loop().call_later(
                        delay, self.queue.put_nowait, (envelope, attempt + 1)
                    )
                else:
                    log.error(
                        "bus.delivery_exhausted", consumer=self.consumer, event_id=envelope.id
                    )

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.bus._subs.discard(self)


class MemoryBus:
    def __init__(self, dedupe_window: int = 100_000) -> None:
        self._subs: set[_MemorySubscription] = set()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._window = dedupe_window
        self.published = 0

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.stop()

    async def ready(self) -> bool:
        return True

    async def publish(self, envelope: Envelope) -> None:
        if envelope.id in self._seen:  # like JetStream's Nats-Msg-Id duplicate window
            return
        self._seen[envelope.id] = None
        if len(self._seen) > self._window:
            self._seen.popitem(last=False)
        self.published += 1
        for sub in self._subs:
            if sub.matches(envelope.bus_subject):
                sub.queue.put_nowait((envelope, 1))

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        for envelope in envelopes:
            await self.publish(envelope)

    async def publish_records(self, records: Sequence[EventRecord]) -> None:
        # Handlers receive envelopes, so in process the bodies are decoded here.
        await self.publish_many([Envelope.from_record(r) for r in records])

    async def subscribe(
        self, consumer: str, subjects: list[str], handler: Handler, *, max_deliver: int
    ) -> _MemorySubscription:
        sub = _MemorySubscription(self, consumer, subjects, handler, max_deliver)
        self._subs.add(sub)
        return sub
