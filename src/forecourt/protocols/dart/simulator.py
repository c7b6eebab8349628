"""A strict DART pump-line simulator: pumps 0x50+ on one line, over TCP and over a pty.

Line behaviour (as a real pump, see :mod:`.line`): a pump answers only a frame addressed to
it that decodes cleanly; a frame with a bad CRC or other damage gets **no answer** (the master
times out and sends again, as ``fangym0335/first:src/lischn007.c`` retries). ``POLL`` gets the
pump's pending data in one data frame, or ``EOT`` when it has nothing to say; that data frame
is sent again, unchanged and with the same tx#, on every ``POLL`` and after a ``NAK`` until the
master ``ACK``s its tx#. A data frame from the master is ``ACK``ed with its tx#; the same tx#
again is a retransmission: ``ACK``ed again and not executed twice. Well-framed data whose
transactions do not decode is ``NAK``ed. The device model is :mod:`.sim_pump`; the faults are
:mod:`.sim_faults`.

Running it: :func:`serve` (what ``forecourt simulate dart`` runs) or, in tests,
``async with DartSimulator(...) as sim`` and :meth:`DartSimulator.start`. The pty's slave is
opened by the driver as ``serial://PATH?baudrate=9600&parity=N`` (:meth:`~DartSimulator.
endpoints`): a pty carries no parity bit, and Linux refuses to set one on it. Options: number of
pumps and nozzles, the pumps' decimals and currency, a ``speed`` factor (simulated seconds
per wall second, so tests fill quickly), autonomous customers (``customers_per_hour`` per pump,
seeded) and ``record``: a JSON-lines file with one line per completed filling::

    {"at": "...", "pump": 1, "address": "0x50", "nozzle": 1, "volume_ml": 20000,
     "amount_minor": 15780, "unit_price_mmu": 789000,
     "totals": {"volume_ml": 120000, "amount_minor": 94680}}

Control surface: the Python methods (:meth:`DartSimulator.lift`, :meth:`~DartSimulator.hang`,
:meth:`~DartSimulator.set_fault`, …) and, for a simulator in another process, a control port
(``control="HOST:PORT"``) speaking JSON lines: one object per line in, one answer per line
out (``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``)::

    {"cmd": "lift", "pump": 1, "nozzle": 1, "target_ml": 20000, "hang": true}
    {"cmd": "hang", "pump": 1}
    {"cmd": "trigger", "pump": 1, "on": false}
    {"cmd": "fault", "name": "reboot", "value": "1"}
    {"cmd": "clear", "name": "no_answer"}          (no name: clear every fault)
    {"cmd": "state"}                               (every pump's state and the faults)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import tty
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import IO, Any

from forecourt.kernel.clock import Clock, SystemClock
from forecourt.protocols.dart.application import (
    Decimals,
    Direction,
    PumpStatusCode,
    decode_transactions,
    encode_transaction,
)
from forecourt.protocols.dart.line import (
    ADDRESS_MAX,
    ADDRESS_MIN,
    ETX,
    MAX_DATA_BYTES,
    SF,
    DartMalformed,
    Deframer,
    Frame,
    FrameKind,
    ack,
    crc16_arc,
    data_frame,
    eot,
    escape,
    nak,
    next_tx,
)
from forecourt.protocols.dart.sim_faults import (
    FAULTS,
    ONE_SHOT,
    ActiveFaults,
    FaultError,
    parse_addresses,
    parse_fault,
)
from forecourt.protocols.dart.sim_pump import CompletedFilling, SimulatedPump
from forecourt.sim.customers import CustomerModel, CustomerSource

log = logging.getLogger("forecourt.protocols.dart.simulator")

S = PumpStatusCode
_TICK_S = 0.02  # wall seconds between two steps of the pumps' meters
_ATTENDANT_S = 300.0  # simulated seconds before an attendant hangs a nozzle left out


@dataclass
class _LineState:
    """One address's side of the line protocol."""

    tx: int = 0  # the pump's next data-frame tx#
    wrap_to: int = 0
    unacked: Frame | None = None  # sent, not yet ACKed: sent again until it is
    last_master_tx: int | None = None  # the tx# of the master's last executed data frame


@dataclass
class _Target:
    """A manual customer: release the trigger (and hang up) at this raw volume."""

    volume: int
    hang: bool
    started: bool = False  # the filling for this customer has begun


Writer = Callable[[bytes], Awaitable[None]]


