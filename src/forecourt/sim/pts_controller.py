"""A simulated Technotrade PTS-2 forecourt controller, run as its own process, speaking jsonPTS.

Run it::

    python -m forecourt.sim.pts_controller --config CONFIG.json --port 0 \\
        [--host 127.0.0.1] [--port-file PATH] [--log-level INFO]

``--port 0`` picks a free port; the chosen port is logged and, with ``--port-file``, written to
that file (atomically, once the socket listens). Simulated time comes from
``SimulatedClock.from_env(os.environ)`` (``FORECOURT_SIM_*`` variables, see kernel.clock) and
falls back to the system clock, so the simulator runs in lock-step with the other processes of a
demo, faster than wall time.

HTTP endpoints:

- ``POST /jsonPTS`` - the controller protocol, HTTP Basic auth (401 otherwise). A body that is
  not a jsonPTS envelope (not JSON, wrong ``Protocol``, ``Packets`` not a list) gets HTTP 400
  with ``{"Error": true, "Code": "jsonpts.malformed", "Message": ...}`` and changes nothing; a
  bad packet gets an error packet while its siblings in the same POST are still answered.
- ``POST /sim/control`` (simulator only, no auth) - ``{"arrivals": true|false}`` stops/starts new
  customers; ``{"offline_pumps": [2, 5]}`` sets which pumps the controller cannot reach.
  Replies with the same body as health.
- ``GET /sim/health`` (no auth) - ``{"status": "ok", "sim_time": ..., "arrivals": ...,
  "queue": n, "stats": {...}}``.

Config file (JSON; numbers may be decimals, they are read exactly)::

    {
      "currency": "CNY",                      # ISO 4217, must be known to kernel.money
      "volume_decimals": 2, "amount_decimals": 2, "price_decimals": 2,
      "auth": {"username": "admin", "password": "admin"},
      "timezone": "Asia/Shanghai",            # IANA; device date-times are local, no offset
      "memory_size": 5000,                    # optional: finished transactions kept per pump
      "pumps": [
        {"pump": 1,
         "amount_resolution_minor": 1,        # smallest amount step (1 fen; 10 = 1 jiao)
         "rounding": "half_up",               # a kernel.money.Rounding value
         "first_transaction": 1,              # optional: the pump's next transaction number
         "offline": false,                    # optional
         "nozzles": [
           {"nozzle": 1, "grade_id": 92, "price_mmu": 789000,   # 7.89 CNY/L
            "totalizer_ml": 1234560, "totalizer_amount_minor": 0}   # amount optional
         ]}
      ],
      "customers": {                          # optional; every member optional
        "arrivals": true, "arrivals_per_hour": 60, "seed": 1,
        "grade_mix": [{"grade_id": 92, "weight": 6}, {"grade_id": 95, "weight": 3}],
        "car_volume_l": [30, 50], "car_flow_l_per_min": [30, 50],
        "truck_share": 0.03, "truck_grade_ids": [0],
        "truck_volume_l": [100, 400], "truck_flow_l_per_min": [60, 130],
        "authorise_timeout_s": 120,           # a calling customer not authorised by then leaves
        "lift_delay_s": [10, 40],             # pump assigned -> nozzle lifted
        "flow_start_delay_s": 2,              # authorised -> product flows (motor start)
        "hangup_delay_s": [3, 10],            # shut-off or stop -> nozzle hung
        "max_queue": 4,                       # arrivals leave when this many already wait
        "queue_patience_s": 600               # queued customers give up after this long
      }
    }

The model (like the hardware): each pump keeps its transaction memory (per-pump increasing
transaction numbers) and per-nozzle volume and amount totalizers (updated when a transaction
ends). A customer arrives (Poisson), takes a free pump (idle, nobody at it) or queues, lifts the
nozzle of their grade (status: nozzle up = calling), waits ``authorise_timeout_s`` to be
authorised (else hangs up and leaves, no transaction), fuels at their flow rate up to their
target or the preset, hangs up; the pump then holds the transaction in END_OF_TRANSACTION until
``PumpCloseTransaction`` - only then may the next customer use it. Amount =
``UnitPrice.amount_for(volume_ml, resolution_minor=..., rounding=...)`` at the authorised price
(or the nozzle's price); volumes move in steps of the volume decimals (0.01 L = 10 ml). An
authorisation sent before a nozzle is lifted (prepay) waits for the next customer; a dispensing
that ends with zero volume leaves no transaction.

jsonPTS requests answered (``Data`` as in protocols.md section 2): ``PumpGetStatus {Pump}``,
``PumpAuthorize {Pump, Nozzle, Type, Dose, Price}``, ``PumpStop``, ``PumpEmergencyStop``,
``PumpSuspend``, ``PumpResume {Pump}``, ``PumpCloseTransaction {Pump, Transaction}``
(idempotent), ``PumpGetTotals {Pump, Nozzle}``, ``PumpSetPrices {Pump, Prices}``,
``ReportGetPumpTransactions {Pump (0 = all), DateTimeStart, DateTimeEnd}``.

What is verified and what is inferred (protocols.md: no official jsonPTS spec text was found):

- [V] envelope, ``Id`` echo, error packet members ``Error``/``Code``/``Message``; request Data
  fields above; reply types ``PumpIdleStatus`` (``NozzleUp``, ``Nozzle``, ``Request``,
  ``LastNozzle``/``LastVolume``/``LastPrice``/``LastAmount``/``LastTransaction``/
  ``LastFuelGradeId``/``LastTotalVolume``/``LastTotalAmount``/``LastDateTimeStart``/
  ``LastDateTime``), ``PumpFillingStatus`` (``Nozzle``, ``FuelGradeId``, ``Volume``, ``Price``,
  ``Amount``, ``Transaction``, ``DateTimeStart``, ``IsSuspended``, ``OrderedType``,
  ``OrderedDose``), ``PumpEndOfTransactionStatus`` (``Nozzle``, ``FuelGradeId``, ``Volume``,
  ``TCVolume``, ``Price``, ``Amount``, ``Transaction``, ``TotalVolume``, ``TotalAmount``,
  ``DateTimeStart``, ``DateTime``), ``PumpOfflineStatus``, ``PumpTotals`` (``Nozzle``,
  ``Volume``, ``Amount``, ``Transaction``, ``FuelGradeId``), ``ReportPumpTransactions`` (``Data``
  is a list of ``Pump``, ``Nozzle``, ``Transaction``, ``DateTimeStart``, ``DateTime``,
  ``Volume``, ``TCVolume``, ``Price``, ``Amount``, ``TotalVolume``, ``TotalAmount``, ``UserId``),
  local date-times ``YYYY-MM-DDTHH:MM:SS``; ``Volume`` 0 in a filling status = authorised.
- [I] command confirmations ``{"Id", "Type": <request type>, "Message": "OK"}``; the error codes
  below (the simulator's own numbering); ``PumpGetTotals`` answered at once with ``PumpTotals``
  (a real PTS-2 may confirm first and deliver ``PumpTotals`` on a later ``PumpGetStatus``; the
  driver handles both); ``IsStopped`` in a filling status (stopped by command, nozzle still up);
  totals using the volume/amount decimals; the report filtering on the end date-time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import enum
import logging
import math
import os
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from forecourt.kernel.clock import Clock, SimulatedClock, SystemClock
from forecourt.kernel.errors import ForecourtError
from forecourt.kernel.money import Rounding, UnitPrice, divide_rounded
from forecourt.protocols.jsonpts.codec import (
    JsonPtsMalformed,
    JsonPtsPrecision,
    NumberFormat,
    Packet,
    confirmation,
    dumps,
    encode_envelope,
    error_packet,
    format_local,
    get_bool,
    get_int,
    get_list,
    get_number,
    get_optional_int,
    get_optional_number,
    get_str,
    loads,
    parse_envelope,
    parse_local,
    parse_packet,
    raw_packet_id,
    raw_packet_type,
)
from forecourt.sim.customers import Customer, CustomerModel, CustomerSource, SimConfigError

logger = logging.getLogger("forecourt.sim.pts_controller")

# Error codes of this simulator [I]: a real PTS-2 numbers its errors its own way.
ERR_UNKNOWN_TYPE = 1
ERR_BAD_DATA = 2
ERR_UNKNOWN_DEVICE = 3
ERR_WRONG_STATE = 4
ERR_OFFLINE = 5
ERR_UNKNOWN_TRANSACTION = 6
ERR_INTERNAL = 99

_MAX_EVENTS_PER_ADVANCE = 1_000_000  # a guard against a scheduling bug spinning forever


class SimCommandError(Exception):
    """A command the simulated controller refuses; becomes an error packet."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class NozzleConfig:
    nozzle: int
    grade_id: int
    price_mmu: int
    totalizer_ml: int
    totalizer_amount_minor: int = 0


