"""The jsonPTS driver: a Technotrade PTS-2 controller behind :class:`ForecourtDriver`.

One ``httpx.AsyncClient`` talks to ``POST {base_url}/jsonPTS``. Several packets travel in one
POST where that saves round trips (status of many pumps; a report plus the pump's status; the
identity requests). Replies are matched to requests by ``Id``, not by position.

Authentication (``auth_scheme``): ``"basic"`` sends HTTP Basic only; ``"digest"`` uses
``httpx.DigestAuth`` (RFC 7616); ``"auto"`` (default) sends Basic and, on a 401 whose
``WWW-Authenticate`` offers Digest, switches to Digest for good and retries once. A PTS-2 offers
either (the vendor's SDK has a Basic and a Digest authenticator, Java SDK
``HttpClientManager``, stored file 17985143705). A 401/403 after that raises
:class:`DriverUnavailable` with code ``jsonpts.auth_failed``.

Mapping to the standard model (edge.drivers):

- ``PumpIdleStatus``: ``NozzleUp`` > 0 -> CALLING (that nozzle), else IDLE.
- ``PumpFillingStatus``: ``IsStopped`` -> STOPPED [I, see the simulator]; ``IsSuspended`` ->
  SUSPENDED; ``Volume`` 0 -> AUTHORISED; else FUELLING.
- ``EmergencyStop: true`` on an idle or filling status -> STOPPED: the pump is blocked by
  ``PumpEmergencyStop`` until released [I, the simulator's marker; no vendor text found].
- ``PumpEndOfTransactionStatus`` -> END_OF_TRANSACTION; ``PumpOfflineStatus`` -> OFFLINE.
- one pump's refused, malformed or unreadable reply -> ERROR for that pump with the reason in
  ``PumpStatus.error``; the other pumps of the same POST are still reported. Only a POST that
  fails as a whole (transport, HTTP status, not a jsonPTS envelope, no usable packet) raises.
- Filling statuses are read strictly: a value with more decimals than configured makes that
  pump ERROR. A finished transaction (end-of-transaction status, report item) is never refused
  for an odd value: a value exact in our units but with more decimals than configured is taken
  with ``FLAG_EXTRA_DECIMALS``; one that is not a whole unit becomes the nearest integer
  (half-even) with ``FLAG_INEXACT`` and its wire text in ``DeviceTransaction.raw``.
- ``DeviceTransaction.totalizer_end_ml`` = ``TotalVolume`` (the nozzle's totalizer after the
  transaction); the vendor SDK treats it as optional, and when it is missing the driver returns
  ``None`` with ``FLAG_NO_TOTALIZER``. ``totalizer_start_ml`` is always ``None``: the edge reads
  the start totals itself with :meth:`JsonPtsDriver.totals`.
- ``PumpAuthorize`` is answered by ``PumpAuthorizeConfirmation {Pump, Transaction}`` (Java SDK
  ``network/http/PumpAuthorize.java``, stored file 17278643764); :meth:`authorize` returns that
  transaction number, or ``None`` for a plain ``"Message": "OK"`` confirmation.

Identity (:meth:`JsonPtsDriver.identity`), one POST of the vendor's requests (names and reply
fields from the Java SDK ``network/http`` classes and the web UI's device-information page,
stored files 17114324032, 17114670687, 17487983676, 17523703720, 56316693476):

- ``GetUniqueIdentifier`` -> ``UniqueIdentifier {Id}``: ``device_id`` (else the base URL);
- ``GetFirmwareInformation`` -> ``FirmwareInformation {DateTime, ...}``: ``firmware`` (the
  firmware's release date-time, which the web UI shows as its version);
- ``GetSystemOperationInformation`` -> ``SystemOperationInformation {SystemUpTime (ms)}`` and
  ``GetDateTime`` -> ``DateTime {DateTime}``: the boot instant = controller time - uptime, both
  read in the same POST from the controller's own clock. ``boot_marker`` is that instant floored
  to ``boot_marker_resolution_s`` [I]. Within one driver the marker is kept while the uptime
  keeps growing and renewed when it falls, so a restart is seen even within one resolution
  step; a new driver (an edge restart) may, rarely, see the floored instant step over a
  boundary (the estimate jitters by the controller clock's one-second resolution).
- ``GetSystemDecimalDigits`` -> ``SystemDecimalDigits {Price, Amount, Volume, AmountTotal,
  VolumeTotal}``: the controller's number format replaces the configured one (logged when they
  differ).

A request the firmware does not know is refused (``JSONPTS_ERROR_NOT_FOUND``); the driver then
falls back on its configuration for that part.

Errors: transport faults, timeouts, HTTP 5xx, 401/403 and unreadable replies raise
:class:`DriverUnavailable`; an error packet raises :class:`DeviceRejected` whose ``details``
carry ``device_code`` (the device's ``Code``), ``device_message`` (its ``Message``, the vendor
error name) and ``packet_type``. A refused close carries
``JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION`` (69) or
``JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH`` (27, [I]) (see codec.PtsErrorCode).

Device date-times are local wall-clock time without offset in the controller's ``timezone``;
the driver returns aware datetimes in that zone and sends local text with whole seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from forecourt.kernel.errors import ForecourtError, InvalidValue
from forecourt.protocols.driver import (
    DeviceConfig,
    DriverContext,
    EventSink,
    PumpDriver,
    ignore_event,
)
from forecourt.protocols.jsonpts.codec import (
    JsonPtsMalformed,
    NumberFormat,
    Packet,
    PtsErrorCode,
    Quantity,
    encode_envelope,
    format_local,
    get_bool,
    get_int,
    get_local_datetime,
    get_optional_int,
    get_optional_local_datetime,
    get_optional_number,
    parse_envelope,
    parse_packet,
    raw_packet_id,
)
from forecourt.protocols.model import (
    FLAG_EXTRA_DECIMALS,
    FLAG_INEXACT,
    FLAG_NO_TOTALIZER,
    Capability,
    DeviceHealth,
    DeviceHealthState,
    DeviceIdentity,
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    FrameRefused,
    HealthChanged,
    NozzleTotals,
    Preset,
    PresetType,
    PumpState,
    PumpStatus,
    PumpStatusChanged,
)
from forecourt.protocols.renumber import renumbered

logger = logging.getLogger(__name__)

_STATUS_TYPES = frozenset(
    {"PumpIdleStatus", "PumpFillingStatus", "PumpEndOfTransactionStatus", "PumpOfflineStatus"}
)
# One-shot replies a real PTS-2 may hand out to PumpGetStatus after another request [I];
# asking again yields the pump's actual status.
_ONE_SHOT_TYPES = frozenset({"PumpTotals", "PumpPrices", "PumpTag", "PumpDisplayData"})

_PRESET_WIRE_TYPE = {
    PresetType.FULL_TANK: "FullTank",
    PresetType.VOLUME: "Volume",
    PresetType.AMOUNT: "Amount",
}

_AUTH_SCHEMES = frozenset({"basic", "digest", "auto"})

# The identity requests, asked together; each may be unknown to an older firmware.
_IDENTITY_REQUESTS = (
    "GetUniqueIdentifier",
    "GetFirmwareInformation",
    "GetSystemOperationInformation",
    "GetDateTime",
    "GetSystemDecimalDigits",
)


@dataclass(frozen=True, slots=True)
class _BadReply:
    """A request the controller's reply did not answer usably (the reason, for the log)."""

    reason: str


