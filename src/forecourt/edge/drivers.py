"""The edge's view of device drivers: the standard model and the driver interface, re-exported.

They live in :mod:`forecourt.protocols.model` and :mod:`forecourt.protocols.driver`; the
edge's modules import them from here so the edge names one place.
"""

from __future__ import annotations

from forecourt.protocols.driver import (
    DeviceConfig,
    DriverContext,
    DriverStore,
    EventSink,
    ForecourtDriver,
    GaugeDriver,
    PumpDriver,
)
from forecourt.protocols.model import (
    FLAG_EXTRA_DECIMALS,
    FLAG_INEXACT,
    FLAG_NO_TOTALIZER,
    Capability,
    DeviceEvent,
    DeviceIdentity,
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    NozzleTotals,
    Preset,
    PresetType,
    PumpState,
    PumpStatus,
)

__all__ = [
    "FLAG_EXTRA_DECIMALS",
    "FLAG_INEXACT",
    "FLAG_NO_TOTALIZER",
    "Capability",
    "DeviceConfig",
    "DeviceEvent",
    "DeviceIdentity",
    "DeviceRejected",
    "DeviceTransaction",
    "DriverContext",
    "DriverStore",
    "DriverUnavailable",
    "EventSink",
    "ForecourtDriver",
    "GaugeDriver",
    "NozzleTotals",
    "Preset",
    "PresetType",
    "PumpDriver",
    "PumpState",
    "PumpStatus",
]
