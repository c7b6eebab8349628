"""Steps several DART tests at the edge share (in-process simulator, real driver, the edge's
command service)."""

from __future__ import annotations

from typing import Any

from forecourt.edge.commands import PumpCommands
from forecourt.edge.controller import ForecourtController
from forecourt.protocols.dart.simulator import DartSimulator
from tests.protocols.dart.test_edge_controller import run_until


async def flowing(sim: DartSimulator, pump: int = 1) -> bool:
    """Product flows at the simulated ``pump`` (its filling is at 100 or more)."""
    filling = sim.pump(pump).filling
    return filling is not None and filling.volume >= 100


async def emergency_stop_while_flowing(
    controller: ForecourtController, service: PumpCommands, sim: DartSimulator
) -> dict[str, Any]:
    """Pump 1 authorised (``till1``, a full tank) for a customer filling up to 60 L and keeping
    the nozzle up, product flowing; then ``till1``'s emergency stop. The authorisation's
    answer."""
    sim.lift(1, 1, target_ml=60_000, hang=True)
    authorised = await service.authorise("till1", 1, {"nozzle": 1, "full": True})
    await run_until(controller, lambda: flowing(sim), what="product to flow")
    await service.emergency_stop("till1")
    return authorised
