"""The device-driver interface every forecourt protocol adapter implements.

A driver turns one vendor's wire protocol (jsonPTS today; DART, Gilbarco two-wire, IFSF and
Veeder-Root TLS later) into this standard model. Pumps are addressed by their fuelling-point
number on the controller (1-based). All quantities are exact integers: volumes in millilitres,
amounts in minor units, unit prices in milli-minor units per litre.

Contract every driver honours (the edge's exactly-once story depends on it):
- a finished dispensing stays readable (:meth:`ForecourtDriver.unacknowledged_transactions`)
  until the edge calls :meth:`ForecourtDriver.close_transaction` with its device transaction
  number, so an edge that restarts re-reads it and de-duplicates by (pump, transaction);
- ``close_transaction`` may be refused for a number the device no longer holds open (a real
  PTS-2 refuses it): the edge only closes what the pump shows it holds, and re-reads on refusal;
- transport faults raise :class:`DriverUnavailable`; a refusal by the device raises
  :class:`DeviceRejected` with the device's own code;
- one pump's unreadable or refused status never fails the others: :meth:`pump_status` gives
  that pump ``PumpState.ERROR`` with a reason in ``PumpStatus.error``;
- a *finished* transaction is never dropped for an odd value: the driver converts what it can
  exactly, and for a value it cannot represent exactly in our integer units it returns the
  nearest integer (half-even), the wire text in ``DeviceTransaction.raw`` and a flag in
  ``DeviceTransaction.flags`` (``FLAG_INEXACT``); a value with more decimals than configured
  but still exact in our units is returned exactly with ``FLAG_EXTRA_DECIMALS``;
- an optional value the device leaves out (the totalizer) is ``None``, never a guess.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from forecourt.kernel.errors import ForecourtError


class DriverUnavailable(ForecourtError):
    code = "edge.driver_unavailable"
    http_status = 503


class DeviceRejected(ForecourtError):
    code = "edge.device_rejected"
    http_status = 409


# Flags a driver may set on a DeviceTransaction (the edge adds its own, see edge.controller).
FLAG_INEXACT = "inexact_device_value"  # a value not representable in our units; see ``raw``
FLAG_EXTRA_DECIMALS = "extra_device_decimals"  # more decimals than configured, still exact
FLAG_NO_TOTALIZER = "no_device_totalizer"  # the device reported no totalizer


class PumpState(enum.StrEnum):
    """What the device says about one fuelling point (the standard model)."""

    IDLE = "idle"  # nozzles hung, nothing pending
    CALLING = "calling"  # a nozzle is up, waiting for authorisation
    AUTHORISED = "authorised"  # authorised, no product has flowed yet
    FUELLING = "fuelling"  # product flowing
    SUSPENDED = "suspended"  # paused by a command
    STOPPED = "stopped"  # stopped by a command before the nozzle was hung
    END_OF_TRANSACTION = "end_of_transaction"  # nozzle hung, transaction waits to be closed
    OFFLINE = "offline"  # the controller cannot reach the dispenser
    ERROR = "error"


class PresetType(enum.StrEnum):
    FULL_TANK = "full_tank"
    VOLUME = "volume"
    AMOUNT = "amount"


@dataclass(frozen=True, slots=True)
class Preset:
    type: PresetType = PresetType.FULL_TANK
    volume_ml: int | None = None
    amount_minor: int | None = None


@dataclass(frozen=True, slots=True)
class PumpStatus:
    pump: int
    state: PumpState
    nozzle: int | None = None  # the nozzle up / in use, when known
    volume_ml: int | None = None  # running or final volume of the current transaction
    amount_minor: int | None = None
    unit_price_mmu: int | None = None  # milli-minor units per litre
    transaction: int | None = None  # the device's own transaction number, when it has one
    error: str | None = None  # why the state is ERROR (the device's code, or a bad packet)


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who the controller is and which life of it we talk to.

    ``device_id`` names the controller (a serial number or unique identifier where the protocol
    offers one, else the configured address); ``boot_marker`` changes when it restarts, where the
    protocol shows that (``None`` when it does not). Transaction numbers are only unique within
    one ``device_id`` and one epoch; the edge detects an epoch change from these and from
    transaction contents that do not match what it journaled under the same number.
    """

    device_id: str
    boot_marker: str | None = None
    firmware: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceTransaction:
    """One finished dispensing as the device recorded it."""

    pump: int
    nozzle: int
    transaction: int
    volume_ml: int
    amount_minor: int
    unit_price_mmu: int
    totalizer_start_ml: int | None  # the nozzle's volume totalizer before (read from the
    totalizer_end_ml: int | None  # device, never derived) and after; None when not reported
    started_at: datetime | None
    ended_at: datetime
    grade_code: str | None = None  # the device's grade id, as text, when it reports one
    closed: bool = False
    flags: tuple[str, ...] = ()  # FLAG_* above
    raw: tuple[tuple[str, str], ...] = ()  # (wire field, wire text) of inexact values


@dataclass(frozen=True, slots=True)
class NozzleTotals:
    pump: int
    nozzle: int
    volume_ml: int
    amount_minor: int


class ForecourtDriver(Protocol):
    """One connection to a forecourt controller (or one dispenser loop)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def identity(self) -> DeviceIdentity:
        """The controller's identity and boot marker; also (re)reads its number format where
        the protocol offers it. Raises :class:`DriverUnavailable` when it does not answer."""
        ...

    async def pump_status(self, pumps: Sequence[int]) -> list[PumpStatus]:
        """Current status of each pump, in the order asked."""
        ...

    async def authorize(
        self, pump: int, nozzle: int | None, preset: Preset, unit_price_mmu: int
    ) -> int | None:
        """Release the pump at ``unit_price_mmu``; ``nozzle`` None releases any nozzle.
        Returns the transaction number the device confirms, when it gives one."""
        ...

    async def stop(self, pump: int) -> None: ...

    async def emergency_stop(self, pump: int) -> None: ...

    async def suspend(self, pump: int) -> None: ...

    async def resume(self, pump: int) -> None: ...

    async def set_prices(self, pump: int, prices_mmu: Sequence[int]) -> None:
        """Prices per nozzle (index 0 = nozzle 1)."""
        ...

    async def totals(self, pump: int, nozzle: int) -> NozzleTotals: ...

    async def unacknowledged_transactions(self, pumps: Sequence[int]) -> list[DeviceTransaction]:
        """Finished transactions not yet closed by :meth:`close_transaction` (after a restart).
        Raises when a pump cannot say (it may hold one)."""
        ...

    async def finished_transaction(self, pump: int) -> DeviceTransaction | None:
        """The one finished, unclosed transaction this pump holds now, or None. Raises
        :class:`DriverUnavailable`/:class:`DeviceRejected` when the pump cannot say."""
        ...

    async def close_transaction(self, pump: int, transaction: int) -> None:
        """Close (settle) a finished transaction. The device may refuse a number it does not
        hold open (:class:`DeviceRejected`); the edge then re-reads the pump's status."""
        ...

    async def transactions(
        self, pump: int, start: datetime, end: datetime
    ) -> list[DeviceTransaction]:
        """The device's transaction memory between two instants (for reconciliation)."""
        ...
