"""HTTP routes of ``devices``: live pump, tank and device-line state per station, with
history and alarms (``/v1/devices/...``; read API, like the other HQ queries)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BeforeValidator

from forecourt.devices.contracts import (
    PumpDevices,
    StationAlarms,
    StationDevices,
    StationSummary,
    TankDevices,
)
from forecourt.devices.handlers import DevicesService
from forecourt.infra.access import require
from forecourt.infra.http import error_responses
from forecourt.kernel.access import Permission, Policy

_DECIMAL = re.compile(r"[0-9]{1,9}")


def _query_int(value: Any) -> Any:
    """Decimal digits only (not ``1.0``, ``1_000``, `` 1``)."""
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise ValueError("an integer is written in decimal digits")
        return int(value)
    return value


StrictInt = Annotated[int, BeforeValidator(_query_int)]
# A station code as it can appear in a telemetry topic.
StationCode = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.\-:]{1,64}$")]
PumpNumber = Annotated[StrictInt, Path(ge=1, le=9999)]
TankNumber = Annotated[StrictInt, Path(ge=1, le=9999)]
Limit = Annotated[StrictInt, Query(ge=1, le=1000, description="history entries, newest first")]


# Every station's devices: chain-wide; one station's: where the reader holds devices:read.
READ_CHAIN = Policy(Permission.DEVICES_READ)
READ_STATION = Policy(Permission.DEVICES_READ, station="path:station")
ERRORS = error_responses(401, 403, 422, 429)


def build_router(service: DevicesService) -> APIRouter:
    router = APIRouter(tags=["devices"])

    @router.get(
        "/v1/devices/stations",
        response_model=list[StationSummary],
        dependencies=[require(READ_CHAIN)],
        responses=ERRORS,
    )
    async def list_stations() -> list[StationSummary]:
        """Every station that sent telemetry: its link, staleness and active alarms."""
        return await service.list_stations()

    @router.get(
        "/v1/devices/stations/{station}",
        response_model=StationDevices,
        dependencies=[require(READ_STATION)],
        responses={**ERRORS, **error_responses(404)},
    )
    async def station(station: StationCode) -> StationDevices:
        """A station's link, pumps, tanks, device lines, active alarms and discards."""
        return await service.station(station)

    @router.get(
        "/v1/devices/stations/{station}/pumps/{pump}",
        response_model=PumpDevices,
        dependencies=[require(READ_STATION)],
        responses={**ERRORS, **error_responses(404)},
    )
    async def pump(station: StationCode, pump: PumpNumber, limit: Limit = 100) -> PumpDevices:
        """A pump's (fuelling point's) current state and its history, newest first."""
        return await service.pump(station, pump, limit)

    @router.get(
        "/v1/devices/stations/{station}/tanks/{tank}",
        response_model=TankDevices,
        dependencies=[require(READ_STATION)],
        responses={**ERRORS, **error_responses(404)},
    )
    async def tank(station: StationCode, tank: TankNumber, limit: Limit = 100) -> TankDevices:
        """A tank's last measurement and its history, newest first."""
        return await service.tank(station, tank, limit)

    @router.get(
        "/v1/devices/stations/{station}/alarms",
        response_model=StationAlarms,
        dependencies=[require(READ_STATION)],
        responses={**ERRORS, **error_responses(404)},
    )
    async def alarms(station: StationCode, limit: Limit = 100) -> StationAlarms:
        """A station's active alarms (the edge's and HQ's) and the recent transitions."""
        return await service.alarms(station, limit)

    return router
