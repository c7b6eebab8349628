"""Pump commands on a DART line (in-process simulator, real driver, the edge's command
service): the pump's own maximum amount bounds a preset, and releasing an emergency stop
resets a DART pump so it shows idle at once, unless its stopped filling is still open."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from forecourt.edge.commands import CommandLine, PumpCommands
from forecourt.edge.controller import ForecourtController
from forecourt.kernel.errors import ForecourtError
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.model import PresetType, PumpState
from tests.edge.forecourt_rig import PRICE_92
from tests.protocols.dart.support import flowing
from tests.protocols.dart.test_driver import reach
from tests.protocols.dart.test_edge_controller import edge, run_until

MAX_AMOUNT_RAW = 30_000  # 300.00 with the pump's two amount decimals


def commands(controller: ForecourtController) -> PumpCommands:
    line = CommandLine("dart", "dart", controller)
    return PumpCommands(
        lambda: [line], controller.journal, max_volume_ml=500_000, max_amount_minor=1_000_000
    )


def audits(controller: ForecourtController, action: str) -> list[dict[str, Any]]:
    """The details of each audit record of ``action`` in the edge's journal."""
    path = controller.journal.path
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT details FROM audit_outbox WHERE action = ? ORDER BY id", (action,)
        ).fetchall()
    return [json.loads(details) for (details,) in rows]


async def parameters_read(controller: ForecourtController) -> None:
    """Once the pumps' parameters are read, each is programmed with its prices (a DART pump
    takes no command before; the edge's price schedule does this at a station)."""

    async def read() -> bool:
        return controller.driver.max_preset(1, PresetType.AMOUNT) is not None  # type: ignore[attr-defined]

    await run_until(controller, read, what="the pump's parameters")
    for pump in controller.pumps():
        await controller.driver.set_prices(pump, [PRICE_92, PRICE_92])


async def test_a_preset_above_the_dart_pumps_own_maximum_amount_is_refused_with_it(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        sim.pump(1).max_amount = MAX_AMOUNT_RAW
        await sim.start("127.0.0.1:0")
        async with edge(sim, tmp_path) as controller:
            # Given the pump's parameters (DC7) read: its maximum amount is 300.00
            await parameters_read(controller)
            driver = controller.driver
            assert driver.max_preset(1, PresetType.AMOUNT) == 30_000
            assert driver.max_preset(1, PresetType.VOLUME) is None  # DC7 has no volume maximum
            assert driver.max_preset(9, PresetType.AMOUNT) is None  # not on this line
            service = commands(controller)
            # When a cashier presets 300.01 on it
            with pytest.raises(ForecourtError) as refused:
                await service.authorise(
                    "till1", 1, {"nozzle": 1, "preset": {"amount_minor": 30_001}}
                )
            # Then it is refused with the pump's own maximum, the edge's being higher
            assert refused.value.code == "pump.preset_above_maximum"
            assert refused.value.details["maximum"] == 30_000
            # And 300.00 is authorised
            answer = await service.authorise(
                "till1", 1, {"nozzle": 1, "preset": {"amount_minor": 30_000}}
            )
            assert answer["state"] == "authorised"


async def test_releasing_an_emergency_stop_resets_a_dart_pump_so_it_is_idle_at_once(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        async with edge(sim, tmp_path) as controller:
            await parameters_read(controller)
            service = commands(controller)
            # Given an idle DART pump emergency-stopped (switched off)
            stopped = await service.emergency_stop("till1")
            assert stopped["all_stopped"] is True
            await reach(controller.driver, 1, PumpState.STOPPED)
            # When it is released
            released = await service.release("till1", 1)
            # Then it was reset and shows idle, and the release says so in the audit
            assert released["state"] == "idle"
            assert sim.pump(1).status == 1  # RESET
            (audit,) = audits(controller, "pump.release")
            assert audit["sent"] == "reset"


async def test_a_dart_pump_holding_its_stopped_filling_is_released_and_reset_when_authorised(
    tmp_path: Path,
) -> None:
    async with DartSimulator(pumps=2, speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        # Given an edge that does not close fillings by itself, and a pump stopped mid-sale
        async with edge(sim, tmp_path, auto_settle=False) as controller:
            await parameters_read(controller)
            service = commands(controller)
            sim.lift(1, 1)
            await run_until(
                controller,
                lambda: flowing(sim),
                what="product to flow",
            )
            await service.emergency_stop("till1")

            async def switched_off() -> bool:
                return int(sim.pump(1).status) == 7

            await run_until(controller, switched_off, what="the pump switched off")

            async def journaled() -> bool:
                return controller.stats.journaled >= 1

            await run_until(controller, journaled, what="the stopped sale journaled")
            # When it is released while its filling, journaled, is not closed yet
            released = await service.release("till1", 1)
            # Then it is not reset (its filling stays on display) until its next authorisation
            assert released["state"] != "idle"
            assert int(sim.pump(1).status) == 7
            (audit,) = audits(controller, "pump.release")
            assert audit["sent"].startswith("nothing yet (pump 1 holds unclosed filling")
