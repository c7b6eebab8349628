"""Device telemetry from the edge to HQ over MQTT: filtered, buffered, never on the sales path.

The edge's device code feeds the :class:`TelemetryPublisher` (``pump``, ``tank``,
``device_health``, ``report_alarm``, or ``device_event`` with a driver's event). Each feed call is
synchronous, O(1) and never raises: it turns the value into the wire body of
:mod:`forecourt.kernel.telemetry`, lets the :class:`TelemetryFilter` decide whether it is
worth publishing (change-only, deadbands, at most one fuelling update per interval), and
leaves what must go out in a buffer that holds the latest message per topic (a newer state
replaces an older one that has not gone out) and a bounded queue of alarms (the oldest
dropped, and counted, when it is full). A background task connects to the broker with the
station's own credentials, publishes with QoS 1 (state topics retained), and reconnects with
a capped backoff when the broker goes away; on every connection it publishes the last state
of every topic again, so a broker that lost its retained messages has them back.

The station's status topic carries ``online: true`` (retained) while connected and is the
connection's MQTT last will (``online: false``); a clean stop publishes ``online: false``
itself. See docs/telemetry.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import ssl
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from forecourt import __version__
from forecourt.infra.background import BackgroundService, cancel_and_wait
from forecourt.infra.logging import get_logger
from forecourt.infra.mqtt import BrokerAddress
from forecourt.kernel.clock import Clock, ensure_aware
from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.telemetry import DEFAULT_PREFIX, MAX_PAYLOAD_BYTES, encode, topic
from forecourt.protocols.model import (
    AlarmReported,
    DeviceEvent,
    DeviceHealth,
    FillingProgress,
    HealthChanged,
    PumpState,
    PumpStatus,
    PumpStatusChanged,
    TankMeasured,
    TankMeasurement,
    as_json,
)
from forecourt.settings import EdgeSettings, SettingsInvalid

log = get_logger("forecourt.edge.telemetry")

QOS = 1
MAX_TOPICS = 4096  # state topics buffered at most (a station has tens)
ALARM_KEYS = 1024  # alarms remembered for change-only
_IDLE_WAKE_S = 0.5  # the sender looks at held updates at least this often


# --- what is worth publishing ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilterRules:
    """When an update of a pump or a tank is worth publishing (see :class:`TelemetryFilter`)."""

    pump_deadband_ml: int = 1000
    pump_interval_s: float = 1.0
    tank_volume_deadband_ml: int = 10_000
    tank_temperature_deadband_mdegc: int = 500
    tank_water_deadband_um: int = 1000
    tank_heartbeat_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> FilterRules:
        return cls(
            pump_deadband_ml=settings.telemetry_pump_deadband_ml,
            pump_interval_s=settings.telemetry_pump_interval_s,
            tank_volume_deadband_ml=settings.telemetry_tank_volume_deadband_ml,
            tank_temperature_deadband_mdegc=settings.telemetry_tank_temperature_deadband_mdegc,
            tank_water_deadband_um=settings.telemetry_tank_water_deadband_um,
            tank_heartbeat_s=settings.telemetry_tank_heartbeat_s,
        )


@dataclass(frozen=True, slots=True, eq=False)
class Update:
    """One state offered for a topic: ``kind`` is the topic's kind (``pumps``, ``tanks``,
    ``devices``, ``status``), ``body`` the payload body, ``at`` when the edge saw it."""

    topic: str
    kind: str
    body: dict[str, Any]
    at: datetime


@dataclass(slots=True)
class _TopicState:
    last: Update | None = None  # the update last released for publishing
    released_at: datetime | None = None  # when it was (a held one is released after it was fed)
    held: Update | None = None  # a newer one, not worth publishing yet
    due_at: datetime | None = None  # when ``held`` is released anyway


_PUMP_PROGRESS = ("volume_ml", "amount_minor")
_TANK_MEASURES = (
    "measured_at",
    "volume_ml",
    "tc_volume_ml",
    "ullage_ml",
    "product_height_um",
    "water_height_um",
    "water_volume_ml",
    "temperature_mdegc",
)


def _without(body: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


def _moved(old: Mapping[str, Any], new: Mapping[str, Any], key: str, band: int) -> bool:
    """``key`` moved by ``band`` or more, or became (un)known."""
    a, b = old.get(key), new.get(key)
    if a is None or b is None:
        return a is not b
    return bool(abs(b - a) >= band)


class TelemetryFilter:
    """Per topic, what goes out now, what waits, and what is not news.

    * Anything equal to what was last released is not news (a held newer update is dropped:
      the state went back to what HQ already has).
    * A pump's fuelling progress (state ``fuelling`` before and after, only ``volume_ml`` and
      ``amount_minor`` changed) goes out when the volume moved ``pump_deadband_ml`` since the
      last release or ``pump_interval_s`` has passed since it; otherwise it is held, and the
      latest held is released ``pump_interval_s`` after the last release. Every other pump
      change (a new state, nozzle, price, error; ``end_of_transaction`` and ``idle`` with
      their final figures) goes out at once.
    * A tank reading goes out at once when its status or product changed, or its volume, water
      or temperature moved by their deadband since the last release; otherwise it is held and
      released ``tank_heartbeat_s`` after the last release.
    * Device health and status go out on every change.

    So whatever is fed, the last update fed for a topic is the last one released once time
    has moved on past its due instant, and a topic's releases come in the order they were fed.
    """

    def __init__(self, clock: Clock, rules: FilterRules | None = None) -> None:
        self.clock = clock
        self.rules = rules or FilterRules()
        self._topics: dict[str, _TopicState] = {}
        self._held: dict[str, None] = {}  # topics holding an update, as an ordered set
        self.suppressed = 0  # updates that were not news, or were replaced while held

    def offer(self, update: Update) -> Update | None:
        """``update`` if it goes out now, else None (held, or not news)."""
        state = self._topics.get(update.topic)
        if state is None:
            state = self._topics[update.topic] = _TopicState()
        last = state.last
        if last is None:
            return self._release(state, update, update.at)
        if update.body == last.body:
            self._drop_held(state)
            self.suppressed += 1
            return None
        wait = self._wait(last, update)
        if wait is None or state.released_at is None or update.at >= state.released_at + wait:
            return self._release(state, update, update.at)
        if state.held is not None:
            self.suppressed += 1  # the held one is replaced by a newer one: aggregation
        state.held, state.due_at = update, state.released_at + wait
        self._held[update.topic] = None
        return None

    def _wait(self, last: Update, update: Update) -> timedelta | None:
        """How long after ``last`` an ``update`` that is not worth it on its own may wait."""
        rules, old, new = self.rules, last.body, update.body
        if update.kind == "pumps":
            fuelling = PumpState.FUELLING.value
            if old.get("state") != fuelling or new.get("state") != fuelling:
                return None
            if _without(old, _PUMP_PROGRESS) != _without(new, _PUMP_PROGRESS):
                return None
            if _moved(old, new, "volume_ml", max(rules.pump_deadband_ml, 1)):
                return None
            return timedelta(seconds=rules.pump_interval_s)
        if update.kind == "tanks":
            if _without(old, _TANK_MEASURES) != _without(new, _TANK_MEASURES):
                return None
            volume = max(rules.tank_volume_deadband_ml, 1)
            bands = (
                ("volume_ml", volume),
                ("tc_volume_ml", volume),
                ("ullage_ml", volume),
                ("water_volume_ml", volume),
                ("water_height_um", max(rules.tank_water_deadband_um, 1)),
                ("temperature_mdegc", max(rules.tank_temperature_deadband_mdegc, 1)),
            )
            if any(_moved(old, new, key, band) for key, band in bands):
                return None
            if _moved(old, new, "product_height_um", 1) and old.get("volume_ml") is None:
                return None  # a gauge that reports heights only: every height is news
            return timedelta(seconds=rules.tank_heartbeat_s)
        return None

    def _release(self, state: _TopicState, update: Update, at: datetime) -> Update:
        state.last, state.released_at = update, at
        self._drop_held(state)
        return update

    def _drop_held(self, state: _TopicState) -> None:
        if state.held is not None:
            self._held.pop(state.held.topic, None)
            state.held = state.due_at = None

    def due(self) -> list[Update]:
        """The held updates whose time has come, released now."""
        now = self.clock.now()
        found: list[Update] = []
        for name in list(self._held):
            state = self._topics[name]
            if state.held is not None and state.due_at is not None and state.due_at <= now:
                found.append(self._release(state, state.held, now))
        return found

    def next_due(self) -> datetime | None:
        instants = [self._topics[name].due_at for name in self._held]
        return min((at for at in instants if at is not None), default=None)

    @property
    def held(self) -> int:
        return len(self._held)


# --- where the broker is ------------------------------------------------------------------


def new_boot() -> str:
    """An id for one life of a publisher that sorts by when it began (text order)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(3)}"


