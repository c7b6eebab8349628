"""The simulator's state file: what survives a restart, with and without reset counters; and
the real process killed and started again on it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from forecourt.edge.drivers import Preset, PresetType, PumpState
from forecourt.kernel.clock import SimulatedClock
from forecourt.protocols.jsonpts.codec import loads
from forecourt.sim.customers import SimConfigError
from forecourt.sim.pts_controller import SimulatorProcess, StateJournal
from tests.sim.support import SPEED, T0, Forecourt, config_dict, real_driver
from tests.support import eventually

REPORT_DAY = {"DateTimeStart": "2026-11-25T00:00:00", "DateTimeEnd": "2026-11-26T23:59:59"}


def events(path: Path) -> list[str]:
    return [loads(line)["event"] for line in path.read_bytes().splitlines() if line.strip()]


def reopened(path: Path, *, later_s: float = 3600, **kwargs) -> Forecourt:
    """A new simulator life on the same state file, ``later_s`` after the first one's start."""
    return Forecourt(journal=StateJournal(path), start=T0 + timedelta(seconds=later_s), **kwargs)


def test_each_finished_transaction_and_close_is_on_disk_once_it_can_be_seen(tmp_path):
    path = tmp_path / "state.jsonl"
    forecourt = Forecourt(journal=StateJournal(path))
    assert events(path) == ["start"]
    number = forecourt.sell()  # its status is answered: the record must already be on disk
    assert events(path) == ["start", "transaction"]
    forecourt.send("PumpCloseTransaction", Pump=1, Transaction=number)
    assert events(path) == ["start", "transaction", "close"]


def test_a_restart_brings_back_memory_totals_numbering_and_the_pending_transaction(tmp_path):
    path = tmp_path / "state.jsonl"
    first = Forecourt(journal=StateJournal(path))
    closed = first.sell(litres="10", number=1)
    first.send("PumpCloseTransaction", Pump=1, Transaction=closed)
    pending = first.sell(litres="20", number=2, at=1000)
    held = first.status().data
    totals = first.send("PumpGetTotals", Pump=1, Nozzle=1).data

    second = reopened(path)
    status = second.status()
    assert (status.type, status.data) == ("PumpEndOfTransactionStatus", held)
    assert second.send("PumpGetTotals", Pump=1, Nozzle=1).data == totals
    report = second.send("ReportGetPumpTransactions", Pump=1, **REPORT_DAY).data
    assert [item["Transaction"] for item in report] == [closed, pending] == [1, 2]
    assert second.station.stats["restored_transactions"] == 2
    # Still strict after the restart: only the pending one can be closed, and then numbering
    # continues where it stopped.
    assert second.send("PumpCloseTransaction", Pump=1, Transaction=closed).error is True
    assert second.send("PumpCloseTransaction", Pump=1, Transaction=pending).message == "OK"
    assert second.sell(number=3, at=100) == 3
    assert second.station.health()["next_transactions"] == {"1": 4, "2": 500}


def test_reset_counters_restart_numbering_but_keep_memory_and_totals(tmp_path):
    path = tmp_path / "state.jsonl"
    first = Forecourt(journal=StateJournal(path))
    for number in (1, 2):
        first.sell(number=number, at=number * 1000)
        first.send("PumpCloseTransaction", Pump=1, Transaction=number)
    totals = first.send("PumpGetTotals", Pump=1, Nozzle=1).data["Volume"]

    swapped = reopened(path, reset_counters=True)
    assert swapped.station.health()["next_transactions"] == {"1": 1, "2": 500}
    assert swapped.send("PumpGetTotals", Pump=1, Nozzle=1).data["Volume"] == totals
    assert swapped.sell(number=3, at=100) == 1  # shares its number with the first sale
    swapped.send("PumpCloseTransaction", Pump=1, Transaction=1)
    report = swapped.send("ReportGetPumpTransactions", Pump=1, **REPORT_DAY).data
    assert [item["Transaction"] for item in report] == [1, 2, 1]
    assert len({item["DateTime"] for item in report}) == 3

    # A later plain restart continues the new numbering, not the old one.
    third = reopened(path, later_s=7200)
    assert third.station.health()["next_transactions"]["1"] == 2


def test_the_reset_counters_fault_acts_like_the_flag(tmp_path):
    path = tmp_path / "state.jsonl"
    first = Forecourt(journal=StateJournal(path))
    first.sell()
    first.send("PumpCloseTransaction", Pump=1, Transaction=1)
    config = config_dict(faults={"reset_counters_on_start": True})
    swapped = Forecourt(config, journal=StateJournal(path), start=T0 + timedelta(hours=1))
    assert swapped.station.pumps[1].next_transaction == 1


