"""A simulated Technotrade PTS-2 forecourt controller, run as its own process, speaking jsonPTS.

Run it::

    python -m forecourt.sim.pts_controller --config CONFIG.json --port 0 \\
        [--host 127.0.0.1] [--port-file PATH] [--state-file PATH] [--reset-counters] \\
        [--log-level INFO]

``--port 0`` picks a free port; the chosen port is logged and, with ``--port-file``, written to
that file (atomically, once the socket listens). Simulated time comes from
``SimulatedClock.from_env(os.environ)`` (``FORECOURT_SIM_*`` variables, see kernel.clock) and
falls back to the system clock, so the simulator runs in lock-step with the other processes of a
demo, faster than wall time.

Persistence (``--state-file PATH``): every finished transaction (with the nozzle's totalizers
after it), every close and every start is appended to PATH as one JSON line and fsync'ed before
the simulator answers. On start the simulator replays the file: the transaction memory, the
per-nozzle totalizers, each pump's transaction counter and each pump's pending (unclosed)
end-of-transaction come back (such a pump restarts in END_OF_TRANSACTION holding it). A
dispensing still in progress when the process dies is lost (nothing was recorded; totalizers do
not move). A torn last line (the process killed mid-write) is ignored. ``--reset-counters`` (or
the fault ``reset_counters_on_start``) starts every pump's numbering again at its
``first_transaction`` while memory and totalizers are kept, as a swapped or reset controller
does: old and new transactions may then share numbers. Without it numbering continues.

HTTP endpoints:

- ``POST /jsonPTS`` - the controller protocol, behind HTTP auth (``auth.scheme``): ``"basic"``,
  ``"digest"`` (RFC 7616, MD5, ``qop=auth``, verified here with hashlib) or ``"any"`` (default:
  both offered, Digest first, as a PTS-2 accepts either). 401 otherwise, with one
  ``WWW-Authenticate`` challenge per offered scheme (realm ``Pts2WebServer`` [I]). Digest nonces
  are HMACs of their issue time under a per-process key: valid until the process ends, each
  ``nc`` accepted once per nonce. A body that is not a jsonPTS envelope (not JSON, wrong
  ``Protocol``, ``Packets`` not a list) gets HTTP 400 with
  ``{"Error": true, "Code": "jsonpts.malformed", "Message": ...}`` and changes nothing; a bad
  packet gets an error packet while its siblings in the same POST are still answered.
- ``POST /sim/control`` (simulator only, no auth) - ``{"arrivals": true|false}`` stops/starts new
  customers; ``{"offline_pumps": [2, 5]}`` sets which pumps the controller cannot reach;
  ``{"faults": {...}}`` merges fault settings (see below; ``null`` puts one back to its
  default); ``{"meter_creep": [{"pump": 1, "nozzle": 1, "volume_ml": 500}]}`` moves those
  nozzles' volume totalizers on without any transaction (product drawn past the books: a
  sale through another terminal, a meter that drifts; not kept across a restart).
  Everything is checked before anything changes (HTTP 400 and nothing applied
  otherwise). Replies with the same body as health.
- ``GET /sim/health`` (no auth) - ``{"status": "ok", "sim_time", "started_at", "uptime_ms",
  "unique_identifier", "arrivals", "queue", "customers", "offline_pumps",
  "emergency_stopped_pumps", "pumps": {n: phase}, "next_transactions": {n: number},
  "faults": {...}, "stats": {...}}``; ``customers`` counts everyone still on the forecourt
  (queued, walking up to a pump whose phase still says idle, or at a pump), so with arrivals
  off, no customers and every pump idle is a forecourt that stays idle;
  ``stats`` counts customers and transactions and the fault counters ``closes_dropped``,
  ``close_replies_lost``, ``double_authorisations``, ``lagged_status_polls``,
  ``emergency_stops``, ``emergency_releases``, ``restored_transactions``.

Config file (JSON; numbers may be decimals, they are read exactly)::

    {
      "currency": "CNY",                      # ISO 4217, must be known to kernel.money
      "volume_decimals": 2, "amount_decimals": 2, "price_decimals": 2,
      "volume_total_decimals": 2, "amount_total_decimals": 2,   # optional (totalizers)
      "auth": {"username": "admin", "password": "admin", "scheme": "any"},
      "timezone": "Asia/Shanghai",            # IANA; device date-times are local, no offset
      "memory_size": 5000,                    # optional: finished transactions kept per pump
      "unique_identifier": 1,                 # optional: GetUniqueIdentifier's Id
      "firmware_datetime": "2024-01-01T00:00:00",   # optional: GetFirmwareInformation
      "emergency_release": "PumpResume",      # optional: the packet type that releases an
                                              # emergency stop [I]
      "faults": {...},                        # optional, see below
      "pumps": [
        {"pump": 1,
         "amount_resolution_minor": 1,        # smallest amount step (1 fen; 10 = 1 jiao)
         "rounding": "half_up",               # a kernel.money.Rounding value
         "first_transaction": 1,              # optional: the pump's first transaction number
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

Faults (config ``faults`` and ``POST /sim/control {"faults": ...}``; all off by default, so the
default simulator is fast and deterministic):

- ``reset_counters_on_start: bool`` - like ``--reset-counters`` (config only: it acts at start).
- ``transaction_wrap: N`` - transaction numbers run 1..N, then wrap to 1 (``first_transaction``
  must be <= N).
- ``drop_close_every: n`` - every n-th ``PumpCloseTransaction`` received is lost in transit: the
  whole POST carrying it is not applied (none of its packets) and is answered HTTP 503.
- ``lose_close_reply_every: n`` - every n-th ``PumpCloseTransaction`` is applied (with its whole
  POST) but the answer is lost: HTTP 503. (Both count the same close requests; a dropped one
  wins.)
- ``odd_decimals_pumps: [pumps]`` - filling statuses of those pumps carry ``Volume`` with one
  more decimal than configured (the shown volume plus 5 in that decimal: ``12.345`` with 2
  decimals), while product flows; the authorised (zero-volume) status is unchanged.
- ``odd_decimals_finished: [pumps]`` - a transaction finishing on those pumps is recorded by the
  device with an ``Amount`` that is not a whole minor unit: the computed amount plus
  ``odd_amount_digit`` (default 4) in the decimal after the minor unit (``12.344`` CNY). The
  end-of-transaction status and the transactions report both show that odd value (it is the
  device's record, persisted as such); the totalizer ``TotalAmount`` advances by the computed
  whole amount (``12.34``), which is also what a half-even reading of the odd value gives back.
- ``odd_amount_digit: 1..9`` - see above (5 makes the odd value a half, 12.345).
- ``omit_total_volume: bool`` - end-of-transaction statuses and report items leave out
  ``TotalVolume`` and ``TotalAmount`` (the vendor SDK treats them as optional).
- ``calling_after_authorize_polls: n`` - after an authorisation of a calling pump, its next n
  ``PumpGetStatus`` still show the nozzle-up call (``PumpIdleStatus`` with ``NozzleUp``) while
  it is in fact authorised (a real device lags); a second authorisation is refused (as always
  while authorised) and counted in ``stats.double_authorisations``.

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
that ends with zero volume leaves no transaction (and does not use its number up).

``PumpEmergencyStop`` [I: behaviour inferred, no vendor text found]: stops the flow at once
(like ``PumpStop``; the customer then hangs up and a dispensed partial volume becomes an
end-of-transaction to close as usual), cancels a pending prepay authorisation and blocks the
pump: it refuses authorisations (``JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED``), takes no new
customer, and its idle and filling statuses carry ``"EmergencyStop": true`` until the
``emergency_release`` packet (default ``PumpResume {Pump}``) releases it.

jsonPTS requests answered (``Data`` as in protocols.md section 2): ``PumpGetStatus {Pump}``,
``PumpAuthorize {Pump, Nozzle, Type, Dose, Price}``, ``PumpStop``, ``PumpEmergencyStop``,
``PumpSuspend``, ``PumpResume {Pump}``, ``PumpCloseTransaction {Pump, Transaction}``,
``PumpGetTotals {Pump, Nozzle}``, ``PumpSetPrices {Pump, Prices}``,
``ReportGetPumpTransactions {Pump (0 = all), DateTimeStart, DateTimeEnd}``, and the controller
requests (no Data) ``GetSystemDecimalDigits``, ``GetUniqueIdentifier``,
``GetFirmwareInformation``, ``GetSystemOperationInformation``, ``GetDateTime``.

What is verified and what is inferred (protocols.md: no official jsonPTS spec text was found;
"Java SDK" is the vendor's Android SDK, package ``com.technotrade.pts2``, "web UI" the
controller's own pages; stored files named by number as in protocols.md):

- [V] envelope, ``Id`` echo, error packet members ``Error``/``Code``/``Message``; request Data
  fields above; reply types ``PumpIdleStatus`` (``NozzleUp``, ``Nozzle``, ``Request``,
  ``LastNozzle``/``LastVolume``/``LastPrice``/``LastAmount``/``LastTransaction``/
  ``LastFuelGradeId``/``LastTotalVolume``/``LastTotalAmount``/``LastDateTimeStart``/
  ``LastDateTime``), ``PumpFillingStatus`` (``Nozzle``, ``FuelGradeId``, ``Volume``, ``Price``,
  ``Amount``, ``Transaction``, ``DateTimeStart``, ``IsSuspended``, ``OrderedType``,
  ``OrderedDose``), ``PumpEndOfTransactionStatus`` (``Nozzle``, ``FuelGradeId``, ``Volume``,
  ``TCVolume``, ``Price``, ``Amount``, ``Transaction``, ``TotalVolume``, ``TotalAmount`` - the
  last two optional, Java SDK ``network/http/PumpGetStatus.java``, stored file 17311632924,
  ``DateTimeStart``, ``DateTime``), ``PumpOfflineStatus``, ``PumpTotals`` (``Nozzle``,
  ``Volume``, ``Amount``, ``Transaction``, ``FuelGradeId``), ``ReportPumpTransactions`` (``Data``
  is a list of ``Pump``, ``Nozzle``, ``Transaction``, ``DateTimeStart``, ``DateTime``,
  ``Volume``, ``TCVolume``, ``Price``, ``Amount``, ``TotalVolume``, ``TotalAmount``, ``UserId``),
  local date-times ``YYYY-MM-DDTHH:MM:SS``; ``Volume`` 0 in a filling status = authorised.
- [V] ``PumpAuthorize`` -> ``PumpAuthorizeConfirmation {Pump, Transaction}`` (Java SDK
  ``network/http/PumpAuthorize.java``, stored file 17278643764).
- [V] ``GetSystemDecimalDigits`` -> ``SystemDecimalDigits {Price, Amount, Volume, AmountTotal,
  VolumeTotal}`` (Java SDK ``GetSystemDecimalDigits.java``, stored file 17487983676);
  ``GetUniqueIdentifier`` -> ``UniqueIdentifier {Id}`` (integer; stored file 17114324032);
  ``GetFirmwareInformation`` -> ``FirmwareInformation {DateTime, PumpProtocols,
  ProbeProtocols, PriceBoardProtocols, ReaderProtocols}`` (stored file 17114670687);
  ``GetSystemOperationInformation`` -> ``SystemOperationInformation {SystemUpTime (ms),
  CurrentHeapFreeSize, MinimalHeapFreeSize, Tasks}`` (web UI device page, stored file
  56316693476); ``GetDateTime`` -> ``DateTime {DateTime, AutoSynchronize, UTCOffset}`` (Java SDK
  ``GetDateTime.java``, stored file 17523703720). ``SystemUpTime`` counts from this process's
  start in simulated time: it is the boot marker a driver can read.
- [V] error codes and names: codec.PtsErrorCode (Java SDK ``enumeration/Result.java``, stored
  file 17288538076); ``Message`` is the code's name. Used here: unknown ``Type`` -> 1
  ``JSONPTS_ERROR_NOT_FOUND``; unparseable packet -> 2; no ``Data`` -> 3; ``Pump`` missing or
  not an integer -> 18, unknown pump -> 20; ``Nozzle`` -> 29, unknown nozzle -> 33; ``Type``
  missing -> 34, not Volume/Amount/FullTank -> 36; ``Dose`` -> 37; ``Price``/``Prices`` -> 38;
  ``Transaction`` missing -> 19; report date-times -> 71; authorising a pump that already holds
  an authorisation -> 39 ``JSONPTS_ERROR_DUPLICATED_AUTHORIZATION_REQUEST``; closing while the
  pump is not in end-of-transaction -> 69 ``JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION``
  (a firmware that auto-closed a transaction answers so; stored file 55826710776).
- [I] the other refusals' codes: closing another number than the pending one -> 27
  ``JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH``; authorising a pump holding an unclosed
  transaction -> 42 ``JSONPTS_ERROR_PUMP_BUSY_FILLING``; an offline or emergency-stopped pump, or
  a nozzle other than the one lifted -> 41 ``JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED``;
  suspend/resume/stop in the wrong state -> 43 ``JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS``; an
  internal failure -> 4.
- [I] other command confirmations ``{"Id", "Type": <request type>, "Message": "OK"}``;
  ``PumpGetTotals`` answered at once with ``PumpTotals`` (a real PTS-2 may confirm first and
  deliver ``PumpTotals`` on a later ``PumpGetStatus``; the driver handles both); ``IsStopped``
  in a filling status (stopped by command, nozzle still up); ``EmergencyStop`` in idle and
  filling statuses; totalizers at ``VolumeTotal``/``AmountTotal`` decimals; the report
  filtering on the end date-time; ``UTCOffset`` in whole hours; the heap figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import enum
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from forecourt.infra.logging import announce, configure_logging
from forecourt.kernel.clock import Clock, SimulatedClock, SystemClock
from forecourt.kernel.errors import ForecourtError
from forecourt.kernel.money import Rounding, UnitPrice, currency_exponent, divide_rounded
from forecourt.protocols.jsonpts.codec import (
    JsonPtsMalformed,
    JsonPtsPrecision,
    NumberFormat,
    Packet,
    PtsErrorCode,
    Quantity,
    confirmation,
    dumps,
    encode_envelope,
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
    vendor_error,
)
from forecourt.sim.customers import Customer, CustomerModel, CustomerSource, SimConfigError

logger = logging.getLogger("forecourt.sim.pts_controller")

_MAX_EVENTS_PER_ADVANCE = 1_000_000  # a guard against a scheduling bug spinning forever
_FAULT_COUNTERS = (
    "closes_dropped",
    "close_replies_lost",
    "double_authorisations",
    "lagged_status_polls",
    "emergency_stops",
    "emergency_releases",
    "restored_transactions",
)
_REALM = "Pts2WebServer"

# Which vendor code a malformed request field earns (see the module docstring).
_FIELD_CODES = {
    "Pump": PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_PUMP_NUMBER,
    "Nozzle": PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_NOZZLE_NUMBER,
    "Type": PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_TYPE,
    "Dose": PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_DOSE_VALUE,
    "Price": PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_PRICE_VALUE,
    "Prices": PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_PRICE_VALUE,
    "Transaction": PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_PUMP_TRANSACTION_NUMBER,
    "DateTimeStart": PtsErrorCode.JSONPTS_ERROR_DATETIME_INCORRECT_FORMAT,
    "DateTimeEnd": PtsErrorCode.JSONPTS_ERROR_DATETIME_INCORRECT_FORMAT,
}


class SimCommandError(Exception):
    """A command the simulated controller refuses; becomes a vendor error packet."""

    def __init__(self, code: PtsErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True, slots=True)
class Faults:
    """The fault settings (see the module docstring); the defaults are all off."""

    reset_counters_on_start: bool = False
    transaction_wrap: int | None = None
    drop_close_every: int | None = None
    lose_close_reply_every: int | None = None
    odd_decimals_pumps: frozenset[int] = frozenset()
    odd_decimals_finished: frozenset[int] = frozenset()
    odd_amount_digit: int = 4
    omit_total_volume: bool = False
    calling_after_authorize_polls: int = 0

    def merged(self, changes: Any, *, pumps: Collection[int], at_start: bool) -> Faults:
        """These faults with ``changes`` applied (``None`` = back to the default), checked."""
        if not isinstance(changes, dict):
            raise SimConfigError("faults must be an object")
        defaults = Faults()
        known = [f.name for f in dataclasses.fields(Faults)]
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise SimConfigError(f"unknown fault {name!r}; known: {', '.join(known)}")
            if name == "reset_counters_on_start" and not at_start:
                raise SimConfigError("reset_counters_on_start acts at start only (config/CLI)")
            values[name] = (
                getattr(defaults, name) if value is None else _fault_value(name, value, pumps)
            )
        return dataclasses.replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            body[f.name] = sorted(value) if isinstance(value, frozenset) else value
        return body


def _fault_value(name: str, value: Any, pumps: Collection[int]) -> Any:
    where = f"faults.{name}"
    if name in ("reset_counters_on_start", "omit_total_volume"):
        if not isinstance(value, bool):
            raise SimConfigError(f"{where} must be true or false")
        return value
    if name in ("odd_decimals_pumps", "odd_decimals_finished"):
        if not isinstance(value, list) or any(
            isinstance(p, bool) or not isinstance(p, int) for p in value
        ):
            raise SimConfigError(f"{where} must be a list of pump numbers")
        unknown = set(value) - set(pumps)
        if unknown:
            raise SimConfigError(f"{where}: no such pumps {sorted(unknown)}")
        return frozenset(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimConfigError(f"{where} must be an integer")
    if name == "odd_amount_digit" and not 1 <= value <= 9:
        raise SimConfigError(f"{where} must be 1..9")
    if name == "calling_after_authorize_polls":
        if value < 0:
            raise SimConfigError(f"{where} cannot be negative")
        return value
    if value < 0:
        raise SimConfigError(f"{where} cannot be negative")
    # 0 switches a periodic fault off, like null.
    return value or None


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


_AUTH_SCHEMES = ("basic", "digest", "any")


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    number_format: NumberFormat
    username: str
    password: str
    timezone: ZoneInfo
    pumps: tuple[PumpConfig, ...]
    customers: CustomerModel
    memory_size: int = 5000
    auth_scheme: str = "any"
    unique_identifier: int = 1
    firmware_datetime: str = "2024-01-01T00:00:00"
    emergency_release: str = "PumpResume"
    faults: Faults = Faults()

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
                volume_total_decimals=_cfg_optional_int(obj, "volume_total_decimals"),
                amount_total_decimals=_cfg_optional_int(obj, "amount_total_decimals"),
            )
        except SimConfigError:
            raise
        except ForecourtError as exc:
            raise SimConfigError(exc.message) from None
        # Totals grow by whole transactions, so they need at least the transactions' decimals.
        if (
            number_format.total_volume_decimals < number_format.volume_decimals
            or number_format.total_amount_decimals < number_format.amount_decimals
        ):
            raise SimConfigError("total decimals must be >= the volume and amount decimals")
        auth = obj.get("auth")
        if not isinstance(auth, dict):
            raise SimConfigError("auth must be an object with username and password")
        scheme = _cfg_str(auth, "scheme", "any")
        if scheme not in _AUTH_SCHEMES:
            raise SimConfigError(f"auth.scheme must be one of {', '.join(_AUTH_SCHEMES)}")
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
        faults = Faults().merged(obj.get("faults") or {}, pumps=numbers, at_start=True)
        wrap = faults.transaction_wrap
        if wrap is not None and any(p.first_transaction > wrap for p in pumps):
            raise SimConfigError("first_transaction must be <= faults.transaction_wrap")
        firmware = _cfg_str(obj, "firmware_datetime", "2024-01-01T00:00:00")
        try:
            parse_local(firmware, timezone, field="firmware_datetime")
        except JsonPtsMalformed as exc:
            raise SimConfigError(exc.message) from None
        grades = {n.grade_id for p in pumps for n in p.nozzles}
        config = cls(
            number_format=number_format,
            username=_cfg_str(auth, "username", None),
            password=_cfg_str(auth, "password", None),
            timezone=timezone,
            pumps=pumps,
            customers=CustomerModel.from_json(obj.get("customers"), known_grades=grades),
            memory_size=_cfg_int(obj, "memory_size", 5000),
            auth_scheme=scheme,
            unique_identifier=_cfg_int(obj, "unique_identifier", 1),
            firmware_datetime=firmware,
            emergency_release=_cfg_str(obj, "emergency_release", "PumpResume"),
            faults=faults,
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


def _cfg_optional_int(obj: Mapping[str, Any], name: str) -> int | None:
    if obj.get(name) is None:
        return None
    return _cfg_int(obj, name, None)


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
            number_format.to_wire(nozzle.totalizer_ml, Quantity.TOTAL_VOLUME)
            number_format.to_wire(nozzle.totalizer_amount_minor, Quantity.TOTAL_AMOUNT)
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


# Phases in which the pump holds a live authorisation (a second one is a duplicate).
_AUTHORISED_PHASES = frozenset({Phase.AUTHORISED, Phase.FUELLING, Phase.SUSPENDED, Phase.FINISHING})


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
    record: int = 0  # the simulator's own serial: numbers alone may repeat (wrap, reset)
    amount_wire: Decimal | None = None  # the device's odd Amount (fault), else None
    closed: bool = False

    def to_event(self) -> dict[str, Any]:
        return {
            "event": "transaction",
            "record": self.record,
            "pump": self.pump,
            "transaction": self.transaction,
            "nozzle": self.nozzle,
            "grade_id": self.grade_id,
            "volume_ml": self.volume_ml,
            "price_mmu": self.price_mmu,
            "amount_minor": self.amount_minor,
            "amount_wire": self.amount_wire,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat(),
            "total_volume_ml": self.total_volume_ml,
            "total_amount_minor": self.total_amount_minor,
        }

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> TransactionRecord:
        wire = event.get("amount_wire")
        if wire is not None and not isinstance(wire, int | Decimal):
            raise SimConfigError(f"state file: bad amount_wire {wire!r}")
        try:
            return cls(
                pump=_cfg_int(event, "pump", None),
                transaction=_cfg_int(event, "transaction", None),
                nozzle=_cfg_int(event, "nozzle", None),
                grade_id=_cfg_int(event, "grade_id", None),
                volume_ml=_cfg_int(event, "volume_ml", None),
                price_mmu=_cfg_int(event, "price_mmu", None),
                amount_minor=_cfg_int(event, "amount_minor", None),
                started_at=datetime.fromisoformat(_cfg_str(event, "started_at", None)),
                ended_at=datetime.fromisoformat(_cfg_str(event, "ended_at", None)),
                total_volume_ml=_cfg_int(event, "total_volume_ml", None),
                total_amount_minor=_cfg_int(event, "total_amount_minor", None),
                record=_cfg_int(event, "record", None),
                amount_wire=None if wire is None else Decimal(wire),
            )
        except ValueError as exc:
            raise SimConfigError(f"state file: bad transaction event: {exc}") from None


@dataclass
class Pump:
    number: int
    resolution_minor: int
    rounding: Rounding
    nozzles: dict[int, NozzleState]
    next_transaction: int
    first_transaction: int = 1
    offline: bool = False
    phase: Phase = Phase.IDLE
    customer: Customer | None = None
    nozzle_up: int | None = None
    auth: Authorisation | None = None
    fill: Fill | None = None
    pending: TransactionRecord | None = None  # the END_OF_TRANSACTION record
    due: datetime | None = None  # when the current phase next changes by itself
    memory: deque[TransactionRecord] = field(default_factory=deque)
    emergency: bool = False  # blocked by PumpEmergencyStop until released
    lag_polls: int = 0  # status polls still showing the call after an authorisation (fault)

    def nozzle_for_grade(self, grade_id: int) -> int | None:
        for number in sorted(self.nozzles):
            if self.nozzles[number].grade_id == grade_id:
                return number
        return None

    def accepts(self, customer: Customer) -> bool:
        """A free pump this customer can use: idle, nobody at it, sells their grade."""
        if self.offline or self.emergency or self.phase is not Phase.IDLE:
            return False
        if self.customer is not None:
            return False
        nozzle = self.nozzle_for_grade(customer.grade_id)
        if nozzle is None:
            return False
        return self.auth is None or self.auth.nozzle in (None, nozzle)


@dataclass
class QueuedCustomer:
    customer: Customer
    leaves_at: datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    """What reaches the client for one POST: its replies, or an HTTP failure (a fault)."""

    status: int  # 200, or 503 when the POST or its reply was lost (faults)
    replies: list[Packet]


# --------------------------------------------------------------------------- persistence


class StateJournal:
    """The simulator's durable state: JSON lines appended and fsync'ed one by one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None

    def load(self) -> list[dict[str, Any]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SimConfigError(f"cannot read state file {self.path}: {exc}") from None
        lines = raw.split(b"\n")
        events = []
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                event = loads(line)
                if not isinstance(event, dict):
                    raise JsonPtsMalformed("a state line must be an object")
            except JsonPtsMalformed as exc:
                if index == len(lines) - 1:
                    # Killed mid-write: the torn last line was never acknowledged to anyone.
                    logger.warning("state file %s: ignoring a torn last line", self.path)
                    break
                raise SimConfigError(
                    f"state file {self.path} line {index + 1} is corrupt: {exc.message}"
                ) from None
            events.append(event)
        return events

    def append(self, event: Mapping[str, Any]) -> None:
        if self._file is None:
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            if created:
                # The new directory entry must survive a crash too.
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        self._file.write(dumps(event) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


# --------------------------------------------------------------------------- the station


class Station:
    """The forecourt behind the controller: pumps, customers, and the jsonPTS command set.

    Time only moves through :meth:`advance`, which replays every scheduled event up to the given
    instant in order, so the outcome doesn't depend on how often it is called.
    """

    def __init__(
        self,
        config: ControllerConfig,
        start: datetime,
        *,
        journal: StateJournal | None = None,
        reset_counters: bool = False,
    ) -> None:
        self.config = config
        self.fmt = config.number_format
        self.tz = config.timezone
        self.now = start
        self.started_at = start
        self.faults = config.faults
        self.journal = journal
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
                first_transaction=p.first_transaction,
                offline=p.offline,
            )
            for p in config.pumps
        }
        self.queue: deque[QueuedCustomer] = deque()
        # The fault counters are always in health (zero until something happens).
        self.stats: Counter[str] = Counter(dict.fromkeys(_FAULT_COUNTERS, 0))
        self.close_requests = 0
        self._next_record = 1
        if journal is not None:
            self._restore(journal.load())
        reset = reset_counters or self.faults.reset_counters_on_start
        if reset:
            for pump in self.pumps.values():
                pump.next_transaction = pump.first_transaction
        self._journal({"event": "start", "at": start.isoformat(), "reset_counters": reset})
        self.arrivals = config.customers.arrivals
        self.next_arrival: datetime | None = None
        if self.arrivals:
            self._schedule_arrival()

    # ----------------------------------------------------------------- persistence

    def _journal(self, event: Mapping[str, Any]) -> None:
        if self.journal is not None:
            self.journal.append(event)

    def _restore(self, events: list[dict[str, Any]]) -> None:
        """Replay the state file: memory, totalizers, counters and pending transactions."""
        next_numbers: dict[int, int] = {}
        records: dict[int, TransactionRecord] = {}
        for event in events:
            kind = event.get("event")
            if kind == "start":
                if event.get("reset_counters") is True:
                    next_numbers.clear()
            elif kind == "transaction":
                record = TransactionRecord.from_event(event)
                pump = self.pumps.get(record.pump)
                nozzle = pump.nozzles.get(record.nozzle) if pump else None
                if pump is None or nozzle is None:
                    raise SimConfigError(
                        f"state file names pump {record.pump} nozzle {record.nozzle}, "
                        "which the config does not have"
                    )
                nozzle.total_volume_ml = record.total_volume_ml
                nozzle.total_amount_minor = record.total_amount_minor
                pump.memory.append(record)
                records[record.record] = record
                next_numbers[pump.number] = self._following(record.transaction)
                self._next_record = max(self._next_record, record.record + 1)
                self.stats["restored_transactions"] += 1
            elif kind == "close":
                closed = records.get(_cfg_int(event, "record", None))
                if closed is not None:
                    closed.closed = True
            else:
                logger.warning("state file: ignoring unknown event %r", kind)
        for number, pump in self.pumps.items():
            if number in next_numbers:
                pump.next_transaction = next_numbers[number]
            last = pump.memory[-1] if pump.memory else None
            if last is not None and not last.closed:
                pump.pending = last
                pump.phase = Phase.END_OF_TRANSACTION
            self._trim_memory(pump)

    def _trim_memory(self, pump: Pump) -> None:
        while len(pump.memory) > self.config.memory_size and pump.memory[0].closed:
            pump.memory.popleft()

    def _following(self, number: int) -> int:
        """The transaction number after ``number`` (wrapping when the fault says so)."""
        wrap = self.faults.transaction_wrap
        following = number + 1
        return 1 if wrap is not None and following > wrap else following

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
        pump.lag_polls = 0
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
            record=self._next_record,
            amount_wire=self._odd_amount(amount) if self._odd_finished(pump) else None,
        )
        self._next_record += 1
        # Durable before anyone can see it (the status is only answered after this returns).
        self._journal(record.to_event())
        pump.memory.append(record)
        self._trim_memory(pump)
        pump.next_transaction = self._following(pump.next_transaction)
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

    def _odd_finished(self, pump: Pump) -> bool:
        return pump.number in self.faults.odd_decimals_finished

    def _odd_amount(self, amount_minor: int) -> Decimal:
        """An amount that is not a whole minor unit: ``odd_amount_digit`` tenths of one added."""
        exponent = currency_exponent(self.config.currency)
        whole = Decimal(amount_minor).scaleb(-exponent)
        return whole + Decimal(self.faults.odd_amount_digit).scaleb(-(exponent + 1))

    # ----------------------------------------------------------------- jsonPTS

    def receive(self, items: list[Any], now: datetime) -> Delivery:
        """One POST as it arrives over the network, with the transport faults applied."""
        drop = lose = False
        for item in items:
            if raw_packet_type(item) != "PumpCloseTransaction":
                continue
            self.close_requests += 1
            count = self.close_requests
            drop_every = self.faults.drop_close_every
            lose_every = self.faults.lose_close_reply_every
            drop = drop or bool(drop_every and count % drop_every == 0)
            lose = lose or bool(lose_every and count % lose_every == 0)
        if drop:
            self.stats["closes_dropped"] += 1
            logger.info("fault: a POST with close request %d is lost", self.close_requests)
            self.advance(now)
            return Delivery(503, [])
        replies = self.handle_items(items, now)
        if lose:
            self.stats["close_replies_lost"] += 1
            logger.info("fault: the reply to close request %d is lost", self.close_requests)
            return Delivery(503, [])
        return Delivery(200, replies)

    def handle_items(self, items: list[Any], now: datetime) -> list[Packet]:
        """Answer every raw packet of one POST, each on its own (errors don't spread)."""
        self.advance(now)
        replies = []
        for item in items:
            try:
                packet = parse_packet(item)
            except JsonPtsMalformed as exc:
                logger.info("unparseable packet: %s", exc.message)
                replies.append(
                    vendor_error(
                        raw_packet_id(item),
                        raw_packet_type(item),
                        PtsErrorCode.INVALID_JSON_REQUEST,
                    )
                )
                continue
            replies.append(self.handle(packet))
        return replies

    def handle(self, packet: Packet) -> Packet:
        handler = self._handlers().get(packet.type)
        if handler is None:
            logger.info("unknown packet type %r", packet.type)
            return vendor_error(packet.id, packet.type, PtsErrorCode.JSONPTS_ERROR_NOT_FOUND)
        try:
            return handler(packet)
        except SimCommandError as exc:
            logger.info("refused %s: %s (%s)", packet.type, exc.message, exc.code.name)
            return vendor_error(packet.id, packet.type, exc.code)
        except JsonPtsMalformed as exc:
            code = _FIELD_CODES.get(exc.details.get("field", ""), PtsErrorCode.INVALID_JSON_REQUEST)
            logger.info("refused %s: %s (%s)", packet.type, exc.message, code.name)
            return vendor_error(packet.id, packet.type, code)
        except Exception:  # one broken packet must not take its siblings down with it
            logger.exception("internal error answering %s", packet.type)
            return vendor_error(packet.id, packet.type, PtsErrorCode.NO_DATA_FOR_RESPONSE)

    def _handlers(self) -> dict[str, Callable[[Packet], Packet]]:
        handlers: dict[str, Callable[[Packet], Packet]] = {
            "PumpGetStatus": self._cmd_status,
            "PumpAuthorize": self._cmd_authorize,
            "PumpStop": self._cmd_stop,
            "PumpEmergencyStop": self._cmd_emergency_stop,
            "PumpSuspend": self._cmd_suspend,
            "PumpResume": self._cmd_resume,
            "PumpCloseTransaction": self._cmd_close,
            "PumpGetTotals": self._cmd_totals,
            "PumpSetPrices": self._cmd_set_prices,
            "ReportGetPumpTransactions": self._cmd_report,
            "GetSystemDecimalDigits": self._cmd_decimals,
            "GetUniqueIdentifier": self._cmd_unique_identifier,
            "GetFirmwareInformation": self._cmd_firmware,
            "GetSystemOperationInformation": self._cmd_operation,
            "GetDateTime": self._cmd_datetime,
        }
        if self.config.emergency_release != "PumpResume":
            handlers[self.config.emergency_release] = self._cmd_release
        return handlers

    @staticmethod
    def _data(packet: Packet) -> dict[str, Any]:
        if not isinstance(packet.data, dict):
            raise SimCommandError(PtsErrorCode.NO_DATA_ERROR, f"{packet.type} needs Data")
        return packet.data

    def _pump(self, data: Mapping[str, Any], *, online: bool = True) -> Pump:
        number = get_int(data, "Pump")
        pump = self.pumps.get(number)
        if pump is None:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE, f"no pump {number}"
            )
        if online and pump.offline:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED,
                f"pump {number} is offline",
            )
        return pump

    def _cmd_status(self, packet: Packet) -> Packet:
        pump = self._pump(self._data(packet), online=False)
        if pump.lag_polls > 0 and pump.fill is not None and pump.nozzle_up and not pump.offline:
            # Fault: the device still shows the call although the pump is authorised.
            pump.lag_polls -= 1
            self.stats["lagged_status_polls"] += 1
            return Packet(packet.id, "PumpIdleStatus", self._idle_status(pump, pump.nozzle_up))
        packet_type, data = self.status_of(pump)
        return Packet(packet.id, packet_type, data)

    def _cmd_authorize(self, packet: Packet) -> Packet:
        data = self._data(packet)
        pump = self._pump(data)
        nozzle = get_optional_int(data, "Nozzle", 0) or None
        if nozzle is not None and nozzle not in pump.nozzles:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_NOZZLE_NUMBER_OUT_OF_RANGE,
                f"pump {pump.number} has no nozzle {nozzle}",
            )
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
                PtsErrorCode.JSONPTS_ERROR_TYPE_OUT_OF_RANGE,
                f"Type must be Volume, Amount or FullTank: {auth_type!r}",
            )
        if (dose_ml is not None and dose_ml <= 0) or (dose_minor is not None and dose_minor <= 0):
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_DOSE_VALUE, "Dose must be positive"
            )
        price = None
        if get_optional_number(data, "Price") is not None:
            price = self.fmt.get_price_mmu(data, "Price")
            if price <= 0:
                raise SimCommandError(
                    PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_PRICE_VALUE, "Price must be positive"
                )
        if pump.emergency:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED,
                f"pump {pump.number} is blocked by an emergency stop",
            )
        if pump.auth is not None or pump.phase in _AUTHORISED_PHASES:
            self.stats["double_authorisations"] += 1
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_DUPLICATED_AUTHORIZATION_REQUEST,
                f"pump {pump.number} is already authorised ({self._phase_name(pump)})",
            )
        if pump.phase is Phase.END_OF_TRANSACTION:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_BUSY_FILLING,
                f"pump {pump.number} holds transaction "
                f"{pump.pending.transaction if pump.pending else '?'} unclosed",
            )
        auth = Authorisation(nozzle, price, auth_type, dose_ml, dose_minor, dose_wire)
        if pump.phase is Phase.IDLE:
            pump.auth = auth  # prepay: waits for the next customer's nozzle
        else:  # CALLING
            if nozzle is not None and nozzle != pump.nozzle_up:
                raise SimCommandError(
                    PtsErrorCode.JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED,
                    f"pump {pump.number}: nozzle {pump.nozzle_up} is up, not {nozzle}",
                )
            pump.auth = auth
            self._begin_fill(pump)
            pump.lag_polls = self.faults.calling_after_authorize_polls
        # The number the dispensing will carry (a prepay's too: nothing else can take it).
        transaction = pump.fill.transaction if pump.fill is not None else pump.next_transaction
        return Packet(
            packet.id,
            "PumpAuthorizeConfirmation",
            {"Pump": pump.number, "Transaction": transaction},
        )

    def _stop_flow(self, pump: Pump) -> None:
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

    def _cmd_stop(self, packet: Packet) -> Packet:
        self._stop_flow(self._pump(self._data(packet)))
        return confirmation(packet.id, packet.type)

    def _cmd_emergency_stop(self, packet: Packet) -> Packet:
        pump = self._pump(self._data(packet))
        self._stop_flow(pump)
        pump.lag_polls = 0
        if not pump.emergency:
            pump.emergency = True
            self.stats["emergency_stops"] += 1
            logger.warning("pump %d: emergency stop, blocked until released", pump.number)
        return confirmation(packet.id, packet.type)

    def _release(self, pump: Pump) -> None:
        pump.emergency = False
        self.stats["emergency_releases"] += 1
        logger.info("pump %d: emergency stop released", pump.number)
        if pump.phase is Phase.IDLE and pump.customer is None:
            self._pump_freed(pump)

    def _cmd_release(self, packet: Packet) -> Packet:
        pump = self._pump(self._data(packet))
        if not pump.emergency:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS,
                f"pump {pump.number} is not emergency-stopped",
            )
        self._release(pump)
        return confirmation(packet.id, packet.type)

    def _cmd_suspend(self, packet: Packet) -> Packet:
        pump = self._pump(self._data(packet))
        fill = pump.fill
        if pump.phase in (Phase.AUTHORISED, Phase.FUELLING) and fill is not None:
            fill.freeze(self.now)
            fill.suspended_from = pump.phase
            pump.phase = Phase.SUSPENDED
            pump.due = None
        elif pump.phase is not Phase.SUSPENDED:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS,
                f"pump {pump.number} is {self._phase_name(pump)}",
            )
        return confirmation(packet.id, packet.type)

    def _cmd_resume(self, packet: Packet) -> Packet:
        pump = self._pump(self._data(packet))
        if pump.emergency and self.config.emergency_release == "PumpResume":
            self._release(pump)
            return confirmation(packet.id, packet.type)
        fill = pump.fill
        if pump.phase is not Phase.SUSPENDED or fill is None:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS,
                f"pump {pump.number} is not suspended",
            )
        if fill.suspended_from is Phase.FUELLING:
            pump.phase = Phase.FUELLING
            self._start_flowing(pump, fill)
        else:
            pump.phase = Phase.AUTHORISED
            pump.due = self._after(self.config.customers.flow_start_delay_s)
        fill.suspended_from = None
        return confirmation(packet.id, packet.type)

    def _cmd_close(self, packet: Packet) -> Packet:
        data = self._data(packet)
        pump = self._pump(data)
        number = get_int(data, "Transaction")
        pending = pump.pending
        if pump.phase is not Phase.END_OF_TRANSACTION or pending is None:
            # As strict as the device: no idempotent close of an old number.
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION,
                f"pump {pump.number} holds no finished transaction (asked to close {number})",
            )
        if pending.transaction != number:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH,
                f"pump {pump.number} holds transaction {pending.transaction}, not {number}",
            )
        self._journal(
            {"event": "close", "record": pending.record, "pump": pump.number, "transaction": number}
        )
        pending.closed = True
        pump.pending = None
        pump.phase = Phase.IDLE
        self._trim_memory(pump)
        self._pump_freed(pump)
        return confirmation(packet.id, packet.type)

    def _cmd_totals(self, packet: Packet) -> Packet:
        data = self._data(packet)
        pump = self._pump(data)
        number = get_int(data, "Nozzle")
        nozzle = pump.nozzles.get(number)
        if nozzle is None:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_NOZZLE_NUMBER_OUT_OF_RANGE,
                f"pump {pump.number} has no nozzle {number}",
            )
        return Packet(
            packet.id,
            "PumpTotals",
            {
                "Pump": pump.number,
                "Nozzle": nozzle.number,
                "FuelGradeId": nozzle.grade_id,
                "Volume": self.fmt.to_wire(nozzle.total_volume_ml, Quantity.TOTAL_VOLUME),
                "Amount": self.fmt.to_wire(nozzle.total_amount_minor, Quantity.TOTAL_AMOUNT),
                "Transaction": pump.memory[-1].transaction if pump.memory else 0,
            },
        )

    def _cmd_set_prices(self, packet: Packet) -> Packet:
        data = self._data(packet)
        pump = self._pump(data)
        prices_raw = get_list(data, "Prices")
        if len(prices_raw) > 8:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_PRICE_VALUE, "at most 8 prices"
            )
        ordered = [pump.nozzles[number] for number in sorted(pump.nozzles)]
        # Validate every price before changing any, so a bad list changes nothing.
        new_prices: list[int] = []
        for index, value in enumerate(prices_raw):
            mmu = self.fmt.get_price_mmu({"Price": value}, "Price")
            if index < len(ordered) and mmu <= 0:
                raise SimCommandError(
                    PtsErrorCode.JSONPTS_ERROR_COULD_NOT_GET_PRICE_VALUE,
                    f"price for nozzle {ordered[index].number} <= 0",
                )
            new_prices.append(mmu)
        for nozzle, mmu in zip(ordered, new_prices, strict=False):
            nozzle.price_mmu = mmu  # applies from the next authorisation
        return confirmation(packet.id, packet.type)

    def _cmd_report(self, packet: Packet) -> Packet:
        data = self._data(packet)
        number = get_int(data, "Pump")
        if number != 0 and number not in self.pumps:
            raise SimCommandError(
                PtsErrorCode.JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE, f"no pump {number}"
            )
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

    def _cmd_decimals(self, packet: Packet) -> Packet:
        fmt = self.fmt
        return Packet(
            packet.id,
            "SystemDecimalDigits",
            {
                "Price": fmt.price_decimals,
                "Amount": fmt.amount_decimals,
                "Volume": fmt.volume_decimals,
                "AmountTotal": fmt.total_amount_decimals,
                "VolumeTotal": fmt.total_volume_decimals,
            },
        )

    def _cmd_unique_identifier(self, packet: Packet) -> Packet:
        return Packet(packet.id, "UniqueIdentifier", {"Id": self.config.unique_identifier})

    def _cmd_firmware(self, packet: Packet) -> Packet:
        return Packet(
            packet.id,
            "FirmwareInformation",
            {
                "DateTime": self.config.firmware_datetime,
                "PumpProtocols": [],
                "ProbeProtocols": [],
                "PriceBoardProtocols": [],
                "ReaderProtocols": [],
            },
        )

    def uptime_ms(self) -> int:
        return int((self.now - self.started_at).total_seconds() * 1000)

    def _cmd_operation(self, packet: Packet) -> Packet:
        return Packet(
            packet.id,
            "SystemOperationInformation",
            {
                "SystemUpTime": self.uptime_ms(),
                "CurrentHeapFreeSize": 65_536,
                "MinimalHeapFreeSize": 32_768,
                "Tasks": [],
            },
        )

    def _cmd_datetime(self, packet: Packet) -> Packet:
        offset = self.now.astimezone(self.tz).utcoffset() or timedelta(0)
        return Packet(
            packet.id,
            "DateTime",
            {
                "DateTime": format_local(self.now, self.tz),
                "AutoSynchronize": False,
                "UTCOffset": int(offset.total_seconds() / 3600),
            },
        )

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
            volume_wire = fmt.ml_to_volume(volume)
            if volume > 0 and pump.number in self.faults.odd_decimals_pumps:
                # Fault: one decimal more than configured, never a trailing zero.
                volume_wire += Decimal(5).scaleb(-(fmt.volume_decimals + 1))
            status: dict[str, Any] = {
                "Pump": pump.number,
                "Nozzle": fill.nozzle.number,
                "FuelGradeId": fill.nozzle.grade_id,
                "Volume": volume_wire,
                "Price": fmt.mmu_to_price(fill.price_mmu),
                "Amount": fmt.minor_to_amount(self._amount(pump, volume, fill.price_mmu)),
                "Transaction": fill.transaction,
                "DateTimeStart": self._local(fill.started_at),
                "IsSuspended": pump.phase is Phase.SUSPENDED,
                "IsStopped": fill.stopped,
                "OrderedType": fill.ordered_type,
                "OrderedDose": fill.ordered_dose if fill.ordered_dose is not None else 0,
            }
            if pump.emergency:
                status["EmergencyStop"] = True
            return "PumpFillingStatus", status
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
        return "PumpIdleStatus", self._idle_status(pump, nozzle_up)

    def _idle_status(self, pump: Pump, nozzle_up: int) -> dict[str, Any]:
        fmt = self.fmt
        last = pump.memory[-1] if pump.memory else None
        idle: dict[str, Any] = {
            "Pump": pump.number,
            "NozzleUp": nozzle_up,
            "Nozzle": nozzle_up,
            "Request": "",
            "LastNozzle": last.nozzle if last else 0,
            "LastVolume": fmt.ml_to_volume(last.volume_ml if last else 0),
            "LastPrice": fmt.mmu_to_price(last.price_mmu if last else 0),
            "LastAmount": self._amount_wire(last) if last else fmt.minor_to_amount(0),
            "LastTransaction": last.transaction if last else 0,
            "LastFuelGradeId": last.grade_id if last else 0,
            "LastTotalVolume": fmt.to_wire(
                last.total_volume_ml if last else 0, Quantity.TOTAL_VOLUME
            ),
            "LastTotalAmount": fmt.to_wire(
                last.total_amount_minor if last else 0, Quantity.TOTAL_AMOUNT
            ),
            "LastDateTimeStart": self._local(last.started_at if last else None),
            "LastDateTime": self._local(last.ended_at if last else None),
        }
        if pump.emergency:
            idle["EmergencyStop"] = True
        return idle

    def _amount_wire(self, record: TransactionRecord) -> Decimal:
        if record.amount_wire is not None:
            return record.amount_wire
        return self.fmt.minor_to_amount(record.amount_minor)

    def _transaction_fields(self, record: TransactionRecord) -> dict[str, Any]:
        fmt = self.fmt
        volume = fmt.ml_to_volume(record.volume_ml)
        fields: dict[str, Any] = {
            "Pump": record.pump,
            "Nozzle": record.nozzle,
            "FuelGradeId": record.grade_id,
            "Transaction": record.transaction,
            "Volume": volume,
            "TCVolume": volume,  # no temperature compensation in the simulator
            "Price": fmt.mmu_to_price(record.price_mmu),
            "Amount": self._amount_wire(record),
            "TotalVolume": fmt.to_wire(record.total_volume_ml, Quantity.TOTAL_VOLUME),
            "TotalAmount": fmt.to_wire(record.total_amount_minor, Quantity.TOTAL_AMOUNT),
            "DateTimeStart": self._local(record.started_at),
            "DateTime": self._local(record.ended_at),
        }
        if self.faults.omit_total_volume:
            del fields["TotalVolume"], fields["TotalAmount"]
        return fields

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

    def creep_checked(self, items: Any) -> list[tuple[int, int, int]]:
        """``meter_creep`` items -> (pump, nozzle, ml), checked (nothing applied)."""
        if not isinstance(items, list):
            raise SimConfigError("meter_creep must be a list of {pump, nozzle, volume_ml}")
        out: list[tuple[int, int, int]] = []
        for item in items:
            if not isinstance(item, dict):
                raise SimConfigError("a meter_creep item is an object")
            pump = get_int(item, "pump")
            nozzle = get_int(item, "nozzle")
            ml = get_int(item, "volume_ml")
            if pump not in self.pumps or nozzle not in self.pumps[pump].nozzles:
                raise SimConfigError(f"no nozzle {nozzle} on pump {pump}")
            if not 0 < ml <= 10**9:
                raise SimConfigError("meter_creep volume_ml must be 1..10^9")
            out.append((pump, nozzle, ml))
        return out

    def creep(self, items: list[tuple[int, int, int]]) -> None:
        for pump, nozzle, ml in items:
            state = self.pumps[pump].nozzles[nozzle]
            state.total_volume_ml += ml
            logger.info("meter creep: pump %d nozzle %d +%d ml", pump, nozzle, ml)

    def faults_with(self, changes: Any) -> Faults:
        """The current faults with runtime ``changes`` merged in (checked, not applied)."""
        return self.faults.merged(changes, pumps=set(self.pumps), at_start=False)

    def set_faults(self, faults: Faults) -> None:
        if faults != self.faults:
            logger.info("faults now %s", faults.to_json())
        self.faults = faults

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "sim_time": self.now.isoformat(),
            "started_at": self.started_at.isoformat(),
            "uptime_ms": self.uptime_ms(),
            "unique_identifier": self.config.unique_identifier,
            "arrivals": self.arrivals,
            "queue": len(self.queue),
            "customers": len(self.queue) + sum(p.customer is not None for p in self.pumps.values()),
            "offline_pumps": sorted(n for n, p in self.pumps.items() if p.offline),
            "emergency_stopped_pumps": sorted(n for n, p in self.pumps.items() if p.emergency),
            "pumps": {str(n): self._phase_name(p) for n, p in sorted(self.pumps.items())},
            "next_transactions": {
                str(n): p.next_transaction for n, p in sorted(self.pumps.items())
            },
            "faults": self.faults.to_json(),
            "stats": dict(sorted(self.stats.items())),
        }


