"""Driver interface v2: what a protocol adapter offers the edge, and how one is chosen.

A driver owns its line: its poll loop, retransmissions and timeouts run inside it, and it
tells the edge what happened through :class:`~forecourt.protocols.model.DeviceEvent` values
given to the sink it was handed (:meth:`PumpDriver.subscribe`). The edge's forecourt
controller also *asks* it (the pull half of :class:`PumpDriver`, answered from what the
driver last read off the line or, for a request/response device, from a fresh exchange), so
the controller's exactly-once rules do not depend on an event having arrived.

Contract every pump driver honours (the edge's exactly-once story depends on it):
- a finished dispensing stays readable (:meth:`PumpDriver.unacknowledged_transactions`)
  until the edge calls :meth:`PumpDriver.close_transaction` with its device transaction
  number, so an edge that restarts re-reads it and de-duplicates by (pump, transaction);
- ``close_transaction`` may be refused for a number the device no longer holds open (a real
  PTS-2 refuses it): the edge only closes what the pump shows it holds, and re-reads on refusal;
- a protocol without transaction numbers (DART) gets a synthesised one from the driver's
  :class:`DriverStore`, written before the transaction is reported, so the same dispensing
  keeps its number across a restart of the edge;
- transport faults raise :class:`DriverUnavailable`; a refusal by the device raises
  :class:`DeviceRejected` with the device's own code;
- one pump's unreadable or refused status never fails the others: :meth:`PumpDriver.
  pump_status` gives that pump ``PumpState.ERROR`` (or ``OFFLINE``) with a reason;
- a *finished* transaction is never dropped for an odd value: the driver converts what it can
  exactly, and for a value it cannot represent exactly in our integer units it returns the
  nearest integer (half-even), the wire text in ``DeviceTransaction.raw`` and a flag in
  ``DeviceTransaction.flags`` (``FLAG_INEXACT``); a value with more decimals than configured
  but still exact in our units is returned exactly with ``FLAG_EXTRA_DECIMALS``;
- an optional value the device leaves out (the totalizer) is ``None``, never a guess;
- a corrupt, truncated, oversized, replayed or out-of-sequence frame is refused with a
  :class:`~forecourt.protocols.model.FrameRefused` event and counted in the device's health;
  it never raises out of the poll loop and never changes a transaction.

Which driver runs which pumps and tanks is station configuration (:class:`DeviceConfig`),
resolved through the registry (:func:`register`, :func:`create_driver`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from forecourt.kernel.clock import Clock
from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.model import (
    Capability,
    DeviceAlarm,
    DeviceEvent,
    DeviceHealth,
    DeviceIdentity,
    DeviceTransaction,
    NozzleTotals,
    Preset,
    PresetType,
    PumpStatus,
    TankDelivery,
    TankMeasurement,
)

EventSink = Callable[[DeviceEvent], None]


def ignore_event(event: DeviceEvent) -> None:
    """The sink a driver has before anyone subscribed."""


@runtime_checkable
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


@runtime_checkable
class PumpDriver(ForecourtDriver, Protocol):
    """A v2 pump driver: the pull half above, plus its name, capabilities, events, health."""

    name: str
    capabilities: frozenset[Capability]

    def subscribe(self, sink: EventSink) -> None:
        """Hand the driver the sink its events go to (one sink; a later call replaces it)."""
        ...

    def health(self) -> DeviceHealth: ...


@runtime_checkable
class StopsAllAtOnce(Protocol):
    """A pump driver with ``Capability.EMERGENCY_STOP_ALL``: one exchange on the line stops
    every pump of it (a broadcast, or one request carrying a stop for each pump)."""

    async def emergency_stop_all(self, pumps: Sequence[int]) -> dict[int, Exception]:
        """Emergency-stop ``pumps`` in one exchange; the pumps the device refused, with why.
        Raises when the exchange itself failed (then none is known to have stopped)."""
        ...


@runtime_checkable
class Resets(Protocol):
    """A pump driver whose pumps take a reset out of a stop (DART's RESET): the edge resets a
    pump when its emergency stop is released, so it shows idle at once."""

    async def reset(self, pump: int) -> None: ...


@runtime_checkable
class ReportsPresetLimits(Protocol):
    """A driver that knows a pump's own maximum preset (e.g. a DART pump's maximum amount from
    its parameters); None where it does not know. The edge's maxima apply either way."""

    def max_preset(self, pump: int, kind: PresetType) -> int | None: ...