@dataclass(frozen=True, slots=True)
class PumpConfig:
    pump: int
    amount_resolution_minor: int
    rounding: Rounding
    nozzles: tuple[NozzleConfig, ...]
    first_transaction: int = 1
    offline: bool = False


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    number_format: NumberFormat
    username: str
    password: str
    timezone: ZoneInfo
    pumps: tuple[PumpConfig, ...]
    customers: CustomerModel
    memory_size: int = 5000

    @property
    def currency(self) -> str:
        return self.number_format.currency

    @classmethod
    def from_json(cls, obj: Any) -> ControllerConfig:
        if not isinstance(obj, dict):
            raise SimConfigError("config must be a JSON object")
        try:
            number_format = NumberFormat(
                volume_decimals=_cfg_int(obj, "volume_decimals", 2),
                amount_decimals=_cfg_int(obj, "amount_decimals", 2),
                price_decimals=_cfg_int(obj, "price_decimals", 2),
                currency=_cfg_str(obj, "currency", "CNY"),
            )
        except SimConfigError:
            raise
        except ForecourtError as exc:
            raise SimConfigError(exc.message) from None
        auth = obj.get("auth")
        if not isinstance(auth, dict):
            raise SimConfigError("auth must be an object with username and password")
        try:
            timezone = ZoneInfo(_cfg_str(obj, "timezone", None))
        except (ZoneInfoNotFoundError, ValueError):
            raise SimConfigError(f"unknown timezone {obj.get('timezone')!r}") from None
        pumps_raw = obj.get("pumps")
        if not isinstance(pumps_raw, list) or not pumps_raw:
            raise SimConfigError("pumps must be a non-empty list")
        pumps = tuple(_pump_config(item, number_format) for item in pumps_raw)
        numbers = [p.pump for p in pumps]
        if len(set(numbers)) != len(numbers):
            raise SimConfigError("pump numbers must be unique")
        grades = {n.grade_id for p in pumps for n in p.nozzles}
        config = cls(
            number_format=number_format,
            username=_cfg_str(auth, "username", None),
            password=_cfg_str(auth, "password", None),
            timezone=timezone,
            pumps=pumps,
            customers=CustomerModel.from_json(obj.get("customers"), known_grades=grades),
            memory_size=_cfg_int(obj, "memory_size", 5000),
        )
        if config.memory_size < 1:
            raise SimConfigError("memory_size must be positive")
        return config


def load_config(path: str | Path) -> ControllerConfig:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SimConfigError(f"cannot read config {path}: {exc}") from None
    try:
        return ControllerConfig.from_json(loads(raw))
    except JsonPtsMalformed as exc:
        raise SimConfigError(f"config {path} is not valid JSON: {exc.message}") from None


def _cfg_int(obj: Mapping[str, Any], name: str, default: int | None) -> int:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimConfigError(f"{name} must be an integer")
    return value


def _cfg_str(obj: Mapping[str, Any], name: str, default: str | None) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str):
        raise SimConfigError(f"{name} must be a string")
    return value


