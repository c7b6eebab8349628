"""The fuelling-point state machine (pure) and the journaled sale record of the edge.

States follow the forecourt, not the other way round: the device is the legal meter, so an
observation the machine did not expect is still applied, and counted as an anomaly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from forecourt.edge.drivers import PumpState


class FpState(enum.StrEnum):
    IDLE = "idle"
    CALLING = "calling"
    AUTHORISED = "authorised"
    FUELLING = "fuelling"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    FINISHED_UNPAID = "finished_unpaid"  # dispensing over, journaled, not yet settled
    CLOSED = "closed"  # settled and closed at the device; waits for the device to go idle
    ERROR = "error"
    OFFLINE = "offline"


_ANY = frozenset(FpState)

# Allowed transitions. ERROR and OFFLINE can be entered from anywhere and left to anything
# (the device tells us where it is when it comes back).
TRANSITIONS: dict[FpState, frozenset[FpState]] = {
    FpState.IDLE: frozenset({FpState.CALLING, FpState.AUTHORISED}),
    FpState.CALLING: frozenset({FpState.IDLE, FpState.AUTHORISED}),
    FpState.AUTHORISED: frozenset(
        {
            FpState.FUELLING,
            FpState.IDLE,
            FpState.STOPPED,
            FpState.FINISHED_UNPAID,
            FpState.SUSPENDED,
        }
    ),
    FpState.FUELLING: frozenset({FpState.SUSPENDED, FpState.STOPPED, FpState.FINISHED_UNPAID}),
    FpState.SUSPENDED: frozenset({FpState.FUELLING, FpState.STOPPED, FpState.FINISHED_UNPAID}),
    FpState.STOPPED: frozenset({FpState.FINISHED_UNPAID, FpState.IDLE, FpState.FUELLING}),
    FpState.FINISHED_UNPAID: frozenset({FpState.CLOSED}),
    FpState.CLOSED: frozenset({FpState.IDLE, FpState.CALLING}),
    FpState.ERROR: _ANY,
    FpState.OFFLINE: _ANY,
}

_FROM_DEVICE: dict[PumpState, FpState] = {
    PumpState.IDLE: FpState.IDLE,
    PumpState.CALLING: FpState.CALLING,
    PumpState.AUTHORISED: FpState.AUTHORISED,
    PumpState.FUELLING: FpState.FUELLING,
    PumpState.SUSPENDED: FpState.SUSPENDED,
    PumpState.STOPPED: FpState.STOPPED,
    PumpState.END_OF_TRANSACTION: FpState.FINISHED_UNPAID,
    PumpState.OFFLINE: FpState.OFFLINE,
    PumpState.ERROR: FpState.ERROR,
}


@dataclass
class FuellingPointMachine:
    number: int
    state: FpState = FpState.OFFLINE
    anomalies: int = 0
    history: list[tuple[FpState, FpState]] = field(default_factory=list)

    def can(self, target: FpState) -> bool:
        return (
            target == self.state
            or target in (FpState.ERROR, FpState.OFFLINE)
            or (target in TRANSITIONS[self.state])
        )

    def move(self, target: FpState) -> bool:
        """Enter ``target``; returns False (and counts an anomaly) if it was not expected."""
        if target == self.state:
            return True
        expected = self.can(target)
        if not expected:
            self.anomalies += 1
        self.history.append((self.state, target))
        if len(self.history) > 50:
            del self.history[:25]
        self.state = target
        return expected

    def observe(self, device: PumpState) -> FpState:
        """Map a device report onto the machine.

        CLOSED is ours (the device only says idle or end-of-transaction), so while we are
        CLOSED an end-of-transaction report of the already-closed sale keeps us CLOSED.
        FINISHED_UNPAID is left only by settlement, never by the device repeating itself.
        """
        target = _FROM_DEVICE[device]
        if self.state is FpState.CLOSED and target is FpState.FINISHED_UNPAID:
            return self.state
        if self.state is FpState.FINISHED_UNPAID and target is FpState.FINISHED_UNPAID:
            return self.state
        if self.state is FpState.FINISHED_UNPAID and target in (FpState.IDLE, FpState.CALLING):
            # The device was closed behind our back (or by our previous life): pass through.
            self.move(FpState.CLOSED)
        self.move(target)
        return self.state
