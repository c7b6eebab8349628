"""Components whose ``run()`` loop runs as one supervised asyncio task: a crash is logged,
counted and followed by a restart after a bounded, doubling backoff."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from forecourt.infra.logging import get_logger

log = get_logger("forecourt.background")


STOP_RECANCEL_S = 0.5  # stop() cancels again after this long without the task ending


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel the tasks and wait until every one has ended, cancelling again every
    ``STOP_RECANCEL_S`` while one has not: on Python 3.11 a cancellation that arrives as an
    ``asyncio.wait_for`` inner task completes is lost (fixed in 3.12), and a stop that waits
    on such a task would wait for ever. The tasks' outcomes are left to the caller."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=STOP_RECANCEL_S)
        for task in pending:
            task.cancel()


class BackgroundService:
    """Subclasses implement ``run()`` (a loop that runs until cancelled).

    ``start()`` runs it under a supervisor. When ``run()`` raises (anything but
    ``CancelledError``, which is how ``stop()`` ends it) the supervisor logs
    ``background.task_crashed``, counts the restart, waits ``restart_delay()`` and runs it
    again: a station must not lose its upload agent or its pump polling to one unforeseen
    error, and a silently dead task is worse than a loud one. A ``run()`` that returns is
    finished and not restarted.

    The backoff starts at ``restart_initial_s`` and doubles up to ``restart_max_s``; a run
    that stayed up ``healthy_after_s`` starts the doubling afresh and clears ``alarm``.
    Subclasses keep their own ``__init__``: the supervision state has class-level defaults.
    """

    task_name = "background"
    restart_initial_s = 0.1
    restart_max_s = 30.0
    healthy_after_s = 60.0
    restarts = 0  # crashes of run() since start, each followed by a restart
    last_error: str | None = None
    _task: asyncio.Task[None] | None = None
    _running = False
    _run_started = 0.0
    _crashed = False

    async def run(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """``run()`` is executing now (not stopped, finished or waiting to restart)."""
        return self._running

    @property
    def alarm(self) -> bool:
        """The task crashed and has not yet stayed up ``healthy_after_s`` since."""
        if not self._crashed:
            return False
        return not self._running or time.monotonic() - self._run_started < self.healthy_after_s

    def health(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "alarm": self.alarm,
        }

    def restart_delay(self, crashes_in_a_row: int) -> float:
        """Seconds to wait before restarting after the n-th crash in a row (n ≥ 1)."""
        return min(self.restart_max_s, self.restart_initial_s * 2 ** min(crashes_in_a_row - 1, 30))

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=self.task_name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _supervise(self) -> None:
        in_a_row = 0
        while True:
            self._running = True
            self._run_started = time.monotonic()
            try:
                await self.run()
            except Exception as exc:  # noqa: BLE001 - the supervisor's job: log, count, restart
                self._running = False
                if time.monotonic() - self._run_started >= self.healthy_after_s:
                    in_a_row = 0
                in_a_row += 1
                self.restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._crashed = True
                delay = self.restart_delay(in_a_row)
                log.exception(
                    "background.task_crashed",
                    task=self.task_name,
                    error=self.last_error,
                    restarts=self.restarts,
                    restart_in_s=delay,
                )
                await asyncio.sleep(delay)
                continue
            finally:
                self._running = False
            log.warning("background.task_finished", task=self.task_name)
            return


class SupervisedTask(BackgroundService):
    """A coroutine function run as a supervised background task (for loops that are not
    services of their own, such as the edge's snapshot refresh)."""

    def __init__(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        self.task_name = name
        self._loop = loop

    async def run(self) -> None:
        await self._loop()


@dataclass(frozen=True)
class Job:
    """A named background job a context registers beside its event consumers: hosted by
    ``forecourt worker`` when its name is among the consumers given (``default`` includes
    it when ``default`` is true), and inside ``forecourt serve`` where HQ's background work
    runs. ``build(settings, db)`` makes the service (its ``run()`` loop is supervised); the
    job may run in several processes at once, so it must be safe under that."""

    name: str
    build: Callable[[Any, Any], BackgroundService]
    default: bool = True
    description: str = ""