def _bind(method: Callable[[Any], None], arg: Any) -> Callable[[], None]:
    return lambda: method(arg)


# --------------------------------------------------------------------------- HTTP auth

_DIGEST_PARAM = re.compile(r'([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def digest_response(
    *,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str,
    cnonce: str,
) -> str:
    """The RFC 7616 ``response`` for MD5 with ``qop=auth`` (section 3.4.1)."""
    ha1 = _md5(f"{username}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    return _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")


class HttpAuthenticator:
    """Checks ``Authorization`` for the configured schemes (Basic; Digest per RFC 7616)."""

    def __init__(self, username: str, password: str, scheme: str, realm: str = _REALM) -> None:
        self.username = username
        self.password = password
        self.realm = realm
        self.schemes = ("digest", "basic") if scheme == "any" else (scheme,)
        self._key = secrets.token_bytes(32)
        self._opaque = secrets.token_hex(16)
        # Nonce -> the nc values already used with it (bounded: old nonces fall out).
        self._used: OrderedDict[str, set[str]] = OrderedDict()

    def allows(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        scheme = scheme.lower()
        if scheme not in self.schemes:
            return False
        if scheme == "basic":
            return self._basic_ok(credentials)
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        uri = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
        return self._digest_ok(request.method, uri, credentials)

    def challenge(self) -> Response:
        response = Response("authentication required", status_code=401)
        for scheme in self.schemes:
            if scheme == "digest":
                value = (
                    f'Digest realm="{self.realm}", qop="auth", algorithm=MD5, '
                    f'nonce="{self._new_nonce()}", opaque="{self._opaque}"'
                )
            else:
                value = f'Basic realm="{self.realm}"'
            response.headers.append("WWW-Authenticate", value)
        return response

    def _basic_ok(self, encoded: str) -> bool:
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, secret = decoded.partition(":")
        # compare_digest on both, so timing doesn't reveal which one was wrong
        user_ok = secrets.compare_digest(user.encode(), self.username.encode())
        secret_ok = secrets.compare_digest(secret.encode(), self.password.encode())
        return bool(sep) and user_ok and secret_ok

    def _new_nonce(self) -> str:
        issued = f"{time.time_ns():x}"
        return f"{issued}.{self._sign(issued)}"

    def _sign(self, issued: str) -> str:
        return hmac.new(self._key, issued.encode(), hashlib.sha256).hexdigest()[:32]

    def _nonce_ok(self, nonce: str) -> bool:
        issued, _, signature = nonce.partition(".")
        return bool(issued) and hmac.compare_digest(signature, self._sign(issued))

    def _digest_ok(self, method: str, uri: str, credentials: str) -> bool:
        params = {
            key.lower(): value[1:-1].replace('\\"', '"') if value.startswith('"') else value
            for key, value in _DIGEST_PARAM.findall(credentials)
        }
        needed = ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
        if any(name not in params for name in needed):
            return False  # RFC 2069 (no qop) is not offered
        if params.get("algorithm", "MD5").upper() != "MD5" or params["qop"] != "auth":
            return False
        if params["realm"] != self.realm or params["uri"] != uri:
            return False
        if "opaque" in params and params["opaque"] != self._opaque:
            return False
        nonce, nc = params["nonce"], params["nc"]
        if not self._nonce_ok(nonce) or not re.fullmatch(r"[0-9a-fA-F]{8}", nc):
            return False
        expected = digest_response(
            username=self.username,
            realm=self.realm,
            password=self.password,
            method=method,
            uri=params["uri"],
            nonce=nonce,
            nc=nc,
            cnonce=params["cnonce"],
        )
        user_ok = secrets.compare_digest(params["username"].encode(), self.username.encode())
        if not (user_ok and secrets.compare_digest(expected, params["response"].lower())):
            return False
        used = self._used.setdefault(nonce, set())
        self._used.move_to_end(nonce)
        if nc.lower() in used:
            return False  # a replayed request
        used.add(nc.lower())
        while len(self._used) > 1024:
            self._used.popitem(last=False)
        return True


# --------------------------------------------------------------------------- HTTP app


def _json_response(body: Any, status_code: int = 200) -> Response:
    return Response(dumps(body), status_code=status_code, media_type="application/json")


_CONTROL_KEYS = frozenset({"arrivals", "offline_pumps", "faults", "meter_creep"})


def create_app(
    config: ControllerConfig,
    clock: Clock,
    *,
    on_started: Callable[[], None] | None = None,
    tick_wall_s: float = 0.05,
    journal: StateJournal | None = None,
    reset_counters: bool = False,
) -> Starlette:
    """The simulator's HTTP app. ``app.state.station`` is the model (tests may inspect it)."""
    station = Station(config, clock.now(), journal=journal, reset_counters=reset_counters)
    authenticator = HttpAuthenticator(config.username, config.password, config.auth_scheme)

    async def jsonpts(request: Request) -> Response:
        if not authenticator.allows(request):
            return authenticator.challenge()
        body = await request.body()
        try:
            items = parse_envelope(body)
        except JsonPtsMalformed as exc:
            return _json_response({"Error": True, "Code": exc.code, "Message": exc.message}, 400)
        # No await between here and the reply: each POST is one atomic step of the model.
        delivery = station.receive(items, clock.now())
        if delivery.status != 200:
            return Response("Service Unavailable", status_code=delivery.status)
        return Response(encode_envelope(delivery.replies), media_type="application/json")

    async def control(request: Request) -> Response:
        try:
            body = loads(await request.body())
            if not isinstance(body, dict):
                raise JsonPtsMalformed("control body must be an object")
            unknown = set(body) - _CONTROL_KEYS
            if unknown:
                raise SimConfigError(f"unknown control keys {sorted(unknown)}")
            # Everything is checked before anything changes.
            arrivals = get_bool(body, "arrivals", default=station.arrivals)
            offline = body.get("offline_pumps")
            offline_set: set[int] | None = None
            if offline is not None:
                offline_set = {
                    get_int({"Pump": p}, "Pump") for p in get_list(body, "offline_pumps")
                }
                unknown_pumps = offline_set - set(station.pumps)
                if unknown_pumps:
                    raise SimConfigError(f"no such pumps: {sorted(unknown_pumps)}")
            faults = station.faults_with(body["faults"]) if "faults" in body else station.faults
            creep = station.creep_checked(body["meter_creep"]) if "meter_creep" in body else []
        except ForecourtError as exc:
            return _json_response({"Error": True, "Code": exc.code, "Message": exc.message}, 400)
        station.advance(clock.now())
        if offline_set is not None:
            station.set_offline(offline_set)
        station.set_faults(faults)
        station.set_arrivals(arrivals)
        station.creep(creep)
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
            if journal is not None:
                journal.close()

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


class _Server(uvicorn.Server):
    """uvicorn that stops in order on SIGINT/SIGTERM and then returns: uvicorn's own handling
    raises the signal again after its shutdown (a KeyboardInterrupt traceback on Ctrl-C,
    death by SIGTERM), where a stopped simulator should simply exit 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run one simulated controller until SIGINT/SIGTERM (exit 0); 2: a bad config, 1: the
    port cannot be had. Logs are Forecourt's JSON lines on stderr."""
    parser = argparse.ArgumentParser(
        prog="python -m forecourt.sim.pts_controller",
        description="Simulated Technotrade PTS-2 forecourt controller speaking jsonPTS over HTTP.",
    )
    parser.add_argument("--config", required=True, help="simulator config JSON file")
    parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port-file", help="write the chosen port to this file once listening")
    parser.add_argument(
        "--state-file", help="append-only state file: reloaded at start, fsync'ed per event"
    )
    parser.add_argument(
        "--reset-counters",
        action="store_true",
        help="restart transaction numbers at first_transaction (memory and totals are kept)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="least severe level logged (default INFO)",
    )
    args = parser.parse_args(argv)

    configure_logging(args.log_level, json_lines=True)
    clock: Clock = SimulatedClock.from_env(dict(os.environ)) or SystemClock()
    journal = StateJournal(Path(args.state_file)) if args.state_file else None
    try:
        config = load_config(args.config)
        port_holder: list[int] = []

        def announce_port() -> None:
            port = port_holder[0]
            url = (
                f"http://[{args.host}]:{port}" if ":" in args.host else f"http://{args.host}:{port}"
            )
            announce(
                f"PTS-2 simulator listening on {url}",
                service="pts-simulator",
                url=url,
                jsonpts=f"{url}/jsonPTS",
            )
            if args.port_file:
                _write_port_file(Path(args.port_file), port)

        app = create_app(
            config,
            clock,
            on_started=announce_port,
            journal=journal,
            reset_counters=args.reset_counters,
        )
    except SimConfigError as exc:
        logger.error("%s", exc.message)
        return 2

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
    port_holder.append(sock.getsockname()[1])
    server = _Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            log_config=None,  # uvicorn's records go through configure_logging: one format
        )
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return 0  # a Ctrl-C before the server took the signals: nothing to stop yet
    return 0


