"""Helpers for every test package: waiting for a condition, with a deadline, never for a time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    timeout: float = 20.0,
    *,
    interval: float = 0.01,
    what: str = "the condition",
) -> T:
    """Poll ``check`` (plain or async) until it gives something truthy, and return that.

    Fails with ``AssertionError`` once ``timeout`` seconds have passed without it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
