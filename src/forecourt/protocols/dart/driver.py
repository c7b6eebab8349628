"""The DART pump driver: one RS-485 line of Wayne pumps behind :class:`PumpDriver`.

The driver owns its line. A background loop (started by :meth:`DartDriver.open`) visits every
configured address in turn: it sends the commands queued for that pump (a data frame, sent
again with the same tx# until the pump ``ACK``s it), asks for the pump's status now and then,
and ``POLL``s until the pump says ``EOT``; every data frame the pump sends is ``ACK``ed and its
transactions update what the driver knows of the pump. The pull methods answer from that
state (:meth:`~DartDriver.pump_status`) or queue commands and await the pump's answer.

One pump that does not answer never blinds the others: after ``offline_after`` failed
exchanges it is OFFLINE, asked again only every ``offline_retry_s``, and back by itself when
it answers. A pump that only sends frames we refuse (bad CRC, broken transactions) is ERROR.
Every refused frame is a :class:`FrameRefused` event and a count in :meth:`~DartDriver.health`.

Standard states from the pump's status (DC1), nozzle (DC3) and filled volume (DC2):
0 not programmed, 1 reset, 5 filling completed -> CALLING with a nozzle out, else IDLE;
2 authorised, and 4 filling or 8 suspended before any product flowed -> AUTHORISED (the
model's "no product has flowed yet"); 4 filling, 6 max reached -> FUELLING (6 is the preset
reached with the nozzle still out); 8 suspended -> SUSPENDED; 7 switched off -> STOPPED. In
0, 5 and 7 the pump still shows its last filling: while that one is unclosed the state is
END_OF_TRANSACTION.

DART has no transaction numbers. When the pump shows a finished filling with product
(volume > 0) the driver reads it (RETURN FILLING INFORMATION: DC2 volume and amount, DC3
nozzle and price) and the nozzle's volume totalizer (CD101), then gives it the next number of
that pump from the :class:`DriverStore` and **saves it before reporting it**. The same filling
read again (same nozzle, volume, amount, price and totalizer, not released since) gets the
same number, also after a restart of the edge; a pump "releases" its filling when it is RESET
for the next sale. Transaction reports (:meth:`~DartDriver.transactions`) come from the store:
a DART pump keeps no memory of its sales.

After FILLING COMPLETED a real site controller reads the filling and the totals and leaves
the pump showing the sale until the next customer lifts a nozzle; it then RESETs and
authorises (``fangym0335/first:src/lischn007.c``: ``DoEot``, ``DO_CALLING`` -> ``ReSet`` ->
``DoAuth``). So :meth:`~DartDriver.close_transaction` marks the filling closed in the store
and the pump stays in status 5 (option ``reset_on_close`` sends the RESET at once);
:meth:`~DartDriver.authorize` does what the protocol asks: prices first when the pump is not
programmed or this price was not downloaded since its power-up (CD5, a price for each of its
nozzles), RESET, the nozzle's start totalizer (CD101, kept with the filling), allowed nozzle
and preset (CD2, CD3/CD4), AUTHORIZE, each step checked in the pump's status.

Events to the sink: :class:`PumpStatusChanged`, :class:`FillingProgress`,
:class:`TransactionFinished` (after the store has the number), :class:`HealthChanged`,
:class:`FrameRefused`, and :class:`AlarmReported` for a DC5 alarm.

Epochs: a pump seen not programmed (status 0) after it had been programmed, or whose volume
totalizer went backwards, was power-cycled; its epoch counter in the store goes up and
:meth:`~DartDriver.identity`'s ``boot_marker`` (``50:1,51:3``: address:epoch) changes.

Options (``DeviceConfig.options``): ``volume_decimals``, ``amount_decimals``,
``price_decimals`` (used until the pump's own DC7 parameters are read, or instead of them with
``read_parameters = false``), ``total_volume_decimals``, ``total_amount_decimals``,
``nozzles`` (per pump when DC7 is not read), ``timeout_s``, ``poll_interval_s``, ``retries``,
``offline_after``, ``offline_retry_s``, ``status_refresh_s``, ``command_timeout_s``,
``currency``, ``reset_on_close``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from forecourt.kernel.clock import Clock, SystemClock
from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.dart.application import (
    AMOUNT_COUNTER_BASE,
    Alarm,
    AllowedNozzles,
    Command,
    Decimals,
    Direction,
    FilledValues,
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
    Scaled,
    TotalCounters,
    Transaction,
    decode_transactions,
    encode_transactions,
)
from forecourt.protocols.dart.line import (
    ADDRESS_MAX,
    ADDRESS_MIN,
    DartMalformed,
    Deframer,
    Frame,
    FrameKind,
    ack,
    data_frame,
    nak,
    next_tx,
    poll,
)
from forecourt.protocols.driver import (
    DeviceConfig,
    DeviceConfigError,
    DriverContext,
    DriverStore,
    EventSink,
    ignore_event,
    transactions_window_ok,
)
from forecourt.protocols.model import (
    FLAG_INEXACT,
    FLAG_NO_TOTALIZER,
    AlarmReported,
    Capability,
    DeviceAlarm,
    DeviceEvent,
    DeviceHealth,
    DeviceHealthState,
    DeviceIdentity,
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    FillingProgress,
    FrameRefused,
    HealthChanged,
    IdentityChanged,
    NozzleTotals,
    Preset,
    PresetType,
    PumpState,
    PumpStatus,
    PumpStatusChanged,
    TransactionFinished,
)
from forecourt.protocols.store import MemoryDriverStore
from forecourt.protocols.transport import Endpoint, open_stream, parse_endpoint

log = logging.getLogger("forecourt.protocols.dart.driver")

S = PumpStatusCode
#: Statuses in which the pump's display still holds its last finished filling.
HOLDING = frozenset({S.NOT_PROGRAMMED, S.FILLING_COMPLETED, S.SWITCHED_OFF})
#: Statuses that mean the pump has let go of its last filling (RESET or a new one running).
RELEASED = frozenset({S.RESET, S.AUTHORIZED, S.FILLING, S.MAX_REACHED, S.SUSPENDED})
_BUSY = frozenset({S.AUTHORIZED, S.FILLING, S.MAX_REACHED, S.SUSPENDED})
_KEPT_FILLINGS = 500  # per pump in the store: the transaction report's memory
_DEGRADED_WINDOW_S = 30.0  # a refused frame keeps the line DEGRADED this long
_SHOWING = frozenset({PumpState.AUTHORISED, PumpState.FUELLING, PumpState.SUSPENDED})


def standard_state(
    status: int | None, nozzle_out: bool, holds_unclosed: bool, volume: int = 0
) -> PumpState:
    """The standard model's state of a pump from its DART status (pure); ``volume`` is the
    running filling's (raw): until product flows a filling pump is still AUTHORISED."""
    if status in HOLDING and holds_unclosed:
        return PumpState.END_OF_TRANSACTION
    if status in (S.NOT_PROGRAMMED, S.RESET, S.FILLING_COMPLETED):
        return PumpState.CALLING if nozzle_out else PumpState.IDLE
    if status == S.AUTHORIZED or (status in (S.FILLING, S.SUSPENDED) and volume == 0):
        return PumpState.AUTHORISED
    if status in (S.FILLING, S.MAX_REACHED):
        return PumpState.FUELLING
    if status == S.SUSPENDED:
        return PumpState.SUSPENDED
    if status == S.SWITCHED_OFF:
        return PumpState.STOPPED
    return PumpState.ERROR


class _LineDown(Exception):
    """The byte stream broke (EOF or a write error): reconnect."""


# --------------------------------------------------------------------------- the line