class SimulatorProcess:
    """Runs the simulator as a child process for tests and demos (always ``stop()`` it).

    ``with SimulatorProcess(config_dict, workdir, env=clock.to_env()) as sim:`` gives
    ``sim.base_url``; the process is killed on exit however the block ends. The simulator keeps
    its state in ``state_file`` (default ``workdir/pts_state.jsonl``), which a new
    ``SimulatorProcess`` empties unless ``fresh_state=False``; :meth:`restart` keeps it, so the
    next process reloads what the last one recorded.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | Path,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        state_file: Path | None = None,
        fresh_state: bool = True,
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
        self.state_file = Path(state_file) if state_file else self.workdir / "pts_state.jsonl"
        if fresh_state:
            self.state_file.unlink(missing_ok=True)
        self.env = dict(env or {})
        self.host = host
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.starts = 0

    def start(self, timeout_s: float = 20.0, *, reset_counters: bool = False, port: int = 0) -> str:
        """Start the process; ``port`` 0 lets it pick one (announced in the port file)."""
        self.port_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "forecourt.sim.pts_controller",
            "--config",
            str(self.config_path),
            "--port",
            str(port),
            "--host",
            self.host,
            "--port-file",
            str(self.port_file),
            "--state-file",
            str(self.state_file),
        ]
        if reset_counters:
            command.append("--reset-counters")
        # One log across restarts, so log_tail() shows every life of the simulator.
        with self.log_path.open("ab" if self.starts else "wb") as log:
            self.process = subprocess.Popen(
                command, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def restart(
        self,
        sig: int = signal.SIGTERM,
        *,
        reset_counters: bool = False,
        timeout_s: float = 20.0,
    ) -> str:
        """End the running simulator with ``sig`` (SIGTERM: orderly, SIGKILL: a crash), check
        it died, and start a new one on the same state file and the same port (a controller
        keeps its address across a restart); returns the ``base_url``."""
        process = self.process
        port = int(self.base_url.rsplit(":", 1)[1]) if self.base_url else 0
        if process is None or process.poll() is not None:
            raise RuntimeError("the simulator is not running")
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
            raise RuntimeError(f"simulator did not die on signal {sig}") from None
        if process.poll() is None:  # pragma: no cover - wait() returned, so it is gone
            raise RuntimeError("simulator still running after its signal")
        self.process = None
        return self.start(timeout_s, reset_counters=reset_counters, port=port)

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
