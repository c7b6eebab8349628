"""Scheduled price changes at the pumps: each pump line's pumps shown the prices in force.

Which price a sale runs at is decided when the pump is authorised: the controller takes the
snapshot's price in force at that instant (``StationSnapshot.prices_at``) and journals its
price version with the sale. A fuelling already running keeps the price it was authorised at;
the new price applies from the pump's next authorisation. That is the rule on every protocol.

What differs is what a pump *shows* while it waits. A protocol that carries the price in the
authorisation (jsonPTS) needs nothing more. A protocol whose pumps hold their own prices
(Wayne DART: ``Capability.PRICE_BEFORE_AUTHORISE``; the driver also downloads them before any
authorisation that needs another price) is sent the new prices at the instant they take
effect, never before (the display would announce a price not yet in force), and never to a
pump that is fuelling or holds a finished sale: such a pump is sent them as soon as it is idle
again. Each download is audited (``pump.prices``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forecourt.edge.domain import FpState
from forecourt.infra.background import BackgroundService
from forecourt.infra.logging import get_logger
from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.model import Capability, DeviceRejected, DriverUnavailable

if TYPE_CHECKING:
    from forecourt.edge.controller import ForecourtController
    from forecourt.network.contracts import SnapshotPrice, StationSnapshot

log = get_logger("forecourt.edge.prices")

#: pump states a price download may be sent in
_QUIET = frozenset({FpState.IDLE, FpState.CLOSED})


@dataclass
class PriceSchedule(BackgroundService):
    controller: ForecourtController
    tick_s: float = 1.0
    #: what each pump was last sent: nozzle -> (price version, unit price mmu)
    shown: dict[int, dict[int, tuple[str, int]]] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)
    downloads: int = 0
    failures: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.task_name = f"edge-prices-{self.controller.device or 'forecourt'}"

    @property
    def pushes(self) -> bool:
        capabilities: frozenset[Capability] = getattr(
            self.controller.driver, "capabilities", frozenset()
        )
        return Capability.PRICE_BEFORE_AUTHORISE in capabilities

    def wanted(self, pump: int) -> dict[int, tuple[str, int]]:
        """nozzle -> (price version, unit price) in force now for ``pump``'s nozzles."""
        snapshot = self.controller.snapshot()
        if snapshot is None:
            return {}
        return self._wanted(snapshot, snapshot.prices_at(self.controller.clock.now()), pump)

    @staticmethod
    def _wanted(
        snapshot: StationSnapshot, in_force: Mapping[str, SnapshotPrice], pump: int
    ) -> dict[int, tuple[str, int]]:
        fp = snapshot.fuelling_point(pump)
        if fp is None:
            return {}
        out: dict[int, tuple[str, int]] = {}
        for nozzle in sorted(fp.nozzles, key=lambda n: n.number):
            price = in_force.get(nozzle.grade)
            if price is not None:
                out[nozzle.number] = (price.price_id, price.milli_minor_per_litre)
        return out

    async def tick(self) -> list[int]:
        """Send each quiet pump whose prices changed the prices in force; the pumps sent."""
        if not self.pushes or not self.controller.reachable:
            return []
        snapshot = self.controller.snapshot()
        if snapshot is None:
            return []
        # One instant for the whole tick: every pump is given the prices in force at it.
        now = self.controller.clock.now()
        in_force = snapshot.prices_at(now)
        sent: list[int] = []
        for pump in self.controller.pumps():
            wanted = self._wanted(snapshot, in_force, pump)
            if not wanted or self.shown.get(pump) == wanted:
                self.pending.discard(pump)
                continue
            machine = self.controller.machines.get(pump)
            if machine is None or machine.state not in _QUIET:
                self.pending.add(pump)
                continue
            nozzles = sorted(wanted)
            if nozzles != list(range(1, len(nozzles) + 1)):
                log.warning("edge.prices_nozzles_not_contiguous", pump=pump, nozzles=nozzles)
                self.shown[pump] = wanted
                continue
            try:
                await self.controller.driver.set_prices(pump, [wanted[n][1] for n in nozzles])
            except (DriverUnavailable, DeviceRejected) as exc:
                self.failures += 1
                self.pending.add(pump)
                log.warning("edge.prices_not_sent", pump=pump, error=str(exc))
                continue
            except InvalidValue as exc:  # the station's nozzles and the pump's disagree
                self.failures += 1
                self.shown[pump] = wanted  # not again until the prices change
                log.error("edge.prices_refused", pump=pump, error=str(exc))
                continue
            self.downloads += 1
            self.shown[pump] = wanted
            self.pending.discard(pump)
            sent.append(pump)
            details = {
                str(n): {"price_version": v, "unit_price_mmu": mmu}
                for n, (v, mmu) in wanted.items()
            }
            log.info("edge.prices_sent", pump=pump, prices=details)
            await self.controller.journal.record_audit(
                actor=self.controller.actor,
                action="pump.prices",
                target=f"fp:{pump}",
                details={"nozzles": details, "at": now.isoformat()},
            )
        return sent

    def poke(self) -> None:
        """Look again now (a new snapshot arrived, a pump went idle)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)

    def as_json(self) -> dict[str, Any]:
        return {
            "device": self.controller.device,
            "pushes": self.pushes,
            "downloads": self.downloads,
            "failures": self.failures,
            "pending": sorted(self.pending),
            "shown": {
                str(p): {str(n): v for n, (v, _) in sorted(s.items())}
                for p, s in sorted(self.shown.items())
            },
        }
