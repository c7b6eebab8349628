"""Helpers shared by the infrastructure contract suites."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from forecourt.infra.bus import Bus
from forecourt.infra.bus.memory import MemoryBus
from forecourt.infra.bus.nats import NatsBus
from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade
from forecourt.kernel.events import Envelope, event_type, new_traceparent

NO_DEDUPE_WINDOW = 0.1  # NATS streams "without" de-duplication: the shortest useful window


class Buses:
    """Connected buses of one backend; ``dedupe=False`` gives one whose broker does not
    de-duplicate (memory: no window; NATS: a 0.1 s window, wait ``dedupe_gap`` to re-publish)."""

    def __init__(self, kind: str, nats_url: str | None, stream: str) -> None:
        self.kind = kind
        self.nats_url = nats_url
        self.stream = stream
        self.made: list[Bus] = []
        self.streams: set[str] = set()
        self.dedupe_gap = 0.0 if kind == "memory" else NO_DEDUPE_WINDOW * 5

    async def new(self, *, dedupe: bool = True) -> Bus:
        bus: Bus
        if self.kind == "memory":
            bus = MemoryBus() if dedupe else MemoryBus(dedupe_window=0)
        else:
            assert self.nats_url is not None
            stream = self.stream if dedupe else f"{self.stream}_ND"
            self.streams.add(stream)
            bus = NatsBus(
                self.nats_url,
                stream=stream,
                subject_prefix=stream.lower(),
                duplicate_window=120.0 if dedupe else NO_DEDUPE_WINDOW,
                retry_backoff=(0.02, 0.2),
                fetch_timeout=0.5,
            )
        await bus.connect()
        self.made.append(bus)
        return bus

    async def cleanup(self) -> None:
        for bus in self.made:
            await bus.close()
        if self.streams:
            import nats
            import nats.js.errors

            assert self.nats_url is not None
            nc = await nats.connect(self.nats_url)
            for stream in self.streams:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await nc.jetstream().delete_stream(stream)
            await nc.close()


@contextlib.asynccontextmanager
async def platform_db(url: str, *, migrate: bool = True) -> AsyncIterator[Database]:
    db = Database(url)
    await db.connect()
    try:
        if migrate:
            await upgrade(db, ["platform"])
        yield db
    finally:
        await db.dispose()


def sale_event(n: int = 0, **data: object) -> Envelope:
    """A ``sale.completed`` event numbered ``n`` (its subject and data say which)."""
    return Envelope(
        type=event_type("sales", "sale.completed"),
        source="/stations/st-0042",
        subject=f"sale-{n}",
        time=datetime.now(UTC),
        traceparent=new_traceparent(),
        data={"n": n, **data},
    )
