"""The TLS gauge driver: a Veeder-Root TLS-3xx/4xx console behind :class:`GaugeDriver`.

One request at a time on the line (``tcp://HOST:10001`` or ``serial:///dev/ttyS0?...``),
each with a deadline (``timeout_s``) and one retry. A background task reads the line into a
:class:`~forecourt.protocols.tls.codec.FrameReader`, so split and merged frames are put back
together and garbage between frames is skipped (counted in ``garbage_bytes``). Before each
request, frames left over from an earlier exchange are discarded (``stale_frames``); a reply
whose function code is not the one asked is refused (``unexpected_reply``) and waited past.

- A refused frame (bad checksum, truncated, oversized...) is given to the sink as a
  :class:`FrameRefused` event and counted by reason in the health; the request is sent
  again at once. Nothing refused ever raises out of a call.
- A timeout or a dropped connection closes the connection and the retry opens a new one.
- Two failed attempts: the gauge is ``offline`` and the call raises
  :class:`DriverUnavailable`; the next call tries again, so a gauge that comes back is
  ``online`` again by itself. An exchange that needed a retry or saw a refused frame leaves
  the gauge ``degraded`` until a clean one.
- ``SOH 9999FF1B ETX`` (the console does not know the function) raises
  :class:`DeviceRejected` with ``device_code="9999"``, without retry.

Requests: ``i20100`` inventory, ``i20200`` deliveries in memory, ``i20500`` active alarms
(all tanks; the driver filters and renumbers), ``i90200`` software revision for
:meth:`TlsGaugeDriver.identity` (3xx manual §7.4.1; the TLS4 manual marks 902 obsolete and
its text hard-coded, so there it names the protocol level rather than the firmware). The
i201 reply has no serial number and the console's serial (in i218, later firmware only) is
not asked, so ``device_id`` is the configured transport address and ``boot_marker`` is None.

Configuration (:class:`DeviceConfig`): ``transport``; ``tanks`` station tank -> gauge tank
(empty: every tank the gauge reports, same numbers); options ``security_code`` (six
characters, when RS-232 security is on), ``volume_unit`` (``litres`` | ``us_gallons`` |
``imperial_gallons``), ``length_unit`` (``millimetres`` | ``inches``), ``temperature_unit``
(``celsius`` | ``fahrenheit``) -- the units the console is set up with, which it does not
report; metric by default -- ``timeout_s`` (default 5) and ``connect_timeout_s``.

``measured_at`` is the driver's clock when the reply came (the console's clock has minute
resolution; its text is in ``raw`` as ``gauge_time``). Delivery times are the console's,
local wall-clock in the station's time zone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from forecourt.kernel.clock import SystemClock
from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.driver import (
    DeviceConfig,
    DeviceConfigError,
    DriverContext,
    EventSink,
    GaugeDriver,
    ignore_event,
)
from forecourt.protocols.model import (
    AlarmReported,
    Capability,
    DeliveryRecorded,
    DeviceAlarm,
    DeviceEvent,
    DeviceHealth,
    DeviceHealthState,
    DeviceIdentity,
    DeviceRejected,
    DriverUnavailable,
    FrameRefused,
    HealthChanged,
    LengthUnit,
    TankDelivery,
    TankMeasured,
    TankMeasurement,
    TemperatureUnit,
    VolumeUnit,
    as_json,
)
from forecourt.protocols.store import MemoryDriverStore
from forecourt.protocols.tls.codec import (
    DEFAULT_MAX_FRAME,
    DeliveryReply,
    FrameReader,
    GaugeUnits,
    InventoryReply,
    RawReply,
    Reply,
    Request,
    TankStatusReply,
    TlsMalformed,
    UnknownCommandReply,
    alarm_from,
    decode_reply,
    delivery_from,
    encode_request,
    measurement_from,
    software_revision,
)
from forecourt.protocols.transport import Endpoint, open_stream, parse_endpoint

log = logging.getLogger(__name__)

PROTOCOL = "tls"
_READ_SIZE = 4096

_VOLUME_UNITS = {
    **dict.fromkeys(("litres", "liters", "litre", "liter", "l"), VolumeUnit.LITRES),
    **dict.fromkeys(("us_gallons", "gallons", "gal", "usg"), VolumeUnit.US_GALLONS),
    **dict.fromkeys(("imperial_gallons", "imp_gal"), VolumeUnit.IMPERIAL_GALLONS),
}
_LENGTH_UNITS = {
    **dict.fromkeys(("millimetres", "millimeters", "mm"), LengthUnit.MILLIMETRES),
    **dict.fromkeys(("inches", "inch", "in"), LengthUnit.INCHES),
}
_TEMPERATURE_UNITS = {
    **dict.fromkeys(("celsius", "c", "degc"), TemperatureUnit.CELSIUS),
    **dict.fromkeys(("fahrenheit", "f", "degf"), TemperatureUnit.FAHRENHEIT),
}

_U = TypeVar("_U")


def _unit(config: DeviceConfig, key: str, table: Mapping[str, _U], default: _U) -> _U:
    value = config.option(key)
    if value is None or value == "":
        return default
    found = table.get(str(value).strip().lower())
    if found is None:
        raise DeviceConfigError(
            f"device {config.name!r}: unknown {key} {value!r}",
            hint=", ".join(sorted({str(v) for v in table.values()})),
        )
    return found


def _positive(config: DeviceConfig, key: str, default: float) -> float:
    value = config.option(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DeviceConfigError(f"device {config.name!r}: {key} must be a number") from None
    if not number > 0:
        raise DeviceConfigError(f"device {config.name!r}: {key} must be positive")
    return number


class _Failed(Exception):
    """One attempt at an exchange failed (why, for the health and the error)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_EOF = None


