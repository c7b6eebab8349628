"""The processes of a chaos run (``forecourt.chaos.processes``): a child process logs to its
file, stops on SIGTERM or is killed after its deadline, and is reaped either way; an
interrupted run's overdue cleanup kills whatever still runs; a service's lives carry their
crash settings; the crash marker names the pid of each crash; a supervisor's failure ends
the wait for the main task."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from forecourt.chaos import processes
from forecourt.chaos.processes import (
    ChaosError,
    ChildProcess,
    Service,
    SimulatorProcess,
    first_failure,
    kill_everything,
    read_marker,
    read_port,
    simulator_command,
)
from tests.support import eventually

# A child that says it is ready, then waits; with "stubborn" it ignores SIGTERM.
CHILD = """
import signal, sys, time
if sys.argv[1:] == ["stubborn"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


def child(tmp_path: Path, *args: str) -> ChildProcess:
    process = ChildProcess("child", tmp_path / "child.log")
    process.spawn([sys.executable, "-c", CHILD, *args], header="--- child life 1")
    return process


async def ready(process: ChildProcess) -> None:
    await eventually(lambda: "ready" in process.text(), 20, what="the child to start")


async def test_a_child_logs_to_its_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = child(tmp_path)
    await ready(process)
    assert process.alive()
    assert process.process in processes._LIVE
    assert process.text().splitlines()[:2] == ["--- child life 1", "ready"]
    assert process.last_lines() == "--- child life 1 | ready"
    await process.stop(timeout_s=10)
    assert process.poll() == -signal.SIGTERM
    assert process.process not in processes._LIVE
    await process.stop()  # again: harmless


async def test_a_child_that_ignores_sigterm_is_killed_after_the_deadline(tmp_path: Path) -> None:
    process = child(tmp_path, "stubborn")
    await ready(process)
    started = time.monotonic()
    await process.stop(timeout_s=0.5)
    assert process.poll() == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_a_stop_without_an_event_loop_kills_a_stubborn_child(tmp_path: Path) -> None:
    process = child(tmp_path, "stubborn")
    deadline = time.monotonic() + 20
    while "ready" not in process.text():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.02)
    process.stop_now(timeout_s=0.5)
    assert process.poll() == -signal.SIGKILL
    assert process.process not in processes._LIVE


async def test_a_child_runs_in_a_session_of_its_own_unless_told_otherwise(
    tmp_path: Path,
) -> None:
    own = child(tmp_path)
    shared = ChildProcess("shared", tmp_path / "shared.log")
    shared.spawn([sys.executable, "-c", CHILD], new_session=False)
    try:
        assert os.getsid(own.pid) == own.pid
        assert os.getpgid(shared.pid) == os.getpgid(0)
    finally:
        await own.stop(timeout_s=5)
        await shared.stop(timeout_s=5)


async def test_kill_everything_kills_every_child_still_running(tmp_path: Path) -> None:
    first = child(tmp_path, "stubborn")
    second = ChildProcess("second", tmp_path / "second.log")
    second.spawn([sys.executable, "-c", CHILD, "stubborn"])
    kill_everything()
    assert first.poll() == -signal.SIGKILL
    assert second.poll() == -signal.SIGKILL
    assert not ({first.process, second.process} & processes._LIVE)


async def test_each_life_of_a_service_carries_its_crash_settings(tmp_path: Path) -> None:
    stages = [{"FORECOURT_CRASH_AT": "payments.after_order_insert:2"}]
    service = Service("hq", ["--help"], dict(os.environ), tmp_path, stages=stages)
    assert service.armed
    for life in (1, 2):
        service.start()
        await eventually(lambda: service.poll() is not None, 60, what="forecourt --help")
        assert service.poll() == 0
        assert service.lives == life
        service.stage += 1
    assert not service.armed
    headers = [line for line in service.text().splitlines() if line.startswith("--- ")]
    assert headers == [
        "--- hq life 1: payments.after_order_insert:2",
        "--- hq life 2: no crash point",
    ]


def test_the_crash_marker_names_the_point_of_each_pid(tmp_path: Path) -> None:
    marker = tmp_path / "crash.marker"
    marker.write_text(
        "payments.after_paid_commit pid=101\nnot a crash line\nrelay.after_publish pid=202\n"
    )
    assert read_marker(marker) == {101: "payments.after_paid_commit", 202: "relay.after_publish"}
    assert read_marker(tmp_path / "missing.marker") == {}


def test_a_port_file_is_read_once_written(tmp_path: Path) -> None:
    port_file = tmp_path / "sim.port"
    assert read_port(port_file) is None
    port_file.write_text("")
    assert read_port(port_file) is None
    port_file.write_text("41701\n")
    assert read_port(port_file) == 41701
    command = simulator_command("forecourt.sim.alipay", tmp_path / "c.json", port_file)
    assert command[:3] == [sys.executable, "-m", "forecourt.sim.alipay"]
    assert command[command.index("--port-file") + 1] == str(port_file)


async def test_a_simulator_that_exits_at_once_is_a_chaos_error(tmp_path: Path) -> None:
    sim = SimulatorProcess(
        "nowhere",
        "forecourt.sim.no_such_simulator",
        {"seed": 1},
        config_path=tmp_path / "nowhere.json",
        port_file=tmp_path / "nowhere.port",
        log=tmp_path / "nowhere.log",
    )
    (tmp_path / "nowhere.port").write_text("1\n")  # a stale port file is not believed
    with pytest.raises(ChaosError, match="the nowhere simulator exited"):
        await sim.start(timeout_s=30)
    assert (tmp_path / "nowhere.json").read_text() == '{"seed": 1}'
    assert not (tmp_path / "nowhere.port").exists()
    await sim.stop()


async def test_a_supervisor_failing_first_ends_the_wait_and_cancels_the_main_task() -> None:
    async def main() -> None:
        await asyncio.Event().wait()

    async def supervisor() -> None:
        raise ChaosError("HQ keeps exiting")

    work = asyncio.create_task(main())
    with pytest.raises(ChaosError, match="HQ keeps exiting"):
        await first_failure(work, asyncio.create_task(supervisor()))
    with pytest.raises(asyncio.CancelledError):
        await work


async def test_the_main_task_ending_first_is_the_answer() -> None:
    async def main() -> int:
        return 1

    watching = asyncio.create_task(asyncio.Event().wait())
    work = asyncio.create_task(main())
    await first_failure(work, watching)
    assert work.result() == 1
    assert not watching.done()
    watching.cancel()
