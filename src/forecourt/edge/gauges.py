"""Tank gauges at the edge: each configured gauge read on a schedule into the standard model.

Every read is journaled (each measurement; each delivery once; each device alarm from the
read it appeared in to the read it was gone in) and the latest of every tank is kept in memory
and served by the edge's API (``/v1/tanks``); a gauge that stops answering raises an alarm and
is read again at the next tick (it comes back by itself). A journal that fails to take a read
loses that read only: the gauge is read again at the next tick. Gauges are never on the sales
path: a gauge that is down blocks no pump and no upload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from forecourt.edge.alarms import AlarmBoard
from forecourt.edge.journal import GaugeJournaled, Journal
from forecourt.infra.background import BackgroundService
from forecourt.infra.logging import get_logger
from forecourt.kernel.clock import Clock
from forecourt.protocols.driver import GaugeDriver
from forecourt.protocols.model import (
    DeviceAlarm,
    DeviceEvent,
    DeviceRejected,
    DriverUnavailable,
    FrameRefused,
    TankDelivery,
    TankMeasurement,
    as_json,
)

log = get_logger("forecourt.edge.gauges")
T = TypeVar("T")


class GaugeReader(BackgroundService):
    """Reads one gauge every ``interval_s``: inventory and alarms each time, deliveries every
    ``deliveries_every`` reads."""

    def __init__(
        self,
        driver: GaugeDriver,
        clock: Clock,
        *,
        interval_s: float = 60.0,
        deliveries_every: int = 10,
        tanks: dict[int, int] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.driver = driver
        self.journal = journal
        #: called after each read with what it journaled (telemetry, for one)
        self.on_read: list[Callable[[GaugeReader, GaugeJournaled | None], None]] = []
        self.journal_failures = 0
        self.clock = clock
        self.task_name = f"edge-gauge-{driver.name}"
        self.interval_s = interval_s
        self.deliveries_every = max(1, deliveries_every)
        self.tanks = sorted(tanks or {})
        self.alarms = AlarmBoard(clock)
        self.measurements: dict[int, TankMeasurement] = {}
        self.deliveries: dict[int, list[TankDelivery]] = {}
        self.device_alarms: list[DeviceAlarm] = []
        self.reads = 0
        self.failures = 0
        self.last_read: datetime | None = None
        self.read_error: str | None = None
        self.reachable = False
        self.frames_refused = 0
        self.unsupported: set[str] = set()  # reports the console refused ("deliveries", …)
        driver.subscribe(self.on_event)

    def on_event(self, event: DeviceEvent) -> None:
        if isinstance(event, FrameRefused):
            self.frames_refused += 1
            log.warning(
                "edge.gauge_frame_refused",
                device=event.device,
                reason=event.reason,
                detail=event.detail,
            )

    async def read_once(self) -> bool:
        """One read of the gauge; False (and an alarm) when it does not answer.

        A report the console does not know (an older TLS answers ``9999FF1B`` to ``i202``) is
        left out from then on, logged once: the gauge answers, it only lacks that report."""
        try:
            found = await self.driver.measurements(self.tanks)
            alarms = await self._optional("alarms", self.driver.alarms)
            deliveries = None
            if self.reads % self.deliveries_every == 0:
                deliveries = await self._optional("deliveries", self.driver.deliveries)
        except (DriverUnavailable, DeviceRejected) as exc:
            self.failures += 1
            self.read_error = str(exc)
            if self.reachable or self.failures == 1:
                log.warning("edge.gauge_unreachable", device=self.driver.name, error=str(exc))
            self.reachable = False
            self.alarms.raise_("gauge_unreachable", "a tank gauge does not answer", error=str(exc))
            return False
        if not self.reachable:
            log.info("edge.gauge_reachable", device=self.driver.name, tanks=len(found))
        self.reachable = True
        self.alarms.clear("gauge_unreachable")
        self.reads += 1
        self.last_read = self.clock.now()
        self.read_error = None
        for measurement in found:
            self.measurements[measurement.tank] = measurement
        if alarms is not None:
            self.device_alarms = alarms
        if deliveries is not None:
            by_tank: dict[int, list[TankDelivery]] = {}
            for delivery in deliveries:
                by_tank.setdefault(delivery.tank, []).append(delivery)
            self.deliveries = by_tank
        journaled = await self._journal(found, deliveries, alarms)
        for listener in self.on_read:
            try:
                listener(self, journaled)
            except Exception:  # noqa: BLE001 - a listener never stops the gauge
                log.exception("edge.gauge_listener_failed", device=self.driver.name)
        return True

    async def _journal(
        self,
        found: list[TankMeasurement],
        deliveries: list[TankDelivery] | None,
        alarms: list[DeviceAlarm] | None,
    ) -> GaugeJournaled | None:
        if self.journal is None:
            return None
        try:
            journaled = await self.journal.record_gauge_read(
                self.driver.name, found, deliveries, alarms
            )
        except Exception as exc:  # noqa: BLE001 - a gauge read is lost, never the gauge
            self.journal_failures += 1
            log.error("edge.gauge_journal_failed", device=self.driver.name, error=str(exc))
            return None
        for delivery in journaled.deliveries:
            log.info(
                "edge.tank_delivery",
                device=self.driver.name,
                tank=delivery.tank,
                started_at=delivery.started_at.isoformat(),
                ended_at=delivery.ended_at.isoformat(),
                start_volume_ml=delivery.start_volume_ml,
                end_volume_ml=delivery.end_volume_ml,
            )
        for alarm in journaled.raised:
            log.warning(
                "edge.device_alarm",
                device=self.driver.name,
                source=alarm.source,
                number=alarm.number,
                code=alarm.code,
                device_code=alarm.device_code,
            )
        for source, number, code in journaled.cleared:
            log.info(
                "edge.device_alarm_cleared",
                device=self.driver.name,
                source=source,
                number=number,
                code=code,
            )
        return journaled

    async def _optional(
        self, report: str, read: Callable[[Sequence[int]], Awaitable[list[T]]]
    ) -> list[T] | None:
        """A report the gauge may not offer: None when it refused it (once, then never asked
        again); transport faults still raise."""
        if report in self.unsupported:
            return None
        try:
            return await read(self.tanks)
        except DeviceRejected as exc:
            self.unsupported.add(report)
            log.warning(
                "edge.gauge_report_unsupported",
                device=self.driver.name,
                report=report,
                error=str(exc),
            )
            return None

    async def run(self) -> None:
        while True:
            await self.read_once()
            await asyncio.sleep(self.interval_s)

    def as_json(self) -> dict[str, Any]:
        return {
            "device": self.driver.name,
            "reachable": self.reachable,
            "last_read": self.last_read.isoformat() if self.last_read else None,
            "read_error": self.read_error,
            "reads": self.reads,
            "failures": self.failures,
            "frames_refused": self.frames_refused,
            "journal_failures": self.journal_failures,
            "unsupported": sorted(self.unsupported),
            "health": as_json(self.driver.health()),
            "tanks": {str(n): as_json(m) for n, m in sorted(self.measurements.items())},
            "deliveries": {
                str(n): [as_json(d) for d in found] for n, found in sorted(self.deliveries.items())
            },
            "alarms": [as_json(a) for a in self.device_alarms],
        }
