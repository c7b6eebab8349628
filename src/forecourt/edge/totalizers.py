"""Totalizer watch: every nozzle's meter read against the journal, so that litres no sale
accounts for are seen even before the next sale.

The controller already checks each journaled sale against the one before it on the same
nozzle (its start totalizer must be the previous end: flag ``totalizer_gap``). This watch
reads the meters when nothing flows: at start-up (once the controller has recovered what the
device holds), after each journaled sale, and every ``interval_s``. For each nozzle of an
idle pump it compares the meter with the last journaled end totalizer (or, before any sale
with a totalizer, with the meter as it first read it):

- the meter is ahead: product left through that nozzle with no sale journaled here (a sale
  taken by another terminal, a pump run in manual mode, a meter drifting). Seen twice in a row
  (a second read at least ``confirm_after_s`` later, the pump idle at both and the journal
  unchanged: never a sale in the middle of being journaled), it raises the alarm
  ``totalizer_gap_fp{pump}_n{nozzle}`` with the evidence (journaled end, meter, unaccounted
  millilitres, last sale) and writes it to the audit trail. A gap is reported once: the next
  alarm needs the meter to move on again unaccounted.
- the meter is behind: it was replaced or reset (alarm ``totalizer_backwards_fp…``).

Reads are never on the sales path: a pump that is not idle is skipped and read later, and a
device that does not answer is read at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forecourt.edge.domain import FpState
from forecourt.infra.background import BackgroundService
from forecourt.infra.logging import get_logger
from forecourt.protocols.model import Capability, DeviceRejected, DriverUnavailable

if TYPE_CHECKING:
    from forecourt.edge.controller import ForecourtController
    from forecourt.edge.journal import NozzleReading

log = get_logger("forecourt.edge.totalizers")

Key = tuple[int, int]  # (fuelling point, nozzle)
MAX_FINDINGS = 100


@dataclass
class TotalizerStats:
    checks: int = 0
    reads: int = 0
    skipped_busy: int = 0
    read_failures: int = 0
    gaps: int = 0
    backwards: int = 0


@dataclass
class _Suspect:
    meter_ml: int
    expected_ml: int
    journaled: tuple[str, int] | None  # (sale id, end) the journal showed
    seen_at: float


@dataclass
class TotalizerWatch(BackgroundService):
    controller: ForecourtController
    interval_s: float = 300.0
    confirm_after_s: float = 1.0
    tolerance_ml: int = 0
    monotonic: Callable[[], float] = time.monotonic
    stats: TotalizerStats = field(default_factory=TotalizerStats)
    #: the newest meter reading of each nozzle, and the meter a gap was last reported at
    meter: dict[Key, int] = field(default_factory=dict)
    reported: dict[Key, int] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    _suspects: dict[Key, _Suspect] = field(default_factory=dict)
    _journaled: dict[Key, tuple[str, int] | None] = field(default_factory=dict)
    _due: set[int] = field(default_factory=set)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.task_name = f"edge-totalizers-{self.controller.device or 'forecourt'}"

    def request(self, pump: int | None = None) -> None:
        """Check ``pump`` (every pump of the line when None) as soon as it is idle."""
        self._due.update(self.controller.pumps() if pump is None else [pump])
        self._wake.set()

    def sale_journaled(self) -> None:
        """A sale was journaled on this line: check the nozzles whose last sale changed."""
        self._wake.set()

    @property
    def supported(self) -> bool:
        capabilities: frozenset[Capability] = getattr(
            self.controller.driver, "capabilities", frozenset({Capability.TOTALS})
        )
        return Capability.TOTALS in capabilities

    # --- one pass ------------------------------------------------------------------------

    async def check_once(self) -> None:
        """Check the pumps that are due, the nozzles whose journal moved, and the suspects."""
        snapshot = self.controller.snapshot()
        if snapshot is None or not self.supported or not self.controller.reachable:
            return
        self.stats.checks += 1
        pumps = set(self._due) | {pump for pump, _ in self._suspects}
        nozzles = [
            (pump, nozzle.number)
            for pump in self.controller.pumps()
            if (fp := snapshot.fuelling_point(pump)) is not None
            for nozzle in fp.nozzles
        ]
        for key, last in (await self.controller.journal.last_readings(nozzles)).items():
            now = (last.sale_id, last.totalizer_end_ml) if last else None
            if key in self._journaled and self._journaled[key] != now:
                pumps.add(key[0])  # a sale was journaled: read the meter after it
            self._journaled[key] = now
        for pump in sorted(pumps):
            if await self._check_pump(pump):
                self._due.discard(pump)

    async def _check_pump(self, pump: int) -> bool:
        """True when every nozzle of ``pump`` was read (False: read it again later)."""
        snapshot = self.controller.snapshot()
        fp = snapshot.fuelling_point(pump) if snapshot else None
        if fp is None:
            return True
        done = True
        for nozzle in fp.nozzles:
            if not self._idle(pump):
                self.stats.skipped_busy += 1
                return False
            done = await self._check_nozzle(pump, nozzle.number) and done
        return done

    def _idle(self, pump: int) -> bool:
        machine = self.controller.machines.get(pump)
        return machine is not None and machine.state is FpState.IDLE

    async def _check_nozzle(self, pump: int, nozzle: int) -> bool:
        key = (pump, nozzle)
        journal = self.controller.journal
        before = await journal.last_reading(pump, nozzle)
        try:
            totals = await self.controller.driver.totals(pump, nozzle)
        except (DriverUnavailable, DeviceRejected) as exc:
            self.stats.read_failures += 1
            log.warning("edge.totalizer_unreadable", pump=pump, nozzle=nozzle, error=str(exc))
            return False
        self.stats.reads += 1
        after = await journal.last_reading(pump, nozzle)
        if after != before or not self._idle(pump):
            self._suspects.pop(key, None)
            return False  # a sale came or is coming: read again when it is journaled
        meter = totals.volume_ml
        journaled = (before.sale_id, before.totalizer_end_ml) if before else None
        first_seen = self.meter.get(key)
        self.meter[key] = meter
        if journaled is not None:
            expected = max(journaled[1], self.reported.get(key, journaled[1]))
        elif first_seen is not None:
            expected = max(first_seen, self.reported.get(key, first_seen))
        else:
            return True  # the first reading of a nozzle with no sale: the baseline
        if expected - self.tolerance_ml <= meter <= expected + self.tolerance_ml:
            self._suspects.pop(key, None)
            return True
        suspect = self._suspects.get(key)
        now = self.monotonic()
        if suspect is None or suspect.journaled != journaled or meter < suspect.meter_ml:
            self._suspects[key] = _Suspect(meter, expected, journaled, now)
            return False  # confirm with a second read
        if now - suspect.seen_at < self.confirm_after_s:
            return False
        del self._suspects[key]
        await self._found(pump, nozzle, expected, meter, before, first_seen)
        return True

    async def _found(
        self,
        pump: int,
        nozzle: int,
        expected: int,
        meter: int,
        last: NozzleReading | None,
        first_seen: int | None,
    ) -> None:
        ahead = meter > expected
        kind = "totalizer_gap" if ahead else "totalizer_backwards"
        journaled_end = last.totalizer_end_ml if last else None
        baseline = journaled_end if journaled_end is not None else first_seen
        evidence = {
            "pump": pump,
            "nozzle": nozzle,
            "device": self.controller.device,
            "journaled_end_ml": journaled_end,  # the last sale's end totalizer (None: no sale)
            "expected_ml": expected,  # the journal's end, or where the last gap was reported
            "meter_ml": meter,
            "unaccounted_ml": meter - expected,  # new since the expected reading
            "unaccounted_total_ml": meter - baseline if baseline is not None else None,
            "last_sale_id": last.sale_id if last else None,
            "read_at": self.controller.clock.now().isoformat(),
        }
        if ahead:
            self.stats.gaps += 1
            message = "the meter moved on with no sale journaled: litres unaccounted for"
        else:
            self.stats.backwards += 1
            message = "the meter is behind the journal: replaced or reset"
        self.reported[(pump, nozzle)] = meter
        self.findings = [*self.findings[-(MAX_FINDINGS - 1) :], {"kind": kind, **evidence}]
        self.controller.alarms.raise_(f"{kind}_fp{pump}_n{nozzle}", message, **evidence)
        await self.controller.journal.record_audit(
            actor=self.controller.actor,
            action=f"meter.{kind}",
            target=f"fp:{pump}",
            details=evidence,
        )

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        # Start-up: once the controller has polled (and so recovered what the device holds).
        while not (self.controller.reachable and self.controller.stats.polls >= 2):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)
            self._wake.clear()
        self.request()
        next_round = self.monotonic() + self.interval_s
        while True:
            self._wake.clear()
            try:
                await self.check_once()
            except (DriverUnavailable, DeviceRejected) as exc:
                log.warning("edge.totalizer_check_failed", error=str(exc))
            if self.monotonic() >= next_round:
                self.request()
                next_round = self.monotonic() + self.interval_s
            wait = self.confirm_after_s if (self._suspects or self._due) else self.interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(wait, self.interval_s))

    def as_json(self) -> dict[str, Any]:
        return {
            "device": self.controller.device,
            "stats": self.stats.__dict__.copy(),
            "meters": {f"{p}:{n}": ml for (p, n), ml in sorted(self.meter.items())},
            "findings": list(self.findings[-10:]),
        }