class DartSimulator:
    """Pumps on one simulated DART line; see the module docstring."""

    def __init__(
        self,
        *,
        pumps: int = 1,
        first_address: int = ADDRESS_MIN,
        nozzles: int = 2,
        decimals: Decimals | None = None,
        speed: float = 1.0,
        flow_l_per_min: float = 40.0,
        customers_per_hour: float = 0.0,
        seed: int = 1,
        record: str | Path | None = None,
        faults: Sequence[str] = (),
        clock: Clock | None = None,
    ) -> None:
        if not 1 <= pumps <= ADDRESS_MAX - first_address + 1:
            raise FaultError(f"{pumps} pumps do not fit on one line from 0x{first_address:02X}")
        if speed <= 0:
            raise FaultError("speed must be positive")
        self.decimals = decimals or Decimals(2, 2, 2)
        self.speed = speed
        self.clock = clock or SystemClock()
        self.pumps: dict[int, SimulatedPump] = {}
        for index in range(pumps):
            address = first_address + index
            self.pumps[address] = SimulatedPump(
                address,
                nozzles=nozzles,
                decimals=self.decimals,
                flow_l_per_min=flow_l_per_min,
                identity=f"{4_000_000_000 + address:010d}",
                on_completed=self._completed,
            )
        self.faults = ActiveFaults(frozenset(self.pumps))
        self._line = {address: _LineState() for address in self.pumps}
        self._rng = random.Random(seed)
        self._seed = seed
        self.customers_per_hour = customers_per_hour
        self._targets: dict[int, _Target] = {}
        self._record_path = Path(record) if record else None
        self._record: IO[str] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._clients: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._pty: tuple[int, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.control_address: tuple[str, int] | None = None
        self.pty_path: str | None = None
        self.frames_in = 0
        self.frames_refused = 0
        self.stats: dict[str, int] = {"polls": 0, "data": 0, "acks_sent": 0, "naks_sent": 0}
        self.completed: list[CompletedFilling] = []
        for text in faults:
            self.set_fault(*parse_fault(text))

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> DartSimulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(
        self,
        listen: str | None = "127.0.0.1:0",
        *,
        pty: bool = False,
        control: str | None = None,
    ) -> None:
        """Serve the line on ``listen`` (``HOST:PORT``, port 0 picks one) and/or a pty."""
        if self._record_path is not None:
            self._record_path.parent.mkdir(parents=True, exist_ok=True)
            self._record = open(self._record_path, "a", encoding="utf-8")  # noqa: SIM115
        if listen:
            host, port = _host_port(listen)
            server = await asyncio.start_server(self._serve_tcp, host, port)
            self._servers.append(server)
            name = server.sockets[0].getsockname()
            self.tcp_address = (str(name[0]), int(name[1]))
        if pty:
            self._open_pty()
        if control:
            host, port = _host_port(control)
            server = await asyncio.start_server(self._serve_control, host, port)
            self._servers.append(server)
            name = server.sockets[0].getsockname()
            self.control_address = (str(name[0]), int(name[1]))
        self._tasks.append(asyncio.create_task(self._tick(), name="dart-sim-meters"))
        if self.customers_per_hour > 0:
            for address in self.pumps:
                self._tasks.append(
                    asyncio.create_task(self._customers(address), name=f"dart-sim-{address:02X}")
                )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for server in self._servers:
            server.close()
        for client in list(self._clients):
            client.close()  # its handler sees the end of the stream and returns
        for handler in list(self._handlers):
            handler.cancel()  # one still waiting (a slow reply) ends now
        await asyncio.sleep(0.01)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        if self._pty is not None:
            master, slave = self._pty
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(master)
            for fd in (master, slave):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pty = None
        if self._record is not None:
            self._record.close()
            self._record = None

    def endpoints(self) -> dict[str, str]:
        found = {}
        if self.tcp_address:
            found["tcp"] = f"tcp://{self.tcp_address[0]}:{self.tcp_address[1]}"
        if self.pty_path:
            # A pty carries no parity bits (Linux refuses PARENB on one): 8N1 stands in for 8O1.
            found["serial"] = f"serial://{self.pty_path}?baudrate=9600&parity=N"
        if self.control_address:
            found["control"] = f"{self.control_address[0]}:{self.control_address[1]}"
        return found

    # ----------------------------------------------------------------- control surface

    def pump(self, which: int) -> SimulatedPump:
        """A pump by DART address (0x50…) or by number on the line (1…)."""
        address = which if which >= ADDRESS_MIN else ADDRESS_MIN + which - 1
        try:
            return self.pumps[address]
        except KeyError:
            raise FaultError(f"no simulated pump {which}") from None

    def lift(
        self, which: int, nozzle: int, *, target_ml: int | None = None, hang: bool = False
    ) -> None:
        """A customer lifts ``nozzle``; with ``target_ml`` they release the trigger there
        (and hang up, with ``hang``)."""
        pump = self.pump(which)
        if target_ml is not None:
            raw = target_ml * 10**pump.decimals.volume // 1000
            self._targets[pump.address] = _Target(max(raw, 1), hang)
        pump.trigger(True)
        pump.lift(nozzle)

    def hang(self, which: int) -> None:
        pump = self.pump(which)
        self._targets.pop(pump.address, None)
        pump.hang()
        pump.trigger(True)

    def set_fault(self, name: str, value: str | None = None) -> None:
        """Put a fault in force now (``reboot`` and ``tx_wrap`` act at once)."""
        if name == "reboot":
            for address in sorted(parse_addresses(value, self.pumps)):
                self.reboot(address)
            return
        if name == "tx_wrap":
            wrap_to = 0 if value in (None, "", "0") else 1
            if value not in (None, "", "0", "1"):
                raise FaultError("tx_wrap wraps to 0 or 1")
            for state in self._line.values():
                state.wrap_to = wrap_to
                if state.unacked is None:
                    state.tx = 0x0E
            return
        self.faults.set(name, value)

    def clear_fault(self, name: str | None = None) -> None:
        self.faults.clear(name)

    def reboot(self, which: int) -> None:
        """Power-cycle one pump: its line state goes too (tx#, unacknowledged data)."""
        pump = self.pump(which)
        self._targets.pop(pump.address, None)
        pump.reboot()
        self._line[pump.address] = _LineState(wrap_to=self._line[pump.address].wrap_to)

    def state(self) -> dict[str, Any]:
        return {
            "pumps": [pump.snapshot() for pump in self.pumps.values()],
            "faults": self.faults.active(),
            "frames_in": self.frames_in,
            "frames_refused": self.frames_refused,
            "stats": dict(self.stats),
            "completed": len(self.completed),
        }

    # ----------------------------------------------------------------- the line protocol

    def handle(self, frame: Frame) -> Frame | None:
        """The pump's answer to one decoded frame from the master (None: silence)."""
        pump = self.pumps.get(frame.address)
        if pump is None or frame.address in self.faults.silent:
            return None
        state = self._line[frame.address]
        if frame.kind is FrameKind.POLL:
            self.stats["polls"] += 1
            return self._data_or_eot(pump, state)
        if frame.kind is FrameKind.ACKPOLL:
            self._acknowledged(state, frame.tx)
            return self._data_or_eot(pump, state)
        if frame.kind is FrameKind.ACK:
            self._acknowledged(state, frame.tx)
            return None
        if frame.kind is FrameKind.NAK:
            return state.unacked or eot(pump.address)
        if frame.kind is FrameKind.DATA:
            self.stats["data"] += 1
            if state.last_master_tx == frame.tx:
                self.stats["acks_sent"] += 1
                return ack(pump.address, frame.tx)  # a retransmission: not executed again
            try:
                items = decode_transactions(frame.data, Direction.TO_DEVICE)
            except DartMalformed:
                self.stats["naks_sent"] += 1
                return nak(pump.address, frame.tx)
            for item in items:
                pump.handle(item)
            state.last_master_tx = frame.tx
            self.stats["acks_sent"] += 1
            return ack(pump.address, frame.tx)
        return None  # EOT from the master: nothing to do

    def _acknowledged(self, state: _LineState, tx: int) -> None:
        if state.unacked is not None and state.unacked.tx == tx:
            state.unacked = None
            state.tx = next_tx(state.tx, wrap_to=state.wrap_to)

    def _data_or_eot(self, pump: SimulatedPump, state: _LineState) -> Frame:
        if state.unacked is not None:
            return state.unacked
        queued = pump.outbox()
        if not queued:
            return eot(pump.address)
        data = b""
        count = 0
        for item in queued:
            encoded = encode_transaction(item)
            if data and len(data) + len(encoded) > MAX_DATA_BYTES:
                break
            data += encoded
            count += 1
        pump.take(count)
        state.unacked = data_frame(pump.address, state.tx, data)
        return state.unacked

    # ----------------------------------------------------------------- bytes and faults

    async def _answer(self, deframer: Deframer, chunk: bytes, write: Writer) -> None:
        for item in deframer.feed(chunk):
            if isinstance(item, DartMalformed):
                self.frames_refused += 1
                continue  # a damaged frame gets no answer
            self.frames_in += 1
            if self.faults.baud:
                # The frame has just crossed the paced line; the pump sees it only now.
                await asyncio.sleep(self.faults.on_the_line_s(len(item.encode())))
            reply = self.handle(item)
            if reply is None:
                if self.faults.merge:
                    await write(item.encode())  # the adapter echoes what nobody answers too
                continue
            if self.faults.slow_s:
                # A slow pump answers late; it does not queue the master's retries behind
                # its late answer (each frame gets its answer after the same delay).
                late = asyncio.create_task(self._send(item.encode(), reply, write))
                self._handlers.add(late)
                late.add_done_callback(self._handlers.discard)
                continue
            await self._send(item.encode(), reply, write)

    async def _send(self, request: bytes, reply: Frame, write: Writer) -> None:
        faults = self.faults
        wire = reply.encode()
        if reply.kind is FrameKind.DATA and faults.corrupt_crc > 0:
            faults.corrupt_crc -= 1
            if faults.corrupt_crc == 0:
                faults.names.pop("corrupt_crc", None)
            wire = _corrupted(reply)
        if faults.garbage and self._rng.random() < faults.garbage:
            wire = bytes(self._rng.randrange(256) for _ in range(self._rng.randint(1, 6))) + wire
        if faults.merge:
            wire = request + wire
        if faults.slow_s:
            await asyncio.sleep(faults.slow_s)
        if faults.baud:
            await asyncio.sleep(faults.on_the_line_s(len(wire)))  # the reply on its way back
        if faults.split:
            for start in range(0, len(wire), faults.split):
                await write(wire[start : start + faults.split])
                await asyncio.sleep(0.001)
        else:
            await write(wire)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        deframer = Deframer()
        self._clients.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)

        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        try:
            while chunk := await reader.read(4096):
                await self._answer(deframer, chunk, write)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels a connection; the server's callback expects it to end.
            pass
        finally:
            self._clients.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._pty = (master, slave)
        self.pty_path = os.ttyname(slave)
        chunks: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(master, 4096)
            except BlockingIOError:
                return
            except OSError:
                return  # nobody has the slave open (EIO): wait for the next opener
            if data:
                chunks.put_nowait(data)

        async def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                try:
                    written = os.write(master, view)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                    continue
                view = view[written:]

        async def pump_bytes() -> None:
            deframer = Deframer()
            while True:
                await self._answer(deframer, await chunks.get(), write)

        asyncio.get_running_loop().add_reader(master, readable)
        self._tasks.append(asyncio.create_task(pump_bytes(), name="dart-sim-pty"))

    # ----------------------------------------------------------------- time and customers

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(_TICK_S)
            now = loop.time()
            elapsed, last = (now - last) * self.speed, now
            for address, pump in self.pumps.items():
                pump.advance(elapsed)
                self._check_target(address, pump)

    def _check_target(self, address: int, pump: SimulatedPump) -> None:
        target = self._targets.get(address)
        if target is None:
            return
        filling = pump.filling
        if pump.status in (S.FILLING, S.SUSPENDED, S.MAX_REACHED):
            target.started = True
        if not target.started:
            return
        ended = pump.status in (S.MAX_REACHED, S.FILLING_COMPLETED, S.SWITCHED_OFF)
        if (filling is not None and filling.volume >= target.volume) or ended:
            pump.trigger(False)
            del self._targets[address]
            if target.hang and address not in self.faults.hanging:
                pump.hang()
                pump.trigger(True)

    async def _sleep_sim(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0) / self.speed)

    async def _customers(self, address: int) -> None:
        pump = self.pumps[address]
        model = CustomerModel(
            arrivals_per_hour=self.customers_per_hour,
            seed=self._seed * 1000 + address,
            grade_mix=tuple((n, 1.0) for n in range(1, pump.nozzles + 1)),
        )
        source = CustomerSource(model, volume_step_ml=10 ** (3 - min(pump.decimals.volume, 3)))
        while True:
            gap = source.arrival_gap_s()
            if gap is None:
                return
            await self._sleep_sim(gap)
            # An authorised pump nobody uses is free: the next customer just fills.
            while pump.nozzle_out is not None or pump.status in (
                S.FILLING,
                S.SUSPENDED,
                S.MAX_REACHED,
            ):
                await self._sleep_sim(5.0)
            customer = source.new_customer(self.clock.now())
            await self._sleep_sim(source.lift_delay_s())
            pump.flow_l_per_min = customer.flow_ml_per_s * 60.0 / 1000.0
            self.lift(address, customer.grade_id, target_ml=customer.target_ml)
            target = self._targets.get(address)
            waited = 0.0
            while target is not None and not target.started:
                if waited >= model.authorise_timeout_s or pump.nozzle_out is None:
                    break
                await self._sleep_sim(1.0)
                waited += 1.0
            if target is None or not target.started:
                self.hang(address)  # not released in time: the customer gives up
                continue
            while address in self._targets and pump.status in (S.FILLING, S.SUSPENDED):
                await self._sleep_sim(1.0)
            await self._sleep_sim(source.hangup_delay_s())
            if address in self.faults.hanging:
                await self._sleep_sim(_ATTENDANT_S)  # left out until an attendant comes
            self.hang(address)

    def _completed(self, filling: CompletedFilling) -> None:
        self.completed.append(filling)
        if self._record is None:
            return
        d = self.decimals
        line = {
            "at": self.clock.now().astimezone(UTC).isoformat(),
            "pump": filling.address - ADDRESS_MIN + 1,
            "address": f"0x{filling.address:02X}",
            "nozzle": filling.nozzle,
            "volume_ml": d.volume_ml(filling.volume).units,
            "amount_minor": d.amount_minor(filling.amount).units,
            "unit_price_mmu": d.price_mmu(filling.price).units,
            "totals": {
                "volume_ml": d.total_volume_ml(filling.total_volume).units,
                "amount_minor": d.total_amount_minor(filling.total_amount).units,
            },
        }
        self._record.write(json.dumps(line, sort_keys=True) + "\n")
        self._record.flush()

    # ----------------------------------------------------------------- control port

    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._clients.add(writer)
        try:
            while line := await reader.readline():
                answer = self._control(line)
                writer.write(json.dumps(answer, sort_keys=True).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    def _control(self, line: bytes) -> dict[str, Any]:
        try:
            command = json.loads(line)
            if not isinstance(command, dict):
                raise FaultError("a control command is a JSON object")
            name = command.get("cmd")
            if name == "lift":
                target = command.get("target_ml")
                self.lift(
                    int(command["pump"]),
                    int(command.get("nozzle", 1)),
                    target_ml=None if target is None else int(target),
                    hang=bool(command.get("hang", False)),
                )
            elif name == "hang":
                self.hang(int(command["pump"]))
            elif name == "trigger":
                self.pump(int(command["pump"])).trigger(bool(command.get("on", True)))
            elif name == "fault":
                fault, _ = parse_fault(str(command["name"]))
                value = command.get("value")
                self.set_fault(fault, None if value is None else str(value))
            elif name == "clear":
                fault_name = command.get("name")
                self.clear_fault(None if fault_name is None else str(fault_name))
            elif name != "state":
                raise FaultError(f"unknown control command {name!r}")
            return {"ok": True, **self.state()}
        except (ValueError, KeyError, TypeError, FaultError) as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}


