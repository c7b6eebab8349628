"""A pump driver seen under the station's fuelling-point numbers when the device numbers its
pumps otherwise (``DeviceConfig.pumps`` maps station number → device number)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from forecourt.protocols.driver import EventSink, PumpDriver
from forecourt.protocols.model import (
    AlarmReported,
    Capability,
    DeviceEvent,
    DeviceHealth,
    DeviceIdentity,
    DeviceRejected,
    DeviceTransaction,
    FillingProgress,
    NozzleTotals,
    Preset,
    PumpStatus,
    PumpStatusChanged,
    TransactionFinished,
)


class RenumberedPumps:
    """Station numbers outside, the device's numbers inside; everything else passes through."""

    def __init__(self, inner: PumpDriver, station_to_device: Mapping[int, int]) -> None:
        self.inner = inner
        self.to_device = dict(station_to_device)
        self.to_station = {d: s for s, d in self.to_device.items()}
        if len(self.to_station) != len(self.to_device):
            raise ValueError("two station fuelling points map to one device pump")
        self.name = inner.name
        self.capabilities: frozenset[Capability] = inner.capabilities
        self._sink: EventSink | None = None

    def _dev(self, pump: int) -> int:
        return self.to_device.get(pump, pump)

    def _st(self, pump: int) -> int:
        return self.to_station.get(pump, pump)

    def _txn(self, txn: DeviceTransaction) -> DeviceTransaction:
        return replace(txn, pump=self._st(txn.pump))

    def _status(self, status: PumpStatus) -> PumpStatus:
        return replace(status, pump=self._st(status.pump))

    def _event(self, event: DeviceEvent) -> DeviceEvent:
        if isinstance(event, PumpStatusChanged):
            return replace(event, status=self._status(event.status))
        if isinstance(event, FillingProgress):
            return replace(event, pump=self._st(event.pump))
        if isinstance(event, TransactionFinished):
            return replace(event, transaction=self._txn(event.transaction))
        if isinstance(event, AlarmReported) and event.alarm.source == "pump":
            return replace(event, alarm=replace(event.alarm, number=self._st(event.alarm.number)))
        return event

    def subscribe(self, sink: EventSink) -> None:
        self._sink = sink
        self.inner.subscribe(lambda event: sink(self._event(event)))

    def health(self) -> DeviceHealth:
        return self.inner.health()

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def identity(self) -> DeviceIdentity:
        return await self.inner.identity()

    async def pump_status(self, pumps: Sequence[int]) -> list[PumpStatus]:
        found = await self.inner.pump_status([self._dev(p) for p in pumps])
        return [self._status(s) for s in found]

    async def authorize(
        self, pump: int, nozzle: int | None, preset: Preset, unit_price_mmu: int
    ) -> int | None:
        return await self.inner.authorize(self._dev(pump), nozzle, preset, unit_price_mmu)

    async def stop(self, pump: int) -> None:
        await self.inner.stop(self._dev(pump))

    async def emergency_stop(self, pump: int) -> None:
        await self.inner.emergency_stop(self._dev(pump))

    async def emergency_stop_all(self, pumps: Sequence[int]) -> dict[int, Exception]:
        stop_all = getattr(self.inner, "emergency_stop_all", None)
        if not callable(stop_all):
            raise DeviceRejected("this line cannot stop every pump at once")
        failed: dict[int, Exception] = await stop_all([self._dev(p) for p in pumps])
        return {self._st(pump): exc for pump, exc in failed.items()}

    async def suspend(self, pump: int) -> None:
        await self.inner.suspend(self._dev(pump))

    async def resume(self, pump: int) -> None:
        await self.inner.resume(self._dev(pump))

    async def set_prices(self, pump: int, prices_mmu: Sequence[int]) -> None:
        await self.inner.set_prices(self._dev(pump), prices_mmu)

    async def totals(self, pump: int, nozzle: int) -> NozzleTotals:
        found = await self.inner.totals(self._dev(pump), nozzle)
        return replace(found, pump=self._st(found.pump))

    async def unacknowledged_transactions(self, pumps: Sequence[int]) -> list[DeviceTransaction]:
        found = await self.inner.unacknowledged_transactions([self._dev(p) for p in pumps])
        return [self._txn(t) for t in found]

    async def finished_transaction(self, pump: int) -> DeviceTransaction | None:
        found = await self.inner.finished_transaction(self._dev(pump))
        return None if found is None else self._txn(found)

    async def close_transaction(self, pump: int, transaction: int) -> None:
        await self.inner.close_transaction(self._dev(pump), transaction)

    async def transactions(
        self, pump: int, start: datetime, end: datetime
    ) -> list[DeviceTransaction]:
        found = await self.inner.transactions(self._dev(pump), start, end)
        return [self._txn(t) for t in found]


def renumbered(driver: PumpDriver, station_to_device: Mapping[int, int]) -> PumpDriver:
    """The driver itself when the numbers agree, else a renumbering view of it."""
    if all(s == d for s, d in station_to_device.items()):
        return driver
    return RenumberedPumps(driver, station_to_device)