# --- the publisher ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class TelemetryStats:
    """What the edge's status shows about its telemetry link."""

    connected: bool = False
    connected_since: datetime | None = None
    attempts: int = 0  # connection attempts
    connects: int = 0  # of which succeeded
    published: int = 0  # messages the broker acknowledged (QoS 1)
    suppressed: int = 0  # updates that were not news, or replaced before they went out
    dropped: int = 0  # alarms dropped from a full queue, updates for too many topics
    rejected: int = 0  # feed calls whose value could not be encoded (logged)
    refused: bool = False  # the broker refused the station's credentials (last attempt)
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_published_at: datetime | None = None


class TelemetryPublisher(BackgroundService):
    """The edge's telemetry link to the broker (see the module docstring).

    Call the feed methods from the event loop's thread; they never block and never raise.
    ``start()`` runs the link; ``stop()`` says ``online: false`` and disconnects cleanly
    (within ``stop_timeout_s``) when connected, then ends the task.
    """

    task_name = "edge-telemetry"

    def __init__(
        self,
        station: str,
        broker: BrokerAddress | str,
        *,
        username: str,
        password: str | None,
        clock: Clock,
        prefix: str = DEFAULT_PREFIX,
        rules: FilterRules | None = None,
        software: str = __version__,
        alarm_buffer: int = 1000,
        keepalive_s: int = 30,
        reconnect_initial_s: float = 0.2,
        reconnect_max_s: float = 30.0,
        publish_timeout_s: float = 10.0,
        stop_timeout_s: float = 2.0,
        tls_context: ssl.SSLContext | None = None,
        identifier: str | None = None,
        boot: str | None = None,
    ) -> None:
        self.station = station
        self.broker = broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)
        self.username = username
        self._password = password
        self.clock = clock
        self.prefix = prefix
        self.software = software
        self.status_topic = topic(prefix, station, "status")  # InvalidValue: a bad station
        self.alarm_topic = topic(prefix, station, "alarms")
        self.filter = TelemetryFilter(clock, rules)
        self.keepalive_s = keepalive_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.publish_timeout_s = publish_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.tls_context = tls_context
        if self.broker.tls and tls_context is None:
            self.tls_context = ssl.create_default_context()
        self.identifier = identifier or f"forecourt-edge-{station}"
        self.boot = boot or new_boot()
        self.stats = TelemetryStats()
        self._seq = 0
        self._pending: OrderedDict[str, _Outgoing] = OrderedDict()  # latest per state topic
        self._sent: dict[str, _Outgoing] = {}  # last released per state topic: republished
        self._alarms: deque[_Outgoing] = deque()
        self.alarm_buffer = max(1, alarm_buffer)
        self._alarm_last: OrderedDict[tuple[str, str, str], tuple[Any, ...]] = OrderedDict()
        self._pumps: dict[tuple[str | None, int], PumpStatus] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closed = asyncio.Event()
        self._logged_error: str | None = None
        self._logged_feed_error: str | None = None

    # --- feeding: synchronous, O(1), never raising -------------------------------------

    def pump(self, device: str | None, status: PumpStatus, currency: str) -> None:
        """A fuelling point's state as the device reports it (every poll is fine)."""
        self._feed(
            "pumps",
            status.pump,
            lambda: {
                "pump": status.pump,
                "device": device,
                "state": PumpState(status.state).value,
                "nozzle": status.nozzle,
                "volume_ml": status.volume_ml,
                "amount_minor": status.amount_minor,
                "currency": currency,
                "unit_price_mmu": status.unit_price_mmu,
                "transaction": status.transaction,
                "error": status.error,
            },
        )
        with contextlib.suppress(Exception):
            self._pumps[(device, status.pump)] = status

    def tank(self, device: str, measurement: TankMeasurement) -> None:
        """A tank's reading by its gauge."""
        m = measurement
        self._feed(
            "tanks",
            m.tank,
            lambda: {
                "tank": m.tank,
                "device": device,
                "product_code": m.product_code,
                "measured_at": ensure_aware(m.measured_at).isoformat(),
                "volume_ml": m.volume_ml,
                "tc_volume_ml": m.tc_volume_ml,
                "ullage_ml": m.ullage_ml,
                "product_height_um": m.product_height_um,
                "water_height_um": m.water_height_um,
                "water_volume_ml": m.water_volume_ml,
                "temperature_mdegc": m.temperature_mdegc,
                "status": list(m.status),
            },
        )

    def device_health(self, device: str, protocol: str, health: DeviceHealth) -> None:
        """How a device line is doing (``detail``: why it is offline or degraded)."""
        self._feed(
            "devices",
            device,
            lambda: {
                "device": device,
                "protocol": protocol,
                "state": health.state.value,
                "detail": health.reason,
            },
        )

    def report_alarm(
        self,
        name: str,
        active: bool,
        message: str,
        raised_at: datetime,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """An alarm raised (``active``) or cleared. One alarm is its ``name`` and, when
        ``details`` carry them, its ``device`` and ``number``: telling it again unchanged
        (same ``active``, ``message`` and ``raised_at``) publishes nothing."""
        try:
            facts = dict(details or {})
            key = (name, str(facts.get("device")), str(facts.get("number")))
            seen = (bool(active), message, raised_at)
            if self._alarm_last.get(key) == seen:
                self.stats.suppressed += 1
                return
            body = {
                "name": name,
                "active": bool(active),
                "message": message,
                "raised_at": ensure_aware(raised_at).isoformat(),
                "details": as_json(facts),
            }
            outgoing = _Outgoing(self.alarm_topic, self._encode(self.clock.now(), body), False)
        except Exception as exc:  # noqa: BLE001 - telemetry must never break its caller
            self._rejected("alarms", exc)
            return
        self._alarm_last[key] = seen
        self._alarm_last.move_to_end(key)
        if len(self._alarm_last) > ALARM_KEYS:
            self._alarm_last.popitem(last=False)
        if len(self._alarms) >= self.alarm_buffer:
            self._alarms.popleft()
            self.stats.dropped += 1
        self._alarms.append(outgoing)
        self._wake.set()

    def device_event(self, event: DeviceEvent, *, protocol: str, currency: str) -> None:
        """A driver's event, for a driver's sink: pump states and filling progress, tank
        readings, health changes and device alarms; anything else is ignored."""
        try:
            if isinstance(event, PumpStatusChanged):
                self.pump(event.device, event.status, currency)
            elif isinstance(event, FillingProgress):
                known = self._pumps.get((event.device, event.pump))
                base = known or PumpStatus(event.pump, PumpState.FUELLING)
                status = replace(
                    base,
                    state=PumpState.FUELLING,
                    nozzle=base.nozzle if event.nozzle is None else event.nozzle,
                    volume_ml=event.volume_ml,
                    amount_minor=event.amount_minor,
                )
                self.pump(event.device, status, currency)
            elif isinstance(event, TankMeasured):
                self.tank(event.device, event.measurement)
            elif isinstance(event, HealthChanged):
                self.device_health(event.device, protocol, event.health)
            elif isinstance(event, AlarmReported):
                alarm = event.alarm
                self.report_alarm(
                    f"{alarm.source}_{alarm.code}",
                    alarm.active,
                    f"{alarm.source} {alarm.number}: {alarm.code} ({alarm.device_code})",
                    alarm.raised_at or self.clock.now(),
                    {"device": event.device, "number": alarm.number, "code": alarm.device_code},
                )
        except Exception as exc:  # noqa: BLE001
            self._rejected(type(event).__name__, exc)

    def _feed(self, kind: str, key: str | int, body: Any) -> None:
        try:
            name = topic(self.prefix, self.station, kind, key)
            update = Update(name, kind, body(), self.clock.now())
            before = self.filter.suppressed
            released = self.filter.offer(update)
            self.stats.suppressed += self.filter.suppressed - before
            if released is not None:
                self._queue(released)
        except Exception as exc:  # noqa: BLE001 - telemetry must never break its caller
            self._rejected(kind, exc)

    def _queue(self, update: Update) -> None:
        outgoing = _Outgoing(update.topic, self._encode(update.at, update.body), True)
        if update.topic not in self._sent and len(self._sent) >= MAX_TOPICS:
            self.stats.dropped += 1
            return
        self._sent[update.topic] = outgoing
        if update.topic in self._pending:
            self.stats.suppressed += 1  # the older one never went out: the latest wins
        self._pending[update.topic] = outgoing
        self._wake.set()

    def _encode(self, at: datetime, body: dict[str, Any]) -> bytes:
        self._seq += 1
        payload = encode(self.station, at, self.boot, self._seq, body)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise InvalidValue(f"a {len(payload)}-byte payload is too big", field="payload")
        return payload

    def _rejected(self, what: str, exc: Exception) -> None:
        self.stats.rejected += 1
        text = f"{what}: {type(exc).__name__}: {exc}"
        if text != self._logged_feed_error:  # once per kind of fault, not once per poll
            self._logged_feed_error = text
            log.warning("edge.telemetry_rejected", kind=what, error=f"{type(exc).__name__}: {exc}")

    # --- status -----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages waiting for the broker (state topics and alarms)."""
        return len(self._pending) + len(self._alarms)

    def as_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "broker": str(self.broker),
            "username": self.username,
            "station": self.station,
            "prefix": self.prefix,
            "boot": self.boot,
            "connected": s.connected,
            "connected_since": s.connected_since.isoformat() if s.connected_since else None,
            "attempts": s.attempts,
            "connects": s.connects,
            "published": s.published,
            "last_published_at": s.last_published_at.isoformat() if s.last_published_at else None,
            "pending_states": len(self._pending),
            "pending_alarms": len(self._alarms),
            "held": self.filter.held,
            "suppressed": s.suppressed,
            "dropped": s.dropped,
            "rejected": s.rejected,
            "refused": s.refused,
            "last_error": s.last_error,
            "last_error_at": s.last_error_at.isoformat() if s.last_error_at else None,
            "task": self.health(),
        }

    # --- the link ---------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._closed.clear()
        super().start()

    async def stop(self) -> None:
        if self._task is not None and self.stats.connected:
            self._stopping.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.stop_timeout_s):
                    await self._closed.wait()
        await super().stop()
        self.stats.connected = False

    def retry_delay(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` in a row (≥ 1): doubling from
        ``reconnect_initial_s`` up to ``reconnect_max_s``, less up to a fifth at random so
        that a chain's stations do not all come back in the same instant."""
        delay = min(self.reconnect_max_s, self.reconnect_initial_s * 2 ** min(failures - 1, 30))
        return delay * random.uniform(0.8, 1.0)

    async def run(self) -> None:
        failures = 0
        while True:
            self.stats.attempts += 1
            delay = 0.0
            try:
                await self._session()
            except MqttConnectError as exc:
                # Wrong credentials or ACL do not mend by themselves: retry slowly.
                self._failed(f"the broker refused the connection: {exc}", refused=True)
                failures = 0
                delay = self.reconnect_max_s
            except (aiomqtt.MqttError, OSError, ValueError) as exc:
                failures = 1 if self._session_was_up else failures + 1
                self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                delay = self.retry_delay(failures)
            finally:
                self.stats.connected = False
            if self._stopping.is_set():
                # Stopped (cleanly, or the broker went away as it was told goodbye): wait for
                # stop() to end the task rather than connect again.
                self._closed.set()
                await asyncio.Event().wait()
            await asyncio.sleep(delay)

    _session_was_up = False

    async def _session(self) -> None:
        """One connection: say online, republish the last states, send until the broker
        goes away (raises) or stop() is asked (returns, after saying offline)."""
        self._session_was_up = False
        if self.broker.transport == "unix" and not Path(self.broker.host).exists():
            # (paho would leave the socket it made for the attempt to the garbage collector)
            raise FileNotFoundError(f"no broker socket at {self.broker.host}")
        # The will's seq follows the online message's, and every later message's follows
        # the will's, so HQ (newest by seq) orders a delivered will after this connection's
        # online message and before the next connection's.
        online = self._encode(self.clock.now(), self._status_body(True))
        will = self._encode(self.clock.now(), self._status_body(False))
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,  # paho wants a valid port for a unix socket too, and ignores it
            username=self.username,
            password=self._password,
            identifier=self.identifier,
            will=aiomqtt.Will(self.status_topic, will, qos=QOS, retain=True),
            clean_session=True,
            transport=self.broker.transport,
            keepalive=self.keepalive_s,
            timeout=self.publish_timeout_s,
            tls_context=self.tls_context if self.broker.tls else None,
        )
        async with client:
            self._session_was_up = True
            self._connected()
            await client.publish(self.status_topic, online, qos=QOS, retain=True)
            self._count_published()
            self._republish()
            watch = asyncio.create_task(self._watch(client), name="edge-telemetry-watch")
            send = asyncio.create_task(self._send(client), name="edge-telemetry-send")
            stop = asyncio.create_task(self._stopping.wait(), name="edge-telemetry-stop")
            try:
                done, _ = await asyncio.wait({watch, send, stop}, return_when="FIRST_COMPLETED")
            finally:
                await cancel_and_wait(watch, send, stop)
            failures = {
                task: task.exception()
                for task in (watch, send)
                if task.done() and not task.cancelled()  # each failure read, none left unseen
            }
            if stop in done and not (watch in done and watch.exception()):
                offline = self._encode(self.clock.now(), self._status_body(False))
                await client.publish(
                    self.status_topic, offline, qos=QOS, retain=True, timeout=self.stop_timeout_s
                )
                self._count_published()
                log.info("edge.telemetry_stopped", broker=str(self.broker))
                return
            for task in (watch, send):
                failure = failures.get(task) if task in done else None
                if failure is not None:
                    raise failure
            raise aiomqtt.MqttError("the connection ended")

    def _status_body(self, online: bool) -> dict[str, Any]:
        return {"online": online, "software": self.software}

    def _connected(self) -> None:
        s = self.stats
        s.connected, s.connected_since, s.refused = True, self.clock.now(), False
        s.connects += 1
        self._logged_error = None
        log.info(
            "edge.telemetry_connected",
            broker=str(self.broker),
            username=self.username,
            pending=self.pending,
        )

    def _failed(self, error: str, *, refused: bool = False) -> None:
        s = self.stats
        was_connected = s.connected
        s.connected, s.refused = False, refused
        s.last_error, s.last_error_at = error, self.clock.now()
        if error != self._logged_error or was_connected:  # once per change, not per attempt
            self._logged_error = error
            (log.error if refused else log.warning)(
                "edge.telemetry_broker_refused" if refused else "edge.telemetry_broker_unavailable",
                broker=str(self.broker),
                username=self.username,
                error=error,
                pending=self.pending,
            )

    def _republish(self) -> None:
        """Queue the last state of every topic again (behind what is pending): a broker that
        restarted without its retained messages has every last state back."""
        for name, outgoing in self._sent.items():
            if name not in self._pending:
                self._pending[name] = outgoing

    async def _watch(self, client: aiomqtt.Client) -> None:
        # Nothing is subscribed: the iterator only ends, with MqttError, when the connection
        # does, which is how a publisher that is idle learns that the broker went away.
        async for _ in client.messages:
            pass

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            for update in self.filter.due():
                self._queue(update)
            outgoing = self._take()
            if outgoing is None:
                await self._idle()
                continue
            sent = False
            try:
                await client.publish(
                    outgoing.topic, outgoing.payload, qos=QOS, retain=outgoing.retain
                )
                sent = True
            finally:
                if not sent:
                    self._put_back(outgoing)
            self._count_published()

    def _take(self) -> _Outgoing | None:
        if self._alarms:
            return self._alarms.popleft()
        if self._pending:
            return self._pending.popitem(last=False)[1]
        return None

    def _put_back(self, outgoing: _Outgoing) -> None:
        """A message that may not have reached the broker goes first next time, unless a
        newer one for its topic came meanwhile."""
        if not outgoing.retain:
            if len(self._alarms) >= self.alarm_buffer:
                self.stats.dropped += 1
                return
            self._alarms.appendleft(outgoing)
        elif outgoing.topic not in self._pending:
            self._pending[outgoing.topic] = outgoing
            self._pending.move_to_end(outgoing.topic, last=False)

    async def _idle(self) -> None:
        """Wait for something to send: a feed, or a held update falling due."""
        self._wake.clear()
        if self._pending or self._alarms:
            return
        wait = _IDLE_WAKE_S
        due = self.filter.next_due()
        if due is not None:
            wait = min(wait, max(0.005, (due - self.clock.now()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wake.wait()

    def _count_published(self) -> None:
        self.stats.published += 1
        self.stats.last_published_at = self.clock.now()


def telemetry_from_settings(
    settings: EdgeSettings, clock: Clock, *, software: str = __version__
) -> TelemetryPublisher | None:
    """The station's publisher from its settings, or None when ``mqtt_url`` is not set;
    :class:`SettingsInvalid` for settings it cannot use (a station code that cannot be a
    topic segment, a CA file that cannot be read)."""
    if settings.mqtt_url is None:
        return None
    address = BrokerAddress.parse(settings.mqtt_url)
    context: ssl.SSLContext | None = None
    if address.tls:
        try:
            context = ssl.create_default_context(
                cafile=str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise SettingsInvalid(
                f"setting mqtt_ca_file ({settings.mqtt_ca_file}) cannot be used: {exc} — "
                "name a readable PEM file with the CA of the broker's certificate",
                setting="FORECOURT_EDGE_MQTT_CA_FILE",
            ) from exc
    elif settings.mqtt_ca_file is not None:
        raise SettingsInvalid(
            "setting mqtt_ca_file is set but mqtt_url is not mqtts:// — use mqtts://host:8883 "
            "or unset FORECOURT_EDGE_MQTT_CA_FILE",
            setting="FORECOURT_EDGE_MQTT_CA_FILE",
        )
    password = settings.mqtt_password or settings.credential
    try:
        return TelemetryPublisher(
            settings.station,
            address,
            username=settings.mqtt_username or settings.station,
            password=password.get_secret_value(),
            clock=clock,
            prefix=settings.telemetry_prefix,
            rules=FilterRules.from_settings(settings),
            software=software,
            alarm_buffer=settings.telemetry_alarm_buffer,
            keepalive_s=settings.mqtt_keepalive_s,
            reconnect_max_s=settings.mqtt_reconnect_max_s,
            tls_context=context,
        )
    except InvalidValue as exc:
        raise SettingsInvalid(
            f"station {settings.station!r} cannot publish telemetry: {exc.message} — a station "
            "code for MQTT is 1-64 letters, digits or _.-:",
            setting="FORECOURT_EDGE_STATION",
        ) from exc
