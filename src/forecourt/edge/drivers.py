"""The device-driver interface every forecourt protocol adapter implements.

A driver turns one vendor's wire protocol (jsonPTS today; DART, Gilbarco two-wire, IFSF and
Veeder-Root TLS later) into this standard model. Pumps are addressed by their fuelling-point
number on the controller (1-based). All quantities are exact integers: volumes in millilitres,
amounts in minor units, unit prices in milli-minor units per litre.

Contract every driver honours (the edge's exactly-once story depends on it):
- a finished dispensing stays readable (:meth:`ForecourtDriver.unacknowledged_transactions`)
  until the edge calls :meth:`ForecourtDriver.close_transaction` with its device transaction
  number, so an edge that restarts re-reads it and de-duplicates by (pump, transaction);
- ``close_transaction`` is idempotent: closing an already-closed transaction is not an error;
- transport faults raise :class:`DriverUnavailable`; a refusal by the device raises
  :class:`DeviceRejected` with the device's own code.
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


@dataclass(frozen=True, slots=True)
class DeviceTransaction:
    """One finished dispensing as the device recorded it."""

    pump: int
    nozzle: int
    transaction: int
    volume_ml: int
    amount_minor: int
    unit_price_mmu: int
    totalizer_start_ml: int  # the nozzle's volume totalizer before and after
    totalizer_end_ml: int
    started_at: datetime | None
    ended_at: datetime
    grade_code: str | None = None  # the device's grade id, as text, when it reports one
    closed: bool = False


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

    async def pump_status(self, pumps: Sequence[int]) -> list[PumpStatus]:
        """Current status of each pump, in the order asked."""
        ...

    async def authorize(
        self, pump: int, nozzle: int | None, preset: Preset, unit_price_mmu: int
    ) -> None:
        """Release the pump at ``unit_price_mmu``; ``nozzle`` None releases any nozzle."""
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
        """Finished transactions not yet closed by :meth:`close_transaction` (after a restart)."""
        ...

    async def close_transaction(self, pump: int, transaction: int) -> None: ...

    async def transactions(
        self, pump: int, start: datetime, end: datetime
    ) -> list[DeviceTransaction]:
        """The device's transaction memory between two instants (for reconciliation)."""
        ...
