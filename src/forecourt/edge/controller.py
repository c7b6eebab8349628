"""The forecourt controller: one state machine per fuelling point over a device driver.

It polls the driver, authorises calling pumps at the price in force (from the snapshot, so
it works without HQ), journals each finished dispensing, then settles and closes it at the
device. After a restart :meth:`ForecourtController.recover` re-reads every transaction the
device still holds unclosed; the journal de-duplicates them by (fuelling point, device
transaction) before any ``sale_id`` is assigned, so a crash between journaling and closing
never makes a second sale.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from forecourt.edge.domain import FpState, FuellingPointMachine
from forecourt.edge.drivers import (
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    ForecourtDriver,
    Preset,
    PumpState,
    PumpStatus,
)
from forecourt.edge.journal import Journal, SaleDraft
from forecourt.infra.background import BackgroundService
from forecourt.infra.crash import crash_point
from forecourt.infra.logging import get_logger
from forecourt.kernel.clock import Clock
from forecourt.network.contracts import StationSnapshot

log = get_logger("forecourt.edge.controller")


@dataclass
class ControllerStats:
    polls: int = 0
    authorisations: int = 0
    journaled: int = 0
    re_read_duplicates: int = 0
    closed: int = 0
    driver_errors: int = 0
    no_price: int = 0


class ForecourtController(BackgroundService):
    task_name = "edge-controller"

    def __init__(
        self,
        driver: ForecourtDriver | None,
        journal: Journal,
        snapshot: Callable[[], StationSnapshot | None],
        clock: Clock,
        *,
        poll_interval_s: float = 0.1,
        auto_authorise: bool = True,
        auto_settle: bool = True,
        on_journaled: Callable[[], None] = lambda: None,
        actor: str = "edge",
    ) -> None:
        self.driver: ForecourtDriver = driver  # type: ignore[assignment]  # set before start
        self.journal = journal
        self.snapshot = snapshot
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self.auto_authorise = auto_authorise
        self.auto_settle = auto_settle
        self.on_journaled = on_journaled
        self.actor = actor
        self.machines: dict[int, FuellingPointMachine] = {}
        self._authorised_price: dict[int, tuple[str, int]] = {}
        self._journaled: dict[int, int] = {}  # pump → device transaction already journaled
        self.stats = ControllerStats()

    def pumps(self) -> list[int]:
        snap = self.snapshot()
        return [fp.number for fp in snap.fuelling_points] if snap else []

    def machine(self, pump: int) -> FuellingPointMachine:
        if pump not in self.machines:
            self.machines[pump] = FuellingPointMachine(pump)
        return self.machines[pump]

    async def recover(self) -> int:
        """Journal and close every finished transaction the device still holds."""
        pumps = self.pumps()
        if not pumps:
            return 0
        txns = await self.driver.unacknowledged_transactions(pumps)
        for txn in txns:
            self.machine(txn.pump).move(FpState.FINISHED_UNPAID)
            await self._finish(txn)
        if txns:
            log.info("edge.recovered_transactions", count=len(txns))
        return len(txns)

    async def poll_once(self) -> None:
        pumps = self.pumps()
        if not pumps:
            return
        self.stats.polls += 1
        try:
            statuses = await self.driver.pump_status(pumps)
        except DriverUnavailable as exc:
            self.stats.driver_errors += 1
            for pump in pumps:
                self.machine(pump).observe(PumpState.OFFLINE)
            log.warning("edge.controller_unreachable", error=str(exc))
            return
        for status in statuses:
            try:
                await self._on_status(status)
            except (DriverUnavailable, DeviceRejected) as exc:
                self.stats.driver_errors += 1
                log.warning("edge.pump_command_failed", pump=status.pump, error=str(exc))

    async def _on_status(self, status: PumpStatus) -> None:
        machine = self.machine(status.pump)
        before = machine.state
        machine.observe(status.state)
        if (
            status.state is PumpState.CALLING
            and self.auto_authorise
            and before is not FpState.AUTHORISED
        ):
            await self._authorise(status.pump, status.nozzle)
        elif (
            status.state is PumpState.END_OF_TRANSACTION
            and machine.state is FpState.FINISHED_UNPAID
            and (
                status.transaction is None or self._journaled.get(status.pump) != status.transaction
            )
        ):
            for txn in await self.driver.unacknowledged_transactions([status.pump]):
                await self._finish(txn)

    async def _authorise(self, pump: int, nozzle: int | None) -> None:
        snap = self.snapshot()
        fp = snap.fuelling_point(pump) if snap else None
        if snap is None or fp is None or nozzle is None:
            return
        grade = next((n.grade for n in fp.nozzles if n.number == nozzle), None)
        price = snap.prices_at(self.clock.now()).get(grade) if grade else None
        if price is None:
            self.stats.no_price += 1
            log.error("edge.no_price", pump=pump, nozzle=nozzle, grade=grade)
            return
        await self.driver.authorize(pump, nozzle, Preset(), price.milli_minor_per_litre)
        self._authorised_price[pump] = (price.price_id, price.milli_minor_per_litre)
        self.stats.authorisations += 1
        self.machine(pump).move(FpState.AUTHORISED)
        await self.journal.record_audit(
            actor=self.actor,
            action="pump.authorize",
            target=f"fp:{pump}",
            details={
                "nozzle": nozzle,
                "grade": grade,
                "unit_price_mmu": price.milli_minor_per_litre,
                "price_version": price.price_id,
            },
        )

    def _draft(self, txn: DeviceTransaction, snap: StationSnapshot) -> SaleDraft:
        fp = snap.fuelling_point(txn.pump)
        nozzle = next((n for n in fp.nozzles if n.number == txn.nozzle), None) if fp else None
        grade = nozzle.grade if nozzle else (txn.grade_code or "unknown")
        price_version = None
        remembered = self._authorised_price.get(txn.pump)
        if remembered and remembered[1] == txn.unit_price_mmu:
            price_version = remembered[0]
        else:  # after a restart: find the snapshot price the device ran at
            in_force = snap.prices_at(txn.started_at or txn.ended_at).get(grade)
            if in_force and in_force.milli_minor_per_litre == txn.unit_price_mmu:
                price_version = in_force.price_id
        return SaleDraft(
            fuelling_point=txn.pump,
            nozzle=txn.nozzle,
            grade=grade,
            volume_ml=txn.volume_ml,
            unit_price_mmu=txn.unit_price_mmu,
            amount_minor=txn.amount_minor,
            currency=snap.currency,
            price_version=price_version,
            snapshot_version=snap.version,
            totalizer_start_ml=txn.totalizer_start_ml,
            totalizer_end_ml=txn.totalizer_end_ml,
            device_txn=txn.transaction,
            dispense_type="sale",
            started_at=txn.started_at,
            ended_at=txn.ended_at,
            business_date=snap.business_date(txn.ended_at),
            shift_id=snap.shift_id(txn.ended_at),
        )

    async def _finish(self, txn: DeviceTransaction) -> None:
        snap = self.snapshot()
        if snap is None:
            return
        journaled = await self.journal.record_sale(self._draft(txn, snap))
        crash_point("edge.after_journal_commit")
        self._journaled[txn.pump] = txn.transaction
        if journaled.new:
            self.stats.journaled += 1
            self.on_journaled()
        else:
            self.stats.re_read_duplicates += 1
        if not self.auto_settle:
            return
        await self.driver.close_transaction(txn.pump, txn.transaction)
        await self.journal.mark_settled(journaled.sale_id, txn.pump, txn.transaction)
        self._authorised_price.pop(txn.pump, None)
        self.machine(txn.pump).move(FpState.CLOSED)
        self.stats.closed += 1
        await self.journal.record_audit(
            actor=self.actor,
            action="pump.close_transaction",
            target=f"fp:{txn.pump}",
            details={"device_txn": txn.transaction, "sale_id": journaled.sale_id},
        )

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad poll must not stop the forecourt
                self.stats.driver_errors += 1
                log.exception("edge.poll_failed", error=str(exc))
            await asyncio.sleep(self.poll_interval_s)

    def states(self) -> dict[int, str]:
        return {n: m.state.value for n, m in sorted(self.machines.items())}