def _pump_config(item: Any, number_format: NumberFormat) -> PumpConfig:
    if not isinstance(item, dict):
        raise SimConfigError("each pump must be an object")
    number = _cfg_int(item, "pump", None)
    where = f"pump {number}"
    resolution = _cfg_int(item, "amount_resolution_minor", 1)
    try:
        rounding = Rounding(_cfg_str(item, "rounding", Rounding.HALF_UP.value))
    except ValueError:
        choices = [r.value for r in Rounding]
        raise SimConfigError(f"{where}: rounding must be one of {choices}") from None
    offline = item.get("offline", False)
    if number < 1 or resolution < 1 or not isinstance(offline, bool):
        raise SimConfigError(f"{where}: pump >= 1, amount_resolution_minor >= 1, offline bool")
    nozzles_raw = item.get("nozzles")
    if not isinstance(nozzles_raw, list) or not nozzles_raw:
        raise SimConfigError(f"{where}: nozzles must be a non-empty list")
    nozzles = []
    for raw in nozzles_raw:
        if not isinstance(raw, dict):
            raise SimConfigError(f"{where}: each nozzle must be an object")
        nozzle = NozzleConfig(
            nozzle=_cfg_int(raw, "nozzle", None),
            grade_id=_cfg_int(raw, "grade_id", None),
            price_mmu=_cfg_int(raw, "price_mmu", None),
            totalizer_ml=_cfg_int(raw, "totalizer_ml", 0),
            totalizer_amount_minor=_cfg_int(raw, "totalizer_amount_minor", 0),
        )
        if not 1 <= nozzle.nozzle <= 8 or nozzle.price_mmu <= 0 or nozzle.totalizer_ml < 0:
            raise SimConfigError(f"{where}: nozzle 1..8, price_mmu > 0, totalizer_ml >= 0")
        # Everything the pump will ever report must be exact at the configured decimals.
        try:
            number_format.mmu_to_price(nozzle.price_mmu)
            number_format.ml_to_volume(nozzle.totalizer_ml)
            number_format.minor_to_amount(nozzle.totalizer_amount_minor)
            number_format.minor_to_amount(resolution)
        except JsonPtsPrecision as exc:
            raise SimConfigError(f"{where} nozzle {nozzle.nozzle}: {exc.message}") from None
        nozzles.append(nozzle)
    if len({n.nozzle for n in nozzles}) != len(nozzles):
        raise SimConfigError(f"{where}: nozzle numbers must be unique")
    first_transaction = _cfg_int(item, "first_transaction", 1)
    if first_transaction < 1:
        raise SimConfigError(f"{where}: first_transaction must be >= 1")
    return PumpConfig(
        pump=number,
        amount_resolution_minor=resolution,
        rounding=rounding,
        nozzles=tuple(sorted(nozzles, key=lambda n: n.nozzle)),
        first_transaction=first_transaction,
        offline=offline,
    )


# --------------------------------------------------------------------------- pump model


class Phase(enum.Enum):
    IDLE = "idle"  # nozzles hung (a customer may be walking up; may be pre-authorised)
    CALLING = "calling"  # nozzle up, not authorised
    AUTHORISED = "authorised"  # nozzle up, authorised, motor starting, nothing flowed yet
    FUELLING = "fuelling"
    SUSPENDED = "suspended"
    FINISHING = "finishing"  # flow over (shut-off, preset or stop), nozzle still up
    END_OF_TRANSACTION = "end_of_transaction"  # hung; held until PumpCloseTransaction


@dataclass
class NozzleState:
    number: int
    grade_id: int
    price_mmu: int
    total_volume_ml: int
    total_amount_minor: int


@dataclass(frozen=True, slots=True)
class Authorisation:
    nozzle: int | None  # None: any nozzle
    price_mmu: int | None  # None: the nozzle's own price
    type: str  # "Volume" | "Amount" | "FullTank"
    dose_ml: int | None = None
    dose_minor: int | None = None
    dose_wire: Decimal | None = None  # as ordered, for OrderedDose


@dataclass
class Fill:
    """The dispensing in progress at a pump."""

    transaction: int
    nozzle: NozzleState
    price_mmu: int
    started_at: datetime
    limit_ml: int  # the customer's target or the preset, whichever is smaller
    flow_ml_per_s: float
    ordered_type: str
    ordered_dose: Decimal | None
    delivered_ml: float = 0.0  # product that flowed before the current flowing segment
    segment_start: datetime | None = None  # set while product flows
    stopped: bool = False
    suspended_from: Phase | None = None

    def raw_ml(self, now: datetime) -> float:
        if self.segment_start is None:
            return self.delivered_ml
        flowing = self.flow_ml_per_s * (now - self.segment_start).total_seconds()
        return min(float(self.limit_ml), self.delivered_ml + flowing)

    def freeze(self, now: datetime) -> None:
        self.delivered_ml = self.raw_ml(now)
        self.segment_start = None


@dataclass
class TransactionRecord:
    pump: int
    transaction: int
    nozzle: int
    grade_id: int
    volume_ml: int
    price_mmu: int
    amount_minor: int
    started_at: datetime
    ended_at: datetime
    total_volume_ml: int  # the nozzle's totalizers after this transaction
    total_amount_minor: int
    closed: bool = False


@dataclass
class Pump:
    number: int
    resolution_minor: int
    rounding: Rounding
    nozzles: dict[int, NozzleState]
    next_transaction: int
    offline: bool = False
    phase: Phase = Phase.IDLE
    customer: Customer | None = None
    nozzle_up: int | None = None
    auth: Authorisation | None = None
    fill: Fill | None = None
    pending: TransactionRecord | None = None  # the END_OF_TRANSACTION record
    due: datetime | None = None  # when the current phase next changes by itself
    memory: deque[TransactionRecord] = field(default_factory=deque)

    def nozzle_for_grade(self, grade_id: int) -> int | None:
        for number in sorted(self.nozzles):
            if self.nozzles[number].grade_id == grade_id:
                return number
        return None

    def accepts(self, customer: Customer) -> bool:
        """A free pump this customer can use: idle, nobody at it, sells their grade."""
        if self.offline or self.phase is not Phase.IDLE or self.customer is not None:
            return False
        nozzle = self.nozzle_for_grade(customer.grade_id)
        if nozzle is None:
            return False
        return self.auth is None or self.auth.nozzle in (None, nozzle)


@dataclass
class QueuedCustomer:
    customer: Customer
    leaves_at: datetime


# --------------------------------------------------------------------------- the station