class _Line:
    """The byte stream to the pumps: one request, then its answer, at a time."""

    def __init__(self, endpoint: Endpoint, *, open_timeout_s: float) -> None:
        self.endpoint = endpoint
        self.open_timeout_s = open_timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._items: asyncio.Queue[Frame | DartMalformed | None] = asyncio.Queue()
        self.deframer = Deframer()
        self.echoes = False  # the line gives us back what we send (two-wire RS-485)
        self.skipped: list[DartMalformed] = []
        self.echo_timeout_s = 0.1

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._task is not None and not self._task.done()

    async def connect(self) -> None:
        await self.close()
        self._reader, self._writer = await open_stream(self.endpoint, timeout_s=self.open_timeout_s)
        self.deframer.reset()
        self._items = asyncio.Queue()
        self._task = asyncio.create_task(self._read(self._reader), name="dart-line-reader")

    async def close(self) -> None:
        task, self._task = self._task, None
        writer, self._writer = self._writer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(4096):
                for item in self.deframer.feed(chunk):
                    self._items.put_nowait(item)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # noqa: BLE001 - pyserial raises its own errors
            log.warning("dart line read failed: %s", exc)
        self._items.put_nowait(None)  # the stream ended

    def _drain(self) -> None:
        """Drop what arrived before this request: it answers nothing we still wait for."""
        while not self._items.empty():
            item = self._items.get_nowait()
            if item is None:
                raise _LineDown("the line closed")
            if isinstance(item, DartMalformed):
                self.skipped.append(item)

    async def send(self, frame: Frame, *, expect_echo: bool = False) -> bytes:
        writer = self._writer
        if writer is None or not self.connected:
            raise _LineDown("the line is not open")
        self._drain()
        wire = frame.encode()
        try:
            writer.write(wire)
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            raise _LineDown(str(exc)) from exc
        if expect_echo and self.echoes:
            await self._swallow_echo(frame)
        return wire

    async def _swallow_echo(self, frame: Frame) -> None:
        """On a line that echoes what we send, read our own frame back (a frame nobody
        answers, such as an ACK, must not be taken later for the pump's)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.echo_timeout_s
        while (remaining := deadline - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(self._items.get(), remaining)
            except TimeoutError:
                return
            if item is None:
                raise _LineDown("the line closed")
            if item == frame:
                return

    async def exchange(
        self,
        request: Frame,
        accept: Callable[[Frame], bool],
        timeout_s: float,
    ) -> Frame | DartMalformed | None:
        """Send ``request``; the first frame ``accept`` takes, a refused frame from the same
        address, or None when nothing came in time. Our own request echoed back by a two-wire
        adapter (the line then counts as echoing) and anything else are skipped."""
        await self.send(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                item = await asyncio.wait_for(self._items.get(), remaining)
            except TimeoutError:
                return None
            if item is None:
                raise _LineDown("the line closed")
            if isinstance(item, DartMalformed):
                if item.frame[:1] == bytes((request.address,)):
                    return item
                self.skipped.append(item)  # noise, or another address's: counted, not answered
                continue
            if item == request:
                self.echoes = True
                continue
            if accept(item):
                return item

    def take_refusals(self) -> list[DartMalformed]:
        """Refusals no exchange took (noise, or arriving between exchanges): counted only."""
        found, self.skipped = self.skipped, []
        kept: list[Frame | DartMalformed | None] = []
        while not self._items.empty():
            item = self._items.get_nowait()
            if isinstance(item, DartMalformed):
                found.append(item)
            else:
                kept.append(item)
        for item in kept:
            self._items.put_nowait(item)
        return found


# --------------------------------------------------------------------------- per pump


@dataclass
class _Command:
    data: bytes
    done: asyncio.Future[None]


@dataclass
class _Waiter:
    ready: Callable[[], bool]
    done: asyncio.Future[None]


@dataclass
class _Link:
    """What the driver knows of one pump (one address on the line)."""

    station: int
    address: int
    decimals: Decimals
    nozzle_count: int
    tx: int = 0
    online: bool = False
    ever_answered: bool = False
    failures: int = 0
    refusals_in_a_row: int = 0
    last_refusal: str | None = None
    next_try: float = 0.0
    timeouts: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    status: int | None = None
    nozzle: int = 1
    filling_nozzle: int | None = None  # the nozzle seen while the pump was busy
    nozzle_out: bool = False
    price: int | None = None
    volume: int = 0
    amount: int = 0
    dc2_seq: int = 0
    dc3_seq: int = 0
    status_seq: int = 0
    totals: dict[int, tuple[int, int]] = field(default_factory=dict)  # counter -> (seq, total)
    totals_seq: int = 0
    pump_prices: tuple[int, ...] | None = None
    parameters: PumpParameters | None = None
    identity: str | None = None
    identity_seq: int = 0
    parameters_seq: int = 0
    parameters_asked: int = 0
    ending: bool = False  # a filling just ended and is being read: keep showing it
    alarm: int | None = None
    last_rx: tuple[int, bytes] | None = None
    needs_status: bool = True
    status_asked_at: float = 0.0
    commands: collections.deque[_Command] = field(default_factory=collections.deque)
    waiters: list[_Waiter] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    save_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    resolving: asyncio.Task[None] | None = None
    resolved: bool = False  # the filling the pump shows now has been read (or was empty)
    resolve_after: float = 0.0
    started_at: datetime | None = None  # when this filling was first seen authorised/filling
    reported: PumpStatus | None = None
    progress: tuple[int, int] | None = None
    saved: dict[str, Any] = field(default_factory=dict)  # the store's record of this pump

    # --- the store record -----------------------------------------------------------------

    @property
    def fillings(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.saved.setdefault("fillings", [])
        return found

    @property
    def epoch(self) -> int:
        return int(self.saved.get("epoch", 0))

    def held(self) -> dict[str, Any] | None:
        """The filling the pump holds (shows, not released), if we recorded one."""
        for record in reversed(self.fillings):
            if not record.get("released"):
                found: dict[str, Any] = record
                return found
        return None

    def unclosed(self) -> dict[str, Any] | None:
        record = self.held()
        if record is not None and not record.get("closed") and self.status in HOLDING:
            return record
        return None

    def counter(self, counter: int) -> tuple[int, int] | None:
        return self.totals.get(counter)


def _free(link: _Link, pump: int) -> None:
    """Refuse a command that needs the pump free: it holds an unclosed filling, or is busy."""
    held = link.unclosed()
    if held is not None:
        raise DeviceRejected(
            f"pump {pump} holds unclosed filling {held['number']}: close it first",
            device_code="unclosed_filling",
        )
    if link.status in _BUSY:
        raise DeviceRejected(f"pump {pump} is busy (status {link.status})", device_code="pump_busy")


def _retrieved(future: asyncio.Future[None]) -> None:
    """Mark a failure as seen: its waiter may have given up already (a timeout)."""
    if not future.cancelled():
        future.exception()


def _store_key(name: str, address: int) -> str:
    return f"dart-{name}-{address:02X}"


class DartDriver:
    """A :class:`forecourt.protocols.driver.PumpDriver` for one DART line."""

    capabilities = frozenset(
        {
            Capability.PRESET_VOLUME,
            Capability.PRESET_AMOUNT,
            Capability.PRICE_BEFORE_AUTHORISE,
            Capability.TOTALS,
            Capability.SUSPEND,
        }
    )

    def __init__(
        self,
        name: str,
        transport: str,
        pumps: Mapping[int, int],
        *,
        store: DriverStore | None = None,
        clock: Clock | None = None,
        decimals: Decimals | None = None,
        nozzles: int = 1,
        read_parameters: bool = True,
        timeout_s: float = 0.5,
        poll_interval_s: float = 0.05,
        retries: int = 3,
        offline_after: int = 3,
        offline_retry_s: float = 2.0,
        status_refresh_s: float = 1.0,
        command_timeout_s: float = 5.0,
        reset_on_close: bool = False,
    ) -> None:
        if not pumps:
            raise DeviceConfigError(f"device {name!r}: no pumps configured on the DART line")
        addresses = list(pumps.values())
        if len(set(addresses)) != len(addresses):
            raise DeviceConfigError(f"device {name!r}: two pumps share one DART address")
        for station, address in pumps.items():
            if not ADDRESS_MIN <= address <= ADDRESS_MAX:
                raise DeviceConfigError(
                    f"device {name!r}: pump {station} address 0x{address:02X} outside 0x50-0x6F"
                )
        if timeout_s <= 0 or poll_interval_s < 0 or retries < 0 or offline_after < 1:
            raise DeviceConfigError(f"device {name!r}: timings must be positive")
        self.name = name
        self.endpoint = parse_endpoint(transport, baudrate=9600, parity="O")
        self.store: DriverStore = store if store is not None else MemoryDriverStore()
        self.clock = clock or SystemClock()
        self.base_decimals = decimals or Decimals()
        self.read_parameters = read_parameters
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.retries = retries
        self.offline_after = offline_after
        self.offline_retry_s = offline_retry_s
        self.status_refresh_s = status_refresh_s
        self.command_timeout_s = command_timeout_s
        self.reset_on_close = reset_on_close
        self.links: dict[int, _Link] = {
            station: _Link(station, address, self.base_decimals, nozzles)
            for station, address in sorted(pumps.items())
        }
        self._line = _Line(self.endpoint, open_timeout_s=max(timeout_s * 4, 2.0))
        self._line.echo_timeout_s = timeout_s
        self._sink: EventSink = ignore_event
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._cycled = asyncio.Event()
        self._closing = False
        self._line_error: str | None = "not opened"
        self._health = DeviceHealth(name, DeviceHealthState.OFFLINE, reason="not opened")
        self._last_refusal_at = -1e9
        self._timeouts = 0
        self._refused_total = 0
        self._refused: collections.Counter[str] = collections.Counter()
        self.cycles = 0  # rounds of the line: every pump visited once
        self.cycle_busy_s = 0.0  # time those rounds took on the line (the waits aside)

    # ----------------------------------------------------------------- events and health

    def subscribe(self, sink: EventSink) -> None:
        self._sink = sink

    def _emit(self, event: DeviceEvent) -> None:
        try:
            self._sink(event)
        except Exception:  # noqa: BLE001 - a subscriber's fault must not stop the line
            log.exception("dart event sink failed on %s", type(event).__name__)

    def health(self) -> DeviceHealth:
        return self._health

    def line_stats(self) -> dict[str, float]:
        """Rounds of the line so far and the time they took (``/v1/status``, benchmarks)."""
        return {"cycles": self.cycles, "busy_s": round(self.cycle_busy_s, 6)}

    def _update_health(self) -> None:
        if self._line_error is not None:
            state, reason = DeviceHealthState.OFFLINE, self._line_error
        else:
            silent = [link for link in self.links.values() if not link.online]
            if len(silent) == len(self.links):
                state, reason = DeviceHealthState.OFFLINE, "no pump answers"
            elif silent:
                names = ", ".join(f"0x{link.address:02X}" for link in silent)
                state, reason = DeviceHealthState.DEGRADED, f"no answer from {names}"
            elif time.monotonic() - self._last_refusal_at < _DEGRADED_WINDOW_S:
                state, reason = DeviceHealthState.DEGRADED, "frames refused lately"
            else:
                state, reason = DeviceHealthState.ONLINE, None
        counters = tuple(sorted((f"refused.{k}", v) for k, v in self._refused.items()))
        counters += tuple(
            (f"offline.0x{link.address:02X}", 0 if link.online else 1)
            for link in self.links.values()
        )
        changed = self._health.state is not state or self._health.reason != reason
        self._health = DeviceHealth(
            self.name,
            state,
            since=self.clock.now() if changed else self._health.since,
            reason=reason,
            frames_refused=self._refused_total,
            timeouts=self._timeouts,
            counters=counters,
        )
        if changed:
            self._emit(HealthChanged(self.name, self._health))

    def _refuse(self, link: _Link | None, error: DartMalformed) -> None:
        self._refused_total += 1
        self._refused[error.reason] += 1
        self._last_refusal_at = time.monotonic()
        if link is not None:
            link.refused[error.reason] += 1
            link.refusals_in_a_row += 1
            link.last_refusal = error.reason
        where = f"0x{link.address:02X}" if link else "line"
        log.warning("dart %s: frame refused (%s): %s", where, error.reason, error.message)
        self._emit(
            FrameRefused(
                self.name,
                reason=error.reason,
                detail=f"{where}: {error.message}",
                frame_hex=error.frame.hex(),
            )
        )

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._task is not None:
            return
        self._closing = False
        for link in self.links.values():
            link.saved = await self.store.load(_store_key(self.name, link.address)) or {}
        self._cycled.clear()
        self._task = asyncio.create_task(self._run(), name=f"dart-{self.name}")
        budget = (self.retries + 2) * self.timeout_s * (len(self.links) + 2) + 2.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cycled.wait(), budget)
        for link in self.links.values():
            if link.resolving is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(link.resolving), self.command_timeout_s)

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for link in self.links.values():
            if link.resolving is not None:
                link.resolving.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await link.resolving
                link.resolving = None
            self._fail_pending(link, "the DART driver closed")
        await self._line.close()
        self._line_error = "closed"

    async def __aenter__(self) -> DartDriver:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- the poll loop

    async def _run(self) -> None:
        backoff = self.timeout_s
        while not self._closing:
            if not self._line.connected:
                try:
                    await self._line.connect()
                except DriverUnavailable as exc:
                    self._line_down(exc.message)
                    self._cycled.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = self.timeout_s
                self._line_error = None
                log.info("dart %s: line open on %s", self.name, self.endpoint)
            try:
                started = time.perf_counter()
                for link in self.links.values():
                    await self._visit_urgent(but=link)
                    await self._visit(link)
                self.cycles += 1
                self.cycle_busy_s += time.perf_counter() - started
                for error in self._line.take_refusals():
                    self._refuse(self._link_of(error), error)
                self._update_health()
                self._cycled.set()
                self._wake.clear()
                if not any(link.commands for link in self.links.values()):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            except _LineDown as exc:
                await self._line.close()
                self._line_down(str(exc) or "the line closed")
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad frame
                log.exception("dart %s: poll loop error", self.name)
                await asyncio.sleep(self.poll_interval_s)

    def _line_down(self, reason: str) -> None:
        if self._line_error != reason:
            log.warning("dart %s: line down: %s", self.name, reason)
        self._line_error = reason
        for link in self.links.values():
            if link.online:
                link.online = False
                link.needs_status = True
            self._fail_pending(link, f"the DART line is down: {reason}")
            self._report(link)
        self._update_health()

    def _fail_pending(self, link: _Link, reason: str) -> None:
        while link.commands:
            command = link.commands.popleft()
            if not command.done.done():
                command.done.set_exception(DriverUnavailable(reason))
        for waiter in link.waiters:
            if not waiter.done.done():
                waiter.done.set_exception(DriverUnavailable(reason))
        link.waiters.clear()

    def _link_of(self, error: DartMalformed) -> _Link | None:
        if not error.frame:
            return None
        for link in self.links.values():
            if link.address == error.frame[0]:
                return link
        return None

    async def _visit_urgent(self, but: _Link) -> None:
        """Before the next pump of the round: every other pump a command waits on (to be sent,
        or for the pump's answer to it), so a command does not wait for a whole round of the
        line (at 9 600 baud, eight pumps take about 200 ms). Each is visited once per step of
        the round, so the round itself still goes on."""
        for link in self.links.values():
            if link is not but and (link.commands or link.waiters) and link.online:
                await self._visit(link)

    async def _visit(self, link: _Link) -> None:
        now = time.monotonic()
        if not link.online and now < link.next_try:
            self._fail_pending(link, f"pump {link.station} (0x{link.address:02X}) does not answer")
            return
        while link.commands:
            command = link.commands[0]
            ok = await self._send_data(link, command.data)
            link.commands.popleft()
            if command.done.done():
                continue
            if ok:
                command.done.set_result(None)
            else:
                command.done.set_exception(
                    DriverUnavailable(
                        f"pump {link.station} (0x{link.address:02X}) did not acknowledge"
                    )
                )
                return
        if self.read_parameters and link.parameters is None and link.online:
            if link.parameters_asked < 3:  # a pump that never answers DC7 keeps the options
                link.parameters_asked += 1
                await self._send_data(
                    link, encode_transactions([Command(PumpCommand.RETURN_PUMP_PARAMETERS)])
                )
        if link.needs_status or now - link.status_asked_at >= self.status_refresh_s:
            if await self._send_data(
                link, encode_transactions([Command(PumpCommand.RETURN_STATUS)])
            ):
                link.needs_status = False
                link.status_asked_at = now
        for _ in range(4):
            if not link.online or not await self._poll(link):
                break

    def _answered(self, link: _Link) -> None:
        link.failures = 0
        link.ever_answered = True
        if not link.online:
            link.online = True
            link.needs_status = True
            log.info("dart %s: pump %d (0x%02X) answers", self.name, link.station, link.address)
            self._report(link)
            self._update_health()

    def _silent(self, link: _Link) -> None:
        link.timeouts += 1
        self._timeouts += 1
        link.failures += 1
        if link.failures >= self.offline_after:
            link.next_try = time.monotonic() + self.offline_retry_s
            if link.online or link.reported is None:
                log.warning(
                    "dart %s: pump %d (0x%02X) does not answer",
                    self.name,
                    link.station,
                    link.address,
                )
            link.online = False
            self._report(link)
            self._update_health()

    def _given_up(self, link: _Link) -> bool:
        """Enough silence in a row: this pump is offline, stop trying it for now."""
        return link.failures >= self.offline_after

    async def _send_data(self, link: _Link, data: bytes) -> bool:
        """One data frame to the pump, sent again with the same tx# until it is ACKed."""
        tx = link.tx
        frame = data_frame(link.address, tx, data)

        def answer(item: Frame) -> bool:
            return (
                item.address == link.address
                and item.kind in (FrameKind.ACK, FrameKind.NAK)
                and item.tx == tx
            )

        try:
            for _ in range(self.retries + 1):
                reply = await self._line.exchange(frame, answer, self.timeout_s)
                if reply is None:
                    self._silent(link)
                    if self._given_up(link):
                        return False
                    continue
                if isinstance(reply, DartMalformed):
                    self._refuse(link, reply)
                    continue
                self._answered(link)
                if reply.kind is FrameKind.ACK:
                    link.refusals_in_a_row = 0
                    return True
            return False
        finally:
            # The pump may have executed a frame whose ACK we lost: never reuse its tx#.
            link.tx = next_tx(tx)

    async def _poll(self, link: _Link) -> bool:
        """POLL (again on silence, NAK on a refused answer); True when the pump sent data
        (it may have more)."""

        def answer(item: Frame) -> bool:
            return item.address == link.address and item.kind in (FrameKind.DATA, FrameKind.EOT)

        request = poll(link.address)
        refused = 0
        for _ in range(self.retries + 1):
            reply = await self._line.exchange(request, answer, self.timeout_s)
            if reply is None:
                self._silent(link)
                if self._given_up(link):
                    return False
                continue
            if isinstance(reply, DartMalformed):
                self._refuse(link, reply)
                self._answered(link)
                self._report(link)
                refused += 1
                if refused >= 2:
                    return True  # the next visit polls again
                # Ask for the same frame again (the pump repeats it until we ACK it).
                tx = reply.frame[1] & 0x0F if len(reply.frame) > 1 else 0
                request = nak(link.address, tx)
                continue
            self._answered(link)
            if reply.kind is FrameKind.EOT:
                link.refusals_in_a_row = 0
                return False
            await self._line.send(ack(link.address, reply.tx), expect_echo=True)
            if link.last_rx == (reply.tx, reply.data):
                return True  # our ACK was lost and the pump sent it again
            link.last_rx = (reply.tx, reply.data)
            try:
                items = decode_transactions(reply.data, Direction.FROM_DEVICE)
            except DartMalformed as exc:
                self._refuse(link, DartMalformed(exc.reason, exc.message, frame=reply.encode()))
                self._report(link)
                return True
            link.refusals_in_a_row = 0
            await self._apply(link, items)
            return True
        return False

    # ----------------------------------------------------------------- what the pump said

    async def _apply(self, link: _Link, items: Iterable[Transaction]) -> None:
        status_before = link.status
        for item in items:
            if isinstance(item, PumpStatusReply):
                link.status = item.status
                link.status_seq += 1
                if item.status == S.RESET:
                    link.filling_nozzle = None
            elif isinstance(item, FilledValues):
                link.volume, link.amount = item.volume, item.amount
                link.dc2_seq += 1
            elif isinstance(item, NozzleStatus):
                if item.nozzle:
                    link.nozzle = item.nozzle
                    if link.status in _BUSY:
                        # The nozzle that dispenses: once the filling ends, the next customer
                        # may lift another before we read it, and DC3 then names that one.
                        link.filling_nozzle = item.nozzle
                link.nozzle_out = item.nozzle_out
                link.price = item.price
                link.dc3_seq += 1
            elif isinstance(item, TotalCounters):
                link.totals_seq += 1
                link.totals[item.counter] = (link.totals_seq, item.total)
                if not item.is_amount:
                    await self._check_totalizer(link, item)
            elif isinstance(item, PumpParameters):
                link.parameters = item
                link.parameters_seq += 1
                link.decimals = self.base_decimals.with_pump(item)
                if item.nozzles:
                    link.nozzle_count = item.nozzles
            elif isinstance(item, PumpIdentity):
                link.identity = item.identity
                link.identity_seq += 1
                if link.saved.get("identity") != item.identity:
                    link.saved["identity"] = item.identity
                    await self._save(link)
            elif isinstance(item, PumpPrices):
                link.pump_prices = item.prices
            elif isinstance(item, Alarm):
                link.alarm = item.alarm
                self._emit(
                    AlarmReported(
                        self.name,
                        DeviceAlarm(
                            "pump",
                            link.station,
                            "pump_alarm",
                            f"{item.alarm:02X}",
                            self.clock.now(),
                        ),
                    )
                )
            else:
                log.debug("dart 0x%02X: transaction 0x%02X ignored", link.address, item.code)
        if link.status != status_before and link.status is not None:
            await self._status_changed(link, status_before)
        if link.status in (S.FILLING, S.MAX_REACHED, S.SUSPENDED):
            progress = (link.volume, link.amount)
            if progress != link.progress and link.volume:
                link.progress = progress
                self._emit(
                    FillingProgress(
                        self.name,
                        link.station,
                        link.nozzle,
                        link.decimals.volume_ml(link.volume).units,
                        link.decimals.amount_minor(link.amount).units,
                    )
                )
        for waiter in list(link.waiters):
            if not waiter.done.done() and waiter.ready():
                waiter.done.set_result(None)
        link.waiters = [w for w in link.waiters if not w.done.done()]
        if (
            link.status in HOLDING
            and not link.resolved
            and link.resolving is None
            and time.monotonic() >= link.resolve_after
        ):
            link.resolving = asyncio.create_task(self._resolve(link), name="dart-resolve")
        self._report(link)

    async def _status_changed(self, link: _Link, before: int | None) -> None:
        status = link.status
        changed = False
        if status == S.NOT_PROGRAMMED and link.saved.get("programmed"):
            link.saved["programmed"] = False
            link.saved["epoch"] = link.epoch + 1
            link.pump_prices = None
            if self.read_parameters:
                link.parameters, link.parameters_asked = None, 0
            changed = True
            log.warning(
                "dart %s: pump %d (0x%02X) was power-cycled: epoch %d",
                self.name,
                link.station,
                link.address,
                link.epoch,
            )
            self._emit(IdentityChanged(self.name, reason=f"pump 0x{link.address:02X} power-cycled"))
        elif status is not None and status != S.NOT_PROGRAMMED and not link.saved.get("programmed"):
            link.saved["programmed"] = True
            changed = True
        if status in RELEASED:
            link.resolved = False
            record = link.held()
            if record is not None:
                record["released"] = True
                changed = True
            if link.started_at is None and status in _BUSY:
                link.started_at = self.clock.now()  # authorised by someone else
        elif status in HOLDING and before in RELEASED:
            link.resolved = False  # a filling just ended (or ran between two polls): read it
            link.ending = True
        if changed:
            await self._save(link)

    async def _check_totalizer(self, link: _Link, item: TotalCounters) -> None:
        """A volume totalizer never goes backwards, unless the pump was swapped or reset."""
        seen: dict[str, int] = link.saved.setdefault("totalizers", {})
        key = str(item.counter)
        previous = seen.get(key)
        if previous == item.total:
            return
        if previous is not None and item.total < previous:
            link.saved["epoch"] = link.epoch + 1
            log.warning(
                "dart %s: pump 0x%02X totalizer %d went back from %d to %d: epoch %d",
                self.name,
                link.address,
                item.counter,
                previous,
                item.total,
                link.epoch,
            )
            self._emit(
                IdentityChanged(self.name, reason=f"pump 0x{link.address:02X} totalizer went back")
            )
        seen[key] = item.total
        await self._save(link)

    def _report(self, link: _Link) -> None:
        status = self._status_of(link)
        if status != link.reported:
            link.reported = status
            self._emit(PumpStatusChanged(self.name, status))

    def _status_of(self, link: _Link) -> PumpStatus:
        if self._line_error is not None and not link.online:
            return PumpStatus(link.station, PumpState.OFFLINE, error=self._line_error)
        if not link.online:
            reason = (
                f"no answer from 0x{link.address:02X}"
                if link.ever_answered or link.failures
                else "not polled yet"
            )
            return PumpStatus(link.station, PumpState.OFFLINE, error=reason)
        if link.refusals_in_a_row >= self.offline_after:
            return PumpStatus(
                link.station,
                PumpState.ERROR,
                error=f"0x{link.address:02X} sends only refused frames ({link.last_refusal})",
            )
        if link.status is None:
            return PumpStatus(link.station, PumpState.OFFLINE, error="no status read yet")
        held = link.unclosed()
        state = standard_state(link.status, link.nozzle_out, held is not None, link.volume)
        previous = link.reported.state if link.reported else None
        if held is None and link.ending and link.status in HOLDING and previous in _SHOWING:
            state = previous  # the filling just ended and is being read: it is not gone
        if state is PumpState.ERROR:
            return PumpStatus(link.station, state, error=f"unknown DART pump status {link.status}")
        d = link.decimals
        if held is not None:
            return PumpStatus(
                link.station,
                state,
                nozzle=int(held["nozzle"]),
                volume_ml=int(held["volume_ml"]),
                amount_minor=int(held["amount_minor"]),
                unit_price_mmu=int(held["unit_price_mmu"]),
                transaction=int(held["number"]),
            )
        showing = state in _SHOWING
        return PumpStatus(
            link.station,
            state,
            nozzle=link.nozzle if (link.nozzle_out or showing) else None,
            volume_ml=d.volume_ml(link.volume).units if showing else None,
            amount_minor=d.amount_minor(link.amount).units if showing else None,
            unit_price_mmu=d.price_mmu(link.price).units if link.price else None,
        )

    # ----------------------------------------------------------------- finished fillings

    async def _resolve(self, link: _Link) -> None:
        """Read the filling the pump shows, number it (store first), report it."""
        try:
            seq = link.dc2_seq
            await self._command(link, [Command(PumpCommand.RETURN_FILLING_INFORMATION)], wait=False)
            await self._wait(link, lambda: link.dc2_seq > seq and link.dc3_seq > 0)
            if link.status not in HOLDING:
                # Reset while we read, by someone else (the dispenser's keypad): the terminal
                # that reset a filling owns its sale; the meter moved without one reported
                # here, which the totalizer check shows. The next holding status reads again.
                log.warning(
                    "dart %s: pump %d was reset elsewhere before its filling was read; "
                    "that sale is not reported by this line",
                    self.name,
                    link.station,
                )
                return
            if link.volume == 0:
                link.resolved = True
                return
            nozzle = link.filling_nozzle or link.nozzle
            volume, amount, price = link.volume, link.amount, link.price or 0
            total = await self._read_counter(link, nozzle)
            record = self._same_filling(link, nozzle, volume, amount, price, total)
            if record is None:
                record = self._new_filling(link, nozzle, volume, amount, price, total)
                await self._save(link)  # durable before anyone hears of it
                self._emit(TransactionFinished(self.name, self._transaction(link, record)))
                log.info(
                    "dart %s: pump %d filling %d: nozzle %d, %s L, %s",
                    self.name,
                    link.station,
                    record["number"],
                    nozzle,
                    record["raw_volume"],
                    record["raw_amount"],
                )
            link.resolved = True
            if link.status not in HOLDING:
                record["released"] = True
                await self._save(link)
        except (DriverUnavailable, DeviceRejected, TimeoutError) as exc:
            log.warning("dart %s: pump %d filling not read yet: %s", self.name, link.station, exc)
            link.resolve_after = time.monotonic() + max(self.timeout_s, 0.5)
        finally:
            link.resolving = None
            if link.resolved or link.status not in HOLDING:
                link.ending = False
            self._report(link)

    def _same_filling(
        self, link: _Link, nozzle: int, volume: int, amount: int, price: int, total: int | None
    ) -> dict[str, Any] | None:
        record = link.held()
        if record is None:
            return None
        same = (
            record["nozzle"] == nozzle
            and record["volume_raw"] == volume
            and record["amount_raw"] == amount
            and record["price_raw"] == price
        )
        if not same:
            record["released"] = True  # the pump shows another filling now
            return None
        known = record.get("totalizer_raw")
        if known is not None and total is not None and known != total:
            record["released"] = True  # same figures, but the meter moved: another sale
            return None
        return record

    def _new_filling(
        self, link: _Link, nozzle: int, volume: int, amount: int, price: int, total: int | None
    ) -> dict[str, Any]:
        d = link.decimals
        number = int(link.saved.get("next_number", 1))
        link.saved["next_number"] = number + 1
        flags: set[str] = set()
        raw: list[tuple[str, str]] = []

        def exact(name: str, value: Scaled) -> int:
            if not value.exact:
                flags.add(FLAG_INEXACT)
                raw.append((name, value.text))
            return value.units

        start = link.saved.pop("start_total", None)
        start_ml = None
        if isinstance(start, dict) and start.get("nozzle") == nozzle:
            start_ml = exact("totalizer_start", d.total_volume_ml(int(start["raw"])))
        end_ml = None if total is None else exact("totalizer_end", d.total_volume_ml(total))
        if end_ml is None:
            flags.add(FLAG_NO_TOTALIZER)
        now = self.clock.now()
        started = link.started_at
        link.started_at = None
        record: dict[str, Any] = {
            "number": number,
            "nozzle": nozzle,
            "volume_raw": volume,
            "amount_raw": amount,
            "price_raw": price,
            "raw_volume": d.volume_ml(volume).text,
            "raw_amount": d.amount_minor(amount).text,
            "volume_ml": exact("volume", d.volume_ml(volume)),
            "amount_minor": exact("amount", d.amount_minor(amount)),
            "unit_price_mmu": exact("price", d.price_mmu(price)),
            "totalizer_raw": total,
            "totalizer_start_ml": start_ml,
            "totalizer_end_ml": end_ml,
            "started_at": started.isoformat() if started else None,
            "ended_at": now.isoformat(),
            "epoch": link.epoch,
            "closed": False,
            "released": False,
            "flags": sorted(flags),
            "raw": raw,
        }
        link.fillings.append(record)
        del link.fillings[:-_KEPT_FILLINGS]
        return record

    def _transaction(self, link: _Link, record: dict[str, Any]) -> DeviceTransaction:
        started = record.get("started_at")
        return DeviceTransaction(
            pump=link.station,
            nozzle=int(record["nozzle"]),
            transaction=int(record["number"]),
            volume_ml=int(record["volume_ml"]),
            amount_minor=int(record["amount_minor"]),
            unit_price_mmu=int(record["unit_price_mmu"]),
            totalizer_start_ml=record.get("totalizer_start_ml"),
            totalizer_end_ml=record.get("totalizer_end_ml"),
            started_at=datetime.fromisoformat(started) if started else None,
            ended_at=datetime.fromisoformat(record["ended_at"]),
            grade_code=self._grade(link, int(record["nozzle"])),
            closed=bool(record.get("closed")) or bool(record.get("released")),
            flags=tuple(record.get("flags", ())),
            raw=tuple((str(k), str(v)) for k, v in record.get("raw", ())),
        )

    @staticmethod
    def _grade(link: _Link, nozzle: int) -> str | None:
        grades = link.parameters.grades if link.parameters else ()
        if 1 <= nozzle <= len(grades) and grades[nozzle - 1]:
            return str(grades[nozzle - 1])
        return None

    async def _save(self, link: _Link) -> None:
        async with link.save_lock:
            await self.store.save(_store_key(self.name, link.address), link.saved)

    # ----------------------------------------------------------------- talking to a pump

    def _link(self, pump: int) -> _Link:
        link = self.links.get(pump)
        if link is None:
            raise DeviceRejected(
                f"pump {pump} is not on DART line {self.name!r}", device_code="unknown_pump"
            )
        return link

    def _usable(self, link: _Link) -> None:
        if self._task is None:
            raise DriverUnavailable(f"DART driver {self.name!r} is not open")
        if self._line_error is not None:
            raise DriverUnavailable(f"DART line {self.name!r} is down: {self._line_error}")
        if not link.online:
            raise DriverUnavailable(f"pump {link.station} (0x{link.address:02X}) does not answer")

    async def _command(
        self, link: _Link, items: Sequence[Transaction], *, wait: bool = True
    ) -> None:
        """Queue one data frame for the pump; return once it is ACKed. ``wait``: also ask
        for the pump's status afterwards (the caller checks what the command did)."""
        self._usable(link)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)
        link.commands.append(_Command(encode_transactions(items), done))
        if wait:
            link.needs_status = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(done), self.command_timeout_s)
        except TimeoutError:
            raise DriverUnavailable(
                f"pump {link.station} (0x{link.address:02X}): no acknowledgement in time"
            ) from None

    async def _wait(self, link: _Link, ready: Callable[[], bool], timeout_s: float = 0) -> None:
        """Until ``ready()`` holds after something the pump sent (TimeoutError if not)."""
        if ready():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)
        link.waiters.append(_Waiter(ready, done))
        self._wake.set()
        await asyncio.wait_for(asyncio.shield(done), timeout_s or self.command_timeout_s)

    async def _until_status(
        self, link: _Link, wanted: Iterable[int], what: str, *, code: str
    ) -> None:
        wanted_set = frozenset(wanted)
        try:
            await self._wait(link, lambda: link.status in wanted_set)
        except TimeoutError:
            raise DeviceRejected(
                f"pump {link.station} (0x{link.address:02X}) did not {what} (status {link.status})",
                device_code=code,
                device_status=link.status,
            ) from None

    async def _read_counter(self, link: _Link, nozzle: int, *, amount: bool = False) -> int | None:
        """One total counter of a nozzle, freshly read (None when the pump does not say)."""
        counter = (AMOUNT_COUNTER_BASE if amount else 0) + nozzle
        seq = link.totals_seq
        try:
            await self._command(link, [RequestTotals(counter)], wait=False)
            await self._wait(
                link, lambda: (found := link.counter(counter)) is not None and found[0] > seq
            )
        except (DriverUnavailable, TimeoutError) as exc:
            log.warning("dart 0x%02X: totals of nozzle %d not read: %s", link.address, nozzle, exc)
            return None
        found = link.counter(counter)
        return None if found is None else found[1]

    # ----------------------------------------------------------------- the pull methods

    async def identity(self) -> DeviceIdentity:
        if self._task is None:
            raise DriverUnavailable(f"DART driver {self.name!r} is not open")
        if self._line_error is not None:
            raise DriverUnavailable(f"DART line {self.name!r} is down: {self._line_error}")
        answering = [link for link in self.links.values() if link.online]
        if not answering:
            raise DriverUnavailable(f"no pump answers on DART line {self.name!r}")
        for link in answering:
            if link.identity is None and link.saved.get("identity") is None:
                await self._read_identity(link)
        device_id = f"dart:{self.name}"
        if len(self.links) == 1:
            (only,) = self.links.values()
            known = only.identity or only.saved.get("identity")
            device_id += f":{known}" if known else f":{only.address:02X}"
        marker = ",".join(f"{link.address:02X}:{link.epoch}" for link in self.links.values())
        return DeviceIdentity(device_id=device_id, boot_marker=marker, firmware=None)

    async def _read_identity(self, link: _Link) -> None:
        seq = link.identity_seq
        with contextlib.suppress(DriverUnavailable, TimeoutError):
            await self._command(link, [Command(PumpCommand.RETURN_PUMP_IDENTITY)], wait=False)
            await self._wait(link, lambda: link.identity_seq > seq)

    async def pump_status(self, pumps: Sequence[int]) -> list[PumpStatus]:
        if self._task is None:
            raise DriverUnavailable(f"DART driver {self.name!r} is not open")
        if self._line_error is not None and not any(k.online for k in self.links.values()):
            raise DriverUnavailable(f"DART line {self.name!r} is down: {self._line_error}")
        found = []
        for pump in pumps:
            link = self.links.get(pump)
            if link is None:
                found.append(
                    PumpStatus(pump, PumpState.ERROR, error=f"not on DART line {self.name!r}")
                )
                continue
            found.append(self._status_of(link))
        return found

    async def authorize(
        self, pump: int, nozzle: int | None, preset: Preset, unit_price_mmu: int
    ) -> int | None:
        link = self._link(pump)
        self._usable(link)
        d = link.decimals
        if nozzle is not None and not 1 <= nozzle <= max(link.nozzle_count, 1):
            raise InvalidValue(f"pump {pump} has no nozzle {nozzle}")
        price = d.raw_price(unit_price_mmu)
        steps: list[Transaction] = []
        if nozzle is not None:
            steps.append(AllowedNozzles((nozzle,)))
        if preset.type is PresetType.VOLUME:
            if not preset.volume_ml or preset.volume_ml <= 0:
                raise InvalidValue("a volume preset needs a positive volume_ml")
            steps.append(PresetVolume(d.raw_volume(preset.volume_ml)))
        elif preset.type is PresetType.AMOUNT:
            if not preset.amount_minor or preset.amount_minor <= 0:
                raise InvalidValue("an amount preset needs a positive amount_minor")
            steps.append(PresetAmount(d.raw_amount(preset.amount_minor)))
        async with link.lock:
            _free(link, pump)
            await self._program(link, nozzle, price)
            if link.status != S.RESET:
                await self._command(link, [Command(PumpCommand.RESET)])
                await self._until_status(link, {S.RESET}, "reset", code="reset_refused")
            await self._remember_start_total(link, nozzle)
            link.started_at = self.clock.now()
            seq = link.dc2_seq
            await self._command(link, [*steps, Command(PumpCommand.AUTHORIZE)])

            def released() -> bool:
                # A quick filling may end between two polls: after our RESET, a finished
                # filling with product can only be the one we just authorised.
                ended = link.status in HOLDING and link.dc2_seq > seq and link.volume > 0
                return link.status in _BUSY - {S.SUSPENDED} or ended

            try:
                await self._wait(link, released)
            except TimeoutError:
                link.started_at = None
                raise DeviceRejected(
                    f"pump {pump} (0x{link.address:02X}) did not accept the authorisation "
                    f"(status {link.status})",
                    device_code="not_authorised",
                    device_status=link.status,
                ) from None
        return None

    async def _program(self, link: _Link, nozzle: int | None, price: int) -> None:
        """Download prices when the pump lacks them or shows another one (CD5 carries a price
        for every nozzle: the others keep what the pump has, or this one)."""
        count = max(link.nozzle_count, 1)
        known = list(link.pump_prices or ())
        prices = [known[i] if i < len(known) else price for i in range(count)]
        if nozzle is None:
            prices = [price] * count
        else:
            prices[nozzle - 1] = price
        if (
            link.status != S.NOT_PROGRAMMED
            and link.pump_prices is not None
            and tuple(prices) == tuple(link.pump_prices)
        ):
            return
        await self._command(link, [PriceUpdate(tuple(prices))])
        link.pump_prices = tuple(prices)
        if link.status == S.NOT_PROGRAMMED:
            await self._until_status(
                link, set(PumpStatusCode) - {S.NOT_PROGRAMMED}, "take the prices", code="no_price"
            )

    async def _remember_start_total(self, link: _Link, nozzle: int | None) -> None:
        """The nozzle's totalizer before this filling (read now), kept with the filling."""
        if nozzle is None:
            link.saved.pop("start_total", None)
            return
        total = await self._read_counter(link, nozzle)
        if total is None:
            link.saved.pop("start_total", None)
        else:
            link.saved["start_total"] = {"nozzle": nozzle, "raw": total}
        await self._save(link)

    async def stop(self, pump: int) -> None:
        link = self._link(pump)
        async with link.lock:
            await self._command(link, [Command(PumpCommand.STOP)])
            if link.status in _BUSY:
                await self._until_status(link, HOLDING, "stop", code="stop_refused")

    async def reset(self, pump: int) -> None:
        """RESET ``pump``: out of a switched-off or completed state, ready to be authorised.
        Refused while it is busy or still holds a filling that is not closed."""
        link = self._link(pump)
        self._usable(link)
        async with link.lock:
            _free(link, pump)
            if link.status in HOLDING and not link.resolved:
                # A RESET releases the filling on display: it must be read first.
                raise DeviceRejected(
                    f"pump {pump} shows a filling that is not read yet: reset it later",
                    device_code="filling_unread",
                )
            if link.status != S.RESET:
                await self._command(link, [Command(PumpCommand.RESET)])
                await self._until_status(link, {S.RESET}, "reset", code="reset_refused")

    def max_preset(self, pump: int, kind: PresetType) -> int | None:
        """The pump's own maximum preset as its parameters (DC7) give it: an amount, in minor
        units; None for a volume, or before the parameters are read."""
        link = self.links.get(pump)
        if link is None or kind is not PresetType.AMOUNT or link.parameters is None:
            return None
        if link.parameters.max_amount <= 0:
            return None
        return link.decimals.amount_minor(link.parameters.max_amount).units

    async def emergency_stop(self, pump: int) -> None:
        link = self._link(pump)
        await self._command(link, [Command(PumpCommand.SWITCH_OFF)])
        await self._until_status(link, {S.SWITCHED_OFF}, "switch off", code="switch_off_refused")

    async def suspend(self, pump: int) -> None:
        link = self._link(pump)
        async with link.lock:
            await self._command(link, [Command(PumpCommand.SUSPEND)])
            await self._until_status(link, {S.SUSPENDED}, "suspend", code="suspend_refused")

    async def resume(self, pump: int) -> None:
        link = self._link(pump)
        async with link.lock:
            await self._command(link, [Command(PumpCommand.RESUME)])
            await self._until_status(
                link, {S.FILLING, S.MAX_REACHED}, "resume", code="resume_refused"
            )

    async def set_prices(self, pump: int, prices_mmu: Sequence[int]) -> None:
        link = self._link(pump)
        if not prices_mmu:
            raise InvalidValue("set_prices needs at least one price")
        d = link.decimals
        count = max(link.nozzle_count, 1)
        raw = [d.raw_price(price) for price in prices_mmu[:count]]
        known = list(link.pump_prices or ())
        for index in range(len(raw), count):
            if index >= len(known):
                raise InvalidValue(
                    f"pump {pump} has {count} nozzles: give a price for each of them"
                )
            raw.append(known[index])
        async with link.lock:
            await self._command(link, [PriceUpdate(tuple(raw))])
            link.pump_prices = tuple(raw)
            if link.status == S.NOT_PROGRAMMED:
                await self._until_status(
                    link,
                    set(PumpStatusCode) - {S.NOT_PROGRAMMED},
                    "take the prices",
                    code="no_price",
                )

    async def totals(self, pump: int, nozzle: int) -> NozzleTotals:
        link = self._link(pump)
        self._usable(link)
        volume_counter, amount_counter = nozzle, AMOUNT_COUNTER_BASE + nozzle
        seq = link.totals_seq

        def fresh(counter: int) -> bool:
            found = link.counter(counter)
            return found is not None and found[0] > seq

        await self._command(
            link, [RequestTotals(volume_counter), RequestTotals(amount_counter)], wait=False
        )
        try:
            await self._wait(link, lambda: fresh(volume_counter) and fresh(amount_counter))
        except TimeoutError:
            raise DriverUnavailable(
                f"pump {pump} nozzle {nozzle}: no total counters in time"
            ) from None
        volume = link.counter(volume_counter)
        amount = link.counter(amount_counter)
        if volume is None or amount is None:
            raise DriverUnavailable(f"pump {pump} nozzle {nozzle}: total counters missing")
        d = link.decimals
        return NozzleTotals(
            pump=pump,
            nozzle=nozzle,
            volume_ml=d.total_volume_ml(volume[1]).units,
            amount_minor=d.total_amount_minor(amount[1]).units,
        )

    async def _settled(self, link: _Link) -> None:
        """Wait for a filling being read; :class:`DriverUnavailable` if the pump cannot say."""
        if link.resolving is not None:
            try:
                await asyncio.wait_for(asyncio.shield(link.resolving), self.command_timeout_s)
            except TimeoutError:
                raise DriverUnavailable(
                    f"pump {link.station}: its filling could not be read in time"
                ) from None
        if link.status in HOLDING and not link.resolved:
            if not link.online:
                raise DriverUnavailable(f"pump {link.station} does not answer")
            resolving = link.resolving or asyncio.create_task(self._resolve(link))
            link.resolving = resolving
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(resolving), self.command_timeout_s)
            if not link.resolved:
                raise DriverUnavailable(f"pump {link.station}: its filling could not be read")

    async def finished_transaction(self, pump: int) -> DeviceTransaction | None:
        link = self._link(pump)
        if not link.online:
            raise DriverUnavailable(f"pump {pump} (0x{link.address:02X}) does not answer")
        await self._settled(link)
        record = link.unclosed()
        return None if record is None else self._transaction(link, record)

    async def unacknowledged_transactions(self, pumps: Sequence[int]) -> list[DeviceTransaction]:
        found = []
        for pump in pumps:
            link = self._link(pump)
            if link.online:
                await self._settled(link)
            elif link.status is None:
                raise DriverUnavailable(f"pump {pump} (0x{link.address:02X}) does not answer")
            for record in link.fillings:
                if not record.get("closed") and not record.get("released"):
                    found.append(self._transaction(link, record))
        return found

    async def close_transaction(self, pump: int, transaction: int) -> None:
        link = self._link(pump)
        async with link.lock:
            record = link.held()
            if record is None or int(record["number"]) != transaction:
                raise DeviceRejected(
                    f"pump {pump} does not hold transaction {transaction}",
                    device_code="not_held",
                    held=None if record is None else record["number"],
                )
            if not record.get("closed"):
                record["closed"] = True
                record["closed_at"] = self.clock.now().isoformat()
                await self._save(link)
            self._report(link)
            if self.reset_on_close and link.online and link.status in HOLDING:
                with contextlib.suppress(DriverUnavailable, DeviceRejected):
                    await self._command(link, [Command(PumpCommand.RESET)])

    async def transactions(
        self, pump: int, start: datetime, end: datetime
    ) -> list[DeviceTransaction]:
        transactions_window_ok(start, end)
        link = self._link(pump)
        found = []
        for record in link.fillings:
            ended = datetime.fromisoformat(record["ended_at"])
            if start <= ended <= end:
                found.append(self._transaction(link, record))
        return sorted(found, key=lambda t: (t.ended_at, t.transaction))


