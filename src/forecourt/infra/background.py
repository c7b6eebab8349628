"""A component whose ``run()`` loop is started and stopped as one asyncio task."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundService:
    """Subclasses implement ``run()`` (a loop that runs until cancelled)."""

    task_name = "background"
    _task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=self.task_name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
