"""The forecourt controller: one state machine per fuelling point over a device driver.

It polls the driver, authorises calling pumps at the price in force (from the snapshot, so
it works without HQ), journals each finished dispensing, then closes it at the device.

What it guarantees, whatever the device does:

- **Nothing is closed unless it was journaled.** A transaction is closed only after the
  journal committed it, and only while the pump still holds a transaction with the *same
  contents* (read again just before the close): a re-used number never closes a new sale.
- **A re-used number is a new sale.** Transactions are de-duplicated by (device, fuelling
  point, number, epoch) and their contents (:func:`forecourt.edge.domain.
  transaction_fingerprint`). A controller that restarts with its counters reset, is swapped, or
  wraps its counter begins a new *epoch*: seen from its boot marker (:meth:`ForecourtDriver.
  identity`) or from a number re-used with other contents. Either raises an alarm.
- **A lost close is retried**, with backoff, while the pump shows the journaled transaction;
  when the pump shows anything else, the sale was closed (our close whose answer was lost, or
  another terminal) and is marked settled.
- **Sales closed elsewhere are found**: on start, on every reconnect, after a restart of the
  controller and when a fuelling vanishes between two polls, the controller's transaction
  report is read for the window since the pump's last journaled sale, and every unseen finished
  transaction in it is journaled.
- **One pump never blinds the others**: a pump that is offline or answers oddly is marked so
  and recovered when it answers; the edge starts and serves whatever answers.
- **The meter is checked**: the start totalizer is read from the device when the pump is
  authorised; consecutive sales of a nozzle must continue each other's totalizers, a gap is a
  flag on the sale and an alarm.
- **Commands never interleave on one line**: a command of the edge API (authorise with a
  preset, stop, suspend, resume; :mod:`forecourt.edge.commands`) and the poll loop's handling
  of a pump take the controller's lock, and a status read before a command is not acted on
  after it. A cashier's authorisation journals exactly like an automatic one (the price version
  and the start totalizer are recorded the same way). An emergency stop takes no lock (it must
  not wait behind anything) and blocks every authorisation of the pump until it is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from forecourt.edge.alarms import AlarmBoard
from forecourt.edge.domain import FpState, FuellingPointMachine, Refusal
from forecourt.edge.drivers import (
    FLAG_INEXACT,
    DeviceEvent,
    DeviceIdentity,
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    ForecourtDriver,
    Preset,
    PumpState,
    PumpStatus,
)
from forecourt.edge.journal import Journal, Journaled, SaleDraft
from forecourt.infra.background import BackgroundService
from forecourt.infra.crash import crash_point
from forecourt.infra.logging import get_logger
from forecourt.kernel.clock import Clock
from forecourt.kernel.errors import ForecourtError
from forecourt.network.contracts import StationSnapshot
from forecourt.protocols.model import (
    Capability,
    DeviceHealthState,
    FrameRefused,
    HealthChanged,
    IdentityChanged,
    PumpStatusChanged,
    TransactionFinished,
)

log = get_logger("forecourt.edge.controller")

FLAG_TOTALIZER_GAP = "totalizer_gap"  # the nozzle's meter moved between two journaled sales
FLAG_TOTALIZER_MISMATCH = "totalizer_volume_mismatch"  # end − start ≠ the volume sold
FLAG_FROM_REPORT = "recovered_from_report"  # closed elsewhere; found in the device's report

_HELD = (PumpState.END_OF_TRANSACTION, PumpState.OFFLINE, PumpState.ERROR)


@dataclass
class ControllerStats:
    polls: int = 0
    authorisations: int = 0
    journaled: int = 0
    re_read_duplicates: int = 0
    closed: int = 0
    closed_elsewhere: int = 0
    close_failures: int = 0
    driver_errors: int = 0
    pump_errors: int = 0  # status polls a pump answered with an error or an unreadable packet
    no_price: int = 0
    authorisations_cancelled: int = 0  # authorised, nothing dispensed in time: released
    refused_moves: int = 0
    epoch_changes: int = 0
    totalizer_gaps: int = 0
    inexact_values: int = 0
    recovered_from_report: int = 0
    recoveries: int = 0
    poll_busy_s: float = 0.0  # time spent in polls (the waits between them aside)


@dataclass(frozen=True)
class Authorised:
    """An authorisation the device accepted: at which price, under which price version."""

    pump: int
    nozzle: int
    grade: str
    unit_price_mmu: int
    price_version: str
    device_txn: int | None
    preset: Preset = field(default_factory=Preset)


class NoPrice(ForecourtError):
    """The snapshot has no price in force for the nozzle's grade: the pump cannot be sold on."""

    code = "pump.no_price"
    http_status = 409