# --------------------------------------------------------------------------- wiring


def _decimals_option(config: DeviceConfig, currency: str) -> Decimals:
    nested = config.option("decimals")
    values: dict[str, Any] = dict(nested) if isinstance(nested, Mapping) else {}

    def pick(key: str, default: int | None) -> int | None:
        value = values.get(key, config.option(f"{key}_decimals", default))
        return None if value is None else int(value)

    return Decimals(
        pick("volume", 2) or 0,
        pick("amount", 2) or 0,
        pick("price", 2) or 0,
        currency,
        pick("total_volume", None),
        pick("total_amount", None),
    )


def _bool_option(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def create(config: DeviceConfig, context: DriverContext) -> DartDriver:
    """A DART driver from a station's device line (``protocol = "dart"``); ``pumps`` maps the
    station's fuelling-point numbers to DART addresses (e.g. ``{1: 0x50, 2: 0x51}``)."""
    currency = str(config.option("currency", context.currency))
    try:
        return DartDriver(
            config.name,
            config.transport,
            dict(config.pumps),
            store=context.store,
            clock=context.clock,
            decimals=_decimals_option(config, currency),
            nozzles=int(config.option("nozzles", 1)),
            read_parameters=_bool_option(config.option("read_parameters", True)),
            timeout_s=float(config.option("timeout_s", 0.5)),
            poll_interval_s=float(config.option("poll_interval_s", 0.05)),
            retries=int(config.option("retries", 3)),
            offline_after=int(config.option("offline_after", 3)),
            offline_retry_s=float(config.option("offline_retry_s", 2.0)),
            status_refresh_s=float(config.option("status_refresh_s", 1.0)),
            command_timeout_s=float(config.option("command_timeout_s", 5.0)),
            reset_on_close=_bool_option(config.option("reset_on_close", False)),
        )
    except (ValueError, TypeError) as exc:
        raise DeviceConfigError(f"device {config.name!r}: bad DART option: {exc}") from None


async def poll_once(endpoint: str, options: Mapping[str, str]) -> dict[str, Any]:
    """Ask the pumps of one DART line once who and how they are (``device poll``).

    ``options``: ``address`` or ``addresses`` (``0x50,0x51`` or ``0x50-0x53``; default
    0x50), ``totals`` (``true``: read each nozzle's totals too), ``timeout_s``, ``nozzles``."""
    addresses = _address_list(options.get("addresses", options.get("address", "0x50")))
    pumps = {index + 1: address for index, address in enumerate(addresses)}
    driver = DartDriver(
        "poll",
        endpoint,
        pumps,
        timeout_s=float(options.get("timeout_s", 0.5)),
        offline_after=2,
        nozzles=int(options.get("nozzles", 1)),
    )
    async with driver:
        try:
            identity: dict[str, Any] | str = _identity_json(await driver.identity())
        except DriverUnavailable as exc:
            identity = f"unavailable: {exc.message}"
        statuses = await driver.pump_status(list(pumps))
        result: dict[str, Any] = {
            "protocol": "dart",
            "endpoint": str(driver.endpoint),
            "identity": identity,
            "pumps": [],
        }
        for status in statuses:
            link = driver.links[status.pump]
            entry: dict[str, Any] = {
                "address": f"0x{link.address:02X}",
                "state": status.state.value,
                "dart_status": link.status,
                "nozzle": status.nozzle,
                "nozzle_out": link.nozzle_out,
                "volume_ml": status.volume_ml,
                "amount_minor": status.amount_minor,
                "unit_price_mmu": status.unit_price_mmu,
                "error": status.error,
                "decimals": link.decimals.to_json(),
                "identity": link.identity,
                "epoch": link.epoch,
            }
            if _bool_option(options.get("totals", False)) and link.online:
                totals: list[dict[str, Any]] = []
                for nozzle in range(1, max(link.nozzle_count, 1) + 1):
                    try:
                        found = await driver.totals(status.pump, nozzle)
                        totals.append(
                            {
                                "nozzle": nozzle,
                                "volume_ml": found.volume_ml,
                                "amount_minor": found.amount_minor,
                            }
                        )
                    except DriverUnavailable as exc:
                        totals.append({"nozzle": nozzle, "error": exc.message})
                entry["totals"] = totals
            result["pumps"].append(entry)
        health = driver.health()
        result["health"] = {
            "state": health.state.value,
            "reason": health.reason,
            "frames_refused": health.frames_refused,
            "timeouts": health.timeouts,
        }
    return result


def _identity_json(identity: DeviceIdentity) -> dict[str, Any]:
    return {
        "device_id": identity.device_id,
        "boot_marker": identity.boot_marker,
        "firmware": identity.firmware,
    }


def _address_list(text: str) -> list[int]:
    found: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                first, last = (int(x, 0) for x in part.split("-", 1))
                found.extend(range(first, last + 1))
            else:
                found.append(int(part, 0))
    except ValueError:
        raise InvalidValue(
            f"not a list of DART addresses: {text!r}", hint="addresses=0x50,0x51"
        ) from None
    if not found or any(not ADDRESS_MIN <= a <= ADDRESS_MAX for a in found):
        raise InvalidValue(f"DART addresses are 0x50-0x6F: {text!r}", hint="addresses=0x50-0x53")
    return found


__all__ = [
    "HOLDING",
    "RELEASED",
    "DartDriver",
    "create",
    "poll_once",
    "standard_state",
]
