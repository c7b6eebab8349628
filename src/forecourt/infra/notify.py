"""PostgreSQL LISTEN on a connection of its own, reconnecting: a process learns at once that
another one committed a change its caches depend on (the change NOTIFYs in its transaction).

``ChannelListener(db, channel, on_notify)``: ``start()`` it; ``listening`` is True only while
the LISTEN stands, so a caller trusts its cache only then (a notification may be missed while
it is False); ``on_notify`` is also called each time the LISTEN (re)starts, for what changed
while nobody listened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
from sqlalchemy.engine import make_url

from forecourt.infra.db import Database
from forecourt.infra.logging import get_logger

log = get_logger("forecourt.infra.notify")


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as asyncpg's ``connect`` takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChannelListener:
    def __init__(self, db: Database, channel: str, on_notify: Callable[[], None]) -> None:
        if not channel.isidentifier():
            raise ValueError(f"not a channel name: {channel!r}")
        self.db = db
        self.channel = channel
        self.on_notify = on_notify
        self.listening = False
        self.notifications = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.listening = False

    def _notified(self, *_: object) -> None:
        self.notifications += 1
        self.on_notify()

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                connection = await asyncpg.connect(asyncpg_dsn(self.db.url), timeout=10)
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                log.warning("infra.listen_failed", channel=self.channel, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            closed = asyncio.Event()
            try:
                connection.add_termination_listener(lambda _c, ended=closed: ended.set())
                await connection.add_listener(self.channel, self._notified)
                self.on_notify()  # whatever changed while nobody listened
                self.listening = True
                await closed.wait()
                log.warning("infra.listen_lost", channel=self.channel)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("infra.listen_lost", channel=self.channel, error=str(exc))
            finally:
                self.listening = False
                with contextlib.suppress(Exception):
                    await connection.close(timeout=2)


__all__ = ["ChannelListener", "asyncpg_dsn"]
