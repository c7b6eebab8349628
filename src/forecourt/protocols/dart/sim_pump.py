"""The simulated DART pump (pure): the device model behind one address on the line.

What it models, after the Dart Pump Interface's command and status flow and what working
site controllers do on real Wayne pumps (``fangym0335/first:src/lischn007.c``,
``moduslightstech-lgtm/intelipump:docs/real-wayne-price-programming-review.md``):

- After power-up the pump is **not programmed** (status 0) and refuses to be authorised until
  it has received a price for every one of its nozzles (CD5); it then shows **filling
  completed** (5).
- A filling: RESET (5 or 1 -> 1) clears the display; an optional preset (CD3 volume / CD4
  amount, accepted in RESET) and allowed nozzles (CD2); AUTHORIZE (only from RESET, so a pump
  never authorises without a price since power-up) -> 2; the customer lifts an allowed nozzle
  and product flows -> 4; a preset reached -> 6; the nozzle back in its holster -> 5 with the
  filling on the display. The pump keeps the finished filling on display (and answers
  RETURN FILLING INFORMATION with it) until the next RESET; it survives a power failure, as a
  legal meter's last sale must.
- STOP ends a filling (-> 5); SWITCH OFF stops and closes the pump (-> 7) until a RESET;
  SUSPEND / RESUME pause a filling (4 <-> 8).
- Total counters per nozzle (volume and amount) only ever grow; a reboot keeps them.

Quantities are the pump's raw integers in its own decimals (:class:`Decimals`): volume in
10**-volume litres, and so on. Time is simulated seconds given to :meth:`SimulatedPump.advance`.
The pump queues the transactions it wants to send (:meth:`outbox`); the line (see
:mod:`.simulator`) packs them into data frames when polled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from forecourt.protocols.dart.application import (
    AMOUNT_COUNTER_BASE,
    Alarm,
    AlarmCode,
    AllowedNozzles,
    Command,
    Decimals,
    FilledValues,
    FromDevice,
    NozzleStatus,
    PresetAmount,
    PresetVolume,
    PriceUpdate,
    PumpCommand,
    PumpIdentity,
    PumpParameters,
    PumpPrices,
    PumpStatusCode,
    PumpStatusReply,
    RequestTotals,
    TotalCounters,
    Transaction,
    pow10,
)

S = PumpStatusCode
_FLOWING = (S.FILLING, S.SUSPENDED, S.MAX_REACHED)


@dataclass
class Filling:
    """One filling as the pump meters it (raw units; ``volume_litres``: the exact flow)."""

    nozzle: int
    price: int
    volume: int = 0
    amount: int = 0
    volume_litres: float = 0.0


@dataclass(frozen=True, slots=True)
class CompletedFilling:
    """A filling that ended (given to the ``on_completed`` hook, e.g. the record file)."""

    address: int
    nozzle: int
    volume: int
    amount: int
    price: int
    total_volume: int
    total_amount: int


@dataclass
class NozzleTotals:
    volume: int = 0
    amount: int = 0
    fillings: int = 0


@dataclass
class SimulatedPump:
    """One pump (fuelling point) on a DART line."""

    address: int
    nozzles: int = 2
    decimals: Decimals = field(default_factory=lambda: Decimals(2, 2, 2))
    identity: str = ""
    flow_l_per_min: float = 40.0
    max_amount: int = 99_999_999
    on_completed: Callable[[CompletedFilling], None] | None = None

    status: PumpStatusCode = S.NOT_PROGRAMMED
    prices: tuple[int, ...] | None = None  # None: not programmed since power-up
    allowed: tuple[int, ...] = ()  # CD2; empty: every nozzle
    preset_volume: int | None = None
    preset_amount: int | None = None
    nozzle_out: int | None = None  # the nozzle out of its holster
    selected: int = 1  # the nozzle DC3 reports (the last one used)
    flowing: bool = True  # the customer holds the trigger
    filling: Filling | None = None  # the current filling (statuses 2, 4, 6, 8)
    display: Filling | None = None  # the finished filling shown until the next RESET
    totals: dict[int, NozzleTotals] = field(default_factory=dict)
    boots: int = 0
    _outbox: dict[object, FromDevice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.nozzles <= 15:
            raise ValueError("a DART pump has 1-15 nozzles")
        if not self.identity:
            self.identity = f"{self.address:010d}"
        for nozzle in range(1, self.nozzles + 1):
            self.totals.setdefault(nozzle, NozzleTotals())
        self._queue_status()

    # ----------------------------------------------------------------- outbox

    def outbox(self) -> list[FromDevice]:
        """What the pump wants to send, oldest first (the latest value of each kind)."""
        return list(self._outbox.values())

    def take(self, count: int) -> list[FromDevice]:
        """Remove and return the first ``count`` queued transactions."""
        keys = list(self._outbox)[:count]
        return [self._outbox.pop(key) for key in keys]

    def _send(self, item: FromDevice, key: object | None = None) -> None:
        key = key if key is not None else item.code
        self._outbox.pop(key, None)  # the newest value goes to the end
        self._outbox[key] = item

    def _queue_status(self) -> None:
        self._send(PumpStatusReply(int(self.status)))
        self._send(self._nozzle_status())

    def _nozzle_status(self) -> NozzleStatus:
        current = self.filling or self.display
        nozzle = self.nozzle_out or (current.nozzle if current else self.selected)
        if current is not None:
            price = current.price
        elif self.prices and 1 <= nozzle <= len(self.prices):
            price = self.prices[nozzle - 1]
        else:
            price = 0
        return NozzleStatus(price, nozzle, self.nozzle_out is not None)

    def _filled_values(self) -> FilledValues:
        current = self.filling or self.display
        return FilledValues(current.volume, current.amount) if current else FilledValues(0, 0)

    def _set_status(self, status: PumpStatusCode) -> None:
        self.status = status
        self._queue_status()

    # ----------------------------------------------------------------- the line's commands

    def handle(self, item: Transaction) -> None:
        """Apply one transaction from the site controller (a pump ignores what it refuses)."""
        if isinstance(item, Command):
            self._command(item.command)
        elif isinstance(item, AllowedNozzles):
            if all(1 <= n <= self.nozzles for n in item.nozzles):
                self.allowed = item.nozzles
        elif isinstance(item, PresetVolume):
            if self.status is S.RESET and item.volume > 0:
                self.preset_volume, self.preset_amount = item.volume, None
        elif isinstance(item, PresetAmount):
            if self.status is S.RESET and 0 < item.amount <= self.max_amount:
                self.preset_amount, self.preset_volume = item.amount, None
        elif isinstance(item, PriceUpdate):
            self._prices(item.prices)
        elif isinstance(item, RequestTotals):
            self._counters(item.counter)

    def _prices(self, prices: tuple[int, ...]) -> None:
        # A price for every nozzle, or the update is ignored; a running filling keeps its
        # price (the new one applies from the next authorisation).
        if len(prices) != self.nozzles or any(p <= 0 for p in prices):
            return
        self.prices = prices
        if self.status is S.NOT_PROGRAMMED:
            self._set_status(S.FILLING_COMPLETED)
        else:
            self._send(self._nozzle_status())

    def _counters(self, counter: int) -> None:
        nozzle = counter & 0x0F
        totals = self.totals.get(nozzle)
        if totals is None:
            return
        if counter & 0xF0 == AMOUNT_COUNTER_BASE:
            # [I] for an amount counter the second field is read as the number of fillings
            # ("TOTM1 or NOFILL" in the decoders named in .application).
            reply = TotalCounters(counter, totals.amount, totals.fillings, 0)
        else:
            reply = TotalCounters(counter, totals.volume, totals.volume, 0)
        self._send(reply, key=("totals", counter))

    def _command(self, command: int) -> None:
        if command == PumpCommand.RETURN_STATUS:
            self._queue_status()
            if self.status in (*_FLOWING, S.AUTHORIZED, S.FILLING_COMPLETED):
                self._send(self._filled_values())
        elif command == PumpCommand.RETURN_PUMP_PARAMETERS:
            grades = tuple(range(1, self.nozzles + 1))
            self._send(
                PumpParameters(
                    self.decimals.volume,
                    self.decimals.amount,
                    self.decimals.price,
                    self.max_amount,
                    grades,
                )
            )
        elif command == PumpCommand.RETURN_PUMP_IDENTITY:
            self._send(PumpIdentity(self.identity))
        elif command == PumpCommand.RETURN_FILLING_INFORMATION:
            self._send(self._filled_values())
            self._send(self._nozzle_status())
        elif command == PumpCommand.RETURN_PRICES:
            self._send(PumpPrices(self.prices or tuple(0 for _ in range(self.nozzles))))
        elif command == PumpCommand.RESET:
            self._reset()
        elif command == PumpCommand.AUTHORIZE:
            self._authorize()
        elif command == PumpCommand.STOP:
            if self.status in (S.AUTHORIZED, *_FLOWING):
                self._complete(S.FILLING_COMPLETED)
        elif command == PumpCommand.SWITCH_OFF:
            if self.status in (S.AUTHORIZED, *_FLOWING):
                self._complete(S.SWITCHED_OFF)
            elif self.status is not S.NOT_PROGRAMMED:
                self._set_status(S.SWITCHED_OFF)
        elif command == PumpCommand.SUSPEND:
            if self.status is S.FILLING:
                self._set_status(S.SUSPENDED)
        elif command == PumpCommand.RESUME:
            if self.status is S.SUSPENDED:
                self._set_status(S.FILLING)

    def _reset(self) -> None:
        if self.status not in (S.RESET, S.AUTHORIZED, S.FILLING_COMPLETED, S.SWITCHED_OFF):
            return  # not programmed, or a filling is running: refused
        self.filling = None
        self.display = None
        self.preset_volume = self.preset_amount = None
        self._set_status(S.RESET)
        self._send(self._filled_values())

    def _authorize(self) -> None:
        if self.status is not S.RESET or self.prices is None:
            return
        self._set_status(S.AUTHORIZED)
        if self.nozzle_out is not None and self._allowed(self.nozzle_out):
            self._start(self.nozzle_out)

    def _allowed(self, nozzle: int) -> bool:
        return not self.allowed or nozzle in self.allowed

    def _start(self, nozzle: int) -> None:
        assert self.prices is not None
        self.selected = nozzle
        self.filling = Filling(nozzle, self.prices[nozzle - 1])
        self.flowing = True
        self._set_status(S.FILLING)
        self._send(self._filled_values())

    # ----------------------------------------------------------------- the customer

    def lift(self, nozzle: int) -> None:
        """A nozzle comes out of its holster (a pump with a nozzle out ignores another)."""
        if not 1 <= nozzle <= self.nozzles:
            raise ValueError(f"pump 0x{self.address:02X} has no nozzle {nozzle}")
        if self.nozzle_out is not None:
            return
        self.nozzle_out = nozzle
        self.selected = nozzle
        if self.status is S.AUTHORIZED and self._allowed(nozzle):
            self._start(nozzle)
        else:
            self._send(self._nozzle_status())

    def hang(self) -> None:
        """The nozzle goes back into its holster."""
        if self.nozzle_out is None:
            return
        self.nozzle_out = None
        if self.status in _FLOWING:
            self._complete(S.FILLING_COMPLETED)
        else:
            self._send(self._nozzle_status())

    def trigger(self, on: bool) -> None:
        """The customer presses (or releases) the nozzle's trigger."""
        self.flowing = on

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass: product flows while filling."""
        filling = self.filling
        if self.status is not S.FILLING or filling is None or not self.flowing or seconds <= 0:
            return
        filling.volume_litres += self.flow_l_per_min * seconds / 60.0
        volume = int(filling.volume_litres * 10**self.decimals.volume)
        amount = self._amount_of(volume, filling.price)
        reached = False
        if self.preset_volume is not None and volume >= self.preset_volume:
            volume, reached = self.preset_volume, True
            amount = self._amount_of(volume, filling.price)
        limit = self.preset_amount if self.preset_amount is not None else self.max_amount
        if amount >= limit:
            amount, reached = limit, True
            volume = self._volume_of(amount, filling.price)
        if (volume, amount) != (filling.volume, filling.amount):
            filling.volume, filling.amount = volume, amount
            self._send(self._filled_values())
        if reached:
            self._set_status(S.MAX_REACHED)

    def _amount_of(self, volume: int, price: int) -> int:
        """Amount = volume x price in the pump's amount decimals, rounded half up."""
        d = self.decimals
        scale = d.volume + d.price - d.amount
        if scale <= 0:
            return volume * price * pow10(-scale)
        return (volume * price * 2 + pow10(scale)) // (2 * pow10(scale))

    def _volume_of(self, amount: int, price: int) -> int:
        """The volume an amount buys (rounded down: the pump stops at the amount)."""
        d = self.decimals
        scale = d.volume + d.price - d.amount
        if scale >= 0:
            return amount * pow10(scale) // price
        return amount // (price * pow10(-scale))

    def _complete(self, status: PumpStatusCode) -> None:
        filling = self.filling
        self.filling = None
        self.preset_volume = self.preset_amount = None
        self.allowed = ()
        if filling is not None:
            self.display = filling
            totals = self.totals[filling.nozzle]
            if filling.volume:
                totals.volume += filling.volume
                totals.amount += filling.amount
                totals.fillings += 1
                if self.on_completed is not None:
                    self.on_completed(
                        CompletedFilling(
                            self.address,
                            filling.nozzle,
                            filling.volume,
                            filling.amount,
                            filling.price,
                            totals.volume,
                            totals.amount,
                        )
                    )
        self._set_status(status)
        self._send(self._filled_values())

    # ----------------------------------------------------------------- power

    def reboot(self) -> None:
        """Power failure and restart: a running filling ends where it stood, prices and
        state are lost (not programmed again); totals and the last filling survive."""
        if self.filling is not None:
            self._complete(S.FILLING_COMPLETED)
        self.boots += 1
        self.prices = None
        self.allowed = ()
        self.preset_volume = self.preset_amount = None
        self.flowing = True
        self._outbox.clear()
        self.status = S.NOT_PROGRAMMED
        self._send(Alarm(AlarmCode.POWER_FAILURE))
        self._queue_status()

    # ----------------------------------------------------------------- inspection

    def snapshot(self) -> dict[str, object]:
        current = self.filling or self.display
        return {
            "address": f"0x{self.address:02X}",
            "status": int(self.status),
            "status_name": self.status.name.lower(),
            "nozzle_out": self.nozzle_out,
            "prices": list(self.prices) if self.prices else None,
            "preset_volume": self.preset_volume,
            "preset_amount": self.preset_amount,
            "filling": dataclasses.asdict(current) if current else None,
            "totals": {str(n): dataclasses.asdict(t) for n, t in sorted(self.totals.items())},
            "boots": self.boots,
        }
