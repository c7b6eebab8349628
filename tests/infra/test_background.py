"""Supervised background tasks: a crashing ``run()`` is logged, counted and restarted after a
bounded, doubling backoff; stopping is a cancellation, never a crash."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from forecourt.infra.background import BackgroundService, SupervisedTask
from tests.support import eventually


class Flaky(BackgroundService):
    """Crashes on its first ``crashes`` runs, then runs until cancelled."""

    task_name = "flaky"
    restart_initial_s = 0.001
    restart_max_s = 0.004

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.runs = 0
        self.delays_asked: list[int] = []

    def restart_delay(self, crashes_in_a_row: int) -> float:
        self.delays_asked.append(crashes_in_a_row)
        return super().restart_delay(crashes_in_a_row)

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise RuntimeError(f"boom {self.runs}")
        await asyncio.Event().wait()


async def test_a_task_whose_run_raises_is_logged_counted_and_restarted() -> None:
    # Given a service that crashes three times before it settles
    service = Flaky(crashes=3)
    with capture_logs() as logs:
        service.start()
        try:
            # When it is left to its supervisor
            await eventually(lambda: service.runs == 4 and service.running)
            # Then every crash was counted, the last error kept, and it runs again
            assert service.restarts == 3
            assert service.last_error == "RuntimeError: boom 3"
            assert service.alarm  # crashed recently, not yet healthy for long
            assert service.health() == {
                "running": True,
                "restarts": 3,
                "last_error": "RuntimeError: boom 3",
                "alarm": True,
            }
        finally:
            await service.stop()
    crashes = [e for e in logs if e["event"] == "background.task_crashed"]
    assert [e["error"] for e in crashes] == [
        "RuntimeError: boom 1",
        "RuntimeError: boom 2",
        "RuntimeError: boom 3",
    ]
    assert all(e["task"] == "flaky" and e["log_level"] == "error" for e in crashes)
    assert [e["restarts"] for e in crashes] == [1, 2, 3]
    assert service.delays_asked == [1, 2, 3]
    assert not service.running


def test_the_restart_backoff_doubles_from_its_initial_delay_up_to_its_bound() -> None:
    service = BackgroundService()
    assert (service.restart_initial_s, service.restart_max_s) == (0.1, 30.0)
    delays = [service.restart_delay(n) for n in range(1, 14)]
    assert delays[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert delays[-1] == 30.0
    assert all(a <= b for a, b in zip(delays, delays[1:], strict=False))
    assert service.restart_delay(10_000) == 30.0  # no overflow after a very long outage


async def test_a_run_that_stays_up_clears_the_alarm_and_starts_the_backoff_afresh() -> None:
    # Given a service considered healthy after 50 ms up, that crashes twice at once, then once
    # more after having run for longer than that
    class Relapsing(Flaky):
        healthy_after_s = 0.05

        async def run(self) -> None:
            self.runs += 1
            if self.runs <= 2:
                raise RuntimeError("early")
            if self.runs == 3:
                await asyncio.sleep(0.08)
                raise RuntimeError("after a good run")
            await asyncio.Event().wait()

    service = Relapsing(crashes=0)
    service.start()
    try:
        await eventually(lambda: service.runs == 4 and service.running)
        # Then the crash after the good run counted as the first in a row again
        assert service.delays_asked == [1, 2, 1]
        assert service.alarm
        # And once the run has stayed up long enough the alarm clears by itself
        await eventually(lambda: not service.alarm)
        assert service.restarts == 3  # the count stays: it is history, not state
    finally:
        await service.stop()


async def test_stopping_a_running_task_is_not_a_crash() -> None:
    service = Flaky(crashes=0)
    service.start()
    await eventually(lambda: service.running)
    await service.stop()
    assert not service.running
    assert (service.restarts, service.last_error, service.alarm) == (0, None, False)


async def test_stopping_during_the_restart_backoff_ends_the_task_at_once() -> None:
    # Given a task waiting out a long backoff after a crash
    service = Flaky(crashes=1)
    service.restart_initial_s = service.restart_max_s = 60.0
    service.start()
    await eventually(lambda: service.restarts == 1)
    assert not service.running
    # When it is stopped, then it ends without waiting for the backoff
    await asyncio.wait_for(service.stop(), timeout=2.0)
    assert service.runs == 1


async def test_a_run_that_returns_is_finished_and_not_restarted() -> None:
    class OneShot(BackgroundService):
        task_name = "one-shot"
        runs = 0

        async def run(self) -> None:
            self.runs += 1

    service = OneShot()
    with capture_logs() as logs:
        service.start()
        assert service._task is not None
        await asyncio.wait_for(service._task, timeout=2.0)
    assert (service.runs, service.restarts, service.running) == (1, 0, False)
    assert [e["event"] for e in logs] == ["background.task_finished"]
    await service.stop()


async def test_a_supervised_coroutine_function_is_restarted_like_a_service() -> None:
    # Given a plain loop (not a service of its own) that fails once
    calls: list[int] = []

    async def loop() -> None:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        await asyncio.Event().wait()

    task = SupervisedTask("edge-snapshots", loop)
    task.restart_initial_s = 0.001
    task.start()
    try:
        await eventually(lambda: len(calls) == 2 and task.running)
        assert task.task_name == "edge-snapshots"
        assert (task.restarts, task.last_error) == (1, "OSError: disk hiccup")
    finally:
        await task.stop()