class _Link:
    """One open connection: a task reads it into a frame reader and queues what it yields."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader(max_frame)
        self.queue: asyncio.Queue[bytes | TlsMalformed | None] = asyncio.Queue()
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._pump(), name="tls-gauge-read")

    async def _pump(self) -> None:
        try:
            while True:
                chunk = await self.reader.read(_READ_SIZE)
                if not chunk:
                    break
                for item in self.frames.feed(chunk):
                    self.queue.put_nowait(item)
        except OSError as exc:  # pyserial's SerialException is an OSError
            log.info("tls gauge line closed: %s", exc)
        finally:
            self.closed = True
            self.queue.put_nowait(_EOF)

    def stale(self) -> list[bytes | TlsMalformed]:
        """Take whatever arrived before the next request was sent (EOF stays queued)."""
        items: list[bytes | TlsMalformed] = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is _EOF:
                self.queue.put_nowait(_EOF)
                break
            items.append(item)
        return items

    async def send(self, data: bytes, timeout_s: float) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), timeout_s)

    async def close(self) -> None:
        self.closed = True
        self.task.cancel()
        # Wait for the reader task without swallowing our own cancellation: a caller being
        # stopped while it closes the line must stop, not carry on.
        await asyncio.wait([self.task])
        if not self.task.cancelled():
            self.task.exception()  # retrieved: a reader that failed is not reported twice
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class TlsGaugeDriver:
    """A :class:`GaugeDriver` for one Veeder-Root TLS console (see the module docstring)."""

    capabilities = frozenset({Capability.TANK_GAUGE})

    def __init__(
        self,
        config: DeviceConfig,
        context: DriverContext,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.config = config
        self.name = config.name
        try:
            self.endpoint: Endpoint = parse_endpoint(config.transport)
        except InvalidValue as exc:
            raise DeviceConfigError(f"device {config.name!r}: {exc.message}") from None
        try:
            self.tz = ZoneInfo(context.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise DeviceConfigError(f"unknown IANA time zone {context.timezone!r}") from None
        security = config.option("security_code")
        self.security_code: str | None = str(security) if security not in (None, "") else None
        try:
            Request("i201", 0, self.security_code)
        except TlsMalformed:
            raise DeviceConfigError(
                f"device {config.name!r}: security_code is six printable characters"
            ) from None
        self.units = GaugeUnits(
            _unit(config, "volume_unit", _VOLUME_UNITS, VolumeUnit.LITRES),
            _unit(config, "length_unit", _LENGTH_UNITS, LengthUnit.MILLIMETRES),
            _unit(config, "temperature_unit", _TEMPERATURE_UNITS, TemperatureUnit.CELSIUS),
        )
        self.timeout_s = _positive(config, "timeout_s", 5.0)
        self.connect_timeout_s = _positive(config, "connect_timeout_s", self.timeout_s)
        for station, gauge in config.tanks.items():
            if not (1 <= int(station) and 1 <= int(gauge) <= 99):
                raise DeviceConfigError(f"device {config.name!r}: bad tank {station} -> {gauge}")
        self._station_of = {int(g): int(s) for s, g in config.tanks.items()}
        if len(self._station_of) != len(config.tanks):
            raise DeviceConfigError(f"device {config.name!r}: two tanks map to one gauge tank")
        self._clock = context.clock
        self._max_frame = max_frame
        self._sink: EventSink = ignore_event
        self._lock = asyncio.Lock()
        self._link: _Link | None = None
        self._garbage_seen = 0  # of the current link's reader
        self._state = DeviceHealthState.OFFLINE
        self._since: datetime | None = None
        self._reason: str | None = "not read yet"
        self._frames_refused = 0
        self._timeouts = 0
        self._counters: dict[str, int] = {}

    # --- GaugeDriver -------------------------------------------------------------------

    def subscribe(self, sink: EventSink) -> None:
        self._sink = sink

    def health(self) -> DeviceHealth:
        return DeviceHealth(
            device=self.name,
            state=self._state,
            since=self._since,
            reason=self._reason,
            frames_refused=self._frames_refused,
            timeouts=self._timeouts,
            counters=tuple(sorted(self._counters.items())),
        )

    async def open(self) -> None:
        """Connect; :class:`DriverUnavailable` when the line cannot be opened (later calls
        try again by themselves)."""
        async with self._lock:
            try:
                await self._connect()
            except _Failed as exc:
                self._set_state(DeviceHealthState.OFFLINE, exc.reason)
                raise DriverUnavailable(self._unavailable(exc.reason)) from None

    async def close(self) -> None:
        async with self._lock:
            await self._disconnect()

    async def identity(self) -> DeviceIdentity:
        try:
            reply = await self._query("i902")
        except DeviceRejected:
            firmware = None  # a console without function 902
        else:
            firmware = software_revision(reply) if isinstance(reply, RawReply) else None
        return DeviceIdentity(device_id=str(self.endpoint), boot_marker=None, firmware=firmware)

    async def measurements(self, tanks: Sequence[int] = ()) -> list[TankMeasurement]:
        reply = _expect(await self._query("i201"), InventoryReply)
        measured_at = self._clock.now()
        found: list[TankMeasurement] = []
        for record in reply.tanks:
            station = self._wanted_station(record.tank, tanks)
            if station is None:
                continue
            measurement = measurement_from(
                record, tank=station, measured_at=measured_at, units=self.units
            )
            measurement = dataclasses.replace(
                measurement, raw=(*measurement.raw, ("gauge_time", reply.at.text))
            )
            found.append(measurement)
        found.sort(key=lambda m: m.tank)
        for measurement in found:
            self._emit(TankMeasured(self.name, measurement))
        return found

    async def deliveries(self, tanks: Sequence[int] = ()) -> list[TankDelivery]:
        reply = _expect(await self._query("i202"), DeliveryReply)
        found: list[TankDelivery] = []
        for tank in reply.tanks:
            station = self._wanted_station(tank.tank, tanks)
            if station is None:
                continue
            for record in tank.deliveries:
                found.append(
                    delivery_from(
                        record, tank=station, product=tank.product, tz=self.tz, units=self.units
                    )
                )
        found.sort(key=lambda d: (d.tank, d.started_at))
        for delivery in found:
            self._emit(DeliveryRecorded(self.name, delivery))
        return found

    async def alarms(self, tanks: Sequence[int] = ()) -> list[DeviceAlarm]:
        reply = _expect(await self._query("i205"), TankStatusReply)
        found: list[DeviceAlarm] = []
        for tank in reply.tanks:
            station = self._wanted_station(tank.tank, tanks)
            if station is None:
                continue
            found.extend(alarm_from(code, tank=station) for code in tank.codes)
        found.sort(key=lambda a: (a.number, a.device_code))
        for alarm in found:
            self._emit(AlarmReported(self.name, alarm))
        return found

    # --- the line ----------------------------------------------------------------------

    def _wanted_station(self, gauge_tank: int, tanks: Sequence[int]) -> int | None:
        station = self._station_of.get(gauge_tank) if self._station_of else gauge_tank
        if station is None or (tanks and station not in tanks):
            return None
        return station

    async def _query(self, function: str) -> Reply:
        """One exchange (with its retry); DeviceRejected for an unknown-command reply."""
        request = Request(function, 0, self.security_code)
        reply = await self._exchange(request)
        if isinstance(reply, UnknownCommandReply):
            raise DeviceRejected(
                f"tank gauge {self.name} does not know function {request.code}",
                device_code="9999",
                function=request.code,
            )
        return reply

    async def _exchange(self, request: Request) -> Reply:
        async with self._lock:
            self._count("requests")
            refused_before = self._frames_refused
            reasons: list[str] = []
            for attempt in range(2):
                if attempt:
                    self._count("retries")
                try:
                    reply = await self._attempt(request)
                except _Failed as exc:
                    reasons.append(exc.reason)
                    continue
                if reasons or self._frames_refused > refused_before:
                    why = f"answered after: {', '.join(reasons) or 'a refused frame'}"
                    self._set_state(DeviceHealthState.DEGRADED, why)
                else:
                    self._set_state(DeviceHealthState.ONLINE, None)
                return reply
            reason = "; ".join(reasons)
            self._set_state(DeviceHealthState.OFFLINE, reason)
            raise DriverUnavailable(self._unavailable(reason))

    def _unavailable(self, reason: str) -> str:
        return f"tank gauge {self.name} at {self.endpoint} does not answer: {reason}"

    async def _attempt(self, request: Request) -> Reply:
        link = await self._connect()
        for left in link.stale():
            if isinstance(left, TlsMalformed):
                self._refuse(left)
            else:
                self._count("stale_frames")
        try:
            await link.send(encode_request(request), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            await self._disconnect()
            raise _Failed(f"cannot send: {exc or type(exc).__name__}") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        item: bytes | TlsMalformed | None
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                item = await asyncio.wait_for(link.queue.get(), remaining)
            except TimeoutError:
                self._timeouts += 1
                self._note_garbage(link)
                await self._disconnect()
                raise _Failed(f"no reply to {request.code} within {self.timeout_s:g} s") from None
            self._note_garbage(link)
            if item is _EOF:
                await self._disconnect()
                raise _Failed("the gauge closed the connection")
            if isinstance(item, TlsMalformed):
                self._refuse(item)
                raise _Failed(f"refused a frame ({item.reason})")
            try:
                reply = decode_reply(item)
            except TlsMalformed as exc:
                self._refuse(exc, item)
                raise _Failed(f"refused a frame ({exc.reason})") from None
            if isinstance(reply, UnknownCommandReply) or reply.code == request.code:
                return reply
            self._refuse(
                TlsMalformed("unexpected_reply", f"asked {request.code}, got {reply.code}"), item
            )

    async def _connect(self) -> _Link:
        if self._link is not None and not self._link.closed:
            return self._link
        await self._disconnect()
        try:
            reader, writer = await open_stream(self.endpoint, timeout_s=self.connect_timeout_s)
        except DriverUnavailable as exc:
            raise _Failed(exc.message) from None
        self._count("connects")
        self._link = _Link(reader, writer, self._max_frame)
        self._garbage_seen = 0
        return self._link

    async def _disconnect(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self._note_garbage(link)
            await link.close()

    # --- health and events -------------------------------------------------------------

    def _count(self, name: str, by: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + by

    def _note_garbage(self, link: _Link) -> None:
        if link is not self._link:
            return
        new = link.frames.garbage_bytes - self._garbage_seen
        if new > 0:
            self._count("garbage_bytes", new)
            self._garbage_seen = link.frames.garbage_bytes

    def _refuse(self, error: TlsMalformed, frame: bytes = b"") -> None:
        self._frames_refused += 1
        self._count(f"refused.{error.reason}")
        frame_hex = frame[:256].hex() if frame else str(error.details.get("frame_hex", ""))
        log.warning("tls gauge %s refused a frame: %s", self.name, error.message)
        self._emit(FrameRefused(self.name, error.reason, error.message, frame_hex))

    def _set_state(self, state: DeviceHealthState, reason: str | None) -> None:
        changed = state != self._state
        self._reason = reason
        if changed:
            self._state = state
            self._since = self._clock.now()
            self._emit(HealthChanged(self.name, self.health()))

    def _emit(self, event: DeviceEvent) -> None:
        try:
            self._sink(event)
        except Exception:  # the sink's own failure must not break the line
            log.exception("tls gauge %s: event sink failed on %s", self.name, type(event).__name__)


_R = TypeVar("_R")


def _expect(reply: Reply, kind: type[_R]) -> _R:
    if not isinstance(reply, kind):  # cannot happen: replies are matched by function code
        raise DriverUnavailable(f"unexpected reply {type(reply).__name__}")
    return reply


def create(config: DeviceConfig, context: DriverContext) -> TlsGaugeDriver:
    """The registry's factory for protocol ``tls``."""
    return TlsGaugeDriver(config, context)


