"""Helpers shared by the infrastructure contract suites."""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forecourt.infra.bus import Bus
from forecourt.infra.bus.memory import MemoryBus
from forecourt.infra.bus.nats import NatsBus
from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade
from forecourt.kernel.events import Envelope, event_type, new_traceparent

NO_DEDUPE_WINDOW = 0.1  # NATS streams "without" de-duplication: the shortest useful window
FAST_BACKOFF = (0.02, 0.2)  # retry delays of test buses: a raising handler retries at once


class Buses:
    """Connected buses of one backend, fast for tests (short retry backoff, fetch/poll and
    stop grace), all closed by :meth:`cleanup`, which also deletes the NATS streams.

    ``memory`` buses keep their deliveries in ``db`` (migrated platform tables); without
    one, :class:`Buses` migrates a SQLite database of its own on first use, shared by every
    bus it makes (so two buses behave like two processes on one database). ``nats`` buses
    use ``stream`` (under the subject prefix ``stream.lower()``). ``dedupe=False`` gives a
    bus whose broker does not de-duplicate (memory: no window; NATS: a 0.1 s window, wait
    ``dedupe_gap`` to re-publish). Other keyword options (``ack_wait``, ...) go to the bus;
    NATS-only ones (``max_msgs``, ``publish_timeout``, ...) are dropped for memory."""

    def __init__(
        self, kind: str, nats_url: str | None, stream: str, db: Database | None = None
    ) -> None:
        self.kind = kind
        self.nats_url = nats_url
        self.stream = stream
        self.db = db
        self.made: list[Bus] = []
        self.streams: set[str] = set()
        self.dedupe_gap = 0.0 if kind == "memory" else NO_DEDUPE_WINDOW * 5
        self._own_db: contextlib.AsyncExitStack | None = None

    async def database(self) -> Database:
        """The database of the memory buses (made and migrated here if none was given)."""
        if self.db is None:
            stack = contextlib.AsyncExitStack()
            self._own_db = stack
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="buses-")))
            self.db = await stack.enter_async_context(
                platform_db(f"sqlite+aiosqlite:///{folder / 'bus.db'}")
            )
        return self.db

    async def new(self, *, dedupe: bool = True, stream: str | None = None, **options: Any) -> Bus:
        bus: Bus
        if self.kind == "memory":
            wanted: dict[str, Any] = {
                "poll_interval": 0.01,
                "retry_backoff": FAST_BACKOFF,
                "stop_grace": 1.0,
                **options,
            }
            if not dedupe:
                wanted["duplicate_window"] = 0.0
            accepted = inspect.signature(MemoryBus).parameters
            bus = MemoryBus(
                await self.database(), **{k: v for k, v in wanted.items() if k in accepted}
            )
        else:
            assert self.nats_url is not None
            name = stream or (self.stream if dedupe else f"{self.stream}_ND")
            self.streams.add(name)
            settings: dict[str, Any] = {
                "subject_prefix": name.lower(),
                "duplicate_window": 120.0 if dedupe else NO_DEDUPE_WINDOW,
                "retry_backoff": FAST_BACKOFF,
                "fetch_timeout": 0.5,
                "stop_grace": 1.0,
                **options,
            }
            bus = NatsBus(self.nats_url, stream=name, **settings)
        await bus.connect()
        self.made.append(bus)
        return bus

    async def cleanup(self) -> None:
        for bus in self.made:
            with contextlib.suppress(Exception):
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
        if self._own_db is not None:
            await self._own_db.aclose()
            self._own_db = None
            self.db = None


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
