"""HTTP routes of ``network``: read API for staff and the station snapshot for edges."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Security

from forecourt.infra.db import Database
from forecourt.infra.http import STATION_CREDENTIAL, bearer_token, error_responses
from forecourt.kernel.errors import Forbidden, Unauthorized
from forecourt.network.contracts import StationDirectory, StationSnapshot
from forecourt.network.domain import UnknownStation, effective_prices
from forecourt.network.handlers import build_snapshot
from forecourt.network.store import NetworkStore


def build_router(db: Database, directory: StationDirectory) -> APIRouter:
    router = APIRouter(tags=["network"])

    @router.get(
        "/v1/stations/{code}/snapshot",
        response_model=StationSnapshot,
        dependencies=[Security(STATION_CREDENTIAL)],
        responses=error_responses(401, 403, 404, 422),
    )
    async def station_snapshot(code: str, request: Request) -> StationSnapshot:
        """The versioned snapshot an edge node runs from (station credential required)."""
        identity = await directory.authenticate(bearer_token(request))
        if identity is None:
            raise Unauthorized("unknown station credential", code="auth.unknown_credential")
        if identity.code != code:
            raise Forbidden(
                f"credential is for {identity.code}, not {code}", code="auth.wrong_station"
            )
        return await build_snapshot(db, code, db.clock.now())

    @router.get("/v1/network/stations")
    async def list_stations() -> list[dict[str, Any]]:
        async with db.connection() as conn:
            store = NetworkStore(conn)
            out = []
            for code in await store.station_codes():
                st = await store.station(code)
                if st is None:
                    continue
                out.append(
                    {
                        "code": st.code,
                        "name": st.name,
                        "region": st.region,
                        "timezone": st.timezone,
                        "business_day_cutoff": st.business_day_cutoff.isoformat(),
                        "dispensers": len(st.dispensers),
                        "fuelling_points": sum(len(d.fuelling_points) for d in st.dispensers),
                    }
                )
            return out

    @router.get("/v1/network/stations/{code}", responses=error_responses(404, 422))
    async def get_station(code: str) -> dict[str, Any]:
        async with db.connection() as conn:
            store = NetworkStore(conn)
            st = await store.station(code)
            if st is None:
                raise UnknownStation(f"unknown station {code!r}")
            prices = effective_prices(
                await store.prices(), station=st.code, region=st.region, at=db.clock.now()
            )
        return {
            "code": st.code,
            "name": st.name,
            "region": st.region,
            "timezone": st.timezone,
            "business_day_cutoff": st.business_day_cutoff.isoformat(),
            "shift_starts": [t.isoformat() for t in st.shift_starts],
            "tanks": [t.__dict__ for t in st.tanks],
            "dispensers": [
                {
                    "number": d.number,
                    "model": d.model,
                    "fuelling_points": [
                        {"number": fp.number, "nozzles": [n.__dict__ for n in fp.nozzles]}
                        for fp in d.fuelling_points
                    ],
                }
                for d in st.dispensers
            ],
            "prices_now": {
                g: {
                    "milli_minor_per_litre": p.milli_minor_per_litre,
                    "currency": p.currency,
                    "effective_from": p.effective_from.isoformat(),
                    "scope": p.scope.value,
                }
                for g, p in sorted(prices.items())
            },
        }

    @router.get("/v1/network/grades")
    async def list_grades() -> list[dict[str, str]]:
        async with db.connection() as conn:
            return [g.__dict__ for g in await NetworkStore(conn).grades()]

    @router.get("/v1/network/prices")
    async def list_prices() -> list[dict[str, Any]]:
        async with db.connection() as conn:
            prices = await NetworkStore(conn).prices()
        return [
            {
                "price_id": p.price_id,
                "grade": p.grade,
                "scope": p.scope.value,
                "scope_code": p.scope_code,
                "milli_minor_per_litre": p.milli_minor_per_litre,
                "currency": p.currency,
                "effective_from": p.effective_from.isoformat(),
            }
            for p in prices
        ]

    return router