# What one POST of several packets came to: each packet's reply, or the error of the whole POST.
_ChunkOutcome: TypeAlias = list[Packet | _BadReply] | DriverUnavailable | DeviceRejected


@dataclass(frozen=True, slots=True)
class _BootReading:
    uptime_ms: int
    marker: str


CAPABILITIES = frozenset(
    {
        Capability.PRESET_VOLUME,
        Capability.PRESET_AMOUNT,
        Capability.PRICE_WITH_AUTHORISE,
        Capability.TOTALS,
        Capability.DEVICE_TRANSACTION_NUMBERS,
        Capability.TRANSACTION_REPORT,
        Capability.SUSPEND,
        Capability.EVENTS_ONLY_WHEN_ASKED,
        Capability.EMERGENCY_STOP_ALL,  # one request, a PumpEmergencyStop packet per pump
    }
)


class JsonPtsDriver:
    """A :class:`forecourt.protocols.driver.PumpDriver` for one PTS-2 controller.

    The controller is request/response over HTTP: every pull method is one exchange, and the
    driver yields events for what those exchanges showed (a pump's state changed, a reply it
    could not read, the controller answering again or not)."""

    capabilities = CAPABILITIES

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        timezone: str,
        volume_decimals: int = 2,
        amount_decimals: int = 2,
        price_decimals: int = 2,
        currency: str = "CNY",
        timeout: float = 5.0,
        max_packets_per_post: int = 32,
        totals_timeout: float = 5.0,
        auth_scheme: str = "auto",
        boot_marker_resolution_s: int = 60,
        transport: httpx.AsyncBaseTransport | None = None,
        name: str = "pts",
    ) -> None:
        try:
            self.tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidValue(f"unknown IANA time zone {timezone!r}") from None
        if max_packets_per_post < 1:
            raise InvalidValue("max_packets_per_post must be positive")
        if auth_scheme not in _AUTH_SCHEMES:
            raise InvalidValue(f"auth_scheme must be one of {sorted(_AUTH_SCHEMES)}")
        if boot_marker_resolution_s < 1:
            raise InvalidValue("boot_marker_resolution_s must be positive")
        self.base_url = base_url.rstrip("/")
        self._known_id: str | None = None  # the controller's own identifier, once read
        self.configured_format = NumberFormat(
            volume_decimals, amount_decimals, price_decimals, currency
        )
        self.fmt = self.configured_format
        self._username = username
        self._password = password
        self._auth_scheme = auth_scheme
        self._auth: httpx.Auth = (
            httpx.DigestAuth(username, password)
            if auth_scheme == "digest"
            else httpx.BasicAuth(username, password)
        )
        self._switched_to_digest = auth_scheme == "digest"
        self._timeout = timeout
        self._max_packets = max_packets_per_post
        self._totals_timeout = totals_timeout
        self._boot_resolution_s = boot_marker_resolution_s
        self._last_boot: _BootReading | None = None
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._ids = itertools.count(1)
        self.name = name
        self._sink: EventSink = ignore_event
        self._health = DeviceHealth(name, DeviceHealthState.OFFLINE, reason="not polled yet")
        self._timeouts = 0
        self._refused = 0
        self._last_status: dict[int, PumpStatus] = {}

    # ----------------------------------------------------------------- v2: events, health

    def subscribe(self, sink: EventSink) -> None:
        self._sink = sink

    def health(self) -> DeviceHealth:
        return self._health

    def _set_health(self, state: DeviceHealthState, reason: str | None = None) -> None:
        if self._health.state is state and self._health.reason == reason:
            return
        self._health = DeviceHealth(
            self.name,
            state,
            since=datetime.now(UTC),
            reason=reason,
            frames_refused=self._refused,
            timeouts=self._timeouts,
        )
        self._sink(HealthChanged(self.name, self._health))

    def _refuse(self, reason: str, detail: str) -> None:
        self._refused += 1
        self._sink(FrameRefused(self.name, reason=reason, detail=detail))

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self._timeout,
                transport=self._transport,
                headers={"Content-Type": "application/json; charset=utf-8"},
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> JsonPtsDriver:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- transport

    def _next_id(self) -> int:
        # Ids stay in the positive 31-bit range that the device's JSON parser surely handles.
        return (next(self._ids) - 1) % 2_147_483_647 + 1

    async def _exchange(
        self, requests: Sequence[tuple[str, dict[str, Any] | None]]
    ) -> list[Packet]:
        """Send packets; every one must be answered (else :class:`DriverUnavailable`)."""
        replies = []
        for reply in await self._exchange_each(requests):
            if isinstance(reply, _BadReply):
                raise DriverUnavailable(
                    f"unreadable jsonPTS reply: {reply.reason}", code="jsonpts.malformed_reply"
                )
            replies.append(reply)
        return replies

    async def _exchange_each(
        self, requests: Sequence[tuple[str, dict[str, Any] | None]]
    ) -> list[Packet | _BadReply]:
        """Send packets (chunked); each reply, or why that one request got no usable reply."""
        replies: list[Packet | _BadReply] = []
        for _, outcome in await self._post_chunks(requests):
            if isinstance(outcome, Exception):
                raise outcome
            replies.extend(outcome)
        return replies

    async def _post_chunks(
        self,
        requests: Sequence[tuple[str, dict[str, Any] | None]],
        *,
        side_by_side: bool = False,
    ) -> list[tuple[slice, _ChunkOutcome]]:
        """Send packets in as few POSTs as the controller takes; for each POST sent, the
        requests it carried (a slice of ``requests``) and its replies, or the
        :class:`DriverUnavailable` or :class:`DeviceRejected` it failed with.

        One POST after the other, stopping at the first that fails; or (``side_by_side``)
        all at once, each sent whatever the others meet."""
        chunks = [
            slice(start, start + self._max_packets)
            for start in range(0, len(requests), self._max_packets)
        ]
        done: list[tuple[slice, _ChunkOutcome]] = []
        if not side_by_side:
            for chunk in chunks:
                try:
                    done.append((chunk, await self._post(requests[chunk])))
                except (DriverUnavailable, DeviceRejected) as exc:
                    done.append((chunk, exc))
                    break
            return done
        outcomes = await asyncio.gather(
            *(self._post(requests[chunk]) for chunk in chunks), return_exceptions=True
        )
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            # A cancellation, or any error but a failed POST, is raised.
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, (DriverUnavailable, DeviceRejected)
            ):
                raise outcome
            done.append((chunk, outcome))
        return done

    async def _send(self, body: bytes) -> httpx.Response:
        client = self._client
        if client is None:
            raise DriverUnavailable("jsonPTS driver is not open", code="jsonpts.not_open")
        try:
            response = await client.post("/jsonPTS", content=body, auth=self._auth)
            if (
                response.status_code == 401
                and self._auth_scheme == "auto"
                and not self._switched_to_digest
                and _offers_digest(response)
            ):
                logger.info("jsonPTS controller at %s wants Digest auth; switching", self.base_url)
                self._auth = httpx.DigestAuth(self._username, self._password)
                self._switched_to_digest = True
                response = await client.post("/jsonPTS", content=body, auth=self._auth)
        except httpx.TimeoutException as exc:
            self._timeouts += 1
            self._set_health(DeviceHealthState.OFFLINE, "timeout")
            raise DriverUnavailable(
                f"jsonPTS controller at {self.base_url} timed out: {exc!r}", code="jsonpts.timeout"
            ) from exc
        except httpx.HTTPError as exc:
            self._set_health(DeviceHealthState.OFFLINE, "unreachable")
            raise DriverUnavailable(
                f"jsonPTS controller at {self.base_url} unreachable: {exc!r}"
            ) from exc
        self._set_health(DeviceHealthState.ONLINE)
        return response

    async def _post(
        self, requests: Sequence[tuple[str, dict[str, Any] | None]]
    ) -> list[Packet | _BadReply]:
        packets = [Packet(self._next_id(), kind, data) for kind, data in requests]
        response = await self._send(encode_envelope(packets))
        status = response.status_code
        if status in (401, 403):
            raise DriverUnavailable(
                f"jsonPTS controller refused our credentials (HTTP {status})",
                code="jsonpts.auth_failed",
                http_status=status,
            )
        if status >= 500:
            raise DriverUnavailable(
                f"jsonPTS controller failed (HTTP {status})", http_status=status
            )
        if status != 200:
            raise DeviceRejected(
                f"jsonPTS controller rejected the request (HTTP {status}): {response.text[:200]}",
                http_status=status,
            )
        try:
            items = parse_envelope(response.content)
        except JsonPtsMalformed as exc:
            raise DriverUnavailable(
                f"unreadable jsonPTS reply: {exc.message}", code="jsonpts.malformed_reply"
            ) from exc
        # Each packet on its own: one broken reply must not hide its siblings.
        by_id: dict[int, Packet | _BadReply] = {}
        for item in items:
            try:
                packet = parse_packet(item)
            except JsonPtsMalformed as exc:
                self._refuse("malformed_packet", exc.message)
                by_id.setdefault(raw_packet_id(item), _BadReply(exc.message))
                continue
            by_id[packet.id] = packet
        answered = [by_id.get(p.id, _BadReply(f"no reply to packet {p.id}")) for p in packets]
        if packets and all(isinstance(a, _BadReply) for a in answered):
            reasons = "; ".join(sorted({a.reason for a in answered if isinstance(a, _BadReply)}))
            raise DriverUnavailable(
                f"jsonPTS reply answers none of our packets: {reasons}",
                code="jsonpts.malformed_reply",
            )
        return answered

    async def _command(self, kind: str, data: dict[str, Any]) -> Packet:
        (reply,) = await self._exchange([(kind, data)])
        _raise_if_error(reply)
        return reply

    # ----------------------------------------------------------------- identity

    async def identity(self) -> DeviceIdentity:
        try:
            replies = await self._exchange_each([(kind, None) for kind in _IDENTITY_REQUESTS])
        except DeviceRejected as exc:
            # A controller that refuses the whole POST (HTTP 4xx) does not know these requests.
            logger.warning("controller refused the identity requests: %s", exc.message)
            return DeviceIdentity(device_id=self._known_id or self.base_url)
        by_type = dict(zip(_IDENTITY_REQUESTS, replies, strict=True))
        device_id = self._unique_identifier(by_type["GetUniqueIdentifier"])
        if device_id is None:
            # One unreadable answer does not make the controller another device: keep the
            # identifier it gave before (the URL only for one that never gave any).
            device_id = self._known_id or self.base_url
        else:
            self._known_id = device_id
        firmware = self._firmware(by_type["GetFirmwareInformation"])
        boot = self._boot_marker(by_type["GetSystemOperationInformation"], by_type["GetDateTime"])
        self._adopt_decimals(by_type["GetSystemDecimalDigits"])
        return DeviceIdentity(device_id=device_id, boot_marker=boot, firmware=firmware)

    def _identity_data(self, reply: Packet | _BadReply, expected: str) -> dict[str, Any] | None:
        """The Data of an identity reply, or None (logged) when the controller can't give it."""
        if isinstance(reply, _BadReply):
            logger.warning("controller's %s reply is unreadable: %s", expected, reply.reason)
            return None
        if reply.error:
            unknown = reply.code == PtsErrorCode.JSONPTS_ERROR_NOT_FOUND
            logger.log(
                logging.INFO if unknown else logging.WARNING,
                "controller refused the request for %s: code %s %s",
                expected,
                reply.code,
                reply.message,
            )
            return None
        if reply.type != expected or not isinstance(reply.data, dict):
            logger.warning("controller answered %s instead of %s", reply.type, expected)
            return None
        return reply.data

    def _unique_identifier(self, reply: Packet | _BadReply) -> str | None:
        data = self._identity_data(reply, "UniqueIdentifier")
        if data is None:
            return None
        value = data.get("Id")
        # The SDK reads an integer; accept text too, as some firmwares may write it so.
        if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
            logger.warning("controller's UniqueIdentifier has no usable Id: %r", value)
            return None
        return str(value)

    def _firmware(self, reply: Packet | _BadReply) -> str | None:
        data = self._identity_data(reply, "FirmwareInformation")
        if data is None:
            return None
        released = data.get("DateTime")
        version = data.get("Version")
        parts = [str(v) for v in (version, released) if isinstance(v, str) and v]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else f"{parts[0]} ({parts[1]})"

    def _boot_marker(self, info: Packet | _BadReply, clock: Packet | _BadReply) -> str | None:
        operation = self._identity_data(info, "SystemOperationInformation")
        device_time = self._identity_data(clock, "DateTime")
        if operation is None or device_time is None:
            return None
        try:
            uptime_ms = get_int(operation, "SystemUpTime")
            now = get_local_datetime(device_time, "DateTime", self.tz)
        except JsonPtsMalformed as exc:
            logger.warning("controller's uptime or clock is unreadable: %s", exc.message)
            return None
        if uptime_ms < 0:
            logger.warning("controller reports a negative uptime %d ms", uptime_ms)
            return None
        last = self._last_boot
        if last is not None and uptime_ms >= last.uptime_ms:
            # Same life of the controller (its clock may have been set meanwhile).
            self._last_boot = _BootReading(uptime_ms, last.marker)
            return last.marker
        booted = (now - timedelta(milliseconds=uptime_ms)).astimezone(UTC)
        step = self._boot_resolution_s
        floored = datetime.fromtimestamp(booted.timestamp() // step * step, UTC)
        marker = floored.isoformat()
        if last is not None and marker == last.marker:
            # The uptime fell: a restart within one resolution step still gets a new marker.
            marker = booted.replace(microsecond=0).isoformat()
            if marker == last.marker:
                marker = f"{marker}+{uptime_ms}ms"
            logger.info("controller restarted (uptime fell to %d ms)", uptime_ms)
        self._last_boot = _BootReading(uptime_ms, marker)
        return marker

    def _adopt_decimals(self, reply: Packet | _BadReply) -> None:
        data = self._identity_data(reply, "SystemDecimalDigits")
        if data is None:
            return
        configured = self.configured_format
        try:
            reported = NumberFormat(
                volume_decimals=get_int(data, "Volume"),
                amount_decimals=get_int(data, "Amount"),
                price_decimals=get_int(data, "Price"),
                currency=configured.currency,
                volume_total_decimals=get_optional_int(data, "VolumeTotal"),
                amount_total_decimals=get_optional_int(data, "AmountTotal"),
            )
        except ForecourtError as exc:
            logger.error(
                "controller reports decimals we cannot use (%s); keeping the configured ones",
                exc.message,
            )
            return
        if _decimals(reported) != _decimals(self.fmt):
            log = logger.warning if _decimals(reported) != _decimals(configured) else logger.info
            log(
                "controller decimals volume=%d amount=%d price=%d (totals %d/%d) differ from "
                "configured volume=%d amount=%d price=%d; using the controller's",
                reported.volume_decimals,
                reported.amount_decimals,
                reported.price_decimals,
                reported.total_volume_decimals,
                reported.total_amount_decimals,
                configured.volume_decimals,
                configured.amount_decimals,
                configured.price_decimals,
            )
        self.fmt = reported

    # ----------------------------------------------------------------- status

    async def pump_status(self, pumps: Sequence[int]) -> list[PumpStatus]:
        replies = await self._status_replies(pumps)
        statuses = [
            self._status_or_error(pump, reply) for pump, reply in zip(pumps, replies, strict=True)
        ]
        for status in statuses:
            if self._last_status.get(status.pump) != status:
                self._last_status[status.pump] = status
                self._sink(PumpStatusChanged(self.name, status))
        return statuses

    async def _status_replies(self, pumps: Sequence[int]) -> list[Packet | _BadReply]:
        """PumpGetStatus for every pump, in as few POSTs as allowed."""
        replies = await self._exchange_each([("PumpGetStatus", {"Pump": p}) for p in pumps])
        again = [
            i
            for i, reply in enumerate(replies)
            if isinstance(reply, Packet) and not reply.error and reply.type in _ONE_SHOT_TYPES
        ]
        if again:
            retried = await self._exchange_each(
                [("PumpGetStatus", {"Pump": pumps[i]}) for i in again]
            )
            for index, reply in zip(again, retried, strict=True):
                replies[index] = reply
        return replies

    def _status_or_error(self, pump: int, reply: Packet | _BadReply) -> PumpStatus:
        if isinstance(reply, _BadReply):
            reason = f"unreadable status reply: {reply.reason}"
        elif reply.error:
            reason = f"controller refused the status: code {reply.code} {reply.message or ''}"
        else:
            try:
                return self._status(pump, reply)
            except JsonPtsMalformed as exc:
                reason = f"malformed {reply.type}: {exc.message}"
        logger.warning("pump %d: %s", pump, reason)
        return PumpStatus(pump=pump, state=PumpState.ERROR, error=reason.strip())

    def _status(self, pump: int, reply: Packet) -> PumpStatus:
        if reply.type not in _STATUS_TYPES:
            raise JsonPtsMalformed(f"unexpected status reply type {reply.type!r}")
        data = reply.data_object()
        reported = get_optional_int(data, "Pump")
        if reported is not None and reported != pump:
            raise JsonPtsMalformed(f"asked for pump {pump}, the reply is about pump {reported}")
        if reply.type == "PumpOfflineStatus":
            return PumpStatus(pump=pump, state=PumpState.OFFLINE)
        blocked = get_bool(data, "EmergencyStop", default=False)
        if reply.type == "PumpIdleStatus":
            nozzle_up = get_optional_int(data, "NozzleUp", 0) or 0
            if blocked:
                return PumpStatus(pump=pump, state=PumpState.STOPPED, nozzle=nozzle_up or None)
            if nozzle_up > 0:
                return PumpStatus(pump=pump, state=PumpState.CALLING, nozzle=nozzle_up)
            return PumpStatus(pump=pump, state=PumpState.IDLE)
        nozzle = get_optional_int(data, "Nozzle", 0) or None
        transaction = get_optional_int(data, "Transaction", 0) or None
        if reply.type == "PumpEndOfTransactionStatus":
            # Finished: read leniently, like the transaction it describes (never refused).
            return PumpStatus(
                pump=pump,
                state=PumpState.END_OF_TRANSACTION,
                nozzle=nozzle,
                volume_ml=self.fmt.get_lenient(data, "Volume", Quantity.VOLUME).units,
                amount_minor=self.fmt.get_lenient(data, "Amount", Quantity.AMOUNT).units,
                unit_price_mmu=self.fmt.get_lenient(data, "Price", Quantity.PRICE).units,
                transaction=transaction,
            )
        volume = self.fmt.get(data, "Volume", Quantity.VOLUME)
        if blocked or get_bool(data, "IsStopped", default=False):
            state = PumpState.STOPPED
        elif get_bool(data, "IsSuspended", default=False):
            state = PumpState.SUSPENDED
        elif volume == 0:
            state = PumpState.AUTHORISED
        else:
            state = PumpState.FUELLING
        return PumpStatus(
            pump=pump,
            state=state,
            nozzle=nozzle,
            volume_ml=volume,
            amount_minor=self.fmt.get(data, "Amount", Quantity.AMOUNT),
            unit_price_mmu=self.fmt.get(data, "Price", Quantity.PRICE),
            transaction=transaction,
        )

    # ----------------------------------------------------------------- commands

    async def authorize(
        self, pump: int, nozzle: int | None, preset: Preset, unit_price_mmu: int
    ) -> int | None:
        data: dict[str, Any] = {"Pump": pump}
        if nozzle is not None:
            data["Nozzle"] = nozzle
        data["Type"] = _PRESET_WIRE_TYPE[preset.type]
        if preset.type is PresetType.VOLUME:
            if preset.volume_ml is None or preset.volume_ml <= 0:
                raise InvalidValue("a volume preset needs a positive volume_ml")
            data["Dose"] = self.fmt.ml_to_volume(preset.volume_ml)
        elif preset.type is PresetType.AMOUNT:
            if preset.amount_minor is None or preset.amount_minor <= 0:
                raise InvalidValue("an amount preset needs a positive amount_minor")
            data["Dose"] = self.fmt.minor_to_amount(preset.amount_minor)
        data["Price"] = self.fmt.mmu_to_price(unit_price_mmu)
        reply = await self._command("PumpAuthorize", data)
        if reply.type != "PumpAuthorizeConfirmation" or not isinstance(reply.data, dict):
            return None
        try:
            confirmed = get_optional_int(reply.data, "Transaction")
        except JsonPtsMalformed as exc:
            # The authorisation stands; only its number is unreadable: the status will show it.
            logger.warning("pump %d: unreadable authorisation confirmation: %s", pump, exc.message)
            return None
        return confirmed if confirmed else None

    async def stop(self, pump: int) -> None:
        await self._command("PumpStop", {"Pump": pump})

    async def emergency_stop(self, pump: int) -> None:
        await self._command("PumpEmergencyStop", {"Pump": pump})

    async def emergency_stop_all(self, pumps: Sequence[int]) -> dict[int, Exception]:
        """Every pump in one request (a ``PumpEmergencyStop`` packet each, in as few POSTs as
        the controller takes packets); the pumps whose packet was refused or not answered."""
        # Every chunk is sent, side by side: one POST that fails must not leave the pumps of
        # the next ones running.
        outcomes = await self._post_chunks(
            [("PumpEmergencyStop", {"Pump": p}) for p in pumps], side_by_side=True
        )
        failed: dict[int, Exception] = {}
        replies: list[Packet | _BadReply] = []
        answered: list[int] = []
        for chunk, outcome in outcomes:
            if isinstance(outcome, Exception):
                failed.update(dict.fromkeys(pumps[chunk], outcome))
                continue
            answered.extend(pumps[chunk])
            replies.extend(outcome)
        if not answered and pumps:
            first = failed[pumps[0]]
            raise first  # no request got through: none is known to have stopped
        for pump, reply in zip(answered, replies, strict=True):
            if isinstance(reply, _BadReply):
                failed[pump] = DriverUnavailable(
                    f"unreadable jsonPTS reply: {reply.reason}", code="jsonpts.malformed_reply"
                )
                continue
            try:
                _raise_if_error(reply)
            except DeviceRejected as exc:
                failed[pump] = exc
        return failed

    async def suspend(self, pump: int) -> None:
        await self._command("PumpSuspend", {"Pump": pump})

    async def resume(self, pump: int) -> None:
        await self._command("PumpResume", {"Pump": pump})

    async def set_prices(self, pump: int, prices_mmu: Sequence[int]) -> None:
        prices = [self.fmt.mmu_to_price(price) for price in prices_mmu]
        await self._command("PumpSetPrices", {"Pump": pump, "Prices": prices})

    async def close_transaction(self, pump: int, transaction: int) -> None:
        await self._command("PumpCloseTransaction", {"Pump": pump, "Transaction": transaction})

    # ----------------------------------------------------------------- totals

    async def totals(self, pump: int, nozzle: int) -> NozzleTotals:
        with _reading():
            reply = await self._command("PumpGetTotals", {"Pump": pump, "Nozzle": nozzle})
            deadline = time.monotonic() + self._totals_timeout
            # A real PTS-2 may only confirm the request and hand PumpTotals out on a later
            # PumpGetStatus once it has read the dispenser [I]; the simulator answers at once.
            while not (reply.type == "PumpTotals" and self._totals_nozzle(reply) == nozzle):
                if time.monotonic() >= deadline:
                    raise DriverUnavailable(
                        f"pump {pump} nozzle {nozzle}: no PumpTotals within "
                        f"{self._totals_timeout} s",
                        code="jsonpts.timeout",
                    )
                await asyncio.sleep(0.2)
                (reply,) = await self._exchange([("PumpGetStatus", {"Pump": pump})])
                _raise_if_error(reply)
            data = reply.data_object()
            return NozzleTotals(
                pump=pump,
                nozzle=nozzle,
                volume_ml=self.fmt.get(data, "Volume", Quantity.TOTAL_VOLUME),
                amount_minor=self.fmt.get(data, "Amount", Quantity.TOTAL_AMOUNT),
            )

    @staticmethod
    def _totals_nozzle(reply: Packet) -> int | None:
        return get_optional_int(reply.data_object(), "Nozzle")

    # ----------------------------------------------------------------- transactions

    async def finished_transaction(self, pump: int) -> DeviceTransaction | None:
        (reply,) = await self._status_replies([pump])
        return self._finished(pump, reply)

    async def unacknowledged_transactions(self, pumps: Sequence[int]) -> list[DeviceTransaction]:
        replies = await self._status_replies(pumps)
        found = []
        for pump, reply in zip(pumps, replies, strict=True):
            # Can't vouch that a pump holds nothing if it could not say.
            transaction = self._finished(pump, reply)
            if transaction is not None:
                found.append(transaction)
        return found

    def _finished(self, pump: int, reply: Packet | _BadReply) -> DeviceTransaction | None:
        if isinstance(reply, _BadReply):
            raise DriverUnavailable(
                f"pump {pump}: unreadable status reply: {reply.reason}",
                code="jsonpts.malformed_reply",
            )
        _raise_if_error(reply)
        with _reading():
            if reply.type not in _STATUS_TYPES:
                raise JsonPtsMalformed(f"unexpected status reply type {reply.type!r}")
            if reply.type != "PumpEndOfTransactionStatus":
                return None
            data = reply.data_object()
            reported = get_optional_int(data, "Pump")
            if reported is not None and reported != pump:
                raise JsonPtsMalformed(f"asked for pump {pump}, the reply is about {reported}")
            return self._transaction(pump, data, closed=False)

    async def transactions(
        self, pump: int, start: datetime, end: datetime
    ) -> list[DeviceTransaction]:
        with _reading():
            report, status = await self._exchange(
                [
                    (
                        "ReportGetPumpTransactions",
                        {
                            "Pump": pump,
                            "DateTimeStart": format_local(start, self.tz),
                            "DateTimeEnd": format_local(end, self.tz),
                        },
                    ),
                    # Same POST, same instant: tells which reported transaction is still open
                    # (a pump holds at most one, its END_OF_TRANSACTION).
                    ("PumpGetStatus", {"Pump": pump}),
                ]
            )
            _raise_if_error(report)
            if not isinstance(report.data, list):
                raise JsonPtsMalformed("ReportPumpTransactions Data must be a list")
            open_transaction = None
            if not status.error and status.type == "PumpEndOfTransactionStatus":
                open_data = status.data_object()
                open_transaction = (get_int(open_data, "Transaction"), open_data.get("DateTime"))
            result = []
            for item in report.data:
                if not isinstance(item, dict):
                    raise JsonPtsMalformed("a report item must be an object")
                if get_int(item, "Pump") != pump:
                    continue
                # Numbers can repeat (a wrapped or reset counter): the end time tells them apart.
                key = (get_int(item, "Transaction"), item.get("DateTime"))
                result.append(self._transaction(pump, item, closed=key != open_transaction))
            return sorted(result, key=lambda t: (t.ended_at, t.transaction))

    def _transaction(
        self, pump: int, data: Mapping[str, Any], *, closed: bool
    ) -> DeviceTransaction:
        flags: set[str] = set()
        raw: list[tuple[str, str]] = []

        def read(name: str, quantity: Quantity) -> int:
            value = self.fmt.get_lenient(data, name, quantity)
            if not value.exact:
                flags.add(FLAG_INEXACT)
                raw.append((name, value.wire))
            elif value.extra_decimals:
                flags.add(FLAG_EXTRA_DECIMALS)
            return value.units

        volume = read("Volume", Quantity.VOLUME)
        amount = read("Amount", Quantity.AMOUNT)
        price = read("Price", Quantity.PRICE)
        total_after: int | None = None
        if get_optional_number(data, "TotalVolume") is None:
            flags.add(FLAG_NO_TOTALIZER)
        else:
            total_after = read("TotalVolume", Quantity.TOTAL_VOLUME)
        grade = get_optional_int(data, "FuelGradeId")
        return DeviceTransaction(
            pump=pump,
            nozzle=get_int(data, "Nozzle"),
            transaction=get_int(data, "Transaction"),
            volume_ml=volume,
            amount_minor=amount,
            unit_price_mmu=price,
            totalizer_start_ml=None,  # never derived: the edge reads the start totals itself
            totalizer_end_ml=total_after,
            started_at=get_optional_local_datetime(data, "DateTimeStart", self.tz),
            ended_at=get_local_datetime(data, "DateTime", self.tz),
            grade_code=str(grade) if grade is not None else None,
            closed=closed,
            flags=tuple(sorted(flags)),
            raw=tuple(raw),
        )


def _decimals(fmt: NumberFormat) -> tuple[int, ...]:
    """The effective decimals of a format (an explicit total equal to its default is equal)."""
    return (
        fmt.volume_decimals,
        fmt.amount_decimals,
        fmt.price_decimals,
        fmt.total_volume_decimals,
        fmt.total_amount_decimals,
    )


def _offers_digest(response: httpx.Response) -> bool:
    return any(
        value.strip().lower().startswith("digest")
        for value in response.headers.get_list("www-authenticate")
    )


def _raise_if_error(reply: Packet) -> None:
    if reply.error:
        raise DeviceRejected(
            f"controller refused {reply.type}: {reply.message or 'no message'} (code {reply.code})",
            device_code=reply.code,
            device_message=reply.message,
            packet_type=reply.type,
        )


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A reply we cannot read is the transport's fault from the edge's point of view."""
    try:
        yield
    except JsonPtsMalformed as exc:
        raise DriverUnavailable(
            f"unreadable jsonPTS reply: {exc.message}", code="jsonpts.malformed_reply"
        ) from exc


def create(config: DeviceConfig, context: DriverContext) -> PumpDriver:
    """A jsonPTS driver from a station's device line (``protocol = "jsonpts"``).

    ``transport`` is the controller's base URL (``http://HOST:PORT``); options ``user``,
    ``password``, ``auth`` (auto|basic|digest), ``volume_decimals``, ``amount_decimals``,
    ``price_decimals``, ``timeout_s``. The controller's pump numbers are the station's unless
    ``pumps`` maps them (see :class:`forecourt.protocols.renumber.RenumberedPumps`)."""
    password = config.option("password")
    if not password:
        raise InvalidValue(
            f"device {config.name!r}: the jsonPTS controller password is not set",
            hint="set options.password (the controller's own credential)",
        )
    driver = JsonPtsDriver(
        config.transport,
        str(config.option("user", "admin")),
        str(password),
        timezone=context.timezone,
        currency=context.currency,
        volume_decimals=int(config.option("volume_decimals", 2)),
        amount_decimals=int(config.option("amount_decimals", 2)),
        price_decimals=int(config.option("price_decimals", 2)),
        timeout=float(config.option("timeout_s", 5.0)),
        auth_scheme=str(config.option("auth", "auto")),
        name=config.name,
    )
    return renumbered(driver, config.pumps)


async def poll_once(endpoint: str, options: Mapping[str, str]) -> dict[str, Any]:
    """Ask one PTS-2 controller who it is and how its pumps are, once (``device poll``).

    ``options``: ``user``, ``password`` (required), ``pumps`` (``1-8`` or ``1,3,5``; default
    1-8), ``timezone`` (default UTC), ``auth``."""
    password = options.get("password")
    if not password:
        raise InvalidValue("the controller's password is needed", hint="--option password=SECRET")
    pumps = _pump_list(options.get("pumps", "1-8"))
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    async with JsonPtsDriver(
        url,
        options.get("user", "admin"),
        password,
        timezone=options.get("timezone", "UTC"),
        auth_scheme=options.get("auth", "auto"),
        timeout=float(options.get("timeout_s", 5.0)),
    ) as driver:
        identity = await driver.identity()
        statuses = await driver.pump_status(pumps)
    return {
        "protocol": "jsonpts",
        "endpoint": url,
        "identity": {
            "device_id": identity.device_id,
            "boot_marker": identity.boot_marker,
            "firmware": identity.firmware,
        },
        "pumps": [
            {
                "pump": s.pump,
                "state": s.state.value,
                "nozzle": s.nozzle,
                "volume_ml": s.volume_ml,
                "amount_minor": s.amount_minor,
                "unit_price_mmu": s.unit_price_mmu,
                "transaction": s.transaction,
                "error": s.error,
            }
            for s in statuses
        ],
    }


def _pump_list(text: str) -> list[int]:
    """``1-8`` or ``1,3,5`` (or a mix) as a list of pump numbers."""
    pumps: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                pumps.extend(range(first, last + 1))
            elif part.strip():
                pumps.append(int(part))
    except ValueError:
        raise InvalidValue(f"not a list of pumps: {text!r}", hint="pumps=1-8 or 1,3,5") from None
    if not pumps or any(p < 1 or p > 99 for p in pumps):
        raise InvalidValue(f"pumps must be 1-99: {text!r}", hint="pumps=1-8 or 1,3,5")
    return pumps
