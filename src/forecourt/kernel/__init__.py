"""Shared kernel: the value types every context speaks (money, prices, ids, time, events)."""

from forecourt.kernel.clock import Clock, SimulatedClock, SystemClock
from forecourt.kernel.errors import ForecourtError
from forecourt.kernel.events import Envelope
from forecourt.kernel.ids import new_id
from forecourt.kernel.money import Money, Rounding, UnitPrice

__all__ = [
    "Clock",
    "Envelope",
    "ForecourtError",
    "Money",
    "Rounding",
    "SimulatedClock",
    "SystemClock",
    "UnitPrice",
    "new_id",
]