class Station:
    """The forecourt behind the controller: pumps, customers, and the jsonPTS command set.

    Time only moves through :meth:`advance`, which replays every scheduled event up to the given
    instant in order, so the outcome doesn't depend on how often it is called.
    """

    def __init__(self, config: ControllerConfig, start: datetime) -> None:
        self.config = config
        self.fmt = config.number_format
        self.tz = config.timezone
        self.now = start
        self.source = CustomerSource(config.customers, volume_step_ml=self.fmt.volume_step_ml)
        self.pumps: dict[int, Pump] = {
            p.pump: Pump(
                number=p.pump,
                resolution_minor=p.amount_resolution_minor,
                rounding=p.rounding,
                nozzles={
                    n.nozzle: NozzleState(
                        n.nozzle, n.grade_id, n.price_mmu, n.totalizer_ml, n.totalizer_amount_minor
                    )
                    for n in p.nozzles
                },
                next_transaction=p.first_transaction,
                offline=p.offline,
            )
            for p in config.pumps
        }
        self.queue: deque[QueuedCustomer] = deque()
        self.stats: Counter[str] = Counter()
        self.arrivals = config.customers.arrivals
        self.next_arrival: datetime | None = None
        if self.arrivals:
            self._schedule_arrival()

    # ----------------------------------------------------------------- time

    def advance(self, now: datetime) -> None:
        if now <= self.now:
            return
        for _ in range(_MAX_EVENTS_PER_ADVANCE):
            event = self._earliest_event()
            if event is None or event[0] > now:
                break
            at, handler = event
            self.now = max(self.now, at)
            handler()
        else:  # pragma: no cover - only a scheduling bug gets here
            logger.error("event limit reached while advancing to %s", now)
        self.now = now

    def _earliest_event(self) -> tuple[datetime, Callable[[], None]] | None:
        best: tuple[datetime, Callable[[], None]] | None = None
        if self.next_arrival is not None:
            best = (self.next_arrival, self._on_arrival)
        for number in sorted(self.pumps):
            pump = self.pumps[number]
            if pump.due is not None and (best is None or pump.due < best[0]):
                best = (pump.due, _bind(self._on_pump_due, pump))
        if self.queue:
            first_to_leave = min(self.queue, key=lambda q: q.leaves_at)
            if best is None or first_to_leave.leaves_at < best[0]:
                best = (first_to_leave.leaves_at, _bind(self._on_queue_timeout, first_to_leave))
        return best

    def _after(self, seconds: float) -> datetime:
        return self.now + timedelta(seconds=seconds)

    # ----------------------------------------------------------------- customers

    def set_arrivals(self, on: bool) -> None:
        if on and not self.arrivals:
            self.arrivals = True
            self._schedule_arrival()
        elif not on:
            self.arrivals = False
            self.next_arrival = None

    def _schedule_arrival(self) -> None:
        gap = self.source.arrival_gap_s()
        self.next_arrival = None if gap is None else self._after(gap)

    def _on_arrival(self) -> None:
        self.arrive()
        self._schedule_arrival()

    def arrive(self, customer: Customer | None = None) -> None:
        """A customer (drawn from the model unless given) arrives now: takes a pump or queues."""
        if customer is None:
            customer = self.source.new_customer(self.now)
        self.stats["arrived"] += 1
        free = [number for number, pump in sorted(self.pumps.items()) if pump.accepts(customer)]
        if free:
            self._assign(self.pumps[self.source.choose(free)], customer)
        elif len(self.queue) < self.config.customers.max_queue:
            leaves_at = self._after(self.config.customers.queue_patience_s)
            self.queue.append(QueuedCustomer(customer, leaves_at))
            self.stats["queued"] += 1
        else:
            self.stats["left_queue_too_long"] += 1

    def _on_queue_timeout(self, queued: QueuedCustomer) -> None:
        self.queue.remove(queued)
        self.stats["left_queue_impatient"] += 1

    def _assign(self, pump: Pump, customer: Customer) -> None:
        pump.customer = customer
        pump.due = self._after(self.source.lift_delay_s())
        logger.debug("customer %d walks to pump %d", customer.id, pump.number)

    def _pump_freed(self, pump: Pump) -> None:
        """The pump can take a new customer: the first queued one it can serve gets it."""
        for queued in self.queue:
            if pump.accepts(queued.customer):
                self.queue.remove(queued)
                self._assign(pump, queued.customer)
                return

    # ----------------------------------------------------------------- pump events

    def _on_pump_due(self, pump: Pump) -> None:
        pump.due = None
        if pump.phase is Phase.IDLE and pump.customer is not None:
            self._lift(pump, pump.customer)
        elif pump.phase is Phase.CALLING:
            # Nobody authorised the pump in time: the customer hangs up and drives off.
            logger.info("pump %d: customer left, not authorised in time", pump.number)
            self.stats["left_unauthorised"] += 1
            pump.phase, pump.customer, pump.nozzle_up = Phase.IDLE, None, None
            self._pump_freed(pump)
        elif pump.phase is Phase.AUTHORISED:
            assert pump.fill is not None
            pump.phase = Phase.FUELLING
            self._start_flowing(pump, pump.fill)
        elif pump.phase is Phase.FUELLING:
            # The target or preset is reached: the nozzle shuts off, the customer hangs up.
            assert pump.fill is not None
            pump.fill.delivered_ml = float(pump.fill.limit_ml)
            pump.fill.segment_start = None
            pump.phase = Phase.FINISHING
            pump.due = self._after(self.source.hangup_delay_s())
        elif pump.phase is Phase.FINISHING:
            self._hang_up(pump)

    def _lift(self, pump: Pump, customer: Customer) -> None:
        nozzle = pump.nozzle_for_grade(customer.grade_id)
        assert nozzle is not None  # accepts() checked it
        pump.nozzle_up = nozzle
        if pump.auth is not None and pump.auth.nozzle in (None, nozzle):
            self._begin_fill(pump)
        else:
            if pump.auth is not None:
                # Authorised for another nozzle than the one lifted: the pump won't release it,
                # and the stale authorisation is dropped so the status shows a plain call.
                logger.info(
                    "pump %d: nozzle %d lifted, authorisation was for nozzle %s",
                    pump.number,
                    nozzle,
                    pump.auth.nozzle,
                )
                pump.auth = None
            pump.phase = Phase.CALLING
            pump.due = self._after(self.config.customers.authorise_timeout_s)

    def _begin_fill(self, pump: Pump) -> None:
        """Nozzle up and authorised: a transaction starts (its number is shown from now on)."""
        assert pump.auth is not None
        assert pump.customer is not None
        assert pump.nozzle_up is not None
        auth, customer = pump.auth, pump.customer
        nozzle = pump.nozzles[pump.nozzle_up]
        price = auth.price_mmu if auth.price_mmu is not None else nozzle.price_mmu
        limit = customer.target_ml
        if auth.dose_ml is not None:
            limit = min(limit, auth.dose_ml)
        if auth.dose_minor is not None:
            limit = min(limit, self._volume_for_amount(pump, auth.dose_minor, price))
        pump.fill = Fill(
            transaction=pump.next_transaction,
            nozzle=nozzle,
            price_mmu=price,
            started_at=self.now,
            limit_ml=limit,
            flow_ml_per_s=customer.flow_ml_per_s,
            ordered_type=auth.type,
            ordered_dose=auth.dose_wire,
        )
        pump.auth = None
        pump.phase = Phase.AUTHORISED
        pump.due = self._after(self.config.customers.flow_start_delay_s)

    def _start_flowing(self, pump: Pump, fill: Fill) -> None:
        fill.segment_start = self.now
        remaining = max(0.0, fill.limit_ml - fill.delivered_ml)
        pump.due = self._after(remaining / fill.flow_ml_per_s)

    def _hang_up(self, pump: Pump) -> None:
        fill, customer = pump.fill, pump.customer
        assert fill is not None
        volume = self._quantise(fill.delivered_ml)
        pump.fill, pump.customer, pump.nozzle_up, pump.due = None, None, None, None
        if volume == 0:
            # Nothing flowed (stopped before the motor ran): no transaction, the number is
            # not used up.
            pump.phase = Phase.IDLE
            self._pump_freed(pump)
            return
        amount = self._amount(pump, volume, fill.price_mmu)
        nozzle = fill.nozzle
        nozzle.total_volume_ml += volume
        nozzle.total_amount_minor += amount
        record = TransactionRecord(
            pump=pump.number,
            transaction=fill.transaction,
            nozzle=nozzle.number,
            grade_id=nozzle.grade_id,
            volume_ml=volume,
            price_mmu=fill.price_mmu,
            amount_minor=amount,
            started_at=fill.started_at,
            ended_at=self.now,
            total_volume_ml=nozzle.total_volume_ml,
            total_amount_minor=nozzle.total_amount_minor,
        )
        pump.memory.append(record)
        while len(pump.memory) > self.config.memory_size and pump.memory[0].closed:
            pump.memory.popleft()
        pump.next_transaction += 1
        pump.pending = record
        pump.phase = Phase.END_OF_TRANSACTION
        self.stats["transactions"] += 1
        logger.info(
            "pump %d transaction %d: %d ml, %d minor (customer %s)",
            pump.number,
            record.transaction,
            volume,
            amount,
            customer.id if customer else "-",
        )

    # ----------------------------------------------------------------- arithmetic

    def _quantise(self, raw_ml: float) -> int:
        """Down to the device's volume step; the epsilon absorbs float error at a boundary."""
        step = self.fmt.volume_step_ml
        return (math.floor(raw_ml + 1e-6) // step) * step

    def _amount(self, pump: Pump, volume_ml: int, price_mmu: int) -> int:
        price = UnitPrice(price_mmu, self.config.currency)
        money = price.amount_for(
            volume_ml, resolution_minor=pump.resolution_minor, rounding=pump.rounding
        )
        return money.minor

    def _volume_for_amount(self, pump: Pump, dose_minor: int, price_mmu: int) -> int:
        """The largest volume on the grid whose amount does not exceed an amount preset."""
        step = self.fmt.volume_step_ml
        if price_mmu <= 0:
            return 10**12
        # amount (minor) = ml * mmu / 1e6, so the exact volume is dose * 1e6 / mmu.
        volume = divide_rounded(dose_minor * 1_000_000, price_mmu, Rounding.DOWN) // step * step
        while self._amount(pump, volume + step, price_mmu) <= dose_minor:
            volume += step
        while volume > 0 and self._amount(pump, volume, price_mmu) > dose_minor:
            volume -= step
        return volume

    # ----------------------------------------------------------------- jsonPTS

    def handle_items(self, items: list[Any], now: datetime) -> list[Packet]:
        """Answer every raw packet of one POST, each on its own (errors don't spread)."""
        self.advance(now)
        replies = []
        for item in items:
            try:
                packet = parse_packet(item)
            except JsonPtsMalformed as exc:
                replies.append(
                    error_packet(
                        raw_packet_id(item), raw_packet_type(item), ERR_BAD_DATA, exc.message
                    )
                )
                continue
            replies.append(self.handle(packet))
        return replies

    def handle(self, packet: Packet) -> Packet:
        handler = self._handlers().get(packet.type)
        if handler is None:
            return error_packet(
                packet.id, packet.type, ERR_UNKNOWN_TYPE, f"unknown packet type {packet.type!r}"
            )
        try:
            return handler(packet)
        except SimCommandError as exc:
            return error_packet(packet.id, packet.type, exc.code, exc.message)
        except JsonPtsMalformed as exc:
            return error_packet(packet.id, packet.type, ERR_BAD_DATA, exc.message)
        except Exception:  # one broken packet must not take its siblings down with it
            logger.exception("internal error answering %s", packet.type)
            return error_packet(packet.id, packet.type, ERR_INTERNAL, "internal error")

    def _handlers(self) -> dict[str, Callable[[Packet], Packet]]:
        return {
            "PumpGetStatus": self._cmd_status,
            "PumpAuthorize": self._cmd_authorize,
            "PumpStop": self._cmd_stop,
            "PumpEmergencyStop": self._cmd_stop,
            "PumpSuspend": self._cmd_suspend,
            "PumpResume": self._cmd_resume,
            "PumpCloseTransaction": self._cmd_close,
            "PumpGetTotals": self._cmd_totals,
            "PumpSetPrices": self._cmd_set_prices,
            "ReportGetPumpTransactions": self._cmd_report,
        }

    def _pump(self, data: Mapping[str, Any], *, online: bool = True) -> Pump:
        number = get_int(data, "Pump")
        pump = self.pumps.get(number)
        if pump is None:
            raise SimCommandError(ERR_UNKNOWN_DEVICE, f"no pump {number}")
        if online and pump.offline:
            raise SimCommandError(ERR_OFFLINE, f"pump {number} is offline")
        return pump

    def _cmd_status(self, packet: Packet) -> Packet:
        pump = self._pump(packet.data_object(), online=False)
        packet_type, data = self.status_of(pump)
        return Packet(packet.id, packet_type, data)

    def _cmd_authorize(self, packet: Packet) -> Packet:
        data = packet.data_object()
        pump = self._pump(data)
        nozzle = get_optional_int(data, "Nozzle", 0) or None
        if nozzle is not None and nozzle not in pump.nozzles:
            raise SimCommandError(ERR_UNKNOWN_DEVICE, f"pump {pump.number} has no nozzle {nozzle}")
        auth_type = get_str(data, "Type")
        dose_ml = dose_minor = None
        dose_wire = None
        if auth_type == "Volume":
            dose_wire = get_number(data, "Dose")
            dose_ml = self.fmt.get_volume_ml(data, "Dose")
        elif auth_type == "Amount":
            dose_wire = get_number(data, "Dose")
            dose_minor = self.fmt.get_amount_minor(data, "Dose")
        elif auth_type != "FullTank":
            raise SimCommandError(
                ERR_BAD_DATA, f"Type must be Volume, Amount or FullTank: {auth_type!r}"
            )
        if (dose_ml is not None and dose_ml <= 0) or (dose_minor is not None and dose_minor <= 0):
            raise SimCommandError(ERR_BAD_DATA, "Dose must be positive")
        price = None
        if get_optional_number(data, "Price") is not None:
            price = self.fmt.get_price_mmu(data, "Price")
            if price <= 0:
                raise SimCommandError(ERR_BAD_DATA, "Price must be positive")
        auth = Authorisation(nozzle, price, auth_type, dose_ml, dose_minor, dose_wire)
        if pump.phase is Phase.IDLE and pump.auth is None:
            pump.auth = auth  # prepay: waits for the next customer's nozzle
        elif pump.phase is Phase.CALLING:
            if nozzle is not None and nozzle != pump.nozzle_up:
                raise SimCommandError(
                    ERR_WRONG_STATE,
                    f"pump {pump.number}: nozzle {pump.nozzle_up} is up, not {nozzle}",
                )
            pump.auth = auth
            self._begin_fill(pump)
        else:
            raise SimCommandError(
                ERR_WRONG_STATE,
                f"pump {pump.number} is {self._phase_name(pump)}, not idle or calling",
            )
        return confirmation(packet.id, packet.type)

    def _cmd_stop(self, packet: Packet) -> Packet:
        pump = self._pump(packet.data_object())
        fill = pump.fill
        if pump.phase in (Phase.AUTHORISED, Phase.FUELLING, Phase.SUSPENDED) and fill is not None:
            fill.freeze(self.now)
            fill.stopped = True
            fill.suspended_from = None
            pump.phase = Phase.FINISHING
            pump.due = self._after(self.source.hangup_delay_s())
        elif pump.phase in (Phase.IDLE, Phase.CALLING):
            pump.auth = None  # a pending prepay authorisation is cancelled
        # FINISHING / END_OF_TRANSACTION: nothing flows; stopping is a harmless no-op.
        return confirmation(packet.id, packet.type)

    def _cmd_suspend(self, packet: Packet) -> Packet:
        pump = self._pump(packet.data_object())
        fill = pump.fill
        if pump.phase in (Phase.AUTHORISED, Phase.FUELLING) and fill is not None:
            fill.freeze(self.now)
            fill.suspended_from = pump.phase
            pump.phase = Phase.SUSPENDED
            pump.due = None
        elif pump.phase is not Phase.SUSPENDED:
            raise SimCommandError(
                ERR_WRONG_STATE, f"pump {pump.number} is {self._phase_name(pump)}"
            )
        return confirmation(packet.id, packet.type)

    def _cmd_resume(self, packet: Packet) -> Packet:
        pump = self._pump(packet.data_object())
        fill = pump.fill
        if pump.phase is not Phase.SUSPENDED or fill is None:
            raise SimCommandError(ERR_WRONG_STATE, f"pump {pump.number} is not suspended")
        if fill.suspended_from is Phase.FUELLING:
            pump.phase = Phase.FUELLING
            self._start_flowing(pump, fill)
        else:
            pump.phase = Phase.AUTHORISED
            pump.due = self._after(self.config.customers.flow_start_delay_s)
        fill.suspended_from = None
        return confirmation(packet.id, packet.type)

    def _cmd_close(self, packet: Packet) -> Packet:
        data = packet.data_object()
        pump = self._pump(data)
        number = get_int(data, "Transaction")
        if pump.pending is not None and pump.pending.transaction == number:
            pump.pending.closed = True
            pump.pending = None
            pump.phase = Phase.IDLE
            self._pump_freed(pump)
        elif not 0 < number < pump.next_transaction or (
            pump.fill is not None and pump.fill.transaction == number
        ):
            raise SimCommandError(
                ERR_UNKNOWN_TRANSACTION, f"pump {pump.number} has no finished transaction {number}"
            )
        # Otherwise it is an earlier, already closed transaction: closing again is fine.
        return confirmation(packet.id, packet.type)

    def _cmd_totals(self, packet: Packet) -> Packet:
        data = packet.data_object()
        pump = self._pump(data)
        number = get_int(data, "Nozzle")
        nozzle = pump.nozzles.get(number)
        if nozzle is None:
            raise SimCommandError(ERR_UNKNOWN_DEVICE, f"pump {pump.number} has no nozzle {number}")
        return Packet(
            packet.id,
            "PumpTotals",
            {
                "Pump": pump.number,
                "Nozzle": nozzle.number,
                "FuelGradeId": nozzle.grade_id,
                "Volume": self.fmt.ml_to_volume(nozzle.total_volume_ml),
                "Amount": self.fmt.minor_to_amount(nozzle.total_amount_minor),
                "Transaction": pump.next_transaction - 1,
            },
        )

    def _cmd_set_prices(self, packet: Packet) -> Packet:
        data = packet.data_object()
        pump = self._pump(data)
        prices_raw = get_list(data, "Prices")
        if len(prices_raw) > 8:
            raise SimCommandError(ERR_BAD_DATA, "at most 8 prices")
        ordered = [pump.nozzles[number] for number in sorted(pump.nozzles)]
        # Validate every price before changing any, so a bad list changes nothing.
        new_prices: list[int] = []
        for index, value in enumerate(prices_raw):
            mmu = self.fmt.get_price_mmu({"Price": value}, "Price")
            if index < len(ordered) and mmu <= 0:
                raise SimCommandError(
                    ERR_BAD_DATA, f"price for nozzle {ordered[index].number} <= 0"
                )
            new_prices.append(mmu)
        for nozzle, mmu in zip(ordered, new_prices, strict=False):
            nozzle.price_mmu = mmu  # applies from the next authorisation
        return confirmation(packet.id, packet.type)

    def _cmd_report(self, packet: Packet) -> Packet:
        data = packet.data_object()
        number = get_int(data, "Pump")
        if number != 0 and number not in self.pumps:
            raise SimCommandError(ERR_UNKNOWN_DEVICE, f"no pump {number}")
        start = parse_local(get_str(data, "DateTimeStart"), self.tz, field="DateTimeStart")
        end = parse_local(get_str(data, "DateTimeEnd"), self.tz, field="DateTimeEnd")
        pumps = sorted(self.pumps) if number == 0 else [number]
        items = []
        for pump_number in pumps:
            for record in self.pumps[pump_number].memory:
                # The device keeps whole seconds, so it compares whole seconds.
                ended = parse_local(format_local(record.ended_at, self.tz), self.tz)
                if start <= ended <= end:
                    items.append(self._report_item(record))
        return Packet(packet.id, "ReportPumpTransactions", items)

    # ----------------------------------------------------------------- replies

    def _phase_name(self, pump: Pump) -> str:
        if pump.phase is Phase.IDLE and pump.auth is not None:
            return "authorised"
        return pump.phase.value

    def _local(self, instant: datetime | None) -> str:
        return "" if instant is None else format_local(instant, self.tz)

    def status_of(self, pump: Pump) -> tuple[str, dict[str, Any]]:
        fmt = self.fmt
        if pump.offline:
            return "PumpOfflineStatus", {
                "Pump": pump.number,
                "State": "Offline",
                "NozzleUp": 0,
                "Nozzle": 0,
            }
        if pump.phase is Phase.END_OF_TRANSACTION and pump.pending is not None:
            return "PumpEndOfTransactionStatus", self._transaction_fields(pump.pending)
        if pump.fill is not None:
            fill = pump.fill
            volume = self._quantise(fill.raw_ml(self.now))
            return "PumpFillingStatus", {
                "Pump": pump.number,
                "Nozzle": fill.nozzle.number,
                "FuelGradeId": fill.nozzle.grade_id,
                "Volume": fmt.ml_to_volume(volume),
                "Price": fmt.mmu_to_price(fill.price_mmu),
                "Amount": fmt.minor_to_amount(self._amount(pump, volume, fill.price_mmu)),
                "Transaction": fill.transaction,
                "DateTimeStart": self._local(fill.started_at),
                "IsSuspended": pump.phase is Phase.SUSPENDED,
                "IsStopped": fill.stopped,
                "OrderedType": fill.ordered_type,
                "OrderedDose": fill.ordered_dose if fill.ordered_dose is not None else 0,
            }
        if pump.auth is not None:
            # Authorised before any nozzle was lifted: the device shows a zero-volume filling.
            auth = pump.auth
            nozzle = pump.nozzles.get(auth.nozzle) if auth.nozzle else None
            price = (
                auth.price_mmu
                if auth.price_mmu is not None
                else (nozzle.price_mmu if nozzle else 0)
            )
            return "PumpFillingStatus", {
                "Pump": pump.number,
                "Nozzle": nozzle.number if nozzle else 0,
                "FuelGradeId": nozzle.grade_id if nozzle else 0,
                "Volume": fmt.ml_to_volume(0),
                "Price": fmt.mmu_to_price(price),
                "Amount": fmt.minor_to_amount(0),
                "Transaction": pump.next_transaction,
                "DateTimeStart": "",
                "IsSuspended": False,
                "IsStopped": False,
                "OrderedType": auth.type,
                "OrderedDose": auth.dose_wire if auth.dose_wire is not None else 0,
            }
        nozzle_up = pump.nozzle_up if pump.phase is Phase.CALLING and pump.nozzle_up else 0
        idle: dict[str, Any] = {
            "Pump": pump.number,
            "NozzleUp": nozzle_up,
            "Nozzle": nozzle_up,
            "Request": "",
        }
        last = pump.memory[-1] if pump.memory else None
        idle.update(
            {
                "LastNozzle": last.nozzle if last else 0,
                "LastVolume": fmt.ml_to_volume(last.volume_ml if last else 0),
                "LastPrice": fmt.mmu_to_price(last.price_mmu if last else 0),
                "LastAmount": fmt.minor_to_amount(last.amount_minor if last else 0),
                "LastTransaction": last.transaction if last else 0,
                "LastFuelGradeId": last.grade_id if last else 0,
                "LastTotalVolume": fmt.ml_to_volume(last.total_volume_ml if last else 0),
                "LastTotalAmount": fmt.minor_to_amount(last.total_amount_minor if last else 0),
                "LastDateTimeStart": self._local(last.started_at if last else None),
                "LastDateTime": self._local(last.ended_at if last else None),
            }
        )
        return "PumpIdleStatus", idle

    def _transaction_fields(self, record: TransactionRecord) -> dict[str, Any]:
        fmt = self.fmt
        volume = fmt.ml_to_volume(record.volume_ml)
        return {
            "Pump": record.pump,
            "Nozzle": record.nozzle,
            "FuelGradeId": record.grade_id,
            "Transaction": record.transaction,
            "Volume": volume,
            "TCVolume": volume,  # no temperature compensation in the simulator
            "Price": fmt.mmu_to_price(record.price_mmu),
            "Amount": fmt.minor_to_amount(record.amount_minor),
            "TotalVolume": fmt.ml_to_volume(record.total_volume_ml),
            "TotalAmount": fmt.minor_to_amount(record.total_amount_minor),
            "DateTimeStart": self._local(record.started_at),
            "DateTime": self._local(record.ended_at),
        }

    def _report_item(self, record: TransactionRecord) -> dict[str, Any]:
        item = self._transaction_fields(record)
        item["UserId"] = 0
        return item

    # ----------------------------------------------------------------- simulator control

    def set_offline(self, pumps: set[int]) -> None:
        unknown = pumps - set(self.pumps)
        if unknown:
            raise SimConfigError(f"no such pumps: {sorted(unknown)}")
        for number, pump in self.pumps.items():
            pump.offline = number in pumps

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "sim_time": self.now.isoformat(),
            "arrivals": self.arrivals,
            "queue": len(self.queue),
            "offline_pumps": sorted(n for n, p in self.pumps.items() if p.offline),
            "pumps": {str(n): self._phase_name(p) for n, p in sorted(self.pumps.items())},
            "stats": dict(sorted(self.stats.items())),
        }


