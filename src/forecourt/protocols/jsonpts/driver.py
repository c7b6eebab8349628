"""The jsonPTS driver: a Technotrade PTS-2 controller behind :class:`ForecourtDriver`.

One ``httpx.AsyncClient`` talks to ``POST {base_url}/jsonPTS`` with HTTP Basic auth. Several
packets travel in one POST where that saves round trips (status of many pumps; a report plus the
pump's status). Replies are matched to requests by ``Id``, not by position.

Mapping to the standard model (edge.drivers):

- ``PumpIdleStatus``: ``NozzleUp`` > 0 -> CALLING (that nozzle), else IDLE.
- ``PumpFillingStatus``: ``IsStopped`` -> STOPPED [inferred field, see the simulator];
  ``IsSuspended`` -> SUSPENDED; ``Volume`` 0 -> AUTHORISED; else FUELLING.
- ``PumpEndOfTransactionStatus`` -> END_OF_TRANSACTION; ``PumpOfflineStatus`` -> OFFLINE.
- an error packet in a status poll -> ERROR for that pump (the others are still reported).
- ``DeviceTransaction.totalizer_start_ml`` = ``TotalVolume`` - ``Volume`` (the device reports
  the nozzle's totalizer after the transaction).

Errors: transport faults, timeouts, HTTP 5xx, 401/403 and unreadable replies raise
:class:`DriverUnavailable`; an error packet raises :class:`DeviceRejected` whose ``details``
carry ``device_code`` (the device's own ``Code``) and ``packet_type``.

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
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from forecourt.edge.drivers import (
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    NozzleTotals,
    Preset,
    PresetType,
    PumpState,
    PumpStatus,
)
from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.jsonpts.codec import (
    JsonPtsMalformed,
    NumberFormat,
    Packet,
    decode_envelope,
    encode_envelope,
    format_local,
    get_bool,
    get_int,
    get_local_datetime,
    get_optional_int,
    get_optional_local_datetime,
)

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


class JsonPtsDriver:
    """A :class:`forecourt.edge.drivers.ForecourtDriver` for one PTS-2 controller."""

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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        try:
            self.tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidValue(f"unknown IANA time zone {timezone!r}") from None
        if max_packets_per_post < 1:
            raise InvalidValue("max_packets_per_post must be positive")
        self.base_url = base_url.rstrip("/")
        self.fmt = NumberFormat(volume_decimals, amount_decimals, price_decimals, currency)
        self._auth = httpx.BasicAuth(username, password)
        self._timeout = timeout
        self._max_packets = max_packets_per_post
        self._totals_timeout = totals_timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._ids = itertools.count(1)

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                auth=self._auth,
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

    async def _exchange(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[Packet]:
        """Send packets (chunked), return the replies in request order, matched by Id."""
        replies: list[Packet] = []
        for start in range(0, len(requests), self._max_packets):
            replies.extend(await self._post(requests[start : start + self._max_packets]))
        return replies

    async def _post(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[Packet]:
        client = self._client
        if client is None:
            raise DriverUnavailable("jsonPTS driver is not open", code="jsonpts.not_open")
        packets = [Packet(self._next_id(), kind, data) for kind, data in requests]
        try:
            response = await client.post("/jsonPTS", content=encode_envelope(packets))
        except httpx.TimeoutException as exc:
            raise DriverUnavailable(
                f"jsonPTS controller at {self.base_url} timed out: {exc!r}", code="jsonpts.timeout"
            ) from exc
        except httpx.HTTPError as exc:
            raise DriverUnavailable(
                f"jsonPTS controller at {self.base_url} unreachable: {exc!r}"
            ) from exc
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
            received = decode_envelope(response.content)
        except JsonPtsMalformed as exc:
            raise DriverUnavailable(
                f"unreadable jsonPTS reply: {exc.message}", code="jsonpts.malformed_reply"
            ) from exc
        by_id = {packet.id: packet for packet in received}
        missing = [packet.id for packet in packets if packet.id not in by_id]
        if missing:
            raise DriverUnavailable(
                f"jsonPTS reply lacks packets {missing}", code="jsonpts.malformed_reply"
            )
        return [by_id[packet.id] for packet in packets]

    async def _command(self, kind: str, data: dict[str, Any]) -> Packet:
        (reply,) = await self._exchange([(kind, data)])
        _raise_if_error(reply)
        return reply

    # ----------------------------------------------------------------- status

    async def pump_status(self, pumps: Sequence[int]) -> list[PumpStatus]:
        with _reading():
            replies = await self._status_replies(pumps)
            return [self._status(pump, reply) for pump, reply in zip(pumps, replies, strict=True)]

    async def _status_replies(self, pumps: Sequence[int]) -> list[Packet]:
        """PumpGetStatus for every pump, in as few POSTs as allowed."""
        replies = await self._exchange([("PumpGetStatus", {"Pump": p}) for p in pumps])
        again = [i for i, reply in enumerate(replies) if reply.type in _ONE_SHOT_TYPES]
        if again:
            retried = await self._exchange([("PumpGetStatus", {"Pump": pumps[i]}) for i in again])
            for index, reply in zip(again, retried, strict=True):
                replies[index] = reply
        return replies

    def _status(self, pump: int, reply: Packet) -> PumpStatus:
        if reply.error:
            logger.warning(
                "pump %d status refused by the controller: code %s %s",
                pump,
                reply.code,
                reply.message,
            )
            return PumpStatus(pump=pump, state=PumpState.ERROR)
        if reply.type not in _STATUS_TYPES:
            logger.warning("pump %d: unexpected status reply %s", pump, reply.type)
            return PumpStatus(pump=pump, state=PumpState.ERROR)
        data = reply.data_object()
        reported = get_optional_int(data, "Pump")
        if reported is not None and reported != pump:
            raise JsonPtsMalformed(f"asked for pump {pump}, the reply is about pump {reported}")
        if reply.type == "PumpOfflineStatus":
            return PumpStatus(pump=pump, state=PumpState.OFFLINE)
        if reply.type == "PumpIdleStatus":
            nozzle_up = get_optional_int(data, "NozzleUp", 0) or 0
            if nozzle_up > 0:
                return PumpStatus(pump=pump, state=PumpState.CALLING, nozzle=nozzle_up)
            return PumpStatus(pump=pump, state=PumpState.IDLE)
        volume = self.fmt.get_volume_ml(data, "Volume")
        if reply.type == "PumpEndOfTransactionStatus":
            state = PumpState.END_OF_TRANSACTION
        elif get_bool(data, "IsStopped", default=False):
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
            nozzle=get_optional_int(data, "Nozzle", 0) or None,
            volume_ml=volume,
            amount_minor=self.fmt.get_amount_minor(data, "Amount"),
            unit_price_mmu=self.fmt.get_price_mmu(data, "Price"),
            transaction=get_optional_int(data, "Transaction", 0) or None,
        )

    # ----------------------------------------------------------------- commands

    async def authorize(
        self, pump: int, nozzle: int | None, preset: Preset, unit_price_mmu: int
    ) -> None:
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
        await self._command("PumpAuthorize", data)

    async def stop(self, pump: int) -> None:
        await self._command("PumpStop", {"Pump": pump})

    async def emergency_stop(self, pump: int) -> None:
        await self._command("PumpEmergencyStop", {"Pump": pump})

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
                volume_ml=self.fmt.get_volume_ml(data, "Volume"),
                amount_minor=self.fmt.get_amount_minor(data, "Amount"),
            )

    @staticmethod
    def _totals_nozzle(reply: Packet) -> int | None:
        return get_optional_int(reply.data_object(), "Nozzle")

    # ----------------------------------------------------------------- transactions

    async def unacknowledged_transactions(self, pumps: Sequence[int]) -> list[DeviceTransaction]:
        with _reading():
            replies = await self._status_replies(pumps)
            found = []
            for pump, reply in zip(pumps, replies, strict=True):
                # Can't vouch that a pump holds nothing if it refused to say.
                _raise_if_error(reply)
                if reply.type == "PumpEndOfTransactionStatus":
                    found.append(self._transaction(pump, reply.data_object(), closed=False))
            return found

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
                open_transaction = get_int(status.data_object(), "Transaction")
            result = []
            for item in report.data:
                if not isinstance(item, dict):
                    raise JsonPtsMalformed("a report item must be an object")
                item_pump = get_int(item, "Pump")
                if item_pump != pump:
                    continue
                number = get_int(item, "Transaction")
                result.append(self._transaction(pump, item, closed=number != open_transaction))
            return sorted(result, key=lambda t: t.transaction)

    def _transaction(
        self, pump: int, data: Mapping[str, Any], *, closed: bool
    ) -> DeviceTransaction:
        volume = self.fmt.get_volume_ml(data, "Volume")
        total_after = self.fmt.get_volume_ml(data, "TotalVolume")
        grade = get_optional_int(data, "FuelGradeId")
        return DeviceTransaction(
            pump=pump,
            nozzle=get_int(data, "Nozzle"),
            transaction=get_int(data, "Transaction"),
            volume_ml=volume,
            amount_minor=self.fmt.get_amount_minor(data, "Amount"),
            unit_price_mmu=self.fmt.get_price_mmu(data, "Price"),
            totalizer_start_ml=total_after - volume,
            totalizer_end_ml=total_after,
            started_at=get_optional_local_datetime(data, "DateTimeStart", self.tz),
            ended_at=get_local_datetime(data, "DateTime", self.tz),
            grade_code=str(grade) if grade is not None else None,
            closed=closed,
        )


def _raise_if_error(reply: Packet) -> None:
    if reply.error:
        raise DeviceRejected(
            f"controller refused {reply.type}: {reply.message or 'no message'} (code {reply.code})",
            device_code=reply.code,
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