def test_a_pending_transaction_keeps_its_number_across_a_reset(tmp_path):
    path = tmp_path / "state.jsonl"
    first = Forecourt(journal=StateJournal(path))
    first.sell(number=1)
    first.send("PumpCloseTransaction", Pump=1, Transaction=1)
    first.sell(number=2, at=1000)  # pending 2
    swapped = reopened(path, reset_counters=True)
    assert swapped.status().data["Transaction"] == 2
    assert swapped.send("PumpCloseTransaction", Pump=1, Transaction=2).message == "OK"
    assert swapped.sell(number=3, at=100) == 1


def test_an_odd_finished_amount_is_restored_as_the_device_recorded_it(tmp_path):
    path = tmp_path / "state.jsonl"
    config = config_dict(faults={"odd_decimals_finished": [1]})
    Forecourt(config, journal=StateJournal(path)).sell(litres="40")
    again = Forecourt(config_dict(), journal=StateJournal(path), start=T0 + timedelta(hours=1))
    assert again.status().data["Amount"] == Decimal("315.604")


def test_a_torn_last_line_is_ignored_but_a_corrupt_middle_one_stops_the_start(tmp_path):
    path = tmp_path / "state.jsonl"
    Forecourt(journal=StateJournal(path)).sell()
    with path.open("ab") as file:
        file.write(b'{"event": "close", "rec')  # killed mid-write
    assert reopened(path).status().type == "PumpEndOfTransactionStatus"
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0], b"{not json", *lines[1:]]) + b"\n")
    with pytest.raises(SimConfigError):
        reopened(path)


def test_a_state_file_naming_a_pump_the_config_lacks_stops_the_start(tmp_path):
    path = tmp_path / "state.jsonl"
    Forecourt(journal=StateJournal(path)).sell()
    config = config_dict()
    del config["pumps"][0]
    config["customers"]["grade_mix"] = [{"grade_id": 95, "weight": 1}]
    with pytest.raises(SimConfigError):
        Forecourt(config, journal=StateJournal(path))


# --------------------------------------------------------------------------- the real process


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[tuple[SimulatorProcess, SimulatedClock]]:
    clock = SimulatedClock(sim_epoch=T0, wall_epoch=time.time(), speed=SPEED)
    config = config_dict(
        arrivals=True, arrivals_per_hour=240, lift_delay_s=[5, 10], authorise_timeout_s=600
    )
    process = SimulatorProcess(config, tmp_path, env=clock.to_env())
    try:
        process.start()
        yield process, clock
    finally:
        process.stop()  # always: a leaked simulator would outlive the test run


async def health(process: SimulatorProcess) -> dict:
    async with httpx.AsyncClient(base_url=process.base_url, timeout=5.0) as http:
        return (await http.get("/sim/health")).json()


async def test_a_killed_simulator_comes_back_holding_its_pending_transaction(simulator):
    process, _clock = simulator
    # A one-second boot marker step: a restart must show whatever the timing.
    async with real_driver(process, boot_marker_resolution_s=1) as driver:
        identity = await driver.identity()

        async def a_calling_pump():
            statuses = await driver.pump_status([1, 2])
            return next((s for s in statuses if s.state is PumpState.CALLING), None)

        calling = await eventually(a_calling_pump)
        pump = calling.pump
        await driver.authorize(
            pump, calling.nozzle, Preset(PresetType.VOLUME, volume_ml=5_000), 789_000
        )

        async def held():
            return await driver.finished_transaction(pump)

        before = await eventually(held)
        totals = await driver.totals(pump, calling.nozzle)
    assert process.state_file.parent == process.workdir
    first_pid = process.process.pid if process.process else None

    process.restart(signal.SIGTERM)  # orderly: numbering continues
    assert process.process is not None
    assert process.process.pid != first_pid
    async with real_driver(process, boot_marker_resolution_s=1) as driver:
        after_term = await driver.identity()
        assert await driver.finished_transaction(pump) == before
    assert (await health(process))["next_transactions"][str(pump)] == before.transaction + 1

    process.restart(signal.SIGKILL, reset_counters=True)  # a crash, and a reset controller
    async with real_driver(process, boot_marker_resolution_s=1) as driver:
        after_kill = await driver.identity()
        assert await driver.finished_transaction(pump) == before
        assert await driver.totals(pump, calling.nozzle) == totals
        state = await health(process)
        assert state["next_transactions"][str(pump)] == (1 if pump == 1 else 500)
        await driver.close_transaction(pump, before.transaction)
        assert await driver.finished_transaction(pump) is None
    assert identity.device_id == after_term.device_id == after_kill.device_id == "4242"
    assert len({identity.boot_marker, after_term.boot_marker, after_kill.boot_marker}) == 3
    assert "PTS-2 simulator listening" in process.log_tail(200)


def test_a_restart_refuses_a_simulator_that_is_not_running(tmp_path):
    clock = SimulatedClock(sim_epoch=T0, wall_epoch=time.time(), speed=SPEED)
    process = SimulatorProcess(config_dict(), tmp_path, env=clock.to_env())
    with pytest.raises(RuntimeError):
        process.restart()