# --- one poll, for the command line -------------------------------------------------------


async def poll_once(endpoint: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a gauge once (``forecourt device poll --protocol tls --json``): identity,
    measurements, alarms and deliveries as a JSON-able dict. ``options`` are the driver's
    (see the module docstring) plus ``timezone`` (default UTC) and ``name``."""
    settings = dict(options or {})
    timezone = str(settings.pop("timezone", "UTC"))
    name = str(settings.pop("name", "tls"))
    config = DeviceConfig(name=name, protocol=PROTOCOL, transport=endpoint, options=settings)
    context = DriverContext(clock=SystemClock(), store=MemoryDriverStore(), timezone=timezone)
    driver = create(config, context)
    gauge: GaugeDriver = driver  # mypy checks that the TLS driver satisfies GaugeDriver
    try:
        await gauge.open()
        identity = await gauge.identity()
        measurements = await gauge.measurements()
        alarms = await gauge.alarms()
        deliveries = await gauge.deliveries()
    finally:
        await gauge.close()
    units = driver.units
    return {
        "protocol": PROTOCOL,
        "endpoint": str(driver.endpoint),
        "timezone": timezone,
        "units": {
            "volume": str(units.volume),
            "length": str(units.length),
            "temperature": str(units.temperature),
        },
        "identity": as_json(identity),
        "measurements": [as_json(m) for m in measurements],
        "alarms": [as_json(a) for a in alarms],
        "deliveries": [{**as_json(d), "volume_ml": d.volume_ml} for d in deliveries],
        "health": as_json(driver.health()),
    }
