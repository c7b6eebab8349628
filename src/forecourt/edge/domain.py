"""The fuelling-point state machine (pure) and the identity of a device transaction.

The machine is the edge's model of one fuelling point. Device reports are observations: a
report the model allows moves it; a report it does not allow (the pump claims to fuel while it
still holds an unclosed sale, say) is *refused*: the machine stays where it is, the refusal is
counted and returned so the controller can log it. Polling skips states (a quick fuelling can
go from calling to end-of-transaction between two polls), so skips that the device can really
make are allowed; what is refused is what no device can do.

Journaling never depends on this machine: a finished transaction the device shows is
journaled whatever state the model is in (the dispenser is the legal meter).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from forecourt.protocols.model import PumpState


class FpState(enum.StrEnum):
    IDLE = "idle"
    CALLING = "calling"
    AUTHORISED = "authorised"
    FUELLING = "fuelling"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    FINISHED_UNPAID = "finished_unpaid"  # dispensing over, not yet closed at the device
    CLOSED = "closed"  # closed at the device; waits for the device to go idle
    ERROR = "error"
    OFFLINE = "offline"


_ANY = frozenset(FpState)
_PROGRESS = frozenset({FpState.AUTHORISED, FpState.FUELLING, FpState.SUSPENDED, FpState.STOPPED})

# Allowed transitions. ERROR and OFFLINE can be entered from anywhere and left to anything
# (the device tells us where it is when it comes back).
TRANSITIONS: dict[FpState, frozenset[FpState]] = {
    # Another terminal (or a prepay) may authorise, and a fuelling can start and end between
    # two polls, so an idle or calling pump may be seen anywhere along a sale.
    FpState.IDLE: frozenset({FpState.CALLING, FpState.FINISHED_UNPAID} | _PROGRESS),
    FpState.CALLING: frozenset({FpState.IDLE, FpState.FINISHED_UNPAID} | _PROGRESS),
    # Authorised → calling: the authorisation was lost or cancelled at the device. Within
    # the grace after our own authorisation it is refused instead: the device is only lagging
    # (that is how a second authorisation of one sale was sent), see observe().
    FpState.AUTHORISED: frozenset(
        {
            FpState.CALLING,
            FpState.FUELLING,
            FpState.IDLE,  # hung up before product flowed, or the authorisation was cancelled
            FpState.STOPPED,
            FpState.FINISHED_UNPAID,
            FpState.SUSPENDED,
        }
    ),
    # Product has flowed: the sale ends in end-of-transaction. Idle means it was closed
    # elsewhere between two polls (the controller's auto-close, another terminal): allowed,
    # and the controller reads the device's transaction report for it.
    FpState.FUELLING: frozenset(
        {FpState.SUSPENDED, FpState.STOPPED, FpState.FINISHED_UNPAID, FpState.IDLE}
    ),
    FpState.SUSPENDED: frozenset(
        {
            FpState.FUELLING,
            FpState.AUTHORISED,
            FpState.STOPPED,
            FpState.FINISHED_UNPAID,
            FpState.IDLE,
        }
    ),
    FpState.STOPPED: frozenset({FpState.FINISHED_UNPAID, FpState.IDLE, FpState.FUELLING}),
    # A pump holding an unclosed sale starts nothing new until it is closed.
    FpState.FINISHED_UNPAID: frozenset({FpState.CLOSED}),
    # A closed sale's pump may show stopped: emergency-stopped mid-sale, switched off until
    # it is released.
    FpState.CLOSED: frozenset(
        {
            FpState.IDLE,
            FpState.CALLING,
            FpState.AUTHORISED,
            FpState.FINISHED_UNPAID,
            FpState.STOPPED,
        }
    ),
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


@dataclass(frozen=True)
class Refusal:
    """A move the machine did not make."""

    pump: int
    current: FpState
    target: FpState
    reason: str


@dataclass
class FuellingPointMachine:
    number: int
    state: FpState = FpState.OFFLINE
    refused: int = 0  # illegal moves refused
    history: list[tuple[FpState, FpState]] = field(default_factory=list)
    authorised_at: float | None = None  # monotonic time of our last authorisation
    #: how long a device may lag behind our authorisation, still showing the call
    authorise_grace_s: float = 5.0
    _last_refusal: tuple[FpState, FpState] | None = None

    def can(self, target: FpState) -> bool:
        return (
            target == self.state
            or target in (FpState.ERROR, FpState.OFFLINE)
            or (target in TRANSITIONS[self.state])
        )

    def move(self, target: FpState) -> Refusal | None:
        """Enter ``target`` if the model allows it; else stay, count, and return a refusal."""
        if target == self.state:
            return None
        if not self.can(target):
            return self._refuse(target, "not a transition of a fuelling point")
        self._enter(target)
        return None

    def _enter(self, target: FpState) -> None:
        self.history.append((self.state, target))
        if len(self.history) > 50:
            del self.history[:25]
        self.state = target
        self._last_refusal = None
        if target is not FpState.AUTHORISED:
            self.authorised_at = None

    def _refuse(self, target: FpState, reason: str) -> Refusal | None:
        """Count a refusal once per episode (the device repeats itself on every poll)."""
        episode = (self.state, target)
        if self._last_refusal == episode:
            return None
        self._last_refusal = episode
        self.refused += 1
        return Refusal(self.number, self.state, target, reason)

    def authorised(self, now: float) -> Refusal | None:
        """We authorised this pump (at monotonic ``now``)."""
        refusal = self.move(FpState.AUTHORISED)
        if refusal is None:
            self.authorised_at = now
        return refusal

    def observe(self, device: PumpState, now: float = 0.0) -> FpState | Refusal:
        """Map a device report onto the machine; returns the new state or the refusal.

        CLOSED is ours (the device only says idle or end-of-transaction), so while we are
        CLOSED an end-of-transaction report keeps us CLOSED: whether it is the closed sale or a
        new one is the controller's business (it journals whatever the device holds), not the
        model's.
        FINISHED_UNPAID is left only by closing, never by the device repeating itself; seen
        idle or calling, the sale was closed behind our back (or by our lost-answer close): we
        pass through CLOSED.
        """
        target = _FROM_DEVICE[device]
        if self.state is FpState.CLOSED and target is FpState.FINISHED_UNPAID:
            return self.state
        if self.state is FpState.FINISHED_UNPAID and target in (FpState.IDLE, FpState.CALLING):
            self._enter(FpState.CLOSED)
        if self.state is FpState.AUTHORISED and target is FpState.CALLING:
            # The device lags behind our authorisation: within the grace the call it still
            # shows is the one we answered. After it, our authorisation is taken as lost.
            if self.authorised_at is not None and now - self.authorised_at < self.authorise_grace_s:
                return self._refuse(target, "the device still shows the call we authorised") or (
                    self.state
                )
            self._enter(target)
            return self.state
        refusal = self.move(target)
        return refusal if refusal is not None else self.state


def transaction_fingerprint(
    *,
    nozzle: int,
    volume_ml: int,
    amount_minor: int,
    unit_price_mmu: int,
    ended_at: datetime,
    totalizer_end_ml: int | None,
) -> str:
    """What makes one finished dispensing itself, whatever number the device gave it.

    Two reads of the same transaction (status, report, after a restart) give the same text; a
    different dispensing that reuses a number (the controller restarted with its counters
    reset, or the counter wrapped) gives another: the meter moved on, or the time did.
    """
    end = ended_at.timestamp()
    return "|".join(
        (
            str(nozzle),
            str(volume_ml),
            str(amount_minor),
            str(unit_price_mmu),
            f"{int(end)}",
            "" if totalizer_end_ml is None else str(totalizer_end_ml),
        )
    )