def _corrupted(frame: Frame) -> bytes:
    """The frame's bytes with a wrong CRC (still well framed: the CRC is what is wrong)."""
    head = bytes((frame.address, frame.control))
    crc = crc16_arc(head + frame.data) ^ 0x5A5A
    return head + escape(frame.data + bytes((crc & 0xFF, crc >> 8))) + bytes((ETX, SF))


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise FaultError(f"expected HOST:PORT, got {text!r}")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise FaultError(f"bad port in {text!r}") from None


async def serve(
    listen: str | None = "127.0.0.1:0",
    *,
    pumps: int = 1,
    nozzles: int = 2,
    faults: Sequence[str] = (),
    record: str | Path | None = None,
    pty: bool = False,
    control: str | None = None,
    speed: float = 1.0,
    customers_per_hour: float = 0.0,
    seed: int = 1,
    decimals: Decimals | None = None,
    flow_l_per_min: float = 40.0,
    ready: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Run a simulated DART line until cancelled (``forecourt simulate dart``).

    ``listen`` ``HOST:PORT`` for TCP (port 0 picks one), ``pty`` for a pseudo-terminal the
    driver opens as ``serial://PATH``, ``control`` ``HOST:PORT`` for the JSON-lines control
    port. ``ready`` is called once with the endpoints (``tcp``, ``serial``, ``control``)."""
    simulator = DartSimulator(
        pumps=pumps,
        nozzles=nozzles,
        decimals=decimals,
        speed=speed,
        flow_l_per_min=flow_l_per_min,
        customers_per_hour=customers_per_hour,
        seed=seed,
        record=record,
        faults=faults,
    )
    async with simulator:
        await simulator.start(listen, pty=pty, control=control)
        endpoints = simulator.endpoints()
        log.info("dart simulator serving %s", endpoints)
        if ready is not None:
            ready(endpoints)
        await asyncio.Event().wait()


__all__ = ["FAULTS", "ONE_SHOT", "DartSimulator", "serve"]