class NozzleUnknown(ForecourtError):
    code = "pump.nozzle_unknown"
    http_status = 422


class EmergencyStopped(ForecourtError):
    """The pump is emergency-stopped from the edge: nothing authorises it until released."""

    code = "pump.emergency_stopped"
    http_status = 409


@dataclass
class _Open:
    """A journaled sale the pump still holds: to close."""

    sale_id: str
    pump: int
    device_txn: int
    fingerprint: str
    attempts: int = 0
    retry_at: float = 0.0


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
        alarms: AlarmBoard | None = None,
        close_backoff_initial_s: float = 0.2,
        close_backoff_max_s: float = 10.0,
        authorise_grace_s: float = 5.0,
        authorisation_timeout: timedelta = timedelta(minutes=2),
        report_lookback: timedelta = timedelta(days=1),
        monotonic: Callable[[], float] = time.monotonic,
        serves: frozenset[int] | None = None,
        device: str | None = None,
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
        self.alarms = alarms or AlarmBoard(clock)
        self.close_backoff_initial_s = close_backoff_initial_s
        self.close_backoff_max_s = close_backoff_max_s
        self.authorise_grace_s = authorise_grace_s
        self.authorisation_timeout = authorisation_timeout
        self._authorised_when: dict[int, datetime] = {}  # pump → our authorisation (clock)
        self.report_lookback = report_lookback
        self.monotonic = monotonic
        self.machines: dict[int, FuellingPointMachine] = {}
        #: the station's fuelling points this controller drives (None: all of the snapshot's)
        self.serves = serves
        #: the configured device line it drives (None: the station's only one)
        self.device = device
        if device is not None:
            self.task_name = f"edge-controller-{device}"
        self.wake = asyncio.Event()  # set by the driver's events: poll now, not at the tick
        self._identity_stale = False  # the driver says who answers changed: ask again
        self.identity: DeviceIdentity | None = None
        self._last_identity: DeviceIdentity | None = None  # kept while the device is away
        self.epoch = 0
        self.reachable = False
        self._authorised_price: dict[int, tuple[str, int]] = {}
        self._start_totals: dict[int, tuple[int, int]] = {}  # pump → (nozzle, totalizer ml)
        self._open: dict[int, _Open] = {}
        self._needs_recovery: set[int] = set()
        self._open_loaded = False
        self._errors: dict[int, str] = {}
        self.stats = ControllerStats()
        #: held by a command and by the poll loop's handling of one pump (never by an emergency
        #: stop): driver commands and state-machine moves of this line do not interleave
        self.lock = asyncio.Lock()
        self._commands: dict[int, int] = {}  # pump → commands run on it (a read before is stale)
        #: pumps emergency-stopped from the edge: no authorisation until released
        self.emergency_stopped: set[int] = set()

    def pumps(self) -> list[int]:
        snap = self.snapshot()
        if snap is None:
            return []
        return [
            fp.number
            for fp in snap.fuelling_points
            if self.serves is None or fp.number in self.serves
        ]

    def on_event(self, event: DeviceEvent) -> None:
        """The driver saw something: a state change or a finished sale is handled at once;
        refused frames and health changes are logged (the driver counts them)."""
        if isinstance(event, PumpStatusChanged | TransactionFinished):
            # A driver without a loop of its own reports while the controller asks it: what
            # it says, that poll sees.
            capabilities: frozenset[Capability] = getattr(self.driver, "capabilities", frozenset())
            if Capability.EVENTS_ONLY_WHEN_ASKED not in capabilities:
                self.wake.set()
        elif isinstance(event, IdentityChanged):
            log.warning("edge.device_identity_changed", device=event.device, reason=event.reason)
            self._identity_stale = True
            self.wake.set()
        elif isinstance(event, FrameRefused):
            log.warning(
                "edge.frame_refused", device=event.device, reason=event.reason, detail=event.detail
            )
        elif isinstance(event, HealthChanged):
            if event.health.state is DeviceHealthState.ONLINE:
                self._identity_stale = True  # back: it may have restarted meanwhile
            log.info(
                "edge.device_health",
                device=event.device,
                state=event.health.state,
                reason=event.health.reason,
            )

    def machine(self, pump: int) -> FuellingPointMachine:
        if pump not in self.machines:
            self.machines[pump] = FuellingPointMachine(
                pump, authorise_grace_s=self.authorise_grace_s
            )
        return self.machines[pump]

    @property
    def device_id(self) -> str:
        return self.identity.device_id if self.identity else ""

    # --- recovery ------------------------------------------------------------------------

    async def recover(self) -> int:
        """Recover every pump that answers now (the others when they answer); returns the
        number of sales journaled. Never raises for a pump or a controller that is away."""
        before = self.stats.journaled
        self._needs_recovery.update(self.pumps())
        await self.poll_once()
        return self.stats.journaled - before

    async def _load_open_sales(self) -> None:
        """Sales a previous life journaled but did not close: close or settle them now."""
        latest: dict[int, _Open] = {}
        for sale in await self.journal.open_sales():
            entry = _Open(sale.sale_id, sale.fuelling_point, sale.device_txn, sale.fingerprint)
            older = latest.get(sale.fuelling_point)
            if older is None or older.sale_id < sale.sale_id:  # UUIDv7: later is greater
                if older is not None:
                    await self._settled(older, "superseded")
                latest[sale.fuelling_point] = entry
            else:
                await self._settled(entry, "superseded")
        self._open.update(latest)
        self._open_loaded = True
        if latest:
            log.info(
                "edge.recovered_transactions",
                count=len(latest),
                pumps=sorted(latest),
                detail="journaled before the restart, not yet closed: closed or settled now",
            )

    async def _check_identity(self) -> bool:
        """Ask the controller who it is; a new boot marker or a new device is a new epoch.

        With several device lines at the station the device is named by its line as well
        (``line:device``): two lines never share an epoch book, whatever their devices say."""
        self._identity_stale = False
        try:
            identity = await self.driver.identity()
        except DriverUnavailable as exc:
            self._unreachable(exc)
            return False
        if self.device is not None:
            identity = replace(identity, device_id=f"{self.device}:{identity.device_id}")
        previous = self._last_identity
        epoch, restarted = await self.journal.observe_device(
            identity.device_id, identity.boot_marker
        )
        self.identity, self.epoch = identity, epoch
        self._last_identity = identity
        if previous is not None and previous.device_id != identity.device_id:
            self.stats.epoch_changes += 1
            self.alarms.raise_(
                "controller_replaced",
                "the forecourt controller answering is another device",
                previous=previous.device_id,
                now=identity.device_id,
            )
        if restarted:
            self.stats.epoch_changes += 1
            self.alarms.raise_(
                "controller_restarted",
                "the forecourt controller restarted: its transactions are read again",
                device_id=identity.device_id,
                epoch=epoch,
                boot_marker=identity.boot_marker,
            )
        self._needs_recovery.update(self.pumps())
        return True

    def _unreachable(self, exc: Exception) -> None:
        self.stats.driver_errors += 1
        for pump in self.pumps():
            self.machine(pump).observe(PumpState.OFFLINE)
        self.reachable = False
        self.identity = None  # ask again who answers when it is back
        self.alarms.raise_(
            "controller_unreachable", "the forecourt controller does not answer", error=str(exc)
        )

    async def _recover(self, pump: int) -> None:
        """Journal what the device's report holds for this pump since its last journaled sale
        (sales closed elsewhere while we were away or blind)."""
        since = await self.journal.last_sale_end(pump)
        now = self.clock.now()
        start = since - timedelta(minutes=10) if since else now - self.report_lookback
        found = await self.driver.transactions(pump, start, now + timedelta(minutes=5))
        for txn in sorted(found, key=lambda t: (t.ended_at, t.transaction)):
            if not txn.closed:
                continue  # the one the pump holds: the status path journals and closes it
            journaled = await self._journal(txn, from_report=True)
            if journaled is None:
                return  # no snapshot yet: try again later
            if journaled.new:
                self.stats.recovered_from_report += 1
                log.warning(
                    "edge.sale_recovered_from_report",
                    pump=pump,
                    device_txn=txn.transaction,
                    sale_id=journaled.sale_id,
                )
            if not journaled.settled:
                await self.journal.mark_settled(journaled.sale_id)
        self.stats.recoveries += 1

    # --- polling -------------------------------------------------------------------------

    async def poll_once(self) -> None:
        pumps = self.pumps()
        if not pumps:
            return
        self.stats.polls += 1
        if not self._open_loaded:
            await self._load_open_sales()
        if (self.identity is None or self._identity_stale) and not await self._check_identity():
            return
        commanded = dict(self._commands)
        try:
            statuses = await self.driver.pump_status(pumps)
        except DriverUnavailable as exc:
            self._unreachable(exc)
            return
        if not self.reachable:
            self.reachable = True
            self.alarms.clear("controller_unreachable")
            log.info("edge.controller_reachable", device_id=self.device_id, epoch=self.epoch)
        for status in statuses:
            try:
                async with self.lock:
                    if self._commands.get(status.pump, 0) != commanded.get(status.pump, 0):
                        continue  # a command ran since this was read: the next poll looks again
                    await self._on_status(status)
            except (DriverUnavailable, DeviceRejected) as exc:
                self.stats.driver_errors += 1
                log.warning("edge.pump_command_failed", pump=status.pump, error=str(exc))

    async def _on_status(self, status: PumpStatus) -> None:
        pump = status.pump
        machine = self.machine(pump)
        if status.state in (PumpState.OFFLINE, PumpState.ERROR):
            machine.observe(status.state)
            if status.state is PumpState.ERROR:
                self.stats.pump_errors += 1
            if self._errors.get(pump) != (status.error or status.state.value):
                self._errors[pump] = status.error or status.state.value
                log.warning(
                    "edge.pump_unavailable", pump=pump, state=status.state, error=status.error
                )
            self._needs_recovery.add(pump)
            return
        if pump in self._errors:
            log.info("edge.pump_available", pump=pump, state=status.state)
            del self._errors[pump]
        if pump in self._needs_recovery:
            await self._recover(pump)
            self._needs_recovery.discard(pump)
        before = machine.state
        outcome = machine.observe(status.state, self.monotonic())
        if isinstance(outcome, Refusal):
            self.stats.refused_moves += 1
            log.warning(
                "edge.fp_move_refused",
                pump=pump,
                state=outcome.current,
                reported=outcome.target,
                reason=outcome.reason,
            )
        held = self._open.get(pump)
        if held is not None and status.state not in _HELD:
            # The pump no longer holds the sale we journaled: our close was applied though its
            # answer was lost, or another terminal closed it.
            await self._settled(held, "device")
        if status.state is not PumpState.AUTHORISED:
            self._authorised_when.pop(pump, None)
        if status.state is PumpState.END_OF_TRANSACTION:
            await self._on_finished(status)
        elif status.state is PumpState.AUTHORISED:
            await self._expire_authorisation(pump)
        elif (
            status.state is PumpState.CALLING
            and self.auto_authorise
            and machine.state is FpState.CALLING
            and pump not in self.emergency_stopped
        ):
            await self._auto_authorise(pump, status.nozzle)
        elif status.state is PumpState.IDLE and before in (
            FpState.FUELLING,
            FpState.SUSPENDED,
            FpState.STOPPED,
        ):
            # A sale that was flowing vanished between two polls: it was closed elsewhere.
            self._needs_recovery.add(pump)

    async def _on_finished(self, status: PumpStatus) -> None:
        pump = status.pump
        held = self._open.get(pump)
        if (
            held is not None
            and status.transaction == held.device_txn
            and self.monotonic() < held.retry_at
        ):
            return  # a close failed a moment ago: wait for its retry time
        txn = await self.driver.finished_transaction(pump)
        if txn is None:
            if held is not None:
                await self._settled(held, "device")
            return
        draft = self._draft(txn)
        if draft is None:
            return  # no snapshot: cannot journal, so nothing is closed
        fingerprint = draft.fingerprint()
        if held is not None and held.fingerprint != fingerprint:
            await self._settled(held, "device")  # the pump holds another sale now
            held = None
        if held is None:
            journaled = await self._journal(txn, draft=draft)
            if journaled is None:
                return
            held = _Open(journaled.sale_id, pump, txn.transaction, fingerprint)
            self._open[pump] = held
        if self.auto_settle:
            await self._close(held)

    async def _close(self, held: _Open) -> None:
        try:
            await self.driver.close_transaction(held.pump, held.device_txn)
        except (DriverUnavailable, DeviceRejected) as exc:
            held.attempts += 1
            delay = min(
                self.close_backoff_max_s,
                self.close_backoff_initial_s * 2 ** min(held.attempts - 1, 16),
            )
            held.retry_at = self.monotonic() + delay
            self.stats.close_failures += 1
            log.warning(
                "edge.close_failed",
                pump=held.pump,
                device_txn=held.device_txn,
                sale_id=held.sale_id,
                attempt=held.attempts,
                retry_in_s=round(delay, 2),
                error=str(exc),
            )
            if held.attempts >= 5:
                self.alarms.raise_(
                    f"close_failing_fp{held.pump}",
                    "a finished sale cannot be closed at the pump: the pump stays blocked",
                    pump=held.pump,
                    device_txn=held.device_txn,
                    attempts=held.attempts,
                )
            return
        crash_point("edge.after_close")
        await self.journal.mark_settled(held.sale_id)
        self._open.pop(held.pump, None)
        self._authorised_price.pop(held.pump, None)
        self._start_totals.pop(held.pump, None)
        self.machine(held.pump).move(FpState.CLOSED)
        self.alarms.clear(f"close_failing_fp{held.pump}")
        self.stats.closed += 1
        await self.journal.record_audit(
            actor=self.actor,
            action="pump.close_transaction",
            target=f"fp:{held.pump}",
            details={"device_txn": held.device_txn, "sale_id": held.sale_id},
        )

    async def _settled(self, held: _Open, by: str) -> None:
        """The sale left the pump without our (answered) close."""
        await self.journal.mark_settled(held.sale_id)
        if self._open.get(held.pump) is held:
            del self._open[held.pump]
        self.alarms.clear(f"close_failing_fp{held.pump}")
        self.stats.closed_elsewhere += 1
        log.info(
            "edge.sale_settled_at_device",
            pump=held.pump,
            device_txn=held.device_txn,
            sale_id=held.sale_id,
            by=by,
        )

    # --- authorising ---------------------------------------------------------------------

    async def _auto_authorise(self, pump: int, nozzle: int | None) -> None:
        """A calling pump, authorised by the edge itself (full tank, at the price in force)."""
        snap = self.snapshot()
        fp = snap.fuelling_point(pump) if snap else None
        if snap is None or fp is None or nozzle is None:
            return
        try:
            await self._authorise(pump, nozzle, Preset(), actor=self.actor)
        except (NoPrice, NozzleUnknown) as exc:
            self.stats.no_price += 1
            log.error("edge.no_price", pump=pump, nozzle=nozzle, grade=exc.details.get("grade"))
        except EmergencyStopped:
            log.warning("edge.authorisation_stopped", pump=pump, nozzle=nozzle)

    async def _authorise(self, pump: int, nozzle: int, preset: Preset, *, actor: str) -> Authorised:
        """Release ``pump``'s ``nozzle`` at the snapshot's price in force now, with ``preset``;
        the price version and the start totalizer are kept for the sale it becomes, and the
        authorisation is audited under ``actor``. Raises :class:`NoPrice`,
        :class:`NozzleUnknown`, or the driver's refusal."""
        snap = self.snapshot()
        fp = snap.fuelling_point(pump) if snap else None
        grade = next((n.grade for n in fp.nozzles if n.number == nozzle), None) if fp else None
        if snap is None or grade is None:
            raise NozzleUnknown(f"pump {pump} has no nozzle {nozzle}", pump=pump, nozzle=nozzle)
        price = snap.prices_at(self.clock.now()).get(grade)
        if price is None:
            raise NoPrice(
                f"no price in force for grade {grade}: pump {pump} cannot be authorised",
                pump=pump,
                nozzle=nozzle,
                grade=grade,
            )
        # The start totalizer, read from the meter itself before any product flows.
        try:
            totals = await self.driver.totals(pump, nozzle)
            self._start_totals[pump] = (nozzle, totals.volume_ml)
        except (DriverUnavailable, DeviceRejected) as exc:
            self._start_totals.pop(pump, None)
            log.warning("edge.totals_unavailable", pump=pump, nozzle=nozzle, error=str(exc))
        if pump in self.emergency_stopped:
            raise EmergencyStopped(f"pump {pump} is emergency-stopped: release it first", pump=pump)
        try:
            transaction = await self.driver.authorize(
                pump, nozzle, preset, price.milli_minor_per_litre
            )
        finally:
            if pump in self.emergency_stopped:
                # An emergency stop came while this authorisation was on its way: whatever the
                # device made of the two, it is stopped again now.
                with contextlib.suppress(DriverUnavailable, DeviceRejected):
                    await self.driver.emergency_stop(pump)
        if pump in self.emergency_stopped:
            raise EmergencyStopped(
                f"pump {pump} was emergency-stopped while it was being authorised", pump=pump
            )
        self._authorised_price[pump] = (price.price_id, price.milli_minor_per_litre)
        self._authorised_when[pump] = self.clock.now()
        self.stats.authorisations += 1
        self.machine(pump).authorised(self.monotonic())
        details: dict[str, object] = {
            "nozzle": nozzle,
            "grade": grade,
            "unit_price_mmu": price.milli_minor_per_litre,
            "price_version": price.price_id,
            "device_txn": transaction,
        }
        if preset != Preset():
            details["preset"] = {
                "type": preset.type.value,
                "volume_ml": preset.volume_ml,
                "amount_minor": preset.amount_minor,
            }
        await self.journal.record_audit(
            actor=actor, action="pump.authorize", target=f"fp:{pump}", details=details
        )
        return Authorised(
            pump=pump,
            nozzle=nozzle,
            grade=grade,
            unit_price_mmu=price.milli_minor_per_litre,
            price_version=price.price_id,
            device_txn=transaction,
            preset=preset,
        )

    async def _expire_authorisation(self, pump: int) -> None:
        """An authorisation nothing was dispensed on (the customer drove off before it came)
        is released, so the pump does not stay reserved for nobody."""
        since = self._authorised_when.setdefault(pump, self.clock.now())
        if self.clock.now() - since < self.authorisation_timeout:
            return
        await self.driver.stop(pump)
        self._authorised_when.pop(pump, None)
        self._authorised_price.pop(pump, None)
        self._start_totals.pop(pump, None)
        self.stats.authorisations_cancelled += 1
        log.warning(
            "edge.authorisation_expired",
            pump=pump,
            after_s=self.authorisation_timeout.total_seconds(),
        )
        await self.journal.record_audit(
            actor=self.actor,
            action="pump.authorisation_cancelled",
            target=f"fp:{pump}",
            details={"reason": "nothing dispensed in time"},
        )

    # --- commands (the edge API's; the rules are forecourt.edge.commands') -----------------

    @contextlib.asynccontextmanager
    async def commanding(self, pump: int) -> AsyncIterator[PumpStatus]:
        """Hold the line for one command on ``pump``: yields the pump's status read now.

        Any status the poll loop read before is not acted on afterwards (the device may have
        moved on because of the command); the loop is woken to look again at once."""
        async with self.lock:
            self._commands[pump] = self._commands.get(pump, 0) + 1
            try:
                yield await self.read_status(pump)
            finally:
                self._commands[pump] += 1
                self.wake.set()

    async def read_status(self, pump: int) -> PumpStatus:
        """The pump's status, asked of the device now (:class:`DriverUnavailable` when the
        line does not answer)."""
        if self.driver is None:
            raise DriverUnavailable(f"the device line of pump {pump} is not open yet")
        (status,) = await self.driver.pump_status([pump])
        return status

    async def authorise(self, pump: int, nozzle: int, preset: Preset, *, actor: str) -> Authorised:
        """A command's authorisation (inside :meth:`commanding`)."""
        return await self._authorise(pump, nozzle, preset, actor=actor)

    def cancelled(self, pump: int) -> None:
        """A command stopped the pump before anything flowed: nothing of its authorisation is
        kept for a next one (what flowed already keeps its price version for the journal)."""
        self._authorised_when.pop(pump, None)

    async def emergency_stop(self, pump: int) -> None:
        """Stop ``pump`` at once and block its authorisations (no lock: nothing waits first)."""
        self.emergency_stopped.add(pump)
        self._commands[pump] = self._commands.get(pump, 0) + 1
        try:
            if self.driver is None:
                raise DriverUnavailable(f"the device line of pump {pump} is not open yet")
            await self.driver.emergency_stop(pump)
        finally:
            self._commands[pump] += 1
            self.alarms.raise_(
                f"emergency_stop_fp{pump}",
                "the pump was emergency-stopped: it sells nothing until it is released",
                pump=pump,
            )
            self.wake.set()

    async def emergency_stop_all(self) -> dict[int, Exception]:
        """Emergency-stop every pump of this line at once: by the protocol's broadcast where
        the driver has one (``Capability.EMERGENCY_STOP_ALL``), else each pump concurrently.
        Returns the pumps that could not be stopped, with why."""
        pumps = self.pumps()
        failed: dict[int, Exception] = {}
        capabilities: frozenset[Capability] = getattr(self.driver, "capabilities", frozenset())
        at_once = getattr(self.driver, "emergency_stop_all", None)
        if Capability.EMERGENCY_STOP_ALL in capabilities and callable(at_once):
            self.emergency_stopped.update(pumps)
            for pump in pumps:
                self._commands[pump] = self._commands.get(pump, 0) + 1
            try:
                failed = await at_once(pumps)
            except Exception as exc:  # noqa: BLE001 - reported per pump to the caller
                failed = dict.fromkeys(pumps, exc)
            finally:
                for pump in pumps:
                    self._commands[pump] += 1
                    self.alarms.raise_(
                        f"emergency_stop_fp{pump}",
                        "the pump was emergency-stopped: it sells nothing until it is released",
                        pump=pump,
                    )
                self.wake.set()
            return failed
        outcomes = await asyncio.gather(
            *(self.emergency_stop(pump) for pump in pumps), return_exceptions=True
        )
        for pump, outcome in zip(pumps, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, Exception):
                failed[pump] = outcome
        return failed

    def released(self, pump: int) -> None:
        """The emergency stop of ``pump`` is released: it may be authorised again."""
        self.emergency_stopped.discard(pump)
        self.alarms.clear(f"emergency_stop_fp{pump}")

    # --- journaling ----------------------------------------------------------------------

    def _draft(self, txn: DeviceTransaction) -> SaleDraft | None:
        snap = self.snapshot()
        if snap is None:
            return None
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
        start = txn.totalizer_start_ml
        if start is None:
            read = self._start_totals.get(txn.pump)
            if read is not None and read[0] == txn.nozzle:
                start = read[1]
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
            totalizer_start_ml=start,
            totalizer_end_ml=txn.totalizer_end_ml,
            device_txn=txn.transaction,
            dispense_type="sale",
            started_at=txn.started_at,
            ended_at=txn.ended_at,
            business_date=snap.business_date(txn.ended_at),
            shift_id=snap.shift_id(txn.ended_at),
            device_id=self.device_id,
            device_flags=tuple(txn.flags),
            device_raw=tuple(txn.raw),
        )

    async def _meter_flags(self, draft: SaleDraft) -> set[str]:
        """Check the nozzle's meter: this sale must continue the last journaled one."""
        flags: set[str] = set()
        end, start = draft.totalizer_end_ml, draft.totalizer_start_ml
        if start is not None and end is not None and end - start != draft.volume_ml:
            flags.add(FLAG_TOTALIZER_MISMATCH)
        if end is None:
            return flags
        expected_start = start if start is not None else end - draft.volume_ml
        previous = await self.journal.last_reading(draft.fuelling_point, draft.nozzle)
        if previous is not None and previous.totalizer_end_ml != expected_start:
            flags.add(FLAG_TOTALIZER_GAP)
            self.stats.totalizer_gaps += 1
            self.alarms.raise_(
                "totalizer_gap",
                "a nozzle's meter moved between two journaled sales (meter drift or an unseen "
                "sale)",
                pump=draft.fuelling_point,
                nozzle=draft.nozzle,
                previous_end_ml=previous.totalizer_end_ml,
                start_ml=expected_start,
                previous_sale=previous.sale_id,
                device_txn=draft.device_txn,
            )
        return flags

    async def _journal(
        self,
        txn: DeviceTransaction,
        *,
        draft: SaleDraft | None = None,
        from_report: bool = False,
    ) -> Journaled | None:
        draft = draft or self._draft(txn)
        if draft is None:
            return None
        known = await self.journal.known(draft)
        if known is not None:
            self.stats.re_read_duplicates += 1
            return known
        flags = await self._meter_flags(draft)
        if from_report:
            flags.add(FLAG_FROM_REPORT)
        if flags:
            draft = replace(draft, device_flags=tuple(sorted(set(draft.device_flags) | flags)))
        journaled = await self.journal.record_sale(draft)
        crash_point("edge.after_journal_commit")
        if not journaled.new:
            self.stats.re_read_duplicates += 1
            return journaled
        self.stats.journaled += 1
        self.on_journaled()
        if journaled.epoch_changed:
            self.stats.epoch_changes += 1
            self.epoch = journaled.epoch
            self.alarms.raise_(
                "device_epoch_change",
                "the controller re-used a transaction number for another sale (restart with "
                "counters reset, swap or wrap): a new epoch began",
                pump=txn.pump,
                device_txn=txn.transaction,
                epoch=journaled.epoch,
            )
            self._needs_recovery.update(self.pumps())
        if FLAG_INEXACT in draft.device_flags:
            self.stats.inexact_values += 1
            self.alarms.raise_(
                "inexact_device_value",
                "a finished sale carries a value our units cannot hold exactly: journaled as "
                "received, flagged for review",
                pump=txn.pump,
                device_txn=txn.transaction,
                raw=dict(txn.raw),
            )
        return journaled

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        self._needs_recovery.update(self.pumps())
        while True:
            # What the driver reported before this poll is seen by it; a report during it wakes
            # the next one early.
            self.wake.clear()
            try:
                started = time.perf_counter()
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad poll must not stop the forecourt
                self.stats.driver_errors += 1
                log.exception("edge.poll_failed", error=str(exc))
            finally:
                self.stats.poll_busy_s += time.perf_counter() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll_interval_s)

    def states(self) -> dict[int, str]:
        return {n: m.state.value for n, m in sorted(self.machines.items())}