def _bind(method: Callable[[Any], None], arg: Any) -> Callable[[], None]:
    return lambda: method(arg)


# --------------------------------------------------------------------------- HTTP app


def _json_response(body: Any, status_code: int = 200) -> Response:
    return Response(dumps(body), status_code=status_code, media_type="application/json")


def _basic_auth_ok(request: Request, username: str, password: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, secret = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    # compare_digest on both, so timing doesn't reveal which one was wrong
    user_ok = secrets.compare_digest(user.encode(), username.encode())
    secret_ok = secrets.compare_digest(secret.encode(), password.encode())
    return bool(sep) and user_ok and secret_ok


def create_app(
    config: ControllerConfig,
    clock: Clock,
    *,
    on_started: Callable[[], None] | None = None,
    tick_wall_s: float = 0.05,
) -> Starlette:
    """The simulator's HTTP app. ``app.state.station`` is the model (tests may inspect it)."""
    station = Station(config, clock.now())

    async def jsonpts(request: Request) -> Response:
        if not _basic_auth_ok(request, config.username, config.password):
            return Response(
                "authentication required",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="Pts2WebServer"'},
            )
        body = await request.body()
        try:
            items = parse_envelope(body)
        except JsonPtsMalformed as exc:
            return _json_response({"Error": True, "Code": exc.code, "Message": exc.message}, 400)
        # No await between here and the reply: each POST is one atomic step of the model.
        replies = station.handle_items(items, clock.now())
        return Response(encode_envelope(replies), media_type="application/json")

    async def control(request: Request) -> Response:
        try:
            body = loads(await request.body())
            if not isinstance(body, dict):
                raise JsonPtsMalformed("control body must be an object")
            arrivals = get_bool(body, "arrivals", default=station.arrivals)
            offline = body.get("offline_pumps")
            if offline is not None:
                offline_set = {
                    get_int({"Pump": p}, "Pump") for p in get_list(body, "offline_pumps")
                }
                station.set_offline(offline_set)
        except ForecourtError as exc:
            return _json_response({"Error": True, "Code": exc.code, "Message": exc.message}, 400)
        station.advance(clock.now())
        station.set_arrivals(arrivals)
        logger.info("control: arrivals=%s offline=%s", station.arrivals, offline)
        return _json_response(station.health())

    async def health(_request: Request) -> Response:
        station.advance(clock.now())
        return _json_response(station.health())

    async def tick() -> None:
        # Customers keep arriving and fuelling even when nobody polls the controller.
        while True:
            station.advance(clock.now())
            await asyncio.sleep(tick_wall_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(tick())
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = Starlette(
        routes=[
            Route("/jsonPTS", jsonpts, methods=["POST"]),
            Route("/sim/control", control, methods=["POST"]),
            Route("/sim/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.station = station
    return app


# --------------------------------------------------------------------------- process


def _write_port_file(path: Path, port: int) -> None:
    # Write then rename, so a reader never sees a half-written number.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{port}\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forecourt.sim.pts_controller",
        description="Simulated Technotrade PTS-2 forecourt controller speaking jsonPTS over HTTP.",
    )
    parser.add_argument("--config", required=True, help="simulator config JSON file")
    parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port-file", help="write the chosen port to this file once listening")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
    except SimConfigError as exc:
        logger.error("%s", exc.message)
        return 2
    clock: Clock = SimulatedClock.from_env(dict(os.environ)) or SystemClock()

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        sock.close()
        return 1
    # Listening before the port is announced: early clients wait in the backlog, not refused.
    sock.listen(128)
    port = sock.getsockname()[1]

    def announce() -> None:
        logger.info("PTS-2 simulator listening on http://%s:%d/jsonPTS", args.host, port)
        if args.port_file:
            _write_port_file(Path(args.port_file), port)

    app = create_app(config, clock, on_started=announce)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    )
    server.run(sockets=[sock])
    return 0


class SimulatorProcess:
    """Runs the simulator as a child process for tests and demos (always ``stop()`` it).

    ``with SimulatorProcess(config_dict, workdir, env=clock.to_env()) as sim:`` gives
    ``sim.base_url``; the process is killed on exit however the block ends.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | Path,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, Path):
            self.config_path = config
        else:
            self.config_path = self.workdir / "pts_config.json"
            # Floats are fine in a config written by code; write them as their shortest repr.
            self.config_path.write_bytes(dumps(_floats_to_decimals(config)))
        self.port_file = self.workdir / "pts_port"
        self.log_path = self.workdir / "pts_controller.log"
        self.env = dict(env or {})
        self.host = host
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self, timeout_s: float = 20.0) -> str:
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "forecourt.sim.pts_controller",
                    "--config",
                    str(self.config_path),
                    "--port",
                    "0",
                    "--host",
                    self.host,
                    "--port-file",
                    str(self.port_file),
                ],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"simulator exited early:\n{self.log_tail()}")
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text:
                self.base_url = f"http://{self.host}:{int(text)}"
                try:
                    if httpx.get(f"{self.base_url}/sim/health", timeout=1.0).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.02)
        raise TimeoutError(f"simulator not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _floats_to_decimals(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, Mapping):
        return {key: _floats_to_decimals(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_floats_to_decimals(item) for item in value]
    return value


def default_clock_env(speed: float, start: datetime | None = None) -> dict[str, str]:
    """Env vars for a simulated clock at ``speed`` starting now (or at ``start``)."""
    anchor = start or datetime.now(UTC)
    return SimulatedClock(sim_epoch=anchor, wall_epoch=time.time(), speed=speed).to_env()


if __name__ == "__main__":
    sys.exit(main())