@runtime_checkable
class GaugeDriver(Protocol):
    """A tank gauge: request/response readings of the tanks it measures."""

    name: str
    capabilities: frozenset[Capability]

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def subscribe(self, sink: EventSink) -> None: ...

    def health(self) -> DeviceHealth: ...

    async def identity(self) -> DeviceIdentity: ...

    async def measurements(self, tanks: Sequence[int] = ()) -> list[TankMeasurement]:
        """Current inventory of the given tanks (station numbers; empty: all it has)."""
        ...

    async def deliveries(self, tanks: Sequence[int] = ()) -> list[TankDelivery]:
        """The deliveries the gauge holds in memory for those tanks."""
        ...

    async def alarms(self, tanks: Sequence[int] = ()) -> list[DeviceAlarm]:
        """The alarms active now for those tanks."""
        ...


class DriverStore(Protocol):
    """A small persistent key → JSON-object store of one driver (what its protocol lacks).

    ``save`` returns only once the value is durable (it survives a crash of the process)."""

    async def load(self, key: str) -> dict[str, Any] | None: ...

    async def save(self, key: str, value: dict[str, Any]) -> None: ...


# --- configuration and registry -----------------------------------------------------------


class DeviceConfigError(InvalidValue):
    code = "edge.device_config"


@dataclass(frozen=True)
class DeviceConfig:
    """One device line of a station's configuration.

    ``transport``: ``tcp://HOST:PORT``, ``http://HOST:PORT`` (jsonPTS) or
    ``serial:///dev/ttyUSB0?baudrate=9600&parity=O`` (DART, TLS serial).
    ``pumps``: station fuelling-point number → the protocol's address for it (DART: 0x50 +
    n; PTS-2: its pump number). ``tanks``: station tank number → the gauge's tank number.
    ``options``: protocol settings (timeouts, decimals, units, credentials…), as text/numbers.
    """

    name: str
    protocol: str
    transport: str
    pumps: Mapping[int, int] = field(default_factory=dict)
    tanks: Mapping[int, int] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass(frozen=True)
class DriverContext:
    """What the edge gives a driver it creates."""

    clock: Clock
    store: DriverStore
    timezone: str = "UTC"
    currency: str = "CNY"


PumpDriverFactory = Callable[[DeviceConfig, DriverContext], PumpDriver]
GaugeDriverFactory = Callable[[DeviceConfig, DriverContext], GaugeDriver]

_PUMP_DRIVERS: dict[str, PumpDriverFactory] = {}
_GAUGE_DRIVERS: dict[str, GaugeDriverFactory] = {}


def register_pump_driver(protocol: str, factory: PumpDriverFactory) -> None:
    _PUMP_DRIVERS[protocol] = factory


def register_gauge_driver(protocol: str, factory: GaugeDriverFactory) -> None:
    _GAUGE_DRIVERS[protocol] = factory


def _load_builtin_drivers() -> None:
    # Imported when first asked, not with this module: every driver module imports this one,
    # and code that only needs the interface (the edge's pure domain) pulls in no driver.
    importlib.import_module("forecourt.protocols.builtin")


def pump_protocols() -> list[str]:
    _load_builtin_drivers()
    return sorted(_PUMP_DRIVERS)


def gauge_protocols() -> list[str]:
    _load_builtin_drivers()
    return sorted(_GAUGE_DRIVERS)


def _factory(kind: str, table: Mapping[str, Any], config: DeviceConfig) -> Any:
    _load_builtin_drivers()
    factory = table.get(config.protocol)
    if factory is None:
        raise DeviceConfigError(
            f"device {config.name!r}: no {kind} driver for protocol {config.protocol!r}",
            hint=f"known: {', '.join(sorted(table)) or 'none'}",
        )
    return factory


def create_pump_driver(config: DeviceConfig, context: DriverContext) -> PumpDriver:
    factory: PumpDriverFactory = _factory("pump", _PUMP_DRIVERS, config)
    return factory(config, context)


def create_gauge_driver(config: DeviceConfig, context: DriverContext) -> GaugeDriver:
    factory: GaugeDriverFactory = _factory("tank-gauge", _GAUGE_DRIVERS, config)
    return factory(config, context)


def transactions_window_ok(start: datetime, end: datetime) -> None:
    """Refuse an empty or reversed report window (every driver's ``transactions``)."""
    if end < start:
        raise InvalidValue("the report window ends before it starts")
